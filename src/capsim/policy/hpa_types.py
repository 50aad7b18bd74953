"""Frozen, validated HPA settings and records, loadable from and exportable to the autoscaling/v2 spelling."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from capsim.policy.hpa_quantity import parse_quantity

PolicyType = Literal["Pods", "Percent"]
SelectPolicy = Literal["Max", "Min", "Disabled"]
PodPhase = Literal["Running", "Pending", "Failed"]

POLICY_TYPES: tuple[str, ...] = ("Pods", "Percent")
SELECT_POLICIES: tuple[str, ...] = ("Max", "Min", "Disabled")
POD_PHASES: tuple[str, ...] = ("Running", "Pending", "Failed")

DEFAULT_TOLERANCE = 0.1  # --horizontal-pod-autoscaler-tolerance
DEFAULT_DOWNSCALE_WINDOW_SECONDS = 300  # --horizontal-pod-autoscaler-downscale-stabilization
MAX_STABILIZATION_WINDOW_SECONDS = 3600  # API validation
MAX_POLICY_PERIOD_SECONDS = 1800  # API validation


def _quote(value: object) -> str:
    return repr(value)


def check_int(label: str, value: object, *, minimum: int | None = None, above: int | None = None,
              maximum: int | None = None) -> int:
    """Return ``value`` if it is an int within bounds, else raise a ValueError naming ``label``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{label} must be an integer, got {_quote(value)}")
    if above is not None and value <= above:
        raise ValueError(f"{label} must be > {above}, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{label} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{label} must be <= {maximum}, got {value}")
    return value


def check_number(label: str, value: object, *, minimum: float | None = None) -> float:
    """Return ``value`` as a float if it is a finite number (>= ``minimum``), else raise naming ``label``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{label} must be a finite number, got {_quote(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{label} must be >= {minimum:g}, got {value}")
    return float(value)


def check_choice(label: str, value: object, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise naming ``label`` and the choices."""
    if value not in choices:
        quoted = [f"'{c}'" for c in choices]
        spelled = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
        raise ValueError(f"{label} must be {spelled}, got {_quote(value)}")
    return str(value)


def _check_keys(path: str, data: Mapping[str, Any], known: tuple[str, ...]) -> None:
    for key in data:
        if key not in known:
            raise ValueError(f"{path} has unknown field {key!r} (known: {', '.join(known)})")


def _mapping(path: str, data: object) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ValueError(f"{path} must be a mapping, got {_quote(data)}")
    return data


@dataclass(frozen=True, slots=True)
class Tolerance:
    """How far (as a fraction) the metric ratio may sit below/above 1.0 before the HPA acts.

    The band is inclusive at both ends: the count is left alone when
    ``1 - scale_down <= ratio <= 1 + scale_up``.
    """

    scale_down: float = DEFAULT_TOLERANCE
    scale_up: float = DEFAULT_TOLERANCE

    def __post_init__(self) -> None:
        down = check_number("Tolerance.scale_down", self.scale_down, minimum=0)
        object.__setattr__(self, "scale_down", down)
        object.__setattr__(self, "scale_up", check_number("Tolerance.scale_up", self.scale_up, minimum=0))

    def is_within(self, ratio: float) -> bool:
        """True when ``ratio`` (current / target) is inside the band, ends included."""
        return (1.0 - self.scale_down) <= ratio <= (1.0 + self.scale_up)


@dataclass(frozen=True, slots=True)
class ScalingPolicy:
    """One rate rule: at most ``value`` pods (or ``value`` percent) of change per ``period_seconds``."""

    type: PolicyType
    value: int
    period_seconds: int

    def __post_init__(self) -> None:
        _check_policy("ScalingPolicy.type", "ScalingPolicy.value", "ScalingPolicy.period_seconds",
                      self.type, self.value, self.period_seconds)

    @classmethod
    def from_k8s(cls, data: Mapping[str, Any], path: str = "policy") -> ScalingPolicy:
        """Load ``{type, value, periodSeconds}``; errors name ``path``."""
        data = _mapping(path, data)
        _check_keys(path, data, ("type", "value", "periodSeconds"))
        for key in ("type", "value", "periodSeconds"):
            if key not in data:
                raise ValueError(f"{path}.{key} is required")
        _check_policy(f"{path}.type", f"{path}.value", f"{path}.periodSeconds",
                      data["type"], data["value"], data["periodSeconds"])
        return cls(data["type"], data["value"], data["periodSeconds"])

    def to_k8s(self) -> dict[str, Any]:
        """The autoscaling/v2 spelling."""
        return {"type": self.type, "value": self.value, "periodSeconds": self.period_seconds}


