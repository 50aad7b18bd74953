"""The Kubernetes HorizontalPodAutoscaler algorithm (autoscaling/v2), ported from upstream podautoscaler.

Pure functions of numbers and settings, no clock: ``now`` is passed in seconds. The per-metric
proposals live in :mod:`capsim.policy.hpa_replicas`, stabilization and rate limits in
:mod:`capsim.policy.hpa_behavior`, the settings in :mod:`capsim.policy.hpa_types`; this module adds
the one stateful piece, :class:`HorizontalPodAutoscaler`, which keeps the recommendation history and
scale events of one HPA the way the controller keeps them per object. Every public name is importable
from here. See docs/autoscaling.md for the mapping to upstream (Apache-2.0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from capsim.policy.hpa_behavior import (
    SCALE_UP_LIMIT_FACTOR,
    SCALE_UP_LIMIT_MINIMUM,
    Reason,
    legacy_rate_limit,
    legacy_scale_up_limit,
    legacy_stabilize,
    rate_limit,
    scale_down_limit,
    scale_down_policies,
    scale_down_window,
    scale_up_limit,
    scale_up_policies,
    scale_up_window,
    stabilize,
    stabilize_windows,
)
from capsim.policy.hpa_metrics import MetricSourceType, MetricSpec, MetricTargetType
from capsim.policy.hpa_quantity import MAX_INT32, milli_value, parse_quantity
from capsim.policy.hpa_replicas import (
    average_value_metric_replicas,
    pods_metric_replicas,
    ready_pod_count,
    value_metric_replicas,
)
from capsim.policy.hpa_types import (
    DEFAULT_DOWNSCALE_WINDOW_SECONDS,
    DEFAULT_SCALE_DOWN_POLICIES,
    DEFAULT_SCALE_UP_POLICIES,
    DEFAULT_TOLERANCE,
    Behavior,
    PodPhase,
    PodSample,
    PolicyType,
    Recommendation,
    ScaleEvent,
    ScalingPolicy,
    ScalingRules,
    SelectPolicy,
    Tolerance,
    check_int,
    check_number,
)

_T = TypeVar("_T")

_SPEC_KEYS = ("scaleTargetRef", "minReplicas", "maxReplicas", "metrics", "behavior")


class HorizontalPodAutoscaler:
    """One HPA as the controller runs it: settings plus the history the controller keeps for it.

    ``history`` is the list of unstabilized recommendations (``None``: the controller has never seen
    this HPA and seeds it with the current count on the first reconcile); ``scale_up_events`` and
    ``scale_down_events`` are the rescales it made. ``behavior=None`` selects the legacy path (a
    max-only scale-down window of ``downscale_window_seconds`` and an up limit of max(2 x current, 4)),
    which is *not* the same as ``Behavior()`` (the API defaults). ``tolerance`` is the cluster-wide
    default; ``behavior.scale_up/scale_down.tolerance`` override it per direction (see
    :attr:`metric_tolerance`, which callers pass to the per-metric functions).
    """

    def __init__(
        self,
        min_replicas: int | None,
        max_replicas: int,
        behavior: Behavior | None = None,
        downscale_window_seconds: float = DEFAULT_DOWNSCALE_WINDOW_SECONDS,
        tolerance: Tolerance = Tolerance(),  # noqa: B008 - frozen, so sharing the default is safe
        history: Sequence[Recommendation] | None = None,
        scale_up_events: Sequence[ScaleEvent] = (),
        scale_down_events: Sequence[ScaleEvent] = (),
        *,
        metrics: Sequence[MetricSpec] = (),
        scale_target_ref: Mapping[str, Any] | None = None,
    ) -> None:
        self._min = 1 if min_replicas is None else check_int("min_replicas", min_replicas, minimum=0)
        self._max = check_int("max_replicas", max_replicas, minimum=1)
        if self._max < self._min:
            raise ValueError(f"max_replicas must be >= min_replicas ({self._min}), got {self._max}")
        if behavior is not None and not isinstance(behavior, Behavior):
            raise ValueError(f"behavior must be a Behavior or None, got {behavior!r}")
        if not isinstance(tolerance, Tolerance):
            raise ValueError(f"tolerance must be a Tolerance, got {tolerance!r}")
        self._behavior = behavior
        self._downscale_window = check_number("downscale_window_seconds", downscale_window_seconds, minimum=0)
        self._tolerance = tolerance
        self._history: list[Recommendation] | None = None
        if history is not None:
            self._history = [_expect(Recommendation, f"history[{i}]", r) for i, r in enumerate(history)]
        self._up_events = [_expect(ScaleEvent, f"scale_up_events[{i}]", e)
                           for i, e in enumerate(scale_up_events)]
        self._down_events = [_expect(ScaleEvent, f"scale_down_events[{i}]", e)
                             for i, e in enumerate(scale_down_events)]
        self._metrics = tuple(_expect(MetricSpec, f"metrics[{i}]", m) for i, m in enumerate(metrics))
        self._scale_target_ref = dict(scale_target_ref) if scale_target_ref is not None else None
        self.last_reason: str | None = None
        """Why the last :meth:`reconcile` ended where it did: a ScalingLimited reason
        (``DesiredWithinRange``, ``ScaleUpLimit``, ...), or ``ScalingDisabled``, ``AboveMaxReplicas``,
        ``BelowMinReplicas``, ``NoUsableMetric``, ``FailedMetricBlocksScaleDown``."""

    # -- settings ------------------------------------------------------------------------------------
    @property
    def min_replicas(self) -> int:
        return self._min

    @property
    def max_replicas(self) -> int:
        return self._max

    @property
    def behavior(self) -> Behavior | None:
        return self._behavior

    @property
    def downscale_window_seconds(self) -> float:
        return self._downscale_window

    @property
    def tolerance(self) -> Tolerance:
        """The HPA-level (controller flag) tolerance."""
        return self._tolerance

    @property
    def metric_tolerance(self) -> Tolerance:
        """The tolerance the per-metric functions should use: per-direction behavior overrides applied."""
        down, up = self._tolerance.scale_down, self._tolerance.scale_up
        if self._behavior is not None:
            if self._behavior.scale_down is not None and self._behavior.scale_down.tolerance is not None:
                down = self._behavior.scale_down.tolerance
            if self._behavior.scale_up is not None and self._behavior.scale_up.tolerance is not None:
                up = self._behavior.scale_up.tolerance
        return Tolerance(scale_down=down, scale_up=up)

    @property
    def metrics(self) -> tuple[MetricSpec, ...]:
        """The metric specs loaded from the manifest (for the simulator to evaluate)."""
        return self._metrics

    @property
    def scale_target_ref(self) -> dict[str, Any] | None:
        return None if self._scale_target_ref is None else dict(self._scale_target_ref)

    # -- state ---------------------------------------------------------------------------------------
    @property
    def history(self) -> tuple[Recommendation, ...] | None:
        return None if self._history is None else tuple(self._history)

    @property
    def scale_up_events(self) -> tuple[ScaleEvent, ...]:
        return tuple(self._up_events)

    @property
    def scale_down_events(self) -> tuple[ScaleEvent, ...]:
        return tuple(self._down_events)

    # -- the sync ------------------------------------------------------------------------------------
    def reconcile(self, now: float, current_replicas: int, proposals: Sequence[int | None]) -> int:
        """One controller sync at ``now`` (s); returns the replica count to set.

        ``proposals`` are the per-metric replica proposals (``None``: that metric failed). The highest
        proposal wins; if any metric failed, a scale-down is not applied (and not recorded). With no
        usable proposal the count stays. ``current_replicas == 0`` with ``min_replicas > 0`` means
        scaling is disabled. A count outside [min, max] jumps to the bound, nothing else consulted.
        """
        check_number("now", now)
        check_int("current_replicas", current_replicas, minimum=0)
        usable: list[int] = []
        for i, proposal in enumerate(proposals):
            if proposal is not None:
                usable.append(check_int(f"proposals[{i}]", proposal, minimum=0))
        if self._history is None:
            self._history = [Recommendation(current_replicas, now)]

        if current_replicas == 0 and self._min != 0:
            self.last_reason = "ScalingDisabled"
            return current_replicas
        if current_replicas > self._max:
            desired, self.last_reason = self._max, "AboveMaxReplicas"
        elif current_replicas < self._min:
            desired, self.last_reason = self._min, "BelowMinReplicas"
        elif not usable:
            self.last_reason = "NoUsableMetric"
            return current_replicas
        else:
            desired = max(usable)
            if len(usable) < len(proposals) and desired < current_replicas:
                self.last_reason = "FailedMetricBlocksScaleDown"
                return current_replicas
            desired, self.last_reason = self._normalize(now, current_replicas, desired)
        if desired != current_replicas:
            self._store_scale_event(now, current_replicas, desired)
        return desired

    def _normalize(self, now: float, current: int, desired: int) -> tuple[int, str]:
        history = self._history if self._history is not None else []
        if self._behavior is None:
            stabilized, self._history = legacy_stabilize(desired, history, now, self._downscale_window)
            return legacy_rate_limit(current, stabilized, self._min, self._max)
        # An unset scale-down window takes the controller's default (maybeInitScaleDownStabilizationWindow).
        up_window = scale_up_window(self._behavior.scale_up)
        down_window = scale_down_window(self._behavior.scale_down, default=int(self._downscale_window))
        stabilized, self._history = stabilize_windows(current, desired, up_window, down_window, history, now)
        return rate_limit(current, stabilized, self._min, self._max, self._behavior,
                          self._up_events, self._down_events, now)

    def _store_scale_event(self, now: float, previous: int, new: int) -> None:
        """Record a rescale, reusing the slot of an event older than the longest period (storeScaleEvent)."""
        if self._behavior is None:
            return  # the legacy path never reads events, so upstream does not keep them
        if new > previous:
            events, change = self._up_events, new - previous
            policies = scale_up_policies(self._behavior.scale_up)
        else:
            events, change = self._down_events, previous - new
            policies = scale_down_policies(self._behavior.scale_down)
        longest = max(p.period_seconds for p in policies)
        outdated = [i for i, e in enumerate(events) if now - e.timestamp > longest]
        event = ScaleEvent(change, now)
        if outdated:
            events[outdated[-1]] = event
        else:
            events.append(event)

    # -- Kubernetes spelling -------------------------------------------------------------------------
    @classmethod
    def from_k8s(
        cls,
        spec: Mapping[str, Any],
        *,
        downscale_window_seconds: float = DEFAULT_DOWNSCALE_WINDOW_SECONDS,
        tolerance: Tolerance = Tolerance(),  # noqa: B008
    ) -> HorizontalPodAutoscaler:
        """Load an autoscaling/v2 HPA ``spec`` (or a whole manifest with a ``spec``) pasted from YAML.

        ``minReplicas`` defaults to 1; ``metrics`` are kept as :class:`MetricSpec`; ``behavior`` as
        :class:`Behavior`. Errors name the field path, e.g. ``behavior.scaleUp.policies[0].type``.
        """
        if not isinstance(spec, Mapping):
            raise ValueError(f"spec must be a mapping, got {spec!r}")
        if "spec" in spec and isinstance(spec["spec"], Mapping):
            kind = spec.get("kind", "HorizontalPodAutoscaler")
            if kind != "HorizontalPodAutoscaler":
                raise ValueError(f"kind must be 'HorizontalPodAutoscaler', got {kind!r}")
            spec = spec["spec"]
        for key in spec:
            if key not in _SPEC_KEYS:
                raise ValueError(f"spec has unknown field {key!r} (known: {', '.join(_SPEC_KEYS)})")
        if "maxReplicas" not in spec:
            raise ValueError("maxReplicas is required")
        min_replicas = spec.get("minReplicas")
        min_replicas = 1 if min_replicas is None else check_int("minReplicas", min_replicas, minimum=0)
        max_replicas = check_int("maxReplicas", spec["maxReplicas"], minimum=1)
        if max_replicas < min_replicas:
            raise ValueError(f"maxReplicas must be >= minReplicas ({min_replicas}), got {max_replicas}")
        raw_metrics = spec.get("metrics") or []
        if isinstance(raw_metrics, (str, bytes, Mapping)) or not isinstance(raw_metrics, Sequence):
            raise ValueError(f"metrics must be a list, got {raw_metrics!r}")
        metrics = [MetricSpec.from_k8s(m, f"metrics[{i}]") for i, m in enumerate(raw_metrics)]
        if min_replicas == 0 and not any(m.type in ("Object", "External") for m in metrics):
            # the API server's rule (pkg/apis/autoscaling/validation: validateMetrics): with no pods there
            # is no Pods or Resource metric to scale back up from, so such an HPA would stay at zero
            raise ValueError("metrics must specify at least one Object or External metric to support scaling "
                             "to zero replicas (minReplicas is 0; Kubernetes refuses this HPA)")
        behavior = None if spec.get("behavior") is None else Behavior.from_k8s(spec["behavior"], "behavior")
        ref = spec.get("scaleTargetRef")
        if ref is not None and not isinstance(ref, Mapping):
            raise ValueError(f"scaleTargetRef must be a mapping, got {ref!r}")
        return cls(min_replicas, max_replicas, behavior, downscale_window_seconds, tolerance,
                   metrics=metrics, scale_target_ref=ref)

    def to_k8s(self) -> dict[str, Any]:
        """The autoscaling/v2 ``spec`` (settings only; the history is controller state, not spec)."""
        spec: dict[str, Any] = {}
        if self._scale_target_ref is not None:
            spec["scaleTargetRef"] = dict(self._scale_target_ref)
        spec["minReplicas"] = self._min
        spec["maxReplicas"] = self._max
        if self._metrics:
            spec["metrics"] = [m.to_k8s() for m in self._metrics]
        if self._behavior is not None:
            spec["behavior"] = self._behavior.to_k8s()
        return spec

    def __repr__(self) -> str:
        return (f"HorizontalPodAutoscaler(min_replicas={self._min}, max_replicas={self._max}, "
                f"behavior={self._behavior!r}, downscale_window_seconds={self._downscale_window:g}, "
                f"tolerance={self._tolerance!r})")


def _expect(kind: type[_T], label: str, value: object) -> _T:
    if not isinstance(value, kind):
        raise ValueError(f"{label} must be a {kind.__name__}, got {value!r}")
    return value


__all__ = [
    "DEFAULT_DOWNSCALE_WINDOW_SECONDS",
    "DEFAULT_SCALE_DOWN_POLICIES",
    "DEFAULT_SCALE_UP_POLICIES",
    "DEFAULT_TOLERANCE",
    "MAX_INT32",
    "SCALE_UP_LIMIT_FACTOR",
    "SCALE_UP_LIMIT_MINIMUM",
    "Behavior",
    "HorizontalPodAutoscaler",
    "MetricSourceType",
    "MetricSpec",
    "MetricTargetType",
    "PodPhase",
    "PodSample",
    "PolicyType",
    "Reason",
    "Recommendation",
    "ScaleEvent",
    "ScalingPolicy",
    "ScalingRules",
    "SelectPolicy",
    "Tolerance",
    "average_value_metric_replicas",
    "legacy_rate_limit",
    "legacy_scale_up_limit",
    "legacy_stabilize",
    "milli_value",
    "parse_quantity",
    "pods_metric_replicas",
    "rate_limit",
    "ready_pod_count",
    "scale_down_limit",
    "scale_up_limit",
    "stabilize",
    "value_metric_replicas",
]
