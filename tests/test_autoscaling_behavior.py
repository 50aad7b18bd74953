"""Stabilization and rate limits: cases ported from kubernetes horizontal_test.go (facts carried over).

Upstream builds timestamps from ``time.Now()``; here ``NOW`` is a fixed clock reading and every record
is placed relative to it.
"""

from __future__ import annotations

import pytest

from capsim.policy.autoscaling import (
    Behavior,
    HorizontalPodAutoscaler,
    Recommendation,
    ScaleEvent,
    ScalingPolicy,
    ScalingRules,
    legacy_rate_limit,
    legacy_scale_up_limit,
    legacy_stabilize,
    rate_limit,
    scale_down_limit,
    scale_up_limit,
    stabilize,
)

NOW = 10_000.0
MIN = 60.0


def rules(pods: int, pods_period: int, percent: int, percent_period: int, window: int) -> ScalingRules:
    """Upstream's generateScalingRules: Max select, a Pods and/or a Percent policy."""
    policies = []
    if pods:
        policies.append(ScalingPolicy("Pods", pods, pods_period))
    if percent:
        policies.append(ScalingPolicy("Percent", percent, percent_period))
    return ScalingRules(stabilization_window_seconds=window, select_policy="Max", policies=tuple(policies))


def spread(changes: list[int], period_seconds: int) -> list[ScaleEvent]:
    """Upstream's generateEventsUniformDistribution: events centred in equal segments of the last period."""
    segment = period_seconds / len(changes)
    return [
        ScaleEvent(change, NOW - (period_seconds - segment * (i + 1) + segment / 2))
        for i, change in enumerate(changes)
    ]


