"""Per-metric replica proposals: cases ported from kubernetes replica_calculator_test.go (facts carried over).

Upstream feeds levels in milli-units; here they are divided by 1000 so the milli quantization is
exercised on the way back. Case names follow the upstream test functions.
"""

from __future__ import annotations

import pytest

from capsim.policy.autoscaling import (
    MAX_INT32,
    PodSample,
    Tolerance,
    average_value_metric_replicas,
    pods_metric_replicas,
    ready_pod_count,
    value_metric_replicas,
)

MAX_INT64 = 2**63 - 1
DEFAULT = Tolerance(0.1, 0.1)
UP_1PCT = Tolerance(0.1, 0.01)  # Tolerances{defaultTestingTolerance, .01}


def m(milli: int) -> float:
    """Upstream's milli-unit level as a value in units."""
    return milli / 1000


def pods(
    levels: list[int],
    ready: list[bool] | None = None,
    phases: list[str] | None = None,
    deleting: list[bool] | None = None,
    count: int | None = None,
) -> list[PodSample]:
    """Build pods the way upstream's fake clients do: pod i gets levels[i] if there is one."""
    n = count if count is not None else max(len(levels), len(phases or []))
    out = []
    for i in range(n):
        out.append(
            PodSample(
                value=m(levels[i]) if i < len(levels) else None,
                phase=phases[i] if phases else "Running",  # type: ignore[arg-type]
                ready=ready[i] if ready and i < len(ready) else True,
                deleting=bool(deleting[i]) if deleting else False,
            )
        )
    return out


# --- Pods metric, AverageValue target (GetMetricReplicas / calcPlainMetricReplicas)
PODS_CASES = [
    # name, current, pods, target (milli), tolerance, expected
    ("TestReplicaCalcScaleUpCM", 3, pods([20000, 10000, 30000]), 15000, DEFAULT, 4),
    (
        "TestReplicaCalcScaleUpCMUnreadyHotCpuNoLessScale",
        3,
        pods([50000, 10000, 30000], ready=[True, True, False]),
        15000,
        DEFAULT,
        6,
    ),
    (
        "TestReplicaCalcScaleUpCMUnreadyHotCpuScaleWouldScaleDown",
        3,
        pods([50000, 15000, 30000], ready=[False, True, False]),
        15000,
        DEFAULT,
        7,
    ),
    ("TestReplicaCalcScaleDownCM", 5, pods([12000] * 5), 20000, DEFAULT, 3),
    ("TestReplicaCalcToleranceCM", 3, pods([20000, 21000, 21000]), 20000, DEFAULT, 3),
    ("TestReplicaCalcConfigurableToleranceCM", 3, pods([20000, 21000, 21000]), 20000, UP_1PCT, 4),
    (
        "TestPlainMetricReplicaCalcMissingMetricsNoChangeEq",
        5,
        pods([20000, 19000, 21000], count=5),
        20000,
        DEFAULT,
        5,
    ),
    ("TestReplicaCalcDuringRollingUpdateWithMaxSurgeCM", 2, pods([10000, 10000], count=3), 17000, DEFAULT, 2),
]


@pytest.mark.parametrize(
    ("name", "current", "samples", "target", "tolerance", "expected"),
    PODS_CASES,
    ids=[c[0] for c in PODS_CASES],
)
def test_pods_metric_upstream(
    name: str, current: int, samples: list[PodSample], target: int, tolerance: Tolerance, expected: int
) -> None:
    assert pods_metric_replicas(current, samples, m(target), tolerance) == expected


# --- Resource (CPU) cases whose utilization arithmetic equals the AverageValue arithmetic
# Upstream's CPU path also treats not-ready Running pods as unready; honor_readiness=True reproduces that.
# Requests are 1.0 CPU per container and two containers per pod (so 2000m per pod); a utilization target
# of u% is an average-value target of u% of the mean request. Only cases where the two paths coincide
# exactly are carried over (missing pods on scale-down use 100% of the request upstream, not the target).
def cpu(levels: list[int]) -> list[int]:
    return [2 * level for level in levels]  # both containers report the level


