"""Property tests for the HPA algorithm: bounds hold, directions never flip, histories stay consistent."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from capsim.policy.autoscaling import (
    Behavior,
    HorizontalPodAutoscaler,
    PodSample,
    Recommendation,
    ScaleEvent,
    ScalingPolicy,
    ScalingRules,
    Tolerance,
    legacy_rate_limit,
    legacy_stabilize,
    milli_value,
    pods_metric_replicas,
    rate_limit,
    stabilize,
)

NOW = 5_000.0

policies = st.builds(
    ScalingPolicy,
    type=st.sampled_from(["Pods", "Percent"]),
    value=st.integers(1, 500),
    period_seconds=st.integers(1, 1800),
)
scaling_rules = st.builds(
    ScalingRules,
    stabilization_window_seconds=st.one_of(st.none(), st.integers(0, 3600)),
    select_policy=st.sampled_from(["Max", "Min", "Disabled"]),
    policies=st.one_of(st.none(), st.lists(policies, min_size=1, max_size=3).map(tuple)),
)
behaviors = st.builds(
    Behavior, scale_up=st.one_of(st.none(), scaling_rules), scale_down=st.one_of(st.none(), scaling_rules)
)
events = st.lists(
    st.builds(ScaleEvent, replica_change=st.integers(1, 50), timestamp=st.floats(NOW - 2000, NOW)), max_size=6
)
history = st.lists(
    st.builds(Recommendation, replicas=st.integers(0, 200), timestamp=st.floats(NOW - 4000, NOW)), max_size=8
)


@st.composite
def bounded_counts(draw: st.DrawFn) -> tuple[int, int, int, int]:
    """(min, max, current within [min, max], desired anywhere)."""
    lo = draw(st.integers(0, 50))
    hi = draw(st.integers(max(lo, 1), 200))
    current = draw(st.integers(max(lo, 0), hi))
    desired = draw(st.integers(0, 400))
    return lo, hi, current, desired


@given(bounded_counts(), behaviors, events, events)
def test_rate_limit_stays_in_bounds_and_never_passes_current_the_wrong_way(
    counts: tuple[int, int, int, int], behavior: Behavior, up: list[ScaleEvent], down: list[ScaleEvent]
) -> None:
    lo, hi, current, desired = counts
    result, reason = rate_limit(current, desired, lo, hi, behavior, up, down, NOW)
    assert lo <= result <= hi
    if desired > current:
        assert current <= result <= desired
    elif desired < current:
        assert desired <= result <= current
    else:
        assert result == current
    assert (reason == "DesiredWithinRange") == (result == desired)


@given(bounded_counts())
def test_legacy_rate_limit_stays_in_bounds(counts: tuple[int, int, int, int]) -> None:
    lo, hi, current, desired = counts
    result, _ = legacy_rate_limit(current, desired, lo, hi)
    assert lo <= result <= hi
    assert result <= max(2 * current, 4)
    if desired >= current:
        assert current <= result <= desired
    else:
        assert desired <= result <= current


@given(st.integers(0, 200), st.integers(0, 200), behaviors, history)
def test_stabilize_lies_between_current_and_the_window_extremes(
    current: int, desired: int, behavior: Behavior, past: list[Recommendation]
) -> None:
    result, new_history = stabilize(current, desired, behavior, past, NOW)
    considered = [desired, current] + [r.replicas for r in past]
    assert min(considered) <= result <= max(considered)
    # Never moves against the direction of the new recommendation.
    if desired >= current:
        assert current <= result <= desired
    else:
        assert desired <= result <= current
    assert len(new_history) in (len(past), len(past) + 1)
    assert Recommendation(desired, NOW) in new_history
    assert past == list(past)  # input not modified


@given(st.integers(0, 200), history, st.integers(0, 3600))
def test_legacy_stabilize_is_the_max_of_the_window(
    desired: int, past: list[Recommendation], window: int
) -> None:
    result, new_history = legacy_stabilize(desired, past, NOW, window)
    recent = [r.replicas for r in past if NOW - r.timestamp <= window]
    assert result == max([desired, *recent])
    assert len(new_history) in (len(past), len(past) + 1)


@given(
    st.integers(1, 50),
    st.lists(st.sampled_from(["ready", "missing", "pending", "failed", "deleting"]), min_size=1, max_size=12),
)
def test_samples_at_target_keep_the_count(current: int, kinds: list[str]) -> None:
    target = 0.75
    make = {
        "ready": PodSample(target),
        "missing": PodSample(None),
        "pending": PodSample(None, phase="Pending"),
        "failed": PodSample(99.0, phase="Failed"),
        "deleting": PodSample(99.0, deleting=True),
    }
    pods = [make["ready"]] + [make[k] for k in kinds]
    assert pods_metric_replicas(current, pods, target, Tolerance(0.0, 0.0)) == current


@given(
    st.integers(1, 40),
    st.integers(1, 40),
    st.lists(st.integers(0, 100_000), min_size=1, max_size=10),
    st.integers(1, 100_000),
)
def test_pods_metric_moves_with_the_ratio(
    current: int, extra_missing: int, levels: list[int], target: int
) -> None:
    pods = [PodSample(v / 1000) for v in levels] + [PodSample(None)] * extra_missing
    result = pods_metric_replicas(current, pods, target / 1000)
    ratio = (sum(levels) // len(levels)) / target
    if ratio < 1.0:
        assert result <= current  # missing pods never turn a scale-down into a scale-up
    elif ratio > 1.0:
        assert result >= current


@given(st.integers(-(2**40), 2**40))
def test_milli_value_round_trips_exact_milli_units(milli: int) -> None:
    assert milli_value(milli / 1000) == milli


@settings(max_examples=50)
@given(
    st.integers(0, 20),
    st.integers(1, 40),
    st.one_of(st.none(), behaviors),
    st.lists(st.lists(st.one_of(st.none(), st.integers(0, 120)), max_size=3), min_size=1, max_size=12),
)
def test_controller_stays_in_bounds(
    lo: int, span: int, behavior: Behavior | None, syncs: list[list[int | None]]
) -> None:
    hpa = HorizontalPodAutoscaler(lo, lo + span, behavior)
    current = lo + span // 2
    if current == 0:
        current = 1
    for i, proposals in enumerate(syncs):
        new = hpa.reconcile(NOW + 15 * i, current, proposals)
        assert hpa.min_replicas <= new <= hpa.max_replicas
        if any(p is None for p in proposals) and new < current:
            raise AssertionError("a failed metric let a scale-down through")
        current = new