# --- TestScalingWithRules (convertDesiredReplicasWithBehaviorRate)
SCALING_WITH_RULES = [
    # name, up events, down events, min, max, up rules, down rules, current, desired, expected, reason
    ("prenormalized desired replicas within range", [], [], 3, 8, None, None, 5, 7, 7, "DesiredWithinRange"),
    ("prenormalized desired replicas < minReplicas", [], [], 2, 8, None, None, 3, 1, 2, "TooFewReplicas"),
    (
        "prenormalized desired replicas within range when minReplicas is 0",
        [],
        [],
        0,
        10,
        None,
        None,
        1,
        0,
        0,
        "DesiredWithinRange",
    ),
    (
        "maxReplicas is the limit because maxReplicas < scaleUpLimit",
        [],
        [],
        1,
        10,
        None,
        None,
        20,
        1000,
        10,
        "TooManyReplicas",
    ),
    (
        "desired replica count is more than the maximum replica count",
        [],
        [],
        100,
        150,
        None,
        None,
        100,
        1000,
        150,
        "TooManyReplicas",
    ),
    (
        "scaleUpLimit is the limit because scaleUpLimit < maxReplicas with user policies",
        [],
        [],
        1,
        2000,
        rules(0, 0, 1, 60, 0),
        None,
        3,
        1000,
        4,
        "ScaleUpLimit",
    ),
    (
        "scaleDownLimit is the limit because scaleDownLimit > minReplicas with user defined policies",
        [],
        [],
        3,
        2000,
        None,
        rules(20, 60, 0, 0, 0),
        1000,
        3,
        980,
        "ScaleDownLimit",
    ),
    ("scaleUp with default behavior", [], [], 1, 1000, None, None, 10, 50, 20, "ScaleUpLimit"),
    (
        "scaleUp with pods policy larger than percent policy",
        [],
        [],
        1,
        1000,
        rules(100, 60, 100, 60, 0),
        None,
        10,
        500,
        110,
        "ScaleUpLimit",
    ),
    (
        "scaleUp with percent policy larger than pods policy",
        [],
        [],
        1,
        1000,
        rules(2, 60, 100, 60, 0),
        None,
        10,
        500,
        20,
        "ScaleUpLimit",
    ),
    (
        "scaleUp with spec MaxReplicas limitation with large pod policy",
        [],
        [],
        1,
        1000,
        rules(100, 60, 0, 0, 0),
        None,
        10,
        50,
        50,
        "DesiredWithinRange",
    ),
    (
        "scaleUp with spec MaxReplicas limitation with large percent policy",
        [],
        [],
        1,
        1000,
        rules(10000, 60, 0, 0, 0),
        None,
        10,
        50,
        50,
        "DesiredWithinRange",
    ),
    (
        "scaleUp with pod policy limitation",
        [],
        [],
        1,
        1000,
        rules(30, 60, 0, 0, 0),
        None,
        10,
        50,
        40,
        "ScaleUpLimit",
    ),
    (
        "scaleUp with percent policy limitation",
        [],
        [],
        1,
        1000,
        rules(0, 0, 200, 60, 0),
        None,
        10,
        50,
        30,
        "ScaleUpLimit",
    ),
    (
        "scaleDown with percent policy larger than pod policy",
        [],
        [],
        1,
        1000,
        None,
        rules(20, 60, 1, 60, 300),
        100,
        2,
        80,
        "ScaleDownLimit",
    ),
    (
        "scaleDown with pod policy larger than percent policy",
        [],
        [],
        1,
        1000,
        None,
        rules(2, 60, 1, 60, 300),
        100,
        2,
        98,
        "ScaleDownLimit",
    ),
    (
        "scaleDown with spec MinReplicas=nil limitation with large pod policy",
        [],
        [],
        1,
        1000,
        None,
        rules(100, 60, 0, 0, 300),
        10,
        0,
        1,
        "TooFewReplicas",
    ),
    (
        "scaleDown with spec MinReplicas limitation with large pod policy",
        [],
        [],
        1,
        1000,
        None,
        rules(100, 60, 0, 0, 300),
        10,
        0,
        1,
        "TooFewReplicas",
    ),
    (
        "scaleDown with spec MinReplicas limitation with large percent policy",
        [],
        [],
        5,
        1000,
        None,
        rules(0, 0, 100, 60, 300),
        10,
        2,
        5,
        "TooFewReplicas",
    ),
    (
        "scaleDown with pod policy limitation",
        [],
        [],
        1,
        1000,
        None,
        rules(5, 60, 0, 0, 300),
        10,
        2,
        5,
        "ScaleDownLimit",
    ),
    (
        "scaleDown with percent policy limitation",
        [],
        [],
        1,
        1000,
        None,
        rules(0, 0, 50, 60, 300),
        10,
        5,
        5,
        "DesiredWithinRange",
    ),
    (
        "scaleUp with spec MaxReplicas limitation with large pod policy and events",
        spread([1, 5, 9], 120),
        [],
        1,
        200,
        rules(300, 60, 0, 0, 0),
        None,
        100,
        500,
        200,
        "TooManyReplicas",
    ),
    (
        "scaleUp with spec MaxReplicas limitation with large percent policy and events",
        spread([1, 5, 9], 120),
        [],
        1,
        200,
        rules(0, 0, 10000, 60, 0),
        None,
        100,
        500,
        200,
        "TooManyReplicas",
    ),
    (
        "scaleUp with currentReplicas limitation with rate.PeriodSeconds"
        " with a lot of recent scale up events",
        spread([1, 5, 9], 120),
        [],
        1,
        1000,
        rules(5, 120, 0, 0, 0),
        None,
        100,
        500,
        100,
        "ScaleUpLimit",
    ),
    (
        "scaleUp with pod policy and previous scale up events",
        spread([1, 5, 9], 120),
        [],
        1,
        1000,
        rules(150, 120, 0, 0, 0),
        None,
        100,
        500,
        235,
        "ScaleUpLimit",
    ),
    (
        "scaleUp with percent policy and previous scale up events",
        spread([1, 5, 9], 120),
        [],
        1,
        1000,
        rules(0, 0, 200, 120, 0),
        None,
        100,
        500,
        255,
        "ScaleUpLimit",
    ),
    (
        "scaleUp with percent policy and previous scale up and down events",
        spread([4], 120),
        spread([2], 120),
        1,
        1000,
        rules(0, 0, 300, 300, 0),
        None,
        6,
        24,
        16,
        "ScaleUpLimit",
    ),
    (
        "scaleDown with default policy and previous events",
        [],
        spread([1, 5, 9], 120),
        1,
        1000,
        None,
        None,
        10,
        5,
        5,
        "DesiredWithinRange",
    ),
    (
        "scaleDown with spec MinReplicas=nil limitation with large pod policy and previous events",
        [],
        spread([1, 5, 9], 120),
        1,
        1000,
        None,
        rules(115, 120, 0, 0, 300),
        100,
        0,
        1,
        "TooFewReplicas",
    ),
    (
        "scaleDown with spec MinReplicas limitation with large pod policy and previous events",
        [],
        spread([1, 5, 9], 120),
        5,
        1000,
        None,
        rules(130, 120, 0, 0, 300),
        100,
        0,
        5,
        "TooFewReplicas",
    ),
    (
        "scaleDown with spec MinReplicas limitation with large percent policy and previous events",
        [],
        spread([1, 5, 9], 120),
        5,
        1000,
        None,
        rules(0, 0, 100, 120, 300),
        100,
        2,
        5,
        "TooFewReplicas",
    ),
    (
        "scaleDown with pod policy limitation and previous events",
        [],
        spread([1, 5, 9], 120),
        1,
        1000,
        None,
        rules(5, 120, 0, 0, 300),
        100,
        2,
        100,
        "ScaleDownLimit",
    ),
    (
        "scaleDown with percent policy limitation and previous events",
        [],
        spread([2, 4, 6], 120),
        1,
        1000,
        None,
        rules(0, 0, 50, 120, 300),
        100,
        0,
        56,
        "ScaleDownLimit",
    ),
    (
        "scaleDown with percent policy and previous scale up and down events",
        spread([2], 120),
        spread([4], 120),
        1,
        1000,
        None,
        rules(0, 0, 50, 180, 0),
        10,
        1,
        6,
        "ScaleDownLimit",
    ),
    (
        "scaleDown with previous events preventing further scale down",
        [],
        spread([10, 10, 10], 120),
        1,
        1000,
        None,
        rules(0, 0, 10, 120, 300),
        100,
        0,
        100,
        "ScaleDownLimit",
    ),
    (
        "scaleDown with with previous events still allowing more scale down",
        [],
        spread([10, 10, 10], 120),
        1,
        1000,
        None,
        rules(0, 0, 1000, 120, 300),
        10,
        5,
        5,
        "DesiredWithinRange",
    ),
    (
        "check 'outdated' flag for events for one behavior for up",
        spread([8, 12, 9, 11], 120),
        [],
        1,
        1000,
        rules(1000, 60, 0, 0, 0),
        None,
        100,
        200,
        200,
        "DesiredWithinRange",
    ),
    (
        "check that events were not marked 'outdated' for two different policies in the behavior for up",
        spread([8, 12, 9, 11], 120),
        [],
        1,
        1000,
        rules(1000, 120, 100, 60, 0),
        None,
        100,
        200,
        200,
        "DesiredWithinRange",
    ),
    (
        "check that events were marked 'outdated' for two different policies in the behavior for up",
        spread([8, 12, 9, 11], 120),
        [],
        1,
        1000,
        rules(1000, 30, 100, 60, 0),
        None,
        100,
        200,
        200,
        "DesiredWithinRange",
    ),
    (
        "check 'outdated' flag for events for one behavior for down",
        [],
        spread([8, 12, 9, 11], 120),
        1,
        1000,
        None,
        rules(1000, 60, 0, 0, 300),
        100,
        5,
        5,
        "DesiredWithinRange",
    ),
    (
        "check that events were not marked 'outdated' for two different policies in the behavior for down",
        [],
        spread([8, 12, 9, 11], 120),
        1,
        1000,
        None,
        rules(1000, 120, 100, 60, 300),
        100,
        5,
        5,
        "DesiredWithinRange",
    ),
    (
        "check that events were marked 'outdated' for two different policies in the behavior for down",
        [],
        spread([8, 12, 9, 11], 120),
        1,
        1000,
        None,
        rules(1000, 30, 100, 60, 300),
        100,
        5,
        5,
        "DesiredWithinRange",
    ),
]