def _check_policy(type_label: str, value_label: str, period_label: str,
                  type_: object, value: object, period: object) -> None:
    check_choice(type_label, type_, POLICY_TYPES)
    check_int(value_label, value, above=0)
    check_int(period_label, period, above=0, maximum=MAX_POLICY_PERIOD_SECONDS)


@dataclass(frozen=True, slots=True)
class ScalingRules:
    """The rules for one direction (``behavior.scaleUp`` or ``behavior.scaleDown``).

    ``None`` fields take the API defaults of the direction they are used for: scale-up window 0 and
    policies "4 pods or 100% per 15 s"; scale-down window the controller default (300 s) and policy
    "100% per 15 s". A user's policy list replaces the defaults entirely. ``tolerance`` overrides the
    HPA-level tolerance for this direction (the HPAConfigurableTolerance field).
    """

    stabilization_window_seconds: int | None = None
    select_policy: SelectPolicy = "Max"
    policies: tuple[ScalingPolicy, ...] | None = None
    tolerance: float | None = None

    def __post_init__(self) -> None:
        _check_rules("ScalingRules", self.stabilization_window_seconds, self.select_policy, self.tolerance)
        if self.policies is not None:
            if isinstance(self.policies, (str, bytes)) or not isinstance(self.policies, Sequence):
                raise ValueError(
                    f"ScalingRules.policies must be a sequence of ScalingPolicy, got {self.policies!r}")
            policies = tuple(self.policies)
            if not policies:
                raise ValueError("ScalingRules.policies must list at least one policy "
                                 "(None means the defaults), got an empty list")
            for i, policy in enumerate(policies):
                if not isinstance(policy, ScalingPolicy):
                    raise ValueError(f"ScalingRules.policies[{i}] must be a ScalingPolicy, got {policy!r}")
            object.__setattr__(self, "policies", policies)
        if self.tolerance is not None:
            object.__setattr__(self, "tolerance", float(self.tolerance))

    @classmethod
    def from_k8s(cls, data: Mapping[str, Any], path: str = "rules") -> ScalingRules:
        """Load ``{stabilizationWindowSeconds, selectPolicy, policies, tolerance}``; errors name ``path``."""
        data = _mapping(path, data)
        _check_keys(path, data, ("stabilizationWindowSeconds", "selectPolicy", "policies", "tolerance"))
        window = data.get("stabilizationWindowSeconds")
        select = data.get("selectPolicy", "Max")
        tolerance = None
        if data.get("tolerance") is not None:
            tolerance = parse_quantity(data["tolerance"], f"{path}.tolerance")
        _check_rules(path, window, select, tolerance, k8s=True)
        policies: tuple[ScalingPolicy, ...] | None = None
        if data.get("policies") is not None:
            raw = data["policies"]
            if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Sequence):
                raise ValueError(f"{path}.policies must be a list, got {_quote(raw)}")
            if not raw:
                raise ValueError(f"{path}.policies must list at least one policy, got an empty list")
            policies = tuple(ScalingPolicy.from_k8s(p, f"{path}.policies[{i}]") for i, p in enumerate(raw))
        return cls(window, select, policies, tolerance)

    def to_k8s(self) -> dict[str, Any]:
        """The autoscaling/v2 spelling, leaving unset fields out so they keep their defaults."""
        out: dict[str, Any] = {}
        if self.stabilization_window_seconds is not None:
            out["stabilizationWindowSeconds"] = self.stabilization_window_seconds
        out["selectPolicy"] = self.select_policy
        if self.policies is not None:
            out["policies"] = [p.to_k8s() for p in self.policies]
        if self.tolerance is not None:
            out["tolerance"] = self.tolerance
        return out


