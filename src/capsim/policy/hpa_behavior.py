"""Stabilization windows and scaling-rate limits, ported from upstream podautoscaler/horizontal.go.

All functions are pure: the caller passes ``now`` (seconds, any monotonic origin) together with the
recommendation history and the scale events, and gets the decision back (plus the new history where
upstream mutates it). Window tests follow upstream's ``time.After``/``time.Before`` comparisons:
a record counts when ``now - timestamp < window``; the legacy path also counts a record exactly one
window old.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from capsim.policy.hpa_types import (
    DEFAULT_DOWNSCALE_WINDOW_SECONDS,
    DEFAULT_SCALE_DOWN_POLICIES,
    DEFAULT_SCALE_UP_POLICIES,
    Behavior,
    Recommendation,
    ScaleEvent,
    ScalingPolicy,
    ScalingRules,
    check_int,
    check_number,
)

Reason = Literal["DesiredWithinRange", "ScaleUpLimit", "ScaleDownLimit", "TooManyReplicas", "TooFewReplicas"]

# Legacy path (no behavior): never more than max(2 x current, 4) in one step (issue #32304 upstream).
SCALE_UP_LIMIT_FACTOR = 2.0
SCALE_UP_LIMIT_MINIMUM = 4.0


def scale_up_policies(rules: ScalingRules | None) -> tuple[ScalingPolicy, ...]:
    """The policies in force for scaling up: the user's list, else 4 pods or 100% per 15 s."""
    if rules is None or rules.policies is None:
        return DEFAULT_SCALE_UP_POLICIES
    return rules.policies


def scale_down_policies(rules: ScalingRules | None) -> tuple[ScalingPolicy, ...]:
    """The policies in force for scaling down: the user's list, else 100% per 15 s."""
    if rules is None or rules.policies is None:
        return DEFAULT_SCALE_DOWN_POLICIES
    return rules.policies


def scale_up_window(rules: ScalingRules | None) -> int:
    """Scale-up stabilization window (s); unset means 0 (no stabilization)."""
    if rules is None or rules.stabilization_window_seconds is None:
        return 0
    return rules.stabilization_window_seconds


def scale_down_window(rules: ScalingRules | None, default: float = DEFAULT_DOWNSCALE_WINDOW_SECONDS) -> float:
    """Scale-down stabilization window (s); unset means the controller default ``default``."""
    if rules is None or rules.stabilization_window_seconds is None:
        return default
    return rules.stabilization_window_seconds


def _period_start(
    current_replicas: int,
    period_seconds: int,
    scale_up_events: Sequence[ScaleEvent],
    scale_down_events: Sequence[ScaleEvent],
    now: float,
) -> int:
    """The replica count at the start of a policy's period: ``current - added + removed`` over the events
    inside it (scale-downs count against the scale-up limit and the reverse, as upstream)."""
    added = _change_in_period(period_seconds, scale_up_events, now)
    removed = _change_in_period(period_seconds, scale_down_events, now)
    return current_replicas - added + removed


def _change_in_period(period_seconds: int, events: Sequence[ScaleEvent], now: float) -> int:
    """Sum of replica changes recorded less than ``period_seconds`` ago (getReplicasChangePerPeriod)."""
    return sum(e.replica_change for e in events if now - e.timestamp < period_seconds)


def _check_common(current_replicas: int, now: float) -> None:
    check_int("current_replicas", current_replicas, minimum=0)
    check_number("now", now)


def scale_up_limit(
    current_replicas: int,
    rules: ScalingRules | None,
    scale_up_events: Sequence[ScaleEvent],
    scale_down_events: Sequence[ScaleEvent],
    now: float,
) -> int:
    """Largest replica count the scale-up policies allow now (calculateScaleUpLimitWithScalingRules).

    For each policy the count at the start of its period is rebuilt from the events inside the period
    (``current - added + removed``: scale-down events count against the scale-up limit too), then the
    policy's step is applied (Percent rounds up). ``Max`` picks the largest allowance, ``Min`` the
    smallest, ``Disabled`` returns ``current_replicas``. The result may be below ``current_replicas``;
    :func:`rate_limit` never lets that push the count down.
    """
    _check_common(current_replicas, now)
    select = "Max" if rules is None else rules.select_policy
    if select == "Disabled":
        return current_replicas
    proposals = []
    for policy in scale_up_policies(rules):
        period_start = _period_start(current_replicas, policy.period_seconds, scale_up_events, scale_down_events, now)
        if policy.type == "Pods":
            proposals.append(period_start + policy.value)
        else:
            # Rounded up, or a small percentage of a small count would never add a pod.
            proposals.append(math.ceil(float(period_start) * (1 + float(policy.value) / 100)))
    return min(proposals) if select == "Min" else max(proposals)