CPU_CASES = [
    (
        "scale up: unready pod scales less",
        3,
        pods(cpu([300, 500, 700]), ready=[False, True, True]),
        600,
        DEFAULT,
        4,
    ),
    (
        "no scale: unready pods ignored",
        3,
        pods(cpu([400, 500, 700]), ready=[True, False, False]),
        600,
        DEFAULT,
        3,
    ),
    (
        "scale up: failed pods ignored",
        2,
        pods(
            cpu([500, 700]),
            ready=[True, True, False, False],
            phases=["Running", "Running", "Failed", "Failed"],
        ),
        600,
        DEFAULT,
        4,
    ),
    (
        "scale up: pods being deleted are ignored",
        2,
        pods(
            cpu([500, 700]),
            ready=[True, True, False, False],
            phases=["Running"] * 4,
            deleting=[False, False, True, True],
        ),
        600,
        DEFAULT,
        4,
    ),
    ("scale down", 5, pods(cpu([100, 300, 500, 250, 250])), 1000, DEFAULT, 3),
    (
        "scale down: exclude unready pods",
        5,
        pods(cpu([100, 300, 500, 250, 250]), ready=[True, True, True, False, False]),
        1000,
        DEFAULT,
        2,
    ),
    (
        "scale down: exclude unscheduled pods",
        5,
        pods(cpu([100]), ready=[True, False, False, False, False], phases=["Running"] + ["Pending"] * 4),
        1000,
        DEFAULT,
        1,
    ),
    (
        "scale down: failed pods ignored",
        5,
        pods(cpu([100, 300, 500, 250, 250]), phases=["Running"] * 5 + ["Failed"] * 2),
        1000,
        DEFAULT,
        3,
    ),
    (
        "scale down: pods being deleted are ignored",
        5,
        pods(cpu([100, 300, 500, 250, 250]), phases=["Running"] * 7, deleting=[False] * 5 + [True] * 2),
        1000,
        DEFAULT,
        3,
    ),
    ("TestReplicaCalcTolerance", 3, pods(cpu([1010, 1030, 1020])), 2000, DEFAULT, 3),
    ("TestReplicaCalcMissingMetricsNoChangeEq", 2, pods(cpu([1000]), count=2), 2000, DEFAULT, 2),
    ("TestReplicaCalcMissingMetricsNoChangeGt", 2, pods(cpu([1900]), count=2), 2000, DEFAULT, 2),
    ("TestReplicaCalcMissingMetricsNoChangeLt", 2, pods(cpu([600]), count=2), 2000, DEFAULT, 2),
    (
        "TestReplicaCalcMissingMetricsUnreadyChange",
        3,
        pods(cpu([100, 450]), ready=[False, True, True], count=3),
        1000,
        DEFAULT,
        3,
    ),
    (
        "TestReplicaCalcMissingMetricsUnreadyScaleUp",
        3,
        pods(cpu([100, 2000]), ready=[False, True, True], count=3),
        1000,
        DEFAULT,
        4,
    ),
    ("TestReplicaCalcDuringRollingUpdateWithMaxSurge", 2, pods(cpu([100, 100]), count=3), 1000, DEFAULT, 2),
    (
        "configurable tolerance: outside of a 0% tolerance",
        3,
        pods(cpu([909, 1010, 1111])),
        2000,
        Tolerance(0.0, 0.0),
        4,
    ),
    (
        "configurable tolerance: within a 200% scale-up tolerance",
        3,
        pods(cpu([1890, 1910, 1900])),
        2000,
        Tolerance(0.1, 2.0),
        3,
    ),
    (
        "configurable tolerance: outside 8% scale-up tolerance",
        3,
        pods(cpu([1100, 1080, 1090])),
        2000,
        Tolerance(2.0, 0.08),
        4,
    ),
    (
        "configurable tolerance: within a 36% scale-down tolerance",
        3,
        pods(cpu([660, 640, 650])),
        2000,
        Tolerance(0.36, 0.1),
        3,
    ),
    (
        "configurable tolerance: outside a 34% scale-down tolerance",
        3,
        pods(cpu([660, 640, 650])),
        2000,
        Tolerance(0.34, 0.1),
        2,
    ),
]


@pytest.mark.parametrize(
    ("name", "current", "samples", "target", "tolerance", "expected"),
    CPU_CASES,
    ids=[c[0] for c in CPU_CASES],
)
def test_cpu_average_value_upstream(
    name: str, current: int, samples: list[PodSample], target: int, tolerance: Tolerance, expected: int
) -> None:
    assert pods_metric_replicas(current, samples, m(target), tolerance, honor_readiness=True) == expected


# --- Object / External metric, Value target (getUsageRatioReplicaCount)
VALUE_CASES = [
    # name, current, value (milli), target (milli), ready pods, tolerance, expected
    ("TestReplicaCalcScaleUpCMObject", 3, 20000, 15000, 3, DEFAULT, 4),
    ("TestReplicaCalcScaleUpCMObjectIgnoresUnreadyPods", 3, 50000, 10000, 1, DEFAULT, 5),
    ("TestReplicaCalcScaleUpCMExternalIgnoresUnreadyPods", 3, 8600, 4400, 1, DEFAULT, 2),
    ("TestReplicaCalcScaleDownCMObject", 5, 12000, 20000, 5, DEFAULT, 3),
    ("TestReplicaCalcScaleDownCMExternal", 5, 8600, 14334, 5, DEFAULT, 3),
    ("TestReplicaCalcToleranceCMObject", 3, 20666, 20000, 3, DEFAULT, 3),
    ("TestReplicaCalcToleranceCMExternal", 3, 8600, 8888, 3, DEFAULT, 3),
    ("TestReplicaCalcConfigurableToleranceCMObject", 3, 20666, 20000, 3, UP_1PCT, 4),
    ("TestReplicaCalcConfigurableToleranceCMExternal", 3, 8900, 8800, 3, UP_1PCT, 4),
    ("TestReplicaCalcScaleUpOverflow", 3, MAX_INT64, 1, 3, DEFAULT, MAX_INT32),
    ("TestReplicaCalcExternalMetricUsageOverflow", 3, MAX_INT64, MAX_INT64, 3, DEFAULT, 3),
]