def _check_rules(path: str, window: object, select: object, tolerance: object, k8s: bool = False) -> None:
    window_label = f"{path}.stabilizationWindowSeconds" if k8s else f"{path}.stabilization_window_seconds"
    select_label = f"{path}.selectPolicy" if k8s else f"{path}.select_policy"
    if window is not None:
        check_int(window_label, window, minimum=0, maximum=MAX_STABILIZATION_WINDOW_SECONDS)
    check_choice(select_label, select, SELECT_POLICIES)
    if tolerance is not None:
        check_number(f"{path}.tolerance", tolerance, minimum=0)


@dataclass(frozen=True, slots=True)
class Behavior:
    """``spec.behavior``: per-direction rules; a direction left ``None`` gets the API defaults."""

    scale_up: ScalingRules | None = None
    scale_down: ScalingRules | None = None

    def __post_init__(self) -> None:
        for name in ("scale_up", "scale_down"):
            rules = getattr(self, name)
            if rules is not None and not isinstance(rules, ScalingRules):
                raise ValueError(f"Behavior.{name} must be ScalingRules or None, got {rules!r}")

    @classmethod
    def from_k8s(cls, data: Mapping[str, Any], path: str = "behavior") -> Behavior:
        """Load ``{scaleUp, scaleDown}`` as written in a manifest; errors name the field path."""
        data = _mapping(path, data)
        _check_keys(path, data, ("scaleUp", "scaleDown"))
        up = data.get("scaleUp")
        down = data.get("scaleDown")
        return cls(
            ScalingRules.from_k8s(up, f"{path}.scaleUp") if up is not None else None,
            ScalingRules.from_k8s(down, f"{path}.scaleDown") if down is not None else None,
        )

    def to_k8s(self) -> dict[str, Any]:
        """The autoscaling/v2 spelling (``Behavior.from_k8s(b.to_k8s()) == b``)."""
        out: dict[str, Any] = {}
        if self.scale_up is not None:
            out["scaleUp"] = self.scale_up.to_k8s()
        if self.scale_down is not None:
            out["scaleDown"] = self.scale_down.to_k8s()
        return out


DEFAULT_SCALE_UP_POLICIES: tuple[ScalingPolicy, ...] = (
    ScalingPolicy("Pods", 4, 15),
    ScalingPolicy("Percent", 100, 15),
)
DEFAULT_SCALE_DOWN_POLICIES: tuple[ScalingPolicy, ...] = (ScalingPolicy("Percent", 100, 15),)


@dataclass(frozen=True, slots=True)
class PodSample:
    """One pod as the HPA sees it: its metric sample (``None``: no sample) and its status.

    ``ready`` is the pod's Ready condition. For Pods metrics upstream ignores it (only CPU resource
    metrics consult readiness); it feeds :func:`ready_pod_count` for Object/External Value targets.
    """

    value: float | None
    phase: PodPhase = "Running"
    ready: bool = True
    deleting: bool = False

    def __post_init__(self) -> None:
        if self.value is not None:
            check_number("PodSample.value", self.value)
        check_choice("PodSample.phase", self.phase, POD_PHASES)
        if not isinstance(self.ready, bool):
            raise ValueError(f"PodSample.ready must be a bool, got {self.ready!r}")
        if not isinstance(self.deleting, bool):
            raise ValueError(f"PodSample.deleting must be a bool, got {self.deleting!r}")


@dataclass(frozen=True, slots=True)
class ScaleEvent:
    """A rescale the controller made: ``replica_change`` pods (a magnitude, > 0) at ``timestamp`` (s)."""

    replica_change: int
    timestamp: float

    def __post_init__(self) -> None:
        check_int("ScaleEvent.replica_change", self.replica_change, above=0)
        check_number("ScaleEvent.timestamp", self.timestamp)


@dataclass(frozen=True, slots=True)
class Recommendation:
    """An unstabilized replica recommendation recorded at ``timestamp`` (s)."""

    replicas: int
    timestamp: float

    def __post_init__(self) -> None:
        check_int("Recommendation.replicas", self.replicas, minimum=0)
        check_number("Recommendation.timestamp", self.timestamp)