def scale_down_limit(
    current_replicas: int,
    rules: ScalingRules | None,
    scale_up_events: Sequence[ScaleEvent],
    scale_down_events: Sequence[ScaleEvent],
    now: float,
) -> int:
    """Smallest replica count the scale-down policies allow now (calculateScaleDownLimitWithBehaviors).

    Mirrors :func:`scale_up_limit`: the period-start count is ``current - added + removed``; a Pods
    policy subtracts its value, a Percent policy keeps ``trunc(start * (1 - value/100))``. ``Max``
    (the default) picks the largest allowed decrease, i.e. the *smallest* count; ``Min`` the largest.
    """
    _check_common(current_replicas, now)
    select = "Max" if rules is None else rules.select_policy
    if select == "Disabled":
        return current_replicas
    proposals = []
    for policy in scale_down_policies(rules):
        period_start = _period_start(current_replicas, policy.period_seconds, scale_up_events, scale_down_events, now)
        if policy.type == "Pods":
            proposals.append(period_start - policy.value)
        else:
            proposals.append(int(float(period_start) * (1 - float(policy.value) / 100)))
    return max(proposals) if select == "Min" else min(proposals)


def _check_bounds(min_replicas: int, max_replicas: int) -> None:
    check_int("min_replicas", min_replicas, minimum=0)
    check_int("max_replicas", max_replicas, minimum=1)
    if max_replicas < min_replicas:
        raise ValueError(f"max_replicas must be >= min_replicas ({min_replicas}), got {max_replicas}")


def rate_limit(
    current_replicas: int,
    desired_replicas: int,
    min_replicas: int,
    max_replicas: int,
    behavior: Behavior | None,
    scale_up_events: Sequence[ScaleEvent],
    scale_down_events: Sequence[ScaleEvent],
    now: float,
) -> tuple[int, str]:
    """Bound a (stabilized) recommendation by [min, max] and the behavior's rate policies.

    Port of convertDesiredReplicasWithBehaviorRate. Returns the count and the ScalingLimited reason
    (``DesiredWithinRange``, ``ScaleUpLimit``, ``ScaleDownLimit``, ``TooManyReplicas``,
    ``TooFewReplicas``). A rate limit never moves the count past ``current_replicas`` the wrong way.
    """
    _check_common(current_replicas, now)
    check_int("desired_replicas", desired_replicas, minimum=0)
    _check_bounds(min_replicas, max_replicas)
    behavior = Behavior() if behavior is None else behavior
    if desired_replicas > current_replicas:
        limit = scale_up_limit(current_replicas, behavior.scale_up, scale_up_events, scale_down_events, now)
        limit = max(limit, current_replicas)  # recent scale-ups used the budget: hold, do not shrink
        if max_replicas > limit:
            allowed, reason = limit, "ScaleUpLimit"
        else:
            allowed, reason = max_replicas, "TooManyReplicas"
        if desired_replicas > allowed:
            return allowed, reason
    elif desired_replicas < current_replicas:
        limit = scale_down_limit(current_replicas, behavior.scale_down, scale_up_events, scale_down_events,
                                 now)
        limit = min(limit, current_replicas)  # recent scale-downs used the budget: hold, do not grow
        if min_replicas < limit:
            allowed, reason = limit, "ScaleDownLimit"
        else:
            allowed, reason = min_replicas, "TooFewReplicas"
        if desired_replicas < allowed:
            return allowed, reason
    return desired_replicas, "DesiredWithinRange"


