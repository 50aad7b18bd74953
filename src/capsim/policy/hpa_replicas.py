"""Per-metric replica proposals, ported from kubernetes pkg/controller/podautoscaler/replica_calculator.go.

Each function answers "how many replicas does this one metric ask for?" exactly as the controller's
ReplicaCalculator does: values and targets are quantized to milli-units first, averages use int64
truncating division, the tolerance band is inclusive, and pods without a usable sample are handled
conservatively so that they can damp a change but never reverse its direction.
"""

from __future__ import annotations

from collections.abc import Sequence

from capsim.policy.hpa_quantity import clamp_int32, div_trunc, milli_value
from capsim.policy.hpa_types import PodSample, Tolerance, check_int

_DEFAULT_TOLERANCE = Tolerance()


def _target_milli(label: str, target: float) -> int:
    milli = milli_value(target, label)
    if milli <= 0:
        raise ValueError(f"{label} must be > 0, got {target!r}")
    return milli


def _average(values: Sequence[int]) -> int:
    return div_trunc(sum(values), len(values))


def ready_pod_count(pods: Sequence[PodSample]) -> int:
    """Pods counted as ready for Object/External ``Value`` targets: Running with a true Ready condition."""
    return sum(1 for p in pods if p.phase == "Running" and p.ready)


def pods_metric_replicas(
    current_replicas: int,
    pods: Sequence[PodSample],
    target_average_value: float,
    tolerance: Tolerance = _DEFAULT_TOLERANCE,
    *,
    honor_readiness: bool = False,
) -> int:
    """Replicas proposed by a Pods metric with an ``AverageValue`` target (upstream calcPlainMetricReplicas).

    ``pods`` lists every pod the selector matches, with its sample in metric units (``None``: no sample).
    Failed and deleting pods are ignored; Pending pods are unready: left out when scaling down and
    counted as 0 when scaling up. Running pods without a sample count as the target when scaling down
    and as 0 when scaling up (nothing is filled in when the ratio is exactly 1). A change that those
    fill-ins would reverse, or that lands inside the tolerance, keeps ``current_replicas``.

    ``honor_readiness=True`` also treats Running pods with ``ready=False`` as unready, which is what
    upstream does for CPU resource metrics (minus its start-time grace logic); by default readiness
    of a Running pod is ignored, as it is for custom Pods metrics.
    """
    check_int("current_replicas", current_replicas, minimum=0)
    if not pods:
        raise ValueError("pods must not be empty: no pods returned by selector while calculating replicas")
    target = _target_milli("target_average_value", target_average_value)

    ready: list[int] = []
    unready = 0
    missing = 0
    for i, pod in enumerate(pods):
        if not isinstance(pod, PodSample):
            raise ValueError(f"pods[{i}] must be a PodSample, got {pod!r}")
        if pod.deleting or pod.phase == "Failed":
            continue
        if pod.phase == "Pending":
            unready += 1
            continue
        if pod.value is None:
            missing += 1
            continue
        if honor_readiness and not pod.ready:
            unready += 1
            continue
        ready.append(milli_value(pod.value, f"pods[{i}].value"))

    if not ready:
        raise ValueError("no samples: did not receive metrics for any ready pod (pods might be unready)")

    usage_ratio = _average(ready) / target
    scale_up_with_unready = unready > 0 and usage_ratio > 1.0
    if not scale_up_with_unready and missing == 0:
        if tolerance.is_within(usage_ratio):
            return current_replicas
        return clamp_int32(usage_ratio * len(ready))

    samples = list(ready)
    if missing > 0:
        if usage_ratio < 1.0:
            samples.extend([target] * missing)
        elif usage_ratio > 1.0:
            samples.extend([0] * missing)
    if scale_up_with_unready:
        samples.extend([0] * unready)

    new_ratio = _average(samples) / target
    if (tolerance.is_within(new_ratio) or (usage_ratio < 1.0 < new_ratio)
            or (usage_ratio > 1.0 > new_ratio)):
        return current_replicas
    new_replicas = clamp_int32(new_ratio * len(samples))
    if (new_ratio < 1.0 and new_replicas > current_replicas) or (
            new_ratio > 1.0 and new_replicas < current_replicas):
        return current_replicas
    return new_replicas


def value_metric_replicas(
    current_replicas: int,
    value: float,
    target_value: float,
    ready_pods: int,
    tolerance: Tolerance = _DEFAULT_TOLERANCE,
) -> int:
    """Replicas proposed by an Object or External metric with a ``Value`` target.

    Outside the tolerance the proposal is ``ceil(value / target * ready_pods)``: the ratio multiplies
    the *ready* pods, not the current count. From ``current_replicas == 0`` the tolerance and pods are
    skipped and the proposal is ``ceil(value / target)`` (scale from zero). ``value`` is the metric's
    total (External metrics sum their series first).
    """
    check_int("current_replicas", current_replicas, minimum=0)
    check_int("ready_pods", ready_pods, minimum=0)
    usage = milli_value(value, "value")
    target = _target_milli("target_value", target_value)
    usage_ratio = usage / target
    if current_replicas == 0:
        return clamp_int32(usage_ratio)
    if tolerance.is_within(usage_ratio):
        return current_replicas
    return clamp_int32(usage_ratio * ready_pods)


def average_value_metric_replicas(
    status_replicas: int,
    total_value: float,
    target_average_value: float,
    tolerance: Tolerance = _DEFAULT_TOLERANCE,
) -> int:
    """Replicas proposed by an Object or External metric with an ``AverageValue`` target.

    The ratio is ``total / (target * status_replicas)``; outside the tolerance the proposal is
    ``ceil(total / target)``, which does not depend on the current count at all.
    ``status_replicas`` is the scale subresource's ``status.replicas`` (pods that exist).
    """
    check_int("status_replicas", status_replicas, minimum=0)
    usage = milli_value(total_value, "total_value")
    target = _target_milli("target_average_value", target_average_value)
    if status_replicas == 0:
        # Upstream divides by zero here: +Inf or NaN, never within tolerance.
        return clamp_int32(usage / target)
    usage_ratio = usage / (float(target) * float(status_replicas))
    if tolerance.is_within(usage_ratio):
        return status_replicas
    return clamp_int32(usage / target)


__all__ = [
    "average_value_metric_replicas",
    "pods_metric_replicas",
    "ready_pod_count",
    "value_metric_replicas",
]
