"""The autoscaling/v2 HorizontalPodAutoscaler of a scenario, and the way back from one to the scenario.

The ``spec`` is the scenario's autoscaler in the Kubernetes spelling it was written in
(``Autoscaler.k8s_spec``), plus a ``scaleTargetRef`` to the Deployment. The metric pipeline the
simulator modelled around the HPA (Prometheus scrape interval, adapter window and lag, controller sync
period and tolerance) is not part of an HPA object: it is recorded in ``capsim.io/*`` annotations, so
:func:`autoscaler_from_hpa` gives back the scenario's autoscaler, equal field for field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from capsim.export.target import DeployTarget
from capsim.model.scenario import Autoscaler, Scenario
from capsim.model.settings import SettingsError, format_validation_error
from capsim.policy.autoscaling import HorizontalPodAutoscaler

API_VERSION = "autoscaling/v2"
#: The pipeline fields of ``Autoscaler`` kept as annotations, and their annotation keys.
PIPELINE_ANNOTATIONS: dict[str, str] = {
    "sync_period_s": "capsim.io/controller-sync-period-s",
    "tolerance": "capsim.io/controller-tolerance",
    "downscale_window_s": "capsim.io/controller-downscale-window-s",
    "scrape_interval_s": "capsim.io/prometheus-scrape-interval-s",
    "query_window_s": "capsim.io/adapter-query-window-s",
    "adapter_lag_s": "capsim.io/adapter-lag-s",
}


def require_autoscaler(scenario: Scenario) -> Autoscaler:
    """The scenario's autoscaler; a scenario without one has nothing to export as an HPA."""
    if scenario.autoscaler is None:
        raise SettingsError("autoscaler is required to export an HPA (the scenario runs a fixed "
                            f"pods.replicas = {scenario.pods.replicas}); add an autoscaler section")
    if scenario.autoscaler.keda is not None:
        return scenario.autoscaler  # its External metrics are KEDA's triggers (the scenario checked them)
    for i, m in enumerate(scenario.autoscaler.metrics):
        if m.get("type") != "Pods":
            raise SettingsError(f"autoscaler.metrics.{i}: without autoscaler.keda capsim exports Pods metrics only "
                                f"(prometheus-adapter rules, KEDA triggers); an {m.get('type')} metric is "
                                "simulated, not exported (with autoscaler.keda, External metrics are KEDA's triggers)")
    return scenario.autoscaler


def scale_target_ref(scenario: Scenario, target: DeployTarget) -> dict[str, Any]:
    """The scenario's own ``scaleTargetRef`` if it has one, else the target's Deployment."""
    auto = require_autoscaler(scenario)
    if auto.scale_target_ref is not None:
        return dict(auto.scale_target_ref)
    return {"apiVersion": "apps/v1", "kind": "Deployment", "name": target.name}


def build_hpa(scenario: Scenario, target: DeployTarget) -> dict[str, Any]:
    """The HorizontalPodAutoscaler object (a dict ready for ``yaml.safe_dump``)."""
    auto = require_autoscaler(scenario)
    spec: dict[str, Any] = {"scaleTargetRef": scale_target_ref(scenario, target)}
    spec.update({k: v for k, v in auto.k8s_spec().items() if k != "scaleTargetRef"})
    annotations = {key: repr(float(getattr(auto, field))) for field, key in PIPELINE_ANNOTATIONS.items()}
    return {"apiVersion": API_VERSION, "kind": "HorizontalPodAutoscaler",
            "metadata": target.metadata(annotations=annotations), "spec": spec}


def autoscaler_from_hpa(manifest: Mapping[str, Any], source: str = "hpa.yaml") -> Autoscaler:
    """A scenario's ``autoscaler`` from an exported HPA: the spec through ``HorizontalPodAutoscaler.from_k8s``
    (the simulator's loader), the pipeline from the ``capsim.io/*`` annotations (absent: the defaults)."""
    if manifest.get("apiVersion") != API_VERSION or manifest.get("kind") != "HorizontalPodAutoscaler":
        raise SettingsError(f"{source}: apiVersion/kind must be {API_VERSION}/HorizontalPodAutoscaler, got "
                            f"{manifest.get('apiVersion')!r}/{manifest.get('kind')!r}")
    spec = manifest.get("spec")
    if not isinstance(spec, Mapping):
        raise SettingsError(f"{source}: spec must be a mapping, got {spec!r}")
    try:
        HorizontalPodAutoscaler.from_k8s(spec)
    except ValueError as exc:
        raise SettingsError(f"{source}: spec.{exc}") from None
    annotations = (manifest.get("metadata") or {}).get("annotations") or {}
    pipeline: dict[str, float] = {}
    for field, key in PIPELINE_ANNOTATIONS.items():
        if key in annotations:
            try:
                pipeline[field] = float(annotations[key])
            except (TypeError, ValueError):
                raise SettingsError(f"{source}: metadata.annotations.{key} must be a number, "
                                    f"got {annotations[key]!r}") from None
    try:
        return Autoscaler.model_validate({**spec, **pipeline})
    except ValidationError as exc:
        raise SettingsError(f"{source}: {format_validation_error(exc, 'spec')}") from None