def stabilize_windows(
    current_replicas: int,
    desired_replicas: int,
    up_window_seconds: float,
    down_window_seconds: float,
    history: Sequence[Recommendation],
    now: float,
) -> tuple[int, list[Recommendation]]:
    """:func:`stabilize` with the two windows given directly (s)."""
    _check_common(current_replicas, now)
    check_int("desired_replicas", desired_replicas, minimum=0)
    up_recommendation = desired_replicas
    down_recommendation = desired_replicas
    obsolete: int | None = None
    for i, rec in enumerate(history):
        age = now - rec.timestamp
        if age < up_window_seconds:
            up_recommendation = min(rec.replicas, up_recommendation)
        if age < down_window_seconds:
            down_recommendation = max(rec.replicas, down_recommendation)
        if age > up_window_seconds and age > down_window_seconds:
            obsolete = i  # upstream reuses the last obsolete slot
    recommendation = current_replicas
    if recommendation < up_recommendation:
        recommendation = up_recommendation
    if recommendation > down_recommendation:
        recommendation = down_recommendation
    return recommendation, _record(history, obsolete, Recommendation(desired_replicas, now))


def _record(
    history: Sequence[Recommendation], obsolete: int | None, new: Recommendation
) -> list[Recommendation]:
    updated = list(history)
    if obsolete is None:
        updated.append(new)
    else:
        updated[obsolete] = new
    return updated


def stabilize(
    current_replicas: int,
    desired_replicas: int,
    behavior: Behavior | None,
    history: Sequence[Recommendation],
    now: float,
) -> tuple[int, list[Recommendation]]:
    """Apply the behavior's stabilization windows (stabilizeRecommendationWithBehaviors).

    The result is ``current_replicas`` pulled up to the *lowest* recommendation of the scale-up window
    and down to the *highest* of the scale-down window (``desired_replicas`` included in both), so the
    count only moves when every recent recommendation agrees. Unset windows: scale-up 0, scale-down
    300 s. Returns the stabilized count and the new history: ``desired_replicas`` recorded at ``now``,
    replacing a record older than both windows if there is one (``history`` itself is not modified).
    """
    behavior = Behavior() if behavior is None else behavior
    return stabilize_windows(current_replicas, desired_replicas, scale_up_window(behavior.scale_up),
                             scale_down_window(behavior.scale_down), history, now)


def legacy_stabilize(
    desired_replicas: int,
    history: Sequence[Recommendation],
    now: float,
    downscale_window_seconds: float = DEFAULT_DOWNSCALE_WINDOW_SECONDS,
) -> tuple[int, list[Recommendation]]:
    """The stabilization used when an HPA has no ``behavior`` (stabilizeRecommendation).

    Only scale-down is stabilized: the result is the highest recommendation no older than
    ``downscale_window_seconds`` (a record exactly one window old still counts), ``desired_replicas``
    included. Returns it and the new history (the last older record is replaced, else appended).
    """
    check_int("desired_replicas", desired_replicas, minimum=0)
    check_number("now", now)
    check_number("downscale_window_seconds", downscale_window_seconds, minimum=0)
    highest = desired_replicas
    obsolete: int | None = None
    for i, rec in enumerate(history):
        if now - rec.timestamp > downscale_window_seconds:
            obsolete = i
        elif rec.replicas > highest:
            highest = rec.replicas
    return highest, _record(history, obsolete, Recommendation(desired_replicas, now))


def legacy_scale_up_limit(current_replicas: int) -> int:
    """The legacy one-step ceiling: ``max(2 x current, 4)``."""
    return int(max(SCALE_UP_LIMIT_FACTOR * float(current_replicas), SCALE_UP_LIMIT_MINIMUM))


def legacy_rate_limit(
    current_replicas: int,
    desired_replicas: int,
    min_replicas: int,
    max_replicas: int,
) -> tuple[int, str]:
    """Bound a recommendation when the HPA has no ``behavior`` (convertDesiredReplicasWithRules).

    Below ``min_replicas`` gives ``min_replicas`` (TooFewReplicas); above ``min(max_replicas,
    max(2 x current, 4))`` gives that ceiling (ScaleUpLimit or TooManyReplicas). No scale-down rate.
    """
    check_int("current_replicas", current_replicas, minimum=0)
    check_int("desired_replicas", desired_replicas, minimum=0)
    _check_bounds(min_replicas, max_replicas)
    ceiling = legacy_scale_up_limit(current_replicas)
    if max_replicas > ceiling:
        allowed, reason = ceiling, "ScaleUpLimit"
    else:
        allowed, reason = max_replicas, "TooManyReplicas"
    if desired_replicas < min_replicas:
        return min_replicas, "TooFewReplicas"
    if desired_replicas > allowed:
        return allowed, reason
    return desired_replicas, "DesiredWithinRange"
