"""The metric specs of an autoscaling/v2 HPA (``spec.metrics``), typed for the simulator, kept for export."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from capsim.policy.hpa_quantity import parse_quantity
from capsim.policy.hpa_types import check_choice, check_int

MetricSourceType = Literal["Resource", "ContainerResource", "Pods", "Object", "External"]
MetricTargetType = Literal["Utilization", "Value", "AverageValue"]

SOURCE_TYPES: tuple[str, ...] = ("Resource", "ContainerResource", "Pods", "Object", "External")
_SOURCE_KEY = {
    "Resource": "resource",
    "ContainerResource": "containerResource",
    "Pods": "pods",
    "Object": "object",
    "External": "external",
}
# Which target types the API accepts for each source.
_ALLOWED_TARGETS: dict[str, tuple[str, ...]] = {
    "Resource": ("Utilization", "AverageValue"),
    "ContainerResource": ("Utilization", "AverageValue"),
    "Pods": ("AverageValue",),
    "Object": ("Value", "AverageValue"),
    "External": ("Value", "AverageValue"),
}
_TARGET_FIELD = {"Utilization": "averageUtilization", "Value": "value", "AverageValue": "averageValue"}


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One entry of ``spec.metrics``.

    ``target`` is the parsed target: a percentage of the request for ``Utilization``, otherwise
    a value in the metric's units (``"500m"`` is 0.5). ``selector`` and ``described_object`` are kept
    as written. ``raw`` is the entry as loaded, so :meth:`to_k8s` gives back the same spelling.
    """

    type: MetricSourceType
    name: str
    target_type: MetricTargetType
    target: float
    container: str | None = None
    selector: Mapping[str, Any] | None = None
    described_object: Mapping[str, Any] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_choice("MetricSpec.type", self.type, SOURCE_TYPES)
        check_choice("MetricSpec.target_type", self.target_type, _ALLOWED_TARGETS[self.type])
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"MetricSpec.name must be a non-empty string, got {self.name!r}")
        if not self.target > 0:
            raise ValueError(f"MetricSpec.target must be > 0, got {self.target!r}")

    @classmethod
    def from_k8s(cls, data: Mapping[str, Any], path: str = "metrics[0]") -> MetricSpec:
        """Load one ``spec.metrics`` entry; errors name the field path (``metrics[1].pods.target.type``)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{path} must be a mapping, got {data!r}")
        source_type = check_choice(f"{path}.type", data.get("type"), SOURCE_TYPES)
        key = _SOURCE_KEY[source_type]
        source = data.get(key)
        if not isinstance(source, Mapping):
            raise ValueError(f"{path}.{key} is required for type {source_type!r}")
        spath = f"{path}.{key}"

        container: str | None = None
        selector: Mapping[str, Any] | None = None
        described: Mapping[str, Any] | None = None
        if source_type in ("Resource", "ContainerResource"):
            name = source.get("name")
            if source_type == "ContainerResource":
                container = source.get("container")
                if not isinstance(container, str) or not container:
                    raise ValueError(f"{spath}.container must be a non-empty string, got {container!r}")
            name_label = f"{spath}.name"
        else:
            metric = source.get("metric")
            if not isinstance(metric, Mapping):
                raise ValueError(f"{spath}.metric is required for type {source_type!r}")
            name = metric.get("name")
            selector = metric.get("selector")
            name_label = f"{spath}.metric.name"
            if source_type == "Object":
                described = source.get("describedObject")
                if not isinstance(described, Mapping):
                    raise ValueError(f"{spath}.describedObject is required for type 'Object'")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{name_label} must be a non-empty string, got {name!r}")

        target = source.get("target")
        if not isinstance(target, Mapping):
            raise ValueError(f"{spath}.target is required")
        tpath = f"{spath}.target"
        target_type = check_choice(f"{tpath}.type", target.get("type"), _ALLOWED_TARGETS[source_type])
        tfield = _TARGET_FIELD[target_type]
        if target.get(tfield) is None:
            raise ValueError(f"{tpath}.{tfield} is required for target type {target_type!r}")
        if target_type == "Utilization":
            value = float(check_int(f"{tpath}.{tfield}", target[tfield], above=0))
        else:
            value = parse_quantity(target[tfield], f"{tpath}.{tfield}")
            if not value > 0:
                raise ValueError(f"{tpath}.{tfield} must be > 0, got {target[tfield]!r}")
        return cls(source_type, name, target_type, value, container, selector, described,  # type: ignore[arg-type]
                   copy.deepcopy(dict(data)))

    def to_k8s(self) -> dict[str, Any]:
        """The entry in autoscaling/v2 spelling (the loaded one when there is one)."""
        if self.raw:
            return copy.deepcopy(dict(self.raw))
        tfield = _TARGET_FIELD[self.target_type]
        target_value: Any = int(self.target) if self.target_type == "Utilization" else self.target
        target = {"type": self.target_type, tfield: target_value}
        source: dict[str, Any]
        if self.type in ("Resource", "ContainerResource"):
            source = {"name": self.name}
            if self.container is not None:
                source["container"] = self.container
        else:
            metric: dict[str, Any] = {"name": self.name}
            if self.selector is not None:
                metric["selector"] = copy.deepcopy(dict(self.selector))
            source = {"metric": metric}
            if self.described_object is not None:
                source["describedObject"] = copy.deepcopy(dict(self.described_object))
        source["target"] = target
        return {"type": self.type, _SOURCE_KEY[self.type]: source}