@pytest.mark.parametrize(
    ("name", "current", "value", "target", "ready", "tolerance", "expected"),
    VALUE_CASES,
    ids=[c[0] for c in VALUE_CASES],
)
def test_value_metric_upstream(
    name: str, current: int, value: int, target: int, ready: int, tolerance: Tolerance, expected: int
) -> None:
    assert value_metric_replicas(current, m(value), m(target), ready, tolerance) == expected


# --- Object / External metric, AverageValue target (Get{Object,External}PerPodMetricReplicas)
AVERAGE_CASES = [
    # name, status replicas, total (milli), per-pod target (milli), tolerance, expected
    ("TestReplicaCalcScaleUpCMPerPodObject", 3, 20000, 5000, DEFAULT, 4),
    ("TestReplicaCalcScaleDownPerPodCMObject", 5, 6000, 2000, DEFAULT, 3),
    ("TestReplicaCalcTolerancePerPodCMObject", 4, 20166, 5000, DEFAULT, 4),
    ("TestReplicaCalcConfigurableTolerancePerPodCMObject", 4, 20208, 5000, UP_1PCT, 5),
    ("TestReplicaCalcScaleUpPerPodCMExternal", 3, 8600, 2150, DEFAULT, 4),
    ("TestReplicaCalcScaleDownPerPodCMExternal", 5, 8600, 2867, DEFAULT, 3),
    ("TestReplicaCalcTolerancePerPodCMExternal", 3, 8600, 2900, DEFAULT, 3),
    ("TestReplicaCalcConfigurableTolerancePerPodCMExternal", 3, 8600, 2800, UP_1PCT, 4),
    ("TestExternalPerPodMetricReplicaOverflow", 1, MAX_INT64, 1, DEFAULT, MAX_INT32),
    ("TestExternalPerPodMetricUsageOverflow", 1, MAX_INT64, MAX_INT64, DEFAULT, 1),
]


@pytest.mark.parametrize(
    ("name", "status", "total", "target", "tolerance", "expected"),
    AVERAGE_CASES,
    ids=[c[0] for c in AVERAGE_CASES],
)
def test_average_value_metric_upstream(
    name: str, status: int, total: int, target: int, tolerance: Tolerance, expected: int
) -> None:
    assert average_value_metric_replicas(status, m(total), m(target), tolerance) == expected


# --- groupPods: which pods count (TestGroupPods, non-CPU resource)
def test_group_pods_pending_unready_failed_and_deleting_ignored() -> None:
    # Scale-up: a Pending pod counts as 0; the Failed and deleting pods are not counted at all.
    samples = [
        PodSample(2.0),
        PodSample(2.0),
        PodSample(None, phase="Pending"),
        PodSample(9.0, phase="Failed"),
        PodSample(9.0, deleting=True),
    ]
    # ready avg 2.0 / 1.0 -> ratio 2; with the Pending pod at 0: 4/3 -> ceil(1.333 * 3) = 4
    assert pods_metric_replicas(3, samples, 1.0) == 4
    # Scale-down: the Pending pod is left out (not counted as the target): 0.5 * 2 ready -> 1
    low = [PodSample(0.5), PodSample(0.5), PodSample(None, phase="Pending")]
    assert pods_metric_replicas(3, low, 1.0) == 1


def test_ready_pod_count_counts_running_and_ready() -> None:
    samples = [
        PodSample(1.0),
        PodSample(1.0, ready=False),
        PodSample(None, phase="Pending"),
        PodSample(1.0, phase="Failed", ready=False),
        PodSample(None),
    ]
    assert ready_pod_count(samples) == 2


def test_scale_from_zero_skips_tolerance_and_pods() -> None:
    # getUsageRatioReplicaCount with currentReplicas == 0: ceil(usageRatio), tolerance not consulted.
    assert value_metric_replicas(0, 1.05, 1.0, ready_pods=0) == 2
    assert value_metric_replicas(0, 0.0, 1.0, ready_pods=0) == 0


def test_average_value_with_zero_status_replicas() -> None:
    # Upstream divides by zero (ratio +Inf/NaN, never within tolerance): ceil(total / target).
    assert average_value_metric_replicas(0, 2.5, 1.0) == 3
    assert average_value_metric_replicas(0, 0.0, 1.0) == 0