@pytest.mark.parametrize(
    (
        "name",
        "up_events",
        "down_events",
        "min_r",
        "max_r",
        "up",
        "down",
        "current",
        "desired",
        "expected",
        "reason",
    ),
    SCALING_WITH_RULES,
    ids=[c[0] for c in SCALING_WITH_RULES],
)
def test_scaling_with_rules_upstream(
    name: str,
    up_events: list[ScaleEvent],
    down_events: list[ScaleEvent],
    min_r: int,
    max_r: int,
    up: ScalingRules | None,
    down: ScalingRules | None,
    current: int,
    desired: int,
    expected: int,
    reason: str,
) -> None:
    behavior = Behavior(scale_up=up, scale_down=down)
    assert rate_limit(current, desired, min_r, max_r, behavior, up_events, down_events, NOW) == (
        expected,
        reason,
    )


# --- TestCalculateScaleUpLimitWithScalingRules / TestCalculateScaleDownLimitWithBehaviors
MIN_SELECT = ScalingRules(
    stabilization_window_seconds=300,
    select_policy="Min",
    policies=(ScalingPolicy("Pods", 2, 60), ScalingPolicy("Percent", 50, 60)),
)


def test_calculate_scale_up_limit_with_min_select_upstream() -> None:
    assert scale_up_limit(1, MIN_SELECT, [], [], NOW) == 2


