"""The HPA controller sync, the Kubernetes spelling, validation, and what a simple version gets wrong."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from capsim.policy.autoscaling import (
    DEFAULT_SCALE_DOWN_POLICIES,
    DEFAULT_SCALE_UP_POLICIES,
    Behavior,
    HorizontalPodAutoscaler,
    MetricSpec,
    PodSample,
    Recommendation,
    ScaleEvent,
    ScalingPolicy,
    ScalingRules,
    Tolerance,
    legacy_rate_limit,
    legacy_stabilize,
    milli_value,
    parse_quantity,
    pods_metric_replicas,
    rate_limit,
    scale_down_limit,
    scale_up_limit,
    stabilize,
    value_metric_replicas,
)

NOW = 1_000.0


# === Semantics a simple version gets wrong
class TestQuantization:
    def test_values_become_milli_units_absorbing_float_error(self) -> None:
        assert milli_value(0.57) == 570  # 0.57 * 1000 is 569.999... in binary floating point
        assert milli_value(8.9) == 8900
        assert milli_value(0.1 + 0.2) == 300
        assert milli_value(3) == 3000

    def test_a_fraction_of_a_milli_unit_rounds_up(self) -> None:
        assert milli_value(0.0001) == 1
        assert milli_value(1.0015) == 1002

    def test_quantized_ratio_is_exact(self) -> None:
        # 0.57 / 0.57 must be exactly 1 (570m / 570m), so even a zero tolerance keeps the count.
        zero = Tolerance(0.0, 0.0)
        assert pods_metric_replicas(4, [PodSample(0.57)] * 4, 0.57, zero) == 4

    def test_average_truncates_like_int64_division(self) -> None:
        # (1000m + 1001m) / 2 = 1000m (not 1000.5m): the ratio is exactly 1, so nothing moves.
        zero = Tolerance(0.0, 0.0)
        assert pods_metric_replicas(2, [PodSample(1.0), PodSample(1.001)], 1.0, zero) == 2
        # 8.9 is 8900m against 8800m: outside a 1% scale-up tolerance (upstream's External case).
        assert value_metric_replicas(3, 8.9, 8.8, 3, Tolerance(0.1, 0.01)) == 4


class TestTolerance:
    @pytest.mark.parametrize("value", [1.1, 0.9, 1.0])
    def test_band_is_inclusive_at_both_ends(self, value: float) -> None:
        assert pods_metric_replicas(10, [PodSample(value)] * 10, 1.0) == 10

    def test_just_outside_the_band_scales(self) -> None:
        assert pods_metric_replicas(10, [PodSample(1.101)] * 10, 1.0) == 12
        assert pods_metric_replicas(10, [PodSample(0.899)] * 10, 1.0) == 9

    def test_up_and_down_may_differ(self) -> None:
        loose_down = Tolerance(scale_down=0.5, scale_up=0.0)
        assert pods_metric_replicas(10, [PodSample(0.6)] * 10, 1.0, loose_down) == 10
        assert pods_metric_replicas(10, [PodSample(1.05)] * 10, 1.0, loose_down) == 11

    def test_behavior_tolerance_overrides_hpa_default_per_direction(self) -> None:
        hpa = HorizontalPodAutoscaler(
            1, 10, Behavior(scale_up=ScalingRules(tolerance=0.02)), tolerance=Tolerance(0.2, 0.2)
        )
        assert hpa.metric_tolerance == Tolerance(scale_down=0.2, scale_up=0.02)
        assert HorizontalPodAutoscaler(1, 10).metric_tolerance == Tolerance()


class TestPodsWithoutSamples:
    def test_missing_pods_count_as_target_when_scaling_down(self) -> None:
        # ready avg 0.2 -> with two pods at the target (1.0): (0.2+0.2+1+1)/4 = 0.6 -> ceil(2.4) = 3
        samples = [PodSample(0.2), PodSample(0.2), PodSample(None), PodSample(None)]
        assert pods_metric_replicas(4, samples, 1.0) == 3

    def test_missing_pods_count_as_zero_when_scaling_up(self) -> None:
        # ready avg 3.0 -> with two pods at 0: 6/4 = 1.5 -> ceil(6.0) = 6
        samples = [PodSample(3.0), PodSample(3.0), PodSample(None), PodSample(None)]
        assert pods_metric_replicas(4, samples, 1.0) == 6

    def test_missing_pods_never_reverse_the_direction(self) -> None:
        # ready ratio 1.2 says "up"; with the missing pods at 0 the ratio is 0.4 ("down"): keep.
        samples = [PodSample(1.2)] + [PodSample(None)] * 2
        assert pods_metric_replicas(3, samples, 1.0) == 3

    def test_missing_pods_not_filled_when_ratio_is_exactly_one(self) -> None:
        samples = [PodSample(1.0)] + [PodSample(None)] * 4
        assert pods_metric_replicas(5, samples, 1.0, Tolerance(0.0, 0.0)) == 5

    def test_no_samples_or_no_pods_raise(self) -> None:
        with pytest.raises(ValueError, match="no samples"):
            pods_metric_replicas(2, [PodSample(None), PodSample(None, phase="Pending")], 1.0)
        with pytest.raises(ValueError, match="pods must not be empty"):
            pods_metric_replicas(2, [], 1.0)

    @pytest.mark.parametrize("target", [0, -1.0, 0.0])
    def test_target_must_be_positive(self, target: float) -> None:
        with pytest.raises(ValueError, match="target_average_value must be > 0"):
            pods_metric_replicas(1, [PodSample(1.0)], target)
        with pytest.raises(ValueError, match="target_value must be > 0"):
            value_metric_replicas(1, 1.0, target, 1)


class TestPodPhases:
    def test_failed_and_deleting_pods_are_left_out(self) -> None:
        live = [PodSample(2.0), PodSample(2.0)]
        gone = [PodSample(100.0, phase="Failed"), PodSample(100.0, deleting=True)]
        assert pods_metric_replicas(2, live + gone, 1.0) == pods_metric_replicas(2, live, 1.0) == 4

    def test_pending_pods_are_unready(self) -> None:
        pending = PodSample(None, phase="Pending")
        # Scaling up: counted as zero -> 4 x 1.3 / 5 = 1.04, inside the tolerance: keep 5
        # (ignoring it would give ceil(1.3 x 4) = 6; counting it as the target, 7).
        assert pods_metric_replicas(5, [PodSample(1.3)] * 4 + [pending], 1.0) == 5
        # Scaling down: left out entirely -> ceil(0.5 x 2) = 1 (as the target it would be 2).
        assert pods_metric_replicas(3, [PodSample(0.5), PodSample(0.5), pending], 1.0) == 1

    def test_pending_pod_sample_is_ignored(self) -> None:
        # A Pending pod's sample is never used, even if one is reported.
        assert pods_metric_replicas(2, [PodSample(1.0), PodSample(50.0, phase="Pending")], 1.0) == 2


def test_value_target_multiplies_ready_pods_not_current() -> None:
    assert value_metric_replicas(10, 2.0, 1.0, ready_pods=3) == 6
    assert value_metric_replicas(10, 2.0, 1.0, ready_pods=10) == 20


class TestReconcile:
    def test_failed_metric_blocks_scale_down_but_not_scale_up(self) -> None:
        hpa = HorizontalPodAutoscaler(1, 20, history=[])
        assert hpa.reconcile(NOW, 5, [3, None]) == 5
        assert hpa.last_reason == "FailedMetricBlocksScaleDown"
        assert hpa.history == ()  # nothing recorded for the blocked scale-down
        assert hpa.reconcile(NOW + 15, 5, [8, None]) == 8

    def test_failed_metric_with_steady_proposal_still_normalizes(self) -> None:
        hpa = HorizontalPodAutoscaler(1, 20, history=[])
        assert hpa.reconcile(NOW, 5, [5, None]) == 5
        assert hpa.history == (Recommendation(5, NOW),)

    @pytest.mark.parametrize("proposals", [[], [None], [None, None]])
    def test_no_usable_proposal_keeps_the_count(self, proposals: list[int | None]) -> None:
        hpa = HorizontalPodAutoscaler(1, 20, history=[])
        assert hpa.reconcile(NOW, 7, proposals) == 7
        assert hpa.history == ()

    def test_highest_proposal_wins(self) -> None:
        hpa = HorizontalPodAutoscaler(1, 20, Behavior())
        assert hpa.reconcile(NOW, 4, [5, 7, 6]) == 7

    @pytest.mark.parametrize(("current", "expected"), [(12, 10), (1, 3)])
    def test_count_outside_bounds_jumps_to_bound_and_skips_the_rest(
        self, current: int, expected: int
    ) -> None:
        hpa = HorizontalPodAutoscaler(
            3,
            10,
            Behavior(scale_up=ScalingRules(select_policy="Disabled")),
            history=[Recommendation(50, NOW - 1)],
        )
        # Proposals, stabilization and the (disabled) rate limits are not consulted; no recommendation.
        assert hpa.reconcile(NOW, current, [None]) == expected
        assert hpa.history == (Recommendation(50, NOW - 1),)

    def test_zero_replicas_with_positive_min_means_scaling_disabled(self) -> None:
        hpa = HorizontalPodAutoscaler(2, 10)
        assert hpa.reconcile(NOW, 0, [5]) == 0
        assert hpa.last_reason == "ScalingDisabled"
        assert HorizontalPodAutoscaler(0, 10).reconcile(NOW, 0, [3]) == 3

    def test_history_none_is_seeded_with_current_on_first_reconcile(self) -> None:
        hpa = HorizontalPodAutoscaler(1, 10)
        assert hpa.history is None
        # The seed (8 at NOW) holds the legacy scale-down for the window.
        assert hpa.reconcile(NOW, 8, [2]) == 8
        assert hpa.history == (Recommendation(8, NOW), Recommendation(2, NOW))
        assert HorizontalPodAutoscaler(1, 10, history=[]).reconcile(NOW, 8, [2]) == 2

    def test_scale_events_are_kept_only_with_behavior(self) -> None:
        legacy = HorizontalPodAutoscaler(1, 10, history=[])
        legacy.reconcile(NOW, 2, [4])
        assert legacy.scale_up_events == ()
        hpa = HorizontalPodAutoscaler(1, 10, Behavior(), history=[])
        assert hpa.reconcile(NOW, 2, [4]) == 4
        assert hpa.scale_up_events == (ScaleEvent(2, NOW),)
        assert hpa.reconcile(NOW + 1, 4, [3]) == 4  # default 300 s scale-down window holds it
        assert hpa.scale_down_events == ()

    # Controller-level upstream cases, with the proposal the metric would have produced.
    def test_scale_up_rc_immediately_upstream(self) -> None:
        assert HorizontalPodAutoscaler(2, 6).reconcile(NOW, 1, [0]) == 2

    def test_scale_down_rc_immediately_upstream(self) -> None:
        assert HorizontalPodAutoscaler(2, 5).reconcile(NOW, 6, [20]) == 5

    def test_stabilize_downscale_upstream(self) -> None:
        hpa = HorizontalPodAutoscaler(
            1, 5, history=[Recommendation(10, NOW - 600), Recommendation(4, NOW - 60)]
        )
        assert hpa.reconcile(NOW, 4, [2]) == 4

    def test_no_scale_down_one_metric_invalid_upstream(self) -> None:
        assert HorizontalPodAutoscaler(2, 6, history=[]).reconcile(NOW, 5, [3, None]) == 5

    def test_scale_up_one_metric_empty_upstream(self) -> None:
        assert HorizontalPodAutoscaler(2, 6, history=[]).reconcile(NOW, 3, [4, None]) == 4

    def test_no_backoff_upscale_cm_no_backoff_cpu_upstream(self) -> None:
        hpa = HorizontalPodAutoscaler(1, 5, history=[])
        assert hpa.reconcile(NOW, 3, [600, 4]) == 5
        assert hpa.last_reason == "TooManyReplicas"


class TestLegacyVersusBehavior:
    def test_no_behavior_uses_legacy_limits_which_differ_from_default_behavior(self) -> None:
        # Legacy: max(2 x 1, 4) = 4. Default behavior: max(1 + 4 pods, 1 x 200%) = 5.
        assert legacy_rate_limit(1, 10, 1, 100) == (4, "ScaleUpLimit")
        assert rate_limit(1, 10, 1, 100, Behavior(), [], [], NOW) == (5, "ScaleUpLimit")
        assert HorizontalPodAutoscaler(1, 100, history=[]).reconcile(NOW, 1, [10]) == 4
        assert HorizontalPodAutoscaler(1, 100, Behavior(), history=[]).reconcile(NOW, 1, [10]) == 5

    def test_legacy_window_counts_a_record_exactly_one_window_old(self) -> None:
        history = [Recommendation(9, NOW - 300)]
        assert legacy_stabilize(3, history, NOW)[0] == 9
        assert legacy_stabilize(3, [Recommendation(9, NOW - 300.001)], NOW)[0] == 3
        # The behavior path uses a strict window.
        assert stabilize(10, 3, Behavior(), history, NOW)[0] == 3
        assert stabilize(10, 3, Behavior(), [Recommendation(9, NOW - 299.999)], NOW)[0] == 9

    def test_legacy_window_is_max_only(self) -> None:
        # A lower recent recommendation never holds back a scale-up on the legacy path.
        assert legacy_stabilize(8, [Recommendation(2, NOW - 10)], NOW)[0] == 8

    def test_controller_downscale_window_applies_to_both_paths(self) -> None:
        history = [Recommendation(9, NOW - 100)]
        assert (
            HorizontalPodAutoscaler(1, 20, history=history, downscale_window_seconds=60).reconcile(
                NOW, 9, [3]
            )
            == 3
        )
        assert (
            HorizontalPodAutoscaler(
                1, 20, Behavior(), history=history, downscale_window_seconds=60
            ).reconcile(NOW, 9, [3])
            == 3
        )
        assert HorizontalPodAutoscaler(1, 20, Behavior(), history=history).reconcile(NOW, 9, [3]) == 9


class TestDefaultBehavior:
    def test_default_policies_and_windows(self) -> None:
        assert (ScalingPolicy("Pods", 4, 15), ScalingPolicy("Percent", 100, 15)) == DEFAULT_SCALE_UP_POLICIES
        assert (ScalingPolicy("Percent", 100, 15),) == DEFAULT_SCALE_DOWN_POLICIES
        # Scale-up: Max of 4 pods or 100% per 15 s.
        assert scale_up_limit(3, None, [], [], NOW) == 7
        assert scale_up_limit(10, None, [], [], NOW) == 20
        # Scale-down: 100% per 15 s -> may go to zero at once.
        assert scale_down_limit(10, None, [], [], NOW) == 0
        # Scale-up window 0: a recent low recommendation does not hold a scale-up.
        assert stabilize(2, 6, Behavior(), [Recommendation(2, NOW - 1)], NOW)[0] == 6
        # Scale-down window 300 s.
        assert stabilize(6, 2, Behavior(), [Recommendation(6, NOW - 299)], NOW)[0] == 6
        assert stabilize(6, 2, Behavior(), [Recommendation(6, NOW - 301)], NOW)[0] == 2

    def test_15_second_period_is_strict(self) -> None:
        events = [ScaleEvent(4, NOW - 15)]
        assert scale_up_limit(8, None, events, [], NOW) == 16  # an event exactly 15 s old no longer counts
        assert scale_up_limit(8, None, [ScaleEvent(4, NOW - 14.9)], [], NOW) == 8

    def test_user_policy_list_replaces_defaults(self) -> None:
        one_pod = ScalingRules(policies=(ScalingPolicy("Pods", 1, 60),))
        assert scale_up_limit(10, one_pod, [], [], NOW) == 11  # not 20: the defaults are gone
        assert scale_down_limit(10, one_pod, [], [], NOW) == 9


class TestRateLimits:
    def test_scale_down_events_count_against_the_scale_up_limit(self) -> None:
        pods4 = ScalingRules(policies=(ScalingPolicy("Pods", 4, 60),))
        assert scale_up_limit(10, pods4, [], [ScaleEvent(3, NOW - 10)], NOW) == 17  # started the period at 13
        assert scale_up_limit(10, pods4, [ScaleEvent(2, NOW - 10)], [ScaleEvent(3, NOW - 10)], NOW) == 15

    def test_scale_up_events_count_against_the_scale_down_limit(self) -> None:
        pods4 = ScalingRules(policies=(ScalingPolicy("Pods", 4, 60),))
        assert scale_down_limit(10, pods4, [ScaleEvent(3, NOW - 10)], [], NOW) == 3  # started the period at 7
        assert scale_down_limit(10, pods4, [ScaleEvent(3, NOW - 10)], [ScaleEvent(1, NOW - 5)], NOW) == 4

    def test_select_max_on_scale_down_means_largest_decrease(self) -> None:
        two = (ScalingPolicy("Pods", 2, 60), ScalingPolicy("Percent", 50, 60))
        assert scale_down_limit(10, ScalingRules(select_policy="Max", policies=two), [], [], NOW) == 5
        assert scale_down_limit(10, ScalingRules(select_policy="Min", policies=two), [], [], NOW) == 8
        assert scale_up_limit(10, ScalingRules(select_policy="Max", policies=two), [], [], NOW) == 15
        assert scale_up_limit(10, ScalingRules(select_policy="Min", policies=two), [], [], NOW) == 12

    def test_disabled_select_policy_blocks_that_direction(self) -> None:
        off = Behavior(scale_up=ScalingRules(select_policy="Disabled"))
        assert rate_limit(5, 9, 1, 10, off, [], [], NOW) == (5, "ScaleUpLimit")
        assert rate_limit(5, 2, 1, 10, off, [], [], NOW) == (2, "DesiredWithinRange")

    def test_a_limit_never_pushes_past_current_the_wrong_way(self) -> None:
        pods2 = ScalingRules(policies=(ScalingPolicy("Pods", 2, 60),))
        busy_up = [ScaleEvent(10, NOW - 5)]
        assert scale_up_limit(10, pods2, busy_up, [], NOW) == 2  # below current: budget spent
        assert rate_limit(10, 20, 1, 100, Behavior(scale_up=pods2), busy_up, [], NOW) == (10, "ScaleUpLimit")
        busy_down = [ScaleEvent(10, NOW - 5)]
        assert scale_down_limit(10, pods2, [], busy_down, NOW) == 18  # above current
        assert rate_limit(10, 1, 1, 100, Behavior(scale_down=pods2), [], busy_down, NOW) == (
            10,
            "ScaleDownLimit",
        )

    def test_floating_point_as_upstream(self) -> None:
        # ceil(25 * (1 + 120/100)): 2.2 x 25 is 55.000000000000007 in float64, so the limit is 56.
        percent120 = ScalingRules(policies=(ScalingPolicy("Percent", 120, 60),))
        assert scale_up_limit(25, percent120, [], [], NOW) == 56
        # Scale-down truncates: int(7 * (1 - 0.3)) = int(4.8999999999999995) = 4.
        percent30 = ScalingRules(policies=(ScalingPolicy("Percent", 30, 60),))
        assert scale_down_limit(7, percent30, [], [], NOW) == 4


# === Validation
@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ScalingPolicy("Pods", 0, 60), "ScalingPolicy.value must be > 0, got 0"),
        (lambda: ScalingPolicy("X", 1, 60), "ScalingPolicy.type must be 'Pods' or 'Percent', got 'X'"),  # type: ignore[arg-type]
        (lambda: ScalingPolicy("Pods", 1, 0), "ScalingPolicy.period_seconds must be > 0, got 0"),
        (lambda: ScalingPolicy("Pods", 1, 1801), "ScalingPolicy.period_seconds must be <= 1800, got 1801"),
        (lambda: ScalingRules(policies=()), "ScalingRules.policies must list at least one policy"),
        (
            lambda: ScalingRules(stabilization_window_seconds=-1),
            "ScalingRules.stabilization_window_seconds must be >= 0, got -1",
        ),
        (
            lambda: ScalingRules(stabilization_window_seconds=3601),
            "ScalingRules.stabilization_window_seconds must be <= 3600, got 3601",
        ),
        (
            lambda: ScalingRules(select_policy="Fastest"),  # type: ignore[arg-type]
            "ScalingRules.select_policy must be 'Max', 'Min' or 'Disabled', got 'Fastest'",
        ),
        (lambda: ScalingRules(tolerance=-0.1), "ScalingRules.tolerance must be >= 0, got -0.1"),
        (lambda: Tolerance(scale_up=-1), "Tolerance.scale_up must be >= 0, got -1"),
        (
            lambda: PodSample(1.0, phase="Unknown"),  # type: ignore[arg-type]
            "PodSample.phase must be 'Running', 'Pending' or 'Failed', got 'Unknown'",
        ),
        (lambda: ScaleEvent(0, 1.0), "ScaleEvent.replica_change must be > 0, got 0"),
        (lambda: Recommendation(-1, 1.0), "Recommendation.replicas must be >= 0, got -1"),
        (lambda: HorizontalPodAutoscaler(5, 3), "max_replicas must be >= min_replicas (5), got 3"),
        (lambda: HorizontalPodAutoscaler(1, 0), "max_replicas must be >= 1, got 0"),
    ],
)
def test_validation_names_field_and_value(build: Any, message: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        build()
    assert message in str(excinfo.value)


def test_reconcile_rejects_negative_proposals() -> None:
    with pytest.raises(ValueError, match=r"proposals\[1\] must be >= 0, got -2"):
        HorizontalPodAutoscaler(1, 5).reconcile(NOW, 2, [3, -2])


# === Kubernetes spelling
MANIFEST: dict[str, Any] = {
    "apiVersion": "autoscaling/v2",
    "kind": "HorizontalPodAutoscaler",
    "metadata": {"name": "agent"},
    "spec": {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "agent"},
        "minReplicas": 2,
        "maxReplicas": 40,
        "metrics": [
            {
                "type": "Resource",
                "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
            },
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": "queue_depth"},
                    "target": {"type": "AverageValue", "averageValue": "500m"},
                },
            },
            {
                "type": "Object",
                "object": {
                    "describedObject": {"apiVersion": "v1", "kind": "Service", "name": "gateway"},
                    "metric": {"name": "requests_per_second"},
                    "target": {"type": "Value", "value": "2k"},
                },
            },
            {
                "type": "External",
                "external": {
                    "metric": {"name": "redis_lag", "selector": {"matchLabels": {"queue": "agents"}}},
                    "target": {"type": "AverageValue", "averageValue": 30},
                },
            },
        ],
        "behavior": {
            "scaleUp": {
                "stabilizationWindowSeconds": 0,
                "selectPolicy": "Max",
                "policies": [
                    {"type": "Pods", "value": 4, "periodSeconds": 15},
                    {"type": "Percent", "value": 100, "periodSeconds": 15},
                ],
                "tolerance": 0.05,
            },
            "scaleDown": {
                "stabilizationWindowSeconds": 600,
                "selectPolicy": "Min",
                "policies": [{"type": "Percent", "value": 10, "periodSeconds": 60}],
            },
        },
    },
}


class TestKubernetesSpelling:
    def test_behavior_round_trip(self) -> None:
        raw = MANIFEST["spec"]["behavior"]
        behavior = Behavior.from_k8s(raw)
        assert behavior.scale_up == ScalingRules(0, "Max", DEFAULT_SCALE_UP_POLICIES, 0.05)
        assert behavior.scale_down == ScalingRules(600, "Min", (ScalingPolicy("Percent", 10, 60),))
        assert behavior.to_k8s() == raw
        assert Behavior.from_k8s(behavior.to_k8s()) == behavior

    def test_partial_behavior_keeps_unset_fields_unset(self) -> None:
        behavior = Behavior.from_k8s({"scaleDown": {"stabilizationWindowSeconds": 60}})
        assert behavior == Behavior(scale_down=ScalingRules(stabilization_window_seconds=60))
        assert Behavior.from_k8s(behavior.to_k8s()) == behavior

    def test_tolerance_accepts_a_quantity_string(self) -> None:
        assert Behavior.from_k8s({"scaleUp": {"tolerance": "50m"}}).scale_up == ScalingRules(tolerance=0.05)

    def test_hpa_from_manifest(self) -> None:
        hpa = HorizontalPodAutoscaler.from_k8s(MANIFEST)
        assert (hpa.min_replicas, hpa.max_replicas) == (2, 40)
        assert [m.type for m in hpa.metrics] == ["Resource", "Pods", "Object", "External"]
        assert hpa.metrics[0] == MetricSpec("Resource", "cpu", "Utilization", 70.0)
        assert hpa.metrics[1] == MetricSpec("Pods", "queue_depth", "AverageValue", 0.5)
        assert hpa.metrics[2].target == 2000.0
        assert hpa.metrics[2].described_object == {"apiVersion": "v1", "kind": "Service", "name": "gateway"}
        assert hpa.metrics[3].selector == {"matchLabels": {"queue": "agents"}}
        assert hpa.behavior == Behavior.from_k8s(MANIFEST["spec"]["behavior"])
        assert hpa.metric_tolerance == Tolerance(scale_down=0.1, scale_up=0.05)
        assert hpa.to_k8s() == MANIFEST["spec"]
        assert HorizontalPodAutoscaler.from_k8s(hpa.to_k8s()).to_k8s() == MANIFEST["spec"]

    def test_hpa_spec_defaults(self) -> None:
        hpa = HorizontalPodAutoscaler.from_k8s({"maxReplicas": 5})
        assert hpa.min_replicas == 1
        assert hpa.behavior is None
        assert hpa.metrics == ()

    def test_metric_spec_built_in_code_exports(self) -> None:
        spec = MetricSpec("Pods", "qps", "AverageValue", 15.0)
        assert MetricSpec.from_k8s(spec.to_k8s(), "metrics[0]") == spec

    @pytest.mark.parametrize(
        ("mutate", "message"),
        [
            (
                lambda s: s["behavior"]["scaleUp"]["policies"][0].update(type="X"),
                "behavior.scaleUp.policies[0].type must be 'Pods' or 'Percent', got 'X'",
            ),
            (
                lambda s: s["behavior"]["scaleDown"]["policies"][0].update(value=0),
                "behavior.scaleDown.policies[0].value must be > 0, got 0",
            ),
            (
                lambda s: s["behavior"]["scaleDown"].update(policies=[]),
                "behavior.scaleDown.policies must list at least one policy",
            ),
            (
                lambda s: s["behavior"]["scaleDown"].update(stabilizationWindowSeconds=4000),
                "behavior.scaleDown.stabilizationWindowSeconds must be <= 3600, got 4000",
            ),
            (
                lambda s: s["behavior"]["scaleUp"].update(selectPolicy="Biggest"),
                "behavior.scaleUp.selectPolicy must be 'Max', 'Min' or 'Disabled', got 'Biggest'",
            ),
            (
                lambda s: s["behavior"]["scaleUp"].update(tolerance="lots"),
                "behavior.scaleUp.tolerance must be a quantity",
            ),
            (
                lambda s: s["behavior"]["scaleUp"].update(stabilisationWindowSeconds=5),
                "behavior.scaleUp has unknown field 'stabilisationWindowSeconds'",
            ),
            (lambda s: s.update(maxReplicas=1), "maxReplicas must be >= minReplicas (2), got 1"),
            (lambda s: s.pop("maxReplicas"), "maxReplicas is required"),
            (
                lambda s: s["metrics"][1]["pods"]["target"].update(type="Value"),
                "metrics[1].pods.target.type must be 'AverageValue', got 'Value'",
            ),
            (
                lambda s: s["metrics"][1]["pods"]["target"].update(averageValue="0"),
                "metrics[1].pods.target.averageValue must be > 0, got '0'",
            ),
            (
                lambda s: s["metrics"][0].update(type="Cheese"),
                "metrics[0].type must be 'Resource', 'ContainerResource', 'Pods', 'Object' or 'External'",
            ),
            (
                lambda s: s["metrics"][2]["object"].pop("describedObject"),
                "metrics[2].object.describedObject is required",
            ),
        ],
    )
    def test_bad_input_names_the_field_path(self, mutate: Any, message: str) -> None:
        spec = copy.deepcopy(MANIFEST["spec"])
        mutate(spec)
        with pytest.raises(ValueError) as excinfo:
            HorizontalPodAutoscaler.from_k8s(spec)
        assert message in str(excinfo.value)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("500m", 0.5),
        ("2", 2.0),
        (3, 3.0),
        ("1.5k", 1500.0),
        ("2Ki", 2048.0),
        ("1e3", 1000.0),
        ("100u", 1e-4),
    ],
)
def test_parse_quantity(raw: object, expected: float) -> None:
    assert parse_quantity(raw) == pytest.approx(expected)


@pytest.mark.parametrize("raw", ["", "abc", "5x", True, None, float("nan")])
def test_parse_quantity_rejects(raw: object) -> None:
    with pytest.raises(ValueError, match=r"x\.y must be"):
        parse_quantity(raw, "x.y")
