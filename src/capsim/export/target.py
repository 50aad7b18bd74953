"""Where the export deploys to: the Deployment's name, namespace, container, port and the services it talks to."""

from __future__ import annotations

import re
from dataclasses import dataclass
from string import Template
from typing import Any

from capsim.model.settings import SettingsError

# RFC 1123 label, as Kubernetes checks names of namespaces, containers and (with dots) most objects
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
#: Longest NAME: object names get suffixes (``-capsim``), and a Deployment's pods ``-<hash>-<5 chars>``.
MAX_NAME_LEN = 47
#: The query for the simulator's gateway counter (every attempt sent to the Service, answered or not):
#: Istio's standard request counter as the clients' sidecars report it, which counts a request to a
#: Service with no pod (a 503) too. ``$name``, ``$namespace``, ``$service`` (the Service's cluster
#: name) and ``$window`` are filled in.
GATEWAY_QUERY = 'sum(rate(istio_requests_total{reporter="source",destination_service="$service"}[$window]))'
_GATEWAY_KEYS = ("name", "namespace", "service", "window")


@dataclass(frozen=True, slots=True)
class DeployTarget:
    """The cluster side of an export; every field has a default that matches ``capsim serve``.

    ``name`` is the Deployment (and its container) the files patch and scale; ``redis_url`` the session
    store the pods use when the scenario's ``state.store`` is ``redis``; ``prometheus_url`` the server
    KEDA queries; ``adapter_namespace`` where prometheus-adapter runs; ``gateway_query`` the PromQL of the
    requests sent to the Deployment's Service (:data:`GATEWAY_QUERY`), which a KEDA trigger on the
    simulated gateway counter runs; ``dcgm_honor_labels`` whether Prometheus scrapes dcgm-exporter with
    ``honorLabels: true``, so its series name the GPU's pod in ``namespace`` and ``pod`` (false, its Helm
    chart's default: in ``exported_namespace`` and ``exported_pod``, the exporter's own pod holding ``pod``).
    """

    name: str = "capsim-agent"
    namespace: str = "default"
    container: str | None = None
    port: int = 8000
    redis_url: str = "redis://redis:6379/0"
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"
    adapter_namespace: str = "monitoring"
    gateway_query: str = GATEWAY_QUERY
    dcgm_honor_labels: bool = False

    def __post_init__(self) -> None:
        for field in ("name", "namespace", "adapter_namespace"):
            _label(field, getattr(self, field))
        if self.container is not None:
            _label("container", self.container)
        if len(self.name) > MAX_NAME_LEN:
            raise SettingsError(f"name must be at most {MAX_NAME_LEN} characters (suffixes are added), "
                                f"got {len(self.name)}: {self.name!r}")
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 1 <= self.port <= 65535:
            raise SettingsError(f"port must be an integer in [1, 65535], got {self.port!r}")
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError(f"redis_url must start with redis://, rediss:// or unix://, got {self.redis_url!r}")
        if not self.prometheus_url.startswith(("http://", "https://")):
            raise SettingsError(f"prometheus_url must start with http:// or https://, got {self.prometheus_url!r}")
        self.gateway_requests("60s")  # a bad placeholder fails here, naming the field

    def gateway_requests(self, window: str) -> str:
        """``gateway_query`` with its placeholders filled in (``window``: a PromQL duration)."""
        values = {"name": self.name, "namespace": self.namespace, "window": window,
                  "service": f"{self.name}.{self.namespace}.svc.cluster.local"}
        try:
            return Template(self.gateway_query).substitute(values)
        except KeyError as exc:
            raise SettingsError(f"gateway_query: unknown placeholder ${exc.args[0]} (use "
                                f"{', '.join('$' + k for k in _GATEWAY_KEYS)}), got {self.gateway_query!r}") from None
        except ValueError as exc:
            raise SettingsError(f"gateway_query: {exc} (a literal $ is written $$), got {self.gateway_query!r}") from None

    @property
    def dcgm_labels(self) -> tuple[str, str]:
        """The labels that name the namespace and the pod of a GPU in dcgm-exporter's series, as scraped."""
        return ("namespace", "pod") if self.dcgm_honor_labels else ("exported_namespace", "exported_pod")

    @property
    def container_name(self) -> str:
        return self.container or self.name

    @property
    def configmap_name(self) -> str:
        return f"{self.name}-capsim"

    def labels(self) -> dict[str, str]:
        return {"app.kubernetes.io/name": self.name, "app.kubernetes.io/managed-by": "capsim"}

    def metadata(self, name: str | None = None, namespace: str | None = None,
                 annotations: dict[str, str] | None = None) -> dict[str, Any]:
        """An object's ``metadata``: its name (default ``self.name``), namespace, labels, annotations."""
        meta: dict[str, Any] = {"name": name or self.name, "namespace": namespace or self.namespace,
                                "labels": self.labels()}
        if annotations:
            meta["annotations"] = annotations
        return meta


def _label(field: str, value: object) -> None:
    if not isinstance(value, str) or len(value) > 63 or not _DNS_LABEL.match(value):
        raise SettingsError(f"{field} must be a DNS-1123 label (lower-case letters, digits and '-', at most 63, "
                            f"starting and ending with a letter or digit), got {value!r}")