def test_calculate_scale_down_limit_with_min_select_upstream() -> None:
    assert scale_down_limit(5, MIN_SELECT, [], [], NOW) == 3


# --- TestNormalizeDesiredReplicasWithBehavior (stabilizeRecommendationWithBehaviors)
def windows(up: int, down: int) -> Behavior:
    return Behavior(
        ScalingRules(stabilization_window_seconds=up), ScalingRules(stabilization_window_seconds=down)
    )


def recs(*pairs: tuple[int, float]) -> list[Recommendation]:
    return [Recommendation(replicas, NOW - age) for replicas, age in pairs]


STABILIZE_CASES = [
    # name, history, current, desired, up window, down window, expected, recorded replicas (None: skip)
    ("empty recommendations for scaling down", [], 100, 5, 0, 0, 5, [5]),
    ("simple scale down stabilization", recs((4, 2 * MIN), (5, MIN)), 100, 3, 0, 180, 5, [4, 5, 3]),
    ("simple scale up stabilization", recs((4, 2 * MIN), (5, MIN)), 1, 7, 300, 0, 4, [4, 5, 7]),
    ("no scale down stabilization", recs((1, 2 * MIN), (2, MIN)), 100, 3, 300, 0, 3, [1, 2, 3]),
    ("no scale up stabilization", recs((4, 2 * MIN), (5, MIN)), 1, 3, 0, 300, 3, [4, 5, 3]),
    (
        "no scale down stabilization, reuse recommendation element",
        recs((10, 10 * MIN), (9, 9 * MIN)),
        100,
        3,
        0,
        0,
        3,
        [10, 3],
    ),
    (
        "no scale up stabilization, reuse recommendation element",
        recs((10, 10 * MIN), (9, 9 * MIN)),
        1,
        100,
        0,
        0,
        100,
        [10, 100],
    ),
    (
        "scale down stabilization, reuse one of obsolete recommendation element",
        recs((10, 10 * MIN), (4, MIN), (5, 2 * MIN), (9, 9 * MIN)),
        100,
        3,
        0,
        180,
        5,
        [10, 4, 5, 3],
    ),
    (
        "scale up stabilization, reuse one of obsolete recommendation element",
        recs((10, 100 * MIN), (6, MIN), (5, 2 * MIN), (9, 3 * MIN)),
        1,
        100,
        300,
        0,
        5,
        [100, 6, 5, 9],
    ),
    (
        "scale up and down stabilization, do not scale up when prenormalized rec goes down",
        recs((2, 100 * MIN), (3, 3 * MIN)),
        2,
        1,
        300,
        300,
        2,
        None,
    ),
    (
        "scale up and down stabilization, do not scale down when prenormalized rec goes up",
        recs((2, 100 * MIN), (1, 3 * MIN)),
        2,
        3,
        300,
        300,
        2,
        None,
    ),
]


@pytest.mark.parametrize(
    ("name", "history", "current", "desired", "up", "down", "expected", "recorded"),
    STABILIZE_CASES,
    ids=[c[0] for c in STABILIZE_CASES],
)
def test_stabilize_with_behaviors_upstream(
    name: str,
    history: list[Recommendation],
    current: int,
    desired: int,
    up: int,
    down: int,
    expected: int,
    recorded: list[int] | None,
) -> None:
    result, new_history = stabilize(current, desired, windows(up, down), history, NOW)
    assert result == expected
    if recorded is not None:
        assert [r.replicas for r in new_history] == recorded
    assert Recommendation(desired, NOW) in new_history


# --- TestNormalizeDesiredReplicas (legacy stabilizeRecommendation, 5 minute window)
LEGACY_STABILIZE_CASES = [
    ("empty log", [], 5, 5, 1),
    ("stabilize", recs((4, 2 * MIN), (5, MIN)), 3, 5, 3),
    ("no stabilize", recs((1, 2 * MIN), (2, MIN)), 3, 3, 3),
    ("no stabilize - old recommendations", recs((10, 10 * MIN), (9, 9 * MIN)), 3, 3, 2),
    ("stabilize - old recommendations", recs((10, 10 * MIN), (4, MIN), (5, 2 * MIN), (9, 9 * MIN)), 3, 5, 4),
]


@pytest.mark.parametrize(
    ("name", "history", "desired", "expected", "log_length"),
    LEGACY_STABILIZE_CASES,
    ids=[c[0] for c in LEGACY_STABILIZE_CASES],
)
def test_legacy_stabilize_upstream(
    name: str, history: list[Recommendation], desired: int, expected: int, log_length: int
) -> None:
    result, new_history = legacy_stabilize(desired, history, NOW, downscale_window_seconds=300)
    assert result == expected
    assert len(new_history) == log_length


