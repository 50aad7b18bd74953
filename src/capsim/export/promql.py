"""The PromQL that turns a pod's Prometheus series into the per-pod value the simulated HPA reads.

The simulator's adapter (``capsim.sim.hpa``) evaluates each metric's query (``autoscaler.queries``: a
gauge's instant value or its average over a window, a counter's rate, a histogram's mean or quantile over a
window); these queries say the same to a real Prometheus, so the exported autoscaler sees the numbers the
simulated one saw. Each metric has two spellings: a prometheus-adapter ``metricsQuery``
(``<<.LabelMatchers>>`` and ``<<.GroupBy>>`` are filled in by the adapter) and a KEDA query, one number
for the whole Deployment (the sum over its pods; KEDA's ``AverageValue`` divides it by the pod count).
"""

from __future__ import annotations

from dataclasses import dataclass

from capsim.model.scenario import DCGM_METRIC_KINDS, METRIC_TYPES, POD_METRIC_ALIASES, QUERIES

_TTFT = "capsim_time_to_first_token_seconds"
#: The histograms a quantile can be taken of.
_HISTOGRAMS = {"ttft": _TTFT, "itl": "vllm:inter_token_latency_seconds"}
#: The series each simulated metric kind comes from (names as docs/metrics.md defines them).
SERIES: dict[str, str] = {
    "queue_depth": "capsim_queue_depth",
    "in_flight": "capsim_requests_in_flight",
    "busy": "capsim_gpu_busy_ratio",
    "ttft": f"{_TTFT}_count",
    # vLLM's series (a capsim pod in continuous mode exports the same names)
    "waiting": "vllm:num_requests_waiting",
    "running": "vllm:num_requests_running",
    "kv_cache": "vllm:kv_cache_usage_perc",
    "itl": "vllm:inter_token_latency_seconds_count",
    "preemptions": "vllm:num_preemptions_total",
    "prompt_tokens": "vllm:prompt_tokens_total",
    "generation_tokens": "vllm:generation_tokens_total",
    # dcgm-exporter's, one series per GPU, labelled with the pod that holds it
    "gpu_util": "DCGM_FI_DEV_GPU_UTIL",
    "gr_active": "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
}


@dataclass(frozen=True, slots=True)
class PodQuery:
    """How one HPA metric name is computed from the pods' series over a window of ``window_s``."""

    metric: str  # the name the HPA asks for (as written in the scenario)
    kind: str  # queue_depth, in_flight, busy, ttft, ... (POD_METRICS' kinds)
    window_s: float
    query: str = ""  # instant, avg_over_time, max_over_time, rate, histogram_quantile ("": the kind's default)
    quantile: float = 0.99

    @classmethod
    def of(cls, metric: str, window_s: float, query: str | None = None, quantile: float = 0.99) -> PodQuery:
        kind = POD_METRIC_ALIASES[metric]
        return cls(metric, kind, window_s, query or QUERIES[METRIC_TYPES.get(kind, "gauge")][0], quantile)

    @property
    def series(self) -> str:
        """The series prometheus-adapter discovers the metric by."""
        return SERIES[self.kind]

    @property
    def window(self) -> str:
        return _duration(self.window_s)

    @staticmethod
    def duration(seconds: float) -> str:
        """A PromQL duration (``60s``, ``1500ms``)."""
        return _duration(seconds)

    def per_pod(self, matchers: str, by: str) -> str:
        """The value per ``by`` group (pods) over the series selected by ``matchers``."""
        w = self.window
        if self.kind in DCGM_METRIC_KINDS:  # per GPU: the mean over a pod's GPUs (tensor parallelism), which run its steps
            if self.query == "instant":
                return f"avg({self.series}{{{matchers}}}) by ({by})"
            return f"avg({self.query}({self.series}{{{matchers}}}[{w}])) by ({by})"
        if self.query == "instant":  # prometheus-adapter's default rule for a series not named *_total
            return f"sum({self.series}{{{matchers}}}) by ({by})"
        if self.query == "histogram_quantile":
            hist = _HISTOGRAMS[self.kind]
            return (f"histogram_quantile({self.quantile:g}, "
                    f"sum(rate({hist}_bucket{{{matchers}}}[{w}])) by (le, {by}))")
        if self.kind == "ttft":  # the mean TTFT: increase of the sum over increase of the count
            return (f"sum(rate({_TTFT}_sum{{{matchers}}}[{w}])) by ({by}) / "
                    f"sum(rate({_TTFT}_count{{{matchers}}}[{w}])) by ({by})")
        if self.kind == "itl":  # the mean inter-token latency, as the TTFT
            itl = "vllm:inter_token_latency_seconds"
            return (f"sum(rate({itl}_sum{{{matchers}}}[{w}])) by ({by}) / "
                    f"sum(rate({itl}_count{{{matchers}}}[{w}])) by ({by})")
        if METRIC_TYPES.get(self.kind) == "counter":  # preemptions, tokens: a counter's rate over the window
            return f"sum(rate({self.series}{{{matchers}}}[{w}])) by ({by})"
        # gauges: the mean (or the highest) of the scrapes in the window, as the simulated adapter's
        return f"sum({self.query}({self.series}{{{matchers}}}[{w}])) by ({by})"

    def adapter_query(self) -> str:
        """prometheus-adapter's ``metricsQuery`` for this metric."""
        return self.per_pod("<<.LabelMatchers>>", "<<.GroupBy>>")

    def deployment_total(self, namespace: str, deployment: str,
                         labels: tuple[str, str] = ("namespace", "pod")) -> str:
        """One number for KEDA: the per-pod values of the Deployment's pods, summed (``labels``: those naming
        the namespace and the pod in the series; dcgm-exporter's, ``DeployTarget.dcgm_labels``)."""
        ns, pod = labels if self.kind in DCGM_METRIC_KINDS else ("namespace", "pod")
        # a Deployment's pods are named <deployment>-<replicaset hash>-<5 characters>
        matchers = f'{ns}="{namespace}",{pod}=~"{deployment}-[a-z0-9]+-[a-z0-9]{{5}}"'
        # ">= 0" keeps the pods whose value is a number (every metric here is): a NaN (a busy ratio's first
        # scrape, a TTFT mean over a window with no request, 0/0) would make the sum NaN, which KEDA reads as 0
        # (ignoreNullValues) or an error whatever the other pods say; prometheus-adapter answers it as 0
        return f"sum(({self.per_pod(matchers, pod)}) >= 0)"


def _duration(seconds: float) -> str:
    """A PromQL duration (``60s``, ``1500ms``)."""
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"
