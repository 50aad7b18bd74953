"""Settings to deployable Kubernetes files: HPA, pod ConfigMap and Deployment patch, adapter rules, KEDA.

Every object is built as data (dicts) and dumped with PyYAML; ``export_scenario`` writes the folder that
``capsim export`` writes, after the checks before deploy. See docs/export.md.
"""

from capsim.export.adapter import adapter_rules, build_adapter_configmap
from capsim.export.hpa import autoscaler_from_hpa, build_hpa
from capsim.export.keda import build_scaled_object
from capsim.export.pod import build_configmap, build_deployment_patch, pod_env
from capsim.export.target import DeployTarget
from capsim.export.writer import (
    BUILDERS,
    ChecksFailedError,
    ExportResult,
    build_all,
    dump_yaml,
    export_scenario,
    simulated_numbers,
)

__all__ = [
    "BUILDERS",
    "ChecksFailedError",
    "DeployTarget",
    "ExportResult",
    "adapter_rules",
    "autoscaler_from_hpa",
    "build_adapter_configmap",
    "build_all",
    "build_configmap",
    "build_deployment_patch",
    "build_hpa",
    "build_scaled_object",
    "dump_yaml",
    "export_scenario",
    "pod_env",
    "simulated_numbers",
]