# --- TestConvertDesiredReplicasWithRules (legacy convertDesiredReplicasWithRules)
# Upstream's test sets scaleUpLimitFactor = 8 in init(); the last case is written against the function,
# as upstream writes it against calculateScaleUpLimit(3).
LEGACY_RATE_CASES = [
    ("prenormalized desired replicas within range", 5, 7, 3, 8, 7, "DesiredWithinRange"),
    ("prenormalized desired replicas < minReplicas", 3, 1, 2, 8, 2, "TooFewReplicas"),
    ("prenormalized desired zeroed replicas within range", 1, 0, 0, 10, 0, "DesiredWithinRange"),
    ("maxReplicas is the limit because maxReplicas < scaleUpLimit", 20, 1000, 1, 10, 10, "TooManyReplicas"),
    (
        "scaleUpLimit is the limit because scaleUpLimit < maxReplicas",
        3,
        1000,
        1,
        2000,
        legacy_scale_up_limit(3),
        "ScaleUpLimit",
    ),
]


@pytest.mark.parametrize(
    ("name", "current", "desired", "min_r", "max_r", "expected", "reason"),
    LEGACY_RATE_CASES,
    ids=[c[0] for c in LEGACY_RATE_CASES],
)
def test_legacy_rate_limit_upstream(
    name: str, current: int, desired: int, min_r: int, max_r: int, expected: int, reason: str
) -> None:
    assert legacy_rate_limit(current, desired, min_r, max_r) == (expected, reason)


def test_legacy_scale_up_limit_is_twice_current_at_least_four() -> None:
    assert [legacy_scale_up_limit(n) for n in (0, 1, 2, 3, 10)] == [4, 4, 4, 6, 20]


# --- TestStoreScaleEvents (storeScaleEvent, through the controller's private helper)
def ev(change: int, age: float) -> ScaleEvent:
    return ScaleEvent(change, NOW - age)


STORE_CASES = [
    # name, previous events, rules (None: no behavior), expected change in last 60 s, expected stored changes
    ("empty entries with default behavior", [], None, 0, []),
    ("empty entries with two-policy-behavior", [], rules(10, 60, 100, 60, 0), 0, [5]),
    ("one outdated entry to be kept untouched without behavior", [ev(7, 61)], None, 0, [7]),
    ("one outdated entry to be replaced with behavior", [ev(7, 61)], rules(10, 60, 100, 60, 0), 0, [5]),
    ("one actual entry to be not touched with behavior", [ev(7, 58)], rules(10, 60, 100, 60, 0), 7, [7, 5]),
    ("two entries, one of them to be replaced", [ev(7, 61), ev(6, 59)], rules(10, 60, 0, 0, 0), 6, [5, 6]),
    (
        "replace one entry, use policies with different periods",
        [ev(8, 29), ev(6, 59), ev(7, 61), ev(9, 61)],
        rules(10, 60, 100, 30, 0),
        14,
        [8, 6, 7, 5],
    ),
    ("two entries, both actual", [ev(7, 58), ev(6, 59)], rules(10, 120, 100, 30, 0), 13, [7, 6, 5]),
]


@pytest.mark.parametrize(
    ("name", "previous", "scaling_rules", "change_60s", "stored"),
    STORE_CASES,
    ids=[c[0] for c in STORE_CASES],
)
def test_store_scale_events_upstream(
    name: str,
    previous: list[ScaleEvent],
    scaling_rules: ScalingRules | None,
    change_60s: int,
    stored: list[int],
) -> None:
    # getReplicasChangePerPeriod(60, events) is what a 60 s Pods policy of +0 would see:
    probe = ScalingRules(policies=(ScalingPolicy("Pods", 1, 60),))
    assert scale_up_limit(100, probe, previous, [], NOW) == 100 - change_60s + 1
    up = HorizontalPodAutoscaler(
        1, 1000, None if scaling_rules is None else Behavior(scale_up=scaling_rules), scale_up_events=previous
    )
    up._store_scale_event(NOW, 10, 15)
    assert [e.replica_change for e in up.scale_up_events] == stored
    down = HorizontalPodAutoscaler(
        1,
        1000,
        None if scaling_rules is None else Behavior(scale_down=scaling_rules),
        scale_down_events=previous,
    )
    down._store_scale_event(NOW, 10, 5)
    assert [e.replica_change for e in down.scale_down_events] == stored
