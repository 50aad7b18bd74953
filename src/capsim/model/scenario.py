"""The scenario a simulation runs: workload, service model, pods, router, autoscaler, faults and SLO.

A ``Scenario`` is frozen and validated; ``Scenario.from_yaml(path)`` loads the YAML an analyst writes and
``Scenario.model_validate(dict)`` the same as a mapping. Every error names the field path and the bad
value (``batching.max_batch_size must be >= 1, got 0``), prefixed by the file name when loaded from
YAML. Where a section mirrors Kubernetes (the autoscaler) the Kubernetes spelling is accepted as is.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from capsim.errors import did_you_mean as suggest
from capsim.model.settings import (
    BatchSettings,
    Bool,
    Float,
    Int,
    SettingsError,
    aliased_path,
    did_you_mean,
    format_error,
)
from capsim.policy.keda import RELEASES, FallbackBehavior, Release, release_at_least
from capsim.policy.keda_cron import CronWindow, valid_schedule
from capsim.policy.keda_formula import Formula, FormulaError, compile_formula, trigger_name
from capsim.policy.outlier import OutlierSettings

#: The Prometheus metrics a pod exports that a Pods-type HPA metric may name, and what each measures.
#: The short names are accepted as aliases.
POD_METRICS: dict[str, str] = {
    "capsim_queue_depth": "queue_depth",  # gauge: requests waiting in the pod's batcher queue
    "capsim_requests_in_flight": "in_flight",  # gauge: requests accepted and not yet answered
    "capsim_time_to_first_token_seconds": "ttft",  # histogram, observed when the pod answers
    "capsim_gpu_busy_ratio": "busy",  # gauge: busy share of the time since the previous scrape
    # vLLM's names and meanings (docs/metrics.md), so an HPA or KEDA object written for vLLM loads unchanged
    "vllm:num_requests_waiting": "waiting",  # gauge: requests waiting for the engine (new or preempted)
    "vllm:num_requests_running": "running",  # gauge: requests in the engine's running batch
    "vllm:kv_cache_usage_perc": "kv_cache",  # gauge: 1 - free / total KV blocks (continuous mode)
    "vllm:time_to_first_token_seconds": "ttft",  # histogram: mean over the query window
    "vllm:inter_token_latency_seconds": "itl",  # histogram: mean over the query window (continuous mode)
    "vllm:num_preemptions_total": "preemptions",  # counter: rate over the query window (continuous mode)
    "vllm:prompt_tokens_total": "prompt_tokens",  # counter: prompt tokens, a request's at its first token
    "vllm:generation_tokens_total": "generation_tokens",  # counter: tokens generated (continuous mode)
    # NVIDIA dcgm-exporter's series of the GPUs a pod holds (labelled with the pod by its Kubernetes mapping), as
    # collected every autoscaler.dcgm_collect_interval_s (capsim.sim.hpa; docs/metrics.md, "GPU utilisation")
    "DCGM_FI_DEV_GPU_UTIL": "gpu_util",  # gauge, 0-100: % of NVML's sample period a kernel ran, at a collection
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE": "gr_active",  # gauge, 0-1: the engine's active share between collections
}
#: Metric kinds dcgm-exporter reports (per GPU; a pod's value is the mean over its GPUs).
DCGM_METRIC_KINDS = frozenset({"gpu_util", "gr_active"})
#: Metric kinds only a continuous-batching pod has.
CONTINUOUS_METRIC_KINDS = frozenset({"kv_cache", "itl", "preemptions", "prompt_tokens", "generation_tokens"})
POD_METRIC_ALIASES: dict[str, str] = {
    "queue_depth": "queue_depth",
    "requests_in_flight": "in_flight",
    "in_flight": "in_flight",
    "time_to_first_token_seconds": "ttft",
    "ttft": "ttft",
    "gpu_busy_fraction": "busy",
    "gpu_busy_ratio": "busy",
    "vllm:gpu_cache_usage_perc": "kv_cache",  # vLLM's names before V1
    "vllm:time_per_output_token_seconds": "itl",
    "vllm:num_preemptions": "preemptions",
    "vllm:prompt_tokens": "prompt_tokens",  # the counters' names as prometheus_client declares them
    "vllm:generation_tokens": "generation_tokens",
    **POD_METRICS,
}


#: Series an External metric may name besides the pods' own (which an External metric sums over the
#: Deployment's pods, as a KEDA prometheus trigger's ``sum(...)`` does): the gateway in front of the pods
#: counts every attempt sent to the Service, answered or not, so it can wake a Deployment with no pod.
EXTERNAL_METRICS: dict[str, str] = {"capsim_gateway_requests_total": "gateway"}

#: What kind of Prometheus series each metric is; it decides which queries fit it (docs/metrics.md).
METRIC_TYPES: dict[str, Literal["gauge", "counter", "histogram"]] = {
    "queue_depth": "gauge", "in_flight": "gauge", "busy": "gauge", "ttft": "histogram",
    "waiting": "gauge", "running": "gauge", "kv_cache": "gauge", "itl": "histogram", "preemptions": "counter",
    "prompt_tokens": "counter", "generation_tokens": "counter",
    "gateway": "counter", "gpu_util": "gauge", "gr_active": "gauge",
}
#: The queries that fit each kind of series, the first the default. prometheus-adapter's default rules
#: (kubernetes-sigs/prometheus-adapter, pkg/config/default.go, Apache-2.0) read a series whose name does not
#: end in ``_total`` as an instant value (``sum(<<.Series>>{...})``) and a ``_total`` counter as
#: ``rate(...[5m])`` (the ``--rate-interval``); a histogram has no default rule, and capsim's export writes
#: the mean over the window (``rate`` of ``_sum`` over ``rate`` of ``_count``) unless a quantile is asked.
QUERIES: dict[str, tuple[str, ...]] = {
    "gauge": ("instant", "avg_over_time", "max_over_time"),
    "counter": ("rate",),
    "histogram": ("rate", "histogram_quantile"),
}
#: The adapter's default ``--rate-interval``: the window of a counter's ``rate`` unless set.
ADAPTER_RATE_INTERVAL_S = 300.0


#: Token counts are stored as int32 (``capsim.model.request``): a count must fit.
TOKENS_MAX = 2**31 - 1
#: the most factors ``service.cycle_noise`` holds: a replayed run's steps, one each (``capsim validate --mode
#: continuous``'s run replay: a 20-s run of 0.6-ms steps is about 33,000)
CYCLE_NOISE_MAX = 100_000


class _Section(BaseModel):
    """A scenario section: frozen, no unknown keys; its errors are reported by the Scenario with full paths."""

    model_config = ConfigDict(frozen=True, extra="forbid")


# ---- workload ---------------------------------------------------------------------------------------
class PoissonArrivals(_Section):
    """Sessions start as a Poisson process of constant rate."""

    kind: Literal["poisson"]
    rate_per_s: Float = Field(gt=0, description="sessions started per second")


class PiecewiseArrivals(_Section):
    """A Poisson process whose rate steps at given times: ``[[time_s, rate_per_s], ...]``."""

    kind: Literal["piecewise"]
    rate_per_s: tuple[tuple[Float, Float], ...] = Field(min_length=1)

    @field_validator("rate_per_s")
    @classmethod
    def _steps(cls, v: tuple[tuple[float, float], ...]) -> tuple[tuple[float, float], ...]:
        times = [t for t, _ in v]
        if times[0] != 0:
            raise ValueError(f"the first step must start at time 0, got {times[0]}")
        if any(b <= a for a, b in itertools.pairwise(times)):
            raise ValueError(f"step times must increase strictly, got {times}")
        if any(r < 0 for _, r in v):
            raise ValueError(f"rates must be >= 0, got {[r for _, r in v]}")
        if not any(r > 0 for _, r in v):
            raise ValueError("at least one rate must be > 0")
        return v


class TraceArrivals(_Section):
    """Replay a trace: Azure LLM inference CSV (one request per row), or Mooncake JSON lines (with the
    prompt's 512-token block hashes, which feed the prefix cache)."""

    kind: Literal["trace"]
    path: Path
    format: Literal["azure", "mooncake"] = Field("azure", description="azure: CSV; mooncake: JSON lines")
    speedup: Float = Field(1.0, gt=0, description="arrival times are divided by this")


Arrivals = Annotated[PoissonArrivals | PiecewiseArrivals | TraceArrivals, Field(discriminator="kind")]


class ConstantTokens(_Section):
    kind: Literal["constant"]
    value: Int = Field(ge=1, le=TOKENS_MAX)


class LognormalTokens(_Section):
    """Lognormal token counts with the given mean; ``sigma`` is that of the underlying normal."""

    kind: Literal["lognormal"]
    mean: Float = Field(gt=0)
    sigma: Float = Field(0.5, ge=0, le=5)
    max: Int | None = Field(None, ge=1, le=TOKENS_MAX, description="counts are clipped to this")


Tokens = Annotated[ConstantTokens | LognormalTokens, Field(discriminator="kind")]


# ---- service and pods -------------------------------------------------------------------------------
class Service(_Section):
    """How long a batch takes: a measured profile, or an exponential or deterministic time per batch."""

    kind: Literal["profile", "exponential", "deterministic"]
    profile: Path | None = None
    mean_s: Float | None = Field(None, gt=0, description="seconds per batch (exponential, deterministic)")
    noise: Bool = Field(True, description="profile: draw times with the measured spread")
    extrapolate: Bool = Field(False, description="profile: allow sizes outside the measured range")
    request_overhead_ms: Float = Field(
        0.0, ge=0, description="pod CPU time per request outside the model (HTTP, session store), spent on the "
        "same core as the model: each batch is longer by size x this; `capsim validate` measures it"
    )
    time_scale: Float = Field(
        1.0, gt=0, le=100, description="multiplies every batch time: calibrates a profile measured on an idle "
        "device to a pod under load (`capsim validate` fits it)"
    )
    arrival_overhead_ms: Float = Field(
        0.0, ge=0, description="pod CPU time per request spent when it arrives (HTTP parsing) on the model's core: "
        "the batch running then ends this much later; `capsim validate` fits it from the pod's batch trace"
    )
    ingress_ms: Float = Field(
        0.0, ge=0, le=60_000, description="a request that arrives while the model runs reaches the pod's batch "
        "queue this much later (its HTTP parsing shares the core), so a batch starting sooner leaves it for the "
        "next; `capsim validate` measures it. Continuous mode: every request reaches the engine's scheduler this "
        "much after it arrives (the pod reads the session's history from the store first), whether a step runs "
        "or not; `capsim validate --mode sessions` measures it (the way in to the pod and the pods' `load_s`)"
    )
    ingress_noise: list[Annotated[float, Field(ge=0)]] | None = Field(
        None, min_length=1, max_length=10_000, description="continuous mode: factors (scaled to mean 1) one "
        "of which, drawn at random for each request, multiplies its `ingress_ms`, so `ingress_ms` stays the "
        "mean: the spread of the way in (a turn sent while the host is busy reaches its engine late); requests "
        "reach the scheduler in the order their ingress ends, not the order they were sent; `capsim validate "
        "--mode sessions` measures it (each turn's time from its send to its engine over their mean)"
    )
    ingress_noise_block: Int = Field(
        1, ge=1, le=10_000, description="1 draws each request's `ingress_noise` factor at random; more reads "
        "`ingress_noise` as a measured sequence (in send order) and walks it this many requests at a time "
        "from random starts, one walk for the whole fleet, so a spell of slow ingress (a busy host) hits "
        "consecutive requests as measured"
    )
    cached_token_us: Float = Field(
        0.0, ge=0, le=10_000, description="continuous mode with prefix caching: engine time per prompt token "
        "served from the prefix cache, added to the step that admits the request (capsim's plain-torch engine "
        "copies a hit's cached KV into the request's own cache; a paged engine such as vLLM's does not copy); "
        "`capsim validate --mode sessions` measures it from the pods' steps"
    )
    cycle_noise: list[Annotated[float, Field(gt=0)]] | None = Field(
        None, min_length=1, max_length=CYCLE_NOISE_MAX, description="factors (mean 1) one of which, drawn at random, "
        "multiplies each batch's time (continuous mode: each step's) instead of the profile's gamma noise: the "
        "spread of a pod's cycle under load (`capsim validate` measures it from the pod's batch or step trace)"
    )
    cycle_noise_block_steps: Int = Field(
        1, ge=1, le=CYCLE_NOISE_MAX, description="1 draws each batch's (continuous mode: each step's) `cycle_noise` "
        "factor at random; more reads `cycle_noise` as a measured sequence and walks it in order this many "
        "batches (steps) at a time from random starts, so slow spells last as long as measured; as many as "
        "`cycle_noise` holds replays it from its start (`capsim validate` sets it)"
    )
    answer_ms: Float = Field(
        0.0, ge=0, le=60_000, description="from a request's last token to its answer at the client (the pod's "
        "answer path: the store write, the response, the way back); the end to end and a session's next turn "
        "count it, the engine does not wait for it, the pod holds the request until then (a crash meanwhile "
        "fails it); `capsim validate` measures it (static mode: from the "
        "open-loop probe, with `answer_per_request_ms`; continuous mode: from the calibration's requests)"
    )
    answer_per_request_ms: Float = Field(
        0.0, ge=0, le=60_000, description="static mode: each request of a batch adds this to the way out of "
        "all the batch's answers (the pod writes and sends them together once the batch ends), so a batch of "
        "b answers `answer_ms + b x this` after it ends; `capsim validate` measures it from the open-loop probe"
    )
    first_token_scale: Float = Field(
        1.0, gt=0, le=100, description="static mode: multiplies the time from a batch's start to its first "
        "token (the prefill, as the profile and the calibration split the batch), at most up to the batch's "
        "end, leaving the batch's time as it is: on a CPU pod the previous batch's answers are written on the "
        "model's core while the next prefill runs, so the first token comes later in the batch than an idle "
        "core's profile says; `capsim validate` measures it from the open-loop probe"
    )

    slowdown: Float = Field(
        1.0, gt=0, le=10, description="a margin (or a stress): the pods' own compute takes this many times as "
        "long as the rest of this section says, on top of `time_scale`: every batch and step time, the time per "
        "request and per arrival and a prefix hit's copy (`request_overhead_ms`, `arrival_overhead_ms`, "
        "`cached_token_us`); the way in and out (`ingress_ms`, `answer_ms`) stay. `capsim validate` found real "
        "pods running 0.92 to 1.35 times their calibration minutes later (docs/validation.md): plan with "
        "`service.slowdown: 1.2` as a tuning stress, or sweep it"
    )

    def effective(self) -> Service:
        """This section as the simulator runs it: ``slowdown`` multiplied into ``time_scale``,
        ``request_overhead_ms``, ``arrival_overhead_ms`` and ``cached_token_us`` (itself then 1)."""
        s = self.slowdown
        if s == 1.0:
            return self
        return self.model_copy(update={"time_scale": self.time_scale * s,
                                       "request_overhead_ms": self.request_overhead_ms * s,
                                       "arrival_overhead_ms": self.arrival_overhead_ms * s,
                                       "cached_token_us": self.cached_token_us * s, "slowdown": 1.0})

    @model_validator(mode="after")
    def _needs(self) -> Self:
        if self.kind == "profile" and self.profile is None:
            raise ValueError("profile is required when kind is 'profile'")
        if self.kind != "profile" and self.mean_s is None:
            raise ValueError(f"mean_s is required when kind is {self.kind!r}")
        return self


class ConstantDuration(_Section):
    kind: Literal["constant"]
    value_s: Float = Field(ge=0)

    @property
    def range_s(self) -> tuple[float, float]:
        """The least and the most it takes: its value, both."""
        return self.value_s, self.value_s


class UniformDuration(_Section):
    kind: Literal["uniform"]
    low_s: Float = Field(ge=0)
    high_s: Float = Field(ge=0)

    @model_validator(mode="after")
    def _order(self) -> Self:
        if self.high_s < self.low_s:
            raise ValueError(f"high_s must be >= low_s ({self.low_s}), got {self.high_s}")
        return self

    @property
    def range_s(self) -> tuple[float, float]:
        """The least and the most it takes: its ends."""
        return self.low_s, self.high_s


class LognormalDuration(_Section):
    kind: Literal["lognormal"]
    mean_s: Float = Field(gt=0)
    sigma: Float = Field(0.3, ge=0, le=5)

    @property
    def range_s(self) -> tuple[float, float]:
        """The least and the most it takes: no floor (0) and its 99.9th percentile (z = 3.09) as the most."""
        median = self.mean_s * math.exp(-self.sigma**2 / 2)
        return 0.0, median * math.exp(3.09 * self.sigma)


def _number_as_constant(v: Any) -> Any:
    # a bare number (``startup_s: 60``) is the common spelling of a constant duration
    if isinstance(v, int | float) and not isinstance(v, bool):
        return {"kind": "constant", "value_s": v}
    return v


Duration = Annotated[
    ConstantDuration | UniformDuration | LognormalDuration,
    Field(discriminator="kind"),
    BeforeValidator(_number_as_constant),
]


class ExponentialDuration(_Section):
    kind: Literal["exponential"]
    mean_s: Float = Field(gt=0)


#: A think or tool time: a bare number is a constant (``think_time_s: 2``), as before it was a distribution.
ThinkTime = Annotated[
    ConstantDuration | UniformDuration | LognormalDuration | ExponentialDuration,
    Field(discriminator="kind"),
    BeforeValidator(_number_as_constant),
]


class Sessions(_Section):
    """Multi-turn conversations (docs/sessions.md): each session sends ``turns`` requests.

    ``mode: closed`` (default): turn k+1 is sent when turn k is answered plus a think (or tool) time;
    ``open``: turn k+1 is sent a think time after turn k was sent, answered or not. With ``new_tokens``
    a session grows: turn k's prompt is the session's history (every earlier prompt and answer) plus a new
    message of ``new_tokens``; the first turn's prompt is drawn from ``prompt_tokens``. A turn whose
    prompt and answer would pass ``batching.max_model_len`` ends the session (``end``) or drops the oldest
    turns of the history until it fits (``truncate_oldest``). Without ``new_tokens`` every turn's prompt is
    drawn independently (the behaviour before growing sessions).
    """

    turns: Int = Field(1, ge=1, le=10_000)
    think_time_s: ThinkTime = Field(ConstantDuration(kind="constant", value_s=0.0))
    mode: Literal["closed", "open"] = "closed"
    new_tokens: Tokens | None = Field(None, description="tokens of each later turn's new message (grows sessions)")
    on_context_overflow: Literal["end", "truncate_oldest"] = "end"

    @property
    def think_mean_s(self) -> float:
        """The mean think time (s)."""
        t = self.think_time_s
        if isinstance(t, ConstantDuration):
            return t.value_s
        if isinstance(t, UniformDuration):
            return (t.low_s + t.high_s) / 2.0
        return t.mean_s


class Workload(_Section):
    arrivals: Arrivals
    prompt_tokens: Tokens = ConstantTokens(kind="constant", value=256)
    output_tokens: Tokens = ConstantTokens(kind="constant", value=64)
    sessions: Sessions = Sessions()
    load_scale: Float = Field(
        1.0, gt=0, le=1000, description="the same traffic, this many times as much: a Poisson or piecewise session "
        "rate times this (the same seed's arrivals stay, more come between them), a trace replayed this much "
        "faster (its speedup times this); `capsim headroom` finds the largest a plan carries within its SLO")

    @model_validator(mode="after")
    def _trace_is_single_turn(self) -> Self:
        if isinstance(self.arrivals, TraceArrivals) and self.sessions.turns != 1:
            raise ValueError(f"sessions.turns must be 1 with a trace (one request per row), got {self.sessions.turns}")
        return self


class CrashLoopBackOff(_Section):
    """The kubelet's restart delays (client-go ``flowcontrol.Backoff``; see ``capsim.sim.kubelet``)."""

    initial_s: Float = Field(10.0, ge=0, description="kubelet backOffPeriod: the delay after the 2nd quick exit")
    max_s: Float = Field(300.0, ge=0, description="kubelet MaxContainerBackOff: the delay doubles up to this")
    reset_s: Float = Field(600.0, ge=0, description="an exit this long after the last restart starts over")

    @model_validator(mode="after")
    def _order(self) -> Self:
        if self.max_s < self.initial_s:
            raise ValueError(f"max_s must be >= initial_s ({self.initial_s}), got {self.max_s}")
        return self


class ReadinessProbe(_Section):
    """The kubelet's readiness probe on ``/readyz`` (Kubernetes defaults; see ``capsim.sim.cluster``)."""

    period_s: Int = Field(10, ge=1, description="periodSeconds: a probe every this many seconds from the "
                                                 "pod's start on its node")
    failure_threshold: Int = Field(3, ge=1, description="failureThreshold: consecutive failed probes that "
                                                         "make a ready pod not ready")


class StartupProbe(_Section):
    """The kubelet's startup probe on ``/healthz``, which the exported Deployment gives the container so that its
    liveness probe leaves a loading model alone. The readiness probe waits for it: the pod is ready at the first
    startup probe that finds the model loaded, when the kubelet runs the readiness probe at once (``capsim.sim.cluster``).
    Its ``failureThreshold``, unset, the export makes outlast the slowest cold start and restart; set (a Deployment's
    own, to check), the kubelet kills a container whose model has not loaded by its ``failure_threshold``-th probe and
    restarts it under CrashLoopBackOff (a crash of kind ``startup_probe``)."""

    period_s: Int | None = Field(None, ge=1, description="periodSeconds: a probe every this many seconds from the "
                                                          "pod's start on its node; none: the readiness probe's")
    failure_threshold: Int | None = Field(
        None, ge=1, description="failureThreshold: the kubelet kills a container whose model has not loaded by this "
                                "many startup probes of it, and restarts it (CrashLoopBackOff); none: the export "
                                "writes one that outlasts the slowest cold start and restart, and no start is "
                                "killed")

    def period(self, readiness: ReadinessProbe) -> int:
        """The period in seconds, ``readiness``'s where none is set."""
        return readiness.period_s if self.period_s is None else self.period_s

    def outlasting(self, readiness: ReadinessProbe, slowest_s: float) -> int:
        """The fewest probes that let a start of ``slowest_s`` pass whatever the probe's phase: a container started
        just after a tick is probed first a period later, so N probes give its model N - 1 periods to load."""
        return math.ceil(slowest_s / self.period(readiness)) + 1


class DisruptionBudget(_Section):
    """A PodDisruptionBudget on the Deployment's pods (policy/v1; integers, not percentages): evictions,
    cluster-autoscaler's drains among them, may take a node's pods only while at least ``min_available``
    (or all but ``max_unavailable`` of the desired replicas) stay ready. The HPA's own scale-down is not
    bound by it, as in Kubernetes. Give exactly one."""

    max_unavailable: Int | None = Field(None, ge=0, description="maxUnavailable: desired replicas less this stay ready")
    min_available: Int | None = Field(None, ge=0, description="minAvailable: this many stay ready")

    @model_validator(mode="after")
    def _one(self) -> Self:
        if (self.max_unavailable is None) == (self.min_available is None):
            raise ValueError("give exactly one of max_unavailable and min_available, got "
                             f"max_unavailable={self.max_unavailable}, min_available={self.min_available}")
        return self

    def disruptions_allowed(self, ready: int, desired: int) -> int:
        """Pods that may be evicted now: ready ones above the desired healthy, none while the Deployment wants
        no pod (the disruption controller's ``status.disruptionsAllowed``, ``pkg/controller/disruption/
        disruption.go``: ``currentHealthy - desiredHealthy``, 0 when that or ``expectedCount`` is not positive;
        Apache-2.0 (c) The Kubernetes Authors, the rule re-implemented)."""
        if desired <= 0:
            return 0
        return max(ready - self.desired_healthy(desired), 0)

    def desired_healthy(self, desired: int) -> int:
        """Ready pods the budget keeps (``status.desiredHealthy``): ``min_available``, or ``desired`` less
        ``max_unavailable``."""
        return self.min_available if self.min_available is not None else desired - (self.max_unavailable or 0)


def _int_or_percent(v: Any, field: str) -> int | str:
    """An intstr of the Kubernetes API: a whole number >= 0, or a whole percentage ``"N%"``."""
    if isinstance(v, bool):
        raise ValueError(f"{field}: a whole number or a percentage such as \"25%\", got {v!r}")
    if isinstance(v, int):
        if v < 0:
            raise ValueError(f"{field} must be at least 0, got {v}")
        return v
    if isinstance(v, str) and v.endswith("%") and v[:-1].isdigit():
        return v
    raise ValueError(f"{field}: a whole number or a percentage such as \"25%\", got {v!r}")


class RollingUpdateStrategy(_Section):
    """The Deployment's ``strategy.rollingUpdate`` (``capsim.policy.rollout``): during a rollout at most
    ``max_surge`` pods over the desired replicas (percentages of them rounded up) and at most ``max_unavailable``
    under them unavailable (rounded down); Kubernetes' defaults, 25% each."""

    max_surge: Int | str = Field("25%", description="maxSurge: a number of pods, or a percentage of the replicas")
    max_unavailable: Int | str = Field("25%", description="maxUnavailable: a number of pods, or a percentage")

    @field_validator("max_surge", "max_unavailable", mode="before")
    @classmethod
    def _intstr(cls, v: Any, info: Any) -> int | str:
        return _int_or_percent(v, info.field_name)

    @model_validator(mode="after")
    def _moves(self) -> Self:
        zero = {0, "0%"}
        if self.max_surge in zero and self.max_unavailable in zero:  # upstream's validation refuses it too
            raise ValueError("max_unavailable may not be 0 when max_surge is 0: the rollout could never move")
        if isinstance(self.max_unavailable, str) and int(self.max_unavailable[:-1]) > 100:
            raise ValueError(f"max_unavailable may not be over 100%, got {self.max_unavailable}")
        return self


class TemplateBatching(_Section):
    """A new pod template's engine flags (``pods.rollouts[].batching``, continuous batching): the ``batching``
    settings a deploy may change, vLLM's ``--max-num-seqs``, ``--max-num-batched-tokens``,
    ``--gpu-memory-utilization`` (or the KV blocks), ``--max-model-len`` and ``--long-prefill-token-threshold``;
    each left out is the scenario's. The block size, the model and the GPU are the pod's, not a flag's."""

    max_num_seqs: Int | None = Field(None, ge=1, le=65536)
    max_num_batched_tokens: Int | None = Field(None, ge=1)
    gpu_memory_utilization: Float | None = Field(None, gt=0, le=1)
    num_blocks: Int | None = Field(None, ge=1)
    max_model_len: Int | None = Field(None, ge=2)
    long_prefill_token_threshold: Int | None = Field(None, ge=0)

    def apply(self, base: BatchSettings) -> BatchSettings:
        """``base`` with these flags, validated as a whole (``ValueError`` naming the flag). ``num_blocks`` replaces
        blocks sized from ``gpu_memory_gb``; ``gpu_memory_utilization`` needs the memory to size them from."""
        given = self.model_dump(exclude_none=True)
        merged = {**base.model_dump(), **given}
        if "num_blocks" in given:
            merged["gpu_memory_gb"] = None
        elif "gpu_memory_utilization" in given and base.gpu_memory_gb is None:
            raise ValueError("gpu_memory_utilization sizes the KV cache from batching.gpu_memory_gb, which the "
                             f"scenario does not give (it gives num_blocks {base.num_blocks}): give num_blocks")
        try:
            return BatchSettings.model_validate(merged)
        except ValidationError as e:
            raise ValueError(format_error(e.errors()[0]).strip()) from None
        except SettingsError as e:
            raise ValueError(str(e)) from None


#: the limits a canary check can set: each limit's field on ``Rollout``, the quantity it reads over the window
#: (``ttft_p99_s``, ``itl_mean_s``, ``error_rate``) and how it compares: ``limit``, over the value; ``times``, over
#: that many times the old pods'; ``plus``, more than that above the old pods'. The simulator's measurement, the
#: export's AnalysisTemplate and its README's steps all walk this one list.
CANARY_LIMITS: tuple[tuple[str, str, str], ...] = (
    ("undo_if_ttft_p99_over_s", "ttft_p99_s", "limit"),
    ("undo_if_ttft_p99_over_baseline", "ttft_p99_s", "times"),
    ("undo_if_itl_mean_over_s", "itl_mean_s", "limit"),
    ("undo_if_itl_mean_over_baseline", "itl_mean_s", "times"),
    ("undo_if_error_rate_over", "error_rate", "limit"),
    ("undo_if_error_rate_over_baseline_by", "error_rate", "plus"),
)


class Rollout(_Section):
    """A new pod template is applied at ``at_s`` (a new image or engine flags): the Deployment rolls its pods over
    to it within ``pods.rolling_update`` (``capsim.sim.cluster``). ``crash_after_s`` makes the new template a bad
    one and ``slowdown`` a slower (or faster) one; ``undo`` is ``kubectl rollout undo`` instead: back to the template
    before the current one."""

    at_s: Float = Field(ge=0)
    crash_after_s: Float | None = Field(
        None, gt=0, description="the new template is broken: each of its containers exits this long after it starts "
        "(a bad image, an engine flag that runs out of GPU memory as the model loads), and the kubelet restarts it in "
        "CrashLoopBackOff; under the cold start (pods.startup_s) its pods are never ready. None: it works")
    new_image: bool = Field(
        True, description="the new template has a new image: each node pulls it (pods.image_pull_s) before the "
        "template's first pod there starts; false: engine flags only, the image the nodes have (an undo's image is "
        "the template's it goes back to, on the nodes that pulled it)")
    slowdown: Float = Field(
        1.0, gt=0, le=10, description="the new template's model steps take this many times as long as the "
        "scenario's (a slower engine version: 1.2; a faster one: 0.8), on top of service.slowdown and faults.slow_pods")
    batching: TemplateBatching | None = Field(
        None, description="the new template's engine flags (continuous batching): some of max_num_seqs, "
        "max_num_batched_tokens, gpu_memory_utilization, num_blocks, max_model_len, long_prefill_token_threshold, "
        "the rest as the scenario's batching section (a deploy of tuned vLLM arguments); None: the scenario's")
    undo: bool = Field(False, description="kubectl rollout undo: the template goes back to the one before the "
                                          "current (its ReplicaSet, with the pods it still has, becomes the new one)")
    pause: bool = Field(False, description="kubectl rollout pause: the Deployment's spec.paused. A rollout under way "
                        "stops where it is (a canary: the new pods it has serve beside the old ones), its progress "
                        "deadline is not checked, a deploy meanwhile waits, and scaling still shares the replicas "
                        "out; an undo is refused until a resume, as kubectl refuses it")
    resume: bool = Field(False, description="kubectl rollout resume: the rollout goes on (its progress deadline "
                         "counts afresh from here), or the deploy made while paused begins")
    undo_if_restarted: bool = Field(
        False, description="with resume: the pipeline's canary check first. If a container of the new template's "
        "pods exited (kubectl get pods: RESTARTS above 0, or CrashLoopBackOff now), it resumes and undoes "
        "(`kubectl rollout resume && kubectl rollout undo`), else it resumes. A slower version restarts nothing and "
        "passes")
    restart_poll_s: Float | None = Field(
        None, gt=0, description="with undo_if_restarted: the pipeline also looks at the canary's pods every this many "
        "seconds of the pause (a `kubectl get pods` loop, from the pause on), and at the first restart it resumes and "
        "undoes at once, not at this resume (which then does nothing)")
    undo_if_ttft_p99_over_s: Float | None = Field(
        None, gt=0, description="with resume: the pipeline's latency check of the canary first. If the p99 TTFT of "
        "what the new template's pods answered in the last check_window_s (histogram_quantile(0.99) of the increase of "
        "vLLM's TTFT histogram, summed over those pods) is over this, or they answered nothing then, it resumes and "
        "undoes, else it resumes (with the other checks: any failing undoes)")
    undo_if_ttft_p99_over_baseline: Float | None = Field(
        None, gt=0, description="with resume: the same p99 against the old pods' over the same window (a baseline, "
        "as Kayenta or an Argo Rollouts analysis compares): over this many times theirs, or nothing answered by the "
        "canary, it resumes and undoes; with no answer from the old pods it passes")
    undo_if_itl_mean_over_s: Float | None = Field(
        None, gt=0, description="with resume (continuous batching): the canary's mean inter-token latency over the "
        "last check_window_s (the increase of vLLM's ITL histogram's sum over its count's, summed over the new "
        "template's pods) over this, or nothing answered then: it resumes and undoes")
    undo_if_itl_mean_over_baseline: Float | None = Field(
        None, gt=0, description="with resume (continuous batching): the same mean against the old pods' over the same "
        "window: over this many times theirs, or nothing answered by the canary, it resumes and undoes; with no answer "
        "from the old pods it passes")
    undo_if_error_rate_over: Float | None = Field(
        None, gt=0, le=1, description="with resume: the share of the attempts the new template's pods ended with an "
        "error over the last check_window_s (a full queue's 429, an unservable request's 400, a refusal, a crash's "
        "reset, a store write's 503, as error_rate_source counts them; a client's timeout is not the pod's) over "
        "this, or none reached them then: it resumes and undoes (an Argo Rollouts success-rate analysis: success "
        "below 1 minus this)")
    undo_if_error_rate_over_baseline_by: Float | None = Field(
        None, gt=0, le=1, description="with resume: the canary's error rate (as undo_if_error_rate_over measures it) "
        "against the old pods' over the same window: more than this above theirs (0.01: a point of the share), or none "
        "reached the canary then, it resumes and undoes; with none reaching the old pods it passes. A cause the "
        "canary shares with the old pods (a session store's outage, a failing upstream) fails their requests as "
        "much, and this check, unlike undo_if_error_rate_over, does not read it as the canary's")
    error_rate_source: Literal["gateway", "pod"] = Field(
        "gateway", description="with an error-rate check: whose count of errors the check reads. gateway: the "
        "gateway's responses by code (4xx and 5xx over all), so every attempt the canary's pods ended with an error, "
        "a draining or not-ready pod's refusal and a crash's reset included; pod: the pods' own servers' count (vLLM's "
        "http_requests_total by status), which leaves those out (a server that takes no more requests, or whose "
        "process is gone, counts nothing), so a scale-down's refusals read no error")
    check_window_s: Float = Field(300.0, gt=0, description="the metric checks' window (the query's [5m])")
    check_interval_s: Float | None = Field(
        None, gt=0, description="with a latency check: the pipeline also measures the canary every this many seconds "
        "of the pause (an Argo Rollouts analysis' interval), the first check_initial_delay_s after the pause, each over "
        "the last check_window_s and with the resume's limits; the resume measures last. Each limit fails as at the "
        "resume (over it, or nothing answered), and once one limit has failed more than check_failure_limit "
        "measurements the pipeline resumes and undoes at once. None: one measurement, at the resume")
    check_initial_delay_s: Float = Field(
        0.0, ge=0, description="with check_interval_s: the wait from the pause to the first measurement (an Argo "
        "Rollouts analysis' initialDelay): for the canary's pods to be ready and the window to hold only their "
        "requests since")
    check_failure_limit: Int = Field(
        0, ge=0, description="with check_interval_s: how many measurements each limit may fail before the "
        "pipeline undoes (an Argo Rollouts analysis' failureLimit, which each of its metrics counts for itself): it "
        "undoes at the measurement that makes one limit's failures more than this, the resume's included. A restart "
        "found (undo_if_restarted) undoes at once, whatever this is")

    def limits(self) -> list[tuple[str, str, str, float]]:
        """The limits this resume's canary check sets, in ``CANARY_LIMITS``' order: (field, quantity, comparison,
        value)."""
        return [(f, q, kind, v) for f, q, kind in CANARY_LIMITS if (v := getattr(self, f)) is not None]

    @property
    def metrics_checked(self) -> bool:
        """Whether the resume checks the canary's metrics over a window: its p99 TTFT or its mean inter-token latency
        (against a limit or the old pods'), or its error rate."""
        return bool(self.limits())

    @property
    def error_checked(self) -> bool:
        """Whether the resume checks the canary's error rate."""
        return any(q == "error_rate" for _, q, _, _ in self.limits())

    @property
    def ttft_checked(self) -> bool:
        """Whether the resume checks the canary's p99 TTFT."""
        return any(q == "ttft_p99_s" for _, q, _, _ in self.limits())

    @property
    def itl_checked(self) -> bool:
        """Whether the resume checks the canary's mean inter-token latency."""
        return any(q == "itl_mean_s" for _, q, _, _ in self.limits())

    @property
    def action(self) -> str:
        """What the entry does: ``deploy`` (a new template), ``undo``, ``pause`` or ``resume``."""
        return "undo" if self.undo else "pause" if self.pause else "resume" if self.resume else "deploy"

    @model_validator(mode="after")
    def _undo_is_no_template(self) -> Self:
        kinds = [k for k in ("undo", "pause", "resume") if getattr(self, k)]
        if len(kinds) > 1:
            raise ValueError(f"{kinds[1]}: an entry is one action (a deploy, an undo, a pause or a resume), but "
                             f"this one sets {' and '.join(kinds)}: give each its own entry")
        for name, value, plain in (("crash_after_s", self.crash_after_s, None), ("slowdown", self.slowdown, 1.0),
                                   ("batching", self.batching, None)):
            if self.undo and value != plain:
                raise ValueError(f"{name}: an undo goes back to an earlier template, it brings none of its own")
        for name in ("undo_if_restarted", *(f for f, _, _ in CANARY_LIMITS)):
            if getattr(self, name) not in (False, None) and not self.resume:
                raise ValueError(f"{name}: the canary check comes with a resume (resume: true), the end of the "
                                 "pause in which the canary ran")
        if self.restart_poll_s is not None and not self.undo_if_restarted:
            raise ValueError("restart_poll_s: how often the pipeline looks for a restart of the canary's pods during the "
                             "pause, which needs undo_if_restarted: true")
        fields = [f for f, _, _ in CANARY_LIMITS]
        metrics = f"{', '.join(fields[:-1])} or {fields[-1]}"
        if self.error_rate_source != "gateway" and not self.error_checked:
            raise ValueError("error_rate_source: whose errors the error-rate check counts, which needs "
                             "undo_if_error_rate_over or undo_if_error_rate_over_baseline_by")
        if self.check_window_s != 300.0 and not self.metrics_checked:
            raise ValueError(f"check_window_s: the window of the metric checks, which needs {metrics}")
        if self.check_interval_s is not None and not self.metrics_checked:
            raise ValueError(f"check_interval_s: how often the pipeline measures the canary during the pause, which "
                             f"needs a metric check: {metrics}")
        for name, default in (("check_initial_delay_s", 0.0), ("check_failure_limit", 0)):
            if getattr(self, name) != default and self.check_interval_s is None:
                raise ValueError(f"{name}: a setting of the measurements during the pause, which needs "
                                 "check_interval_s (with one measurement, at the resume, there is no delay to wait "
                                 "and a failure limit above 0 would never undo)")
        if self.pause or self.resume:  # (compared with the defaults, not the fields given: a dump carries them all)
            for name in ("crash_after_s", "slowdown", "new_image", "batching"):
                if getattr(self, name) != type(self).model_fields[name].default:
                    raise ValueError(f"{name}: a {kinds[0]} changes no template; put the template's settings on a "
                                     "deploy entry of their own")
        return self


class _TopologySpread(_Section):
    """What the two spreads share: ``maxSkew`` and ``whenUnsatisfiable`` (``minDomains``, named per topology
    by ``_min_key``, only with DoNotSchedule, as the Kubernetes API asks)."""

    _min_key: ClassVar[str]
    max_skew: Int = Field(1, ge=1, description="maxSkew")
    when_unsatisfiable: Literal["DoNotSchedule", "ScheduleAnyway"] = Field(
        "DoNotSchedule", description="whenUnsatisfiable: DoNotSchedule filters the domains (a pod the skew "
        "allows nowhere stays Pending); ScheduleAnyway only prefers those with fewer of the pods")

    @model_validator(mode="after")
    def _min_domains_only_hard(self) -> Self:
        if self.when_unsatisfiable == "ScheduleAnyway" and getattr(self, self._min_key) is not None:
            raise ValueError(f"{self._min_key} (minDomains) needs when_unsatisfiable: DoNotSchedule, as Kubernetes "
                             "asks")
        return self


class Spread(_TopologySpread):
    """A topology spread constraint over nodes on the Deployment's pods (``topologySpreadConstraints`` with
    ``topologyKey: kubernetes.io/hostname``, ``whenUnsatisfiable: DoNotSchedule``, ``nodeTaintsPolicy:
    Honor``): a pod goes only to a node where its pods would number at most ``max_skew`` above the fewest
    on any schedulable node of the group, that fewest counted as 0 while fewer than ``min_nodes`` nodes are
    schedulable (``minDomains``); cluster-autoscaler adds nodes for pods that fit nowhere else. So a node
    failure takes fewer pods, at the price of more, emptier nodes (``capsim.sim.nodes``)."""

    _min_key: ClassVar[str] = "min_nodes"
    min_nodes: Int | None = Field(None, ge=1, description="minDomains: spread over at least this many nodes")


class ZoneSpread(_TopologySpread):
    """A topology spread constraint over availability zones on the Deployment's pods (``topologyKey:
    topology.kubernetes.io/zone``, ``whenUnsatisfiable: DoNotSchedule``, ``nodeTaintsPolicy: Honor``): a pod
    goes only to a zone where the Deployment's pods would number at most ``max_skew`` above the fewest in a
    zone with a schedulable node, that fewest counted as 0 while fewer than ``min_zones`` zones have one
    (``minDomains``); cluster-autoscaler adds nodes in a zone the skew allows. So a zone's outage takes about
    1 / ``cluster.zones`` of the pods. Works beside ``pods.spread`` (both constraints must hold). A zone
    with no GPU node is no domain (the Deployment's pods go only to GPU nodes): give each zone a node
    (``cluster.min_nodes_per_zone``) or ``min_zones``, else the pods fill the zones that have nodes first."""

    _min_key: ClassVar[str] = "min_zones"
    min_zones: Int | None = Field(None, ge=1, description="minDomains: spread over at least this many zones")


class Pods(_Section):
    replicas: Int = Field(1, ge=0, le=100_000, description="replicas at time 0 (ready at once)")
    image_pull_s: Duration = Field(
        ConstantDuration(kind="constant", value_s=0.0),
        description="pulling the image, once per node (a restart on the same node reuses it)",
    )
    startup_s: Duration = Field(
        ConstantDuration(kind="constant", value_s=60.0),
        description="container start to ready: model load and warm-up, paid by every first start (and by "
                    "restarts unless restart_startup_s is set)",
    )
    restart_startup_s: Duration | None = Field(
        None,
        description="a restarted container's start to ready (the kubelet's restart in place, after a crash or a "
                    "startup probe's kill): shorter than startup_s where the weights and compile caches outlive "
                    "the container (the node's page cache; a volume at HF_HUB_CACHE and VLLM_CACHE_ROOT); none: "
                    "startup_s, a restart as slow as a first start",
    )
    node_model_cache: bool = Field(
        False,
        description="the weights and compile caches sit on a volume of the node (a hostPath, a local PV) that "
                    "outlives the pod: a new pod placed on a node where a container of its image has loaded the "
                    "model starts in restart_startup_s (which it needs), as a restart does; false: only a restart "
                    "in place finds them (an emptyDir)",
    )
    crash_loop_backoff: CrashLoopBackOff = CrashLoopBackOff()
    readiness_probe: ReadinessProbe = ReadinessProbe()
    startup_probe: StartupProbe = StartupProbe()
    endpoints_propagation_s: Float = Field(
        1.0, ge=0,
        description="a change of readiness reaches the Service's endpoints (EndpointSlice controller, "
                    "kube-proxy) this much later",
    )
    crash_detection_s: Float = Field(
        1.0, ge=0,
        description="a crashed container is seen by the kubelet this much later (its PLEG relist period, 1 s), "
                    "and leaves the endpoints endpoints_propagation_s after that; requests sent to it "
                    "meanwhile are refused",
    )
    crash_teardown_s: Float = Field(
        0.0, ge=0, le=600,
        description="a crashed container's process is torn down this long, its kernel still accepting the "
                    "connections the router opens: what it held and what it is sent meanwhile fail when the "
                    "teardown ends (a SIGKILLed CPU pod of capsim's: about 0.04 s, data/validation/sessions/"
                    "teardown-2026-12-05; a GPU pod's driver teardown is longer); 0: the crash is instant"
    )
    disruption_budget: DisruptionBudget | None = Field(
        None, description="a PodDisruptionBudget: cluster-autoscaler drains a node only when evicting its pods "
        "keeps it (docs/simulator.md); none: drains evict at will, as without a PDB")
    gpu_cost_per_hour: Float = Field(0.0, ge=0, description="price of one GPU-hour (a pod of "
                                     "batching.tensor_parallel_size GPUs costs that many)")
    termination_grace_s: Float = Field(
        25.0, ge=0,
        description="a terminating pod's time to drain before what it still runs fails: the real pod's drain "
                    "timeout (capsim.core.service.PodConfig.drain_timeout_s, 25 s), which the export writes",
    )
    spread: Spread | None = Field(
        None, description="spread the pods over nodes (topologySpreadConstraints on the hostname; needs a "
                          "cluster section to matter): none, packed onto the fewest nodes")
    zone_spread: ZoneSpread | None = Field(
        None, description="spread the pods over availability zones (topologySpreadConstraints on "
                          "topology.kubernetes.io/zone; needs a cluster section of several zones to matter)")
    unreachable_toleration_s: Int | None = Field(
        None, ge=0,
        description="the pods' own NoExecute tolerations of node.kubernetes.io/unreachable and not-ready "
                    "(tolerationSeconds): how long after its node is NotReady a pod is evicted and replaced; "
                    "none: the cluster's default (cluster.unreachable_toleration_s). The export writes them",
    )
    strategy: Literal["RollingUpdate", "Recreate"] = Field(
        "RollingUpdate", description="the Deployment's strategy.type: RollingUpdate (Kubernetes' default) moves the "
        "pods within pods.rolling_update; Recreate takes every old pod down, waits until all are gone, then creates "
        "the new ones (no surge GPU, a whole outage per rollout). The export writes Recreate")
    rolling_update: RollingUpdateStrategy = Field(
        RollingUpdateStrategy(), description="the Deployment's rolling update: maxSurge and maxUnavailable (25% each, "
        "Kubernetes' defaults); the export writes them. Not with strategy Recreate")
    rollouts: tuple[Rollout, ...] = Field(
        (), description="times a new pod template is applied (a deploy): each rolls every pod over to a new one")
    min_ready_s: Int = Field(
        0, ge=0, le=3600, description="the Deployment's minReadySeconds: a pod counts as available to a rollout this "
        "long after it turns ready (a rollout waits for it); 0, Kubernetes' default: at once. The export writes it")
    progress_deadline_s: Int = Field(
        600, ge=1, description="the Deployment's progressDeadlineSeconds: a rollout with no progress this long is "
        "reported stalled (ProgressDeadlineExceeded; `kubectl rollout status` exits with an error then), as Kubernetes "
        "reports it: the rollout goes on. The export writes it when not 600")
    undo_on_deadline: bool = Field(
        False, description="the deploy pipeline undoes a rollout once Kubernetes reports it stalled (`kubectl rollout "
        "status` failing at progress_deadline_s, then `kubectl rollout undo`); false: it goes on until an undo in "
        "pods.rollouts")
    undo_after_s: Float | None = Field(
        None, gt=0, description="the deploy pipeline undoes a rollout not done this long after it began (`kubectl "
        "rollout status --timeout`, then `kubectl rollout undo`): a clock of its own, which an HPA scaling the "
        "Deployment does not reset as it resets the progress deadline; none: no such timeout")

    @model_validator(mode="after")
    def _node_cache_has_its_start(self) -> Self:
        if self.node_model_cache and self.restart_startup_s is None:
            raise ValueError("node_model_cache: a pod on a node that holds the model's files starts in "
                             "restart_startup_s, which is not set; set it (what a start with those caches warm "
                             "takes) or leave node_model_cache false")
        return self

    @model_validator(mode="after")
    def _undo_after_a_deploy(self) -> Self:
        deployed = False
        paused: int | None = None  # the entry that paused the Deployment, while it is paused
        for i in sorted(range(len(self.rollouts)), key=lambda i: (self.rollouts[i].at_s, i)):
            ro = self.rollouts[i]
            at = f"at {ro.at_s:g} s"
            if ro.undo and not deployed:
                raise ValueError(f"rollouts.{i}.undo: the undo {at} comes before any deploy, so there is no earlier "
                                 "template to go back to (kubectl: no rollout history)")
            if ro.undo and paused is not None:
                raise ValueError(f"rollouts.{i}.undo: the undo {at} comes while rollouts.{paused} has paused the "
                                 "Deployment, and kubectl refuses it (\"you cannot rollback a paused deployment; "
                                 "resume it first\"): add a resume entry before it")
            if ro.pause and paused is not None:
                raise ValueError(f"rollouts.{i}.pause: the Deployment is already paused {at} (since rollouts.{paused}); "
                                 "add a resume entry between them")
            if ro.resume and paused is None:
                raise ValueError(f"rollouts.{i}.resume: the Deployment is not paused {at} (kubectl: \"is not "
                                 "paused\"); add a pause entry before it")
            deployed |= ro.action == "deploy"
            paused = i if ro.pause else None if ro.resume else paused
        return self

    @property
    def restart_start(self) -> Duration:
        """A restarted container's start to ready: ``restart_startup_s``, else ``startup_s``."""
        return self.startup_s if self.restart_startup_s is None else self.restart_startup_s

    @property
    def template_changes(self) -> tuple[Rollout, ...]:
        """The ``rollouts`` entries that roll the pods to another template: deploys and undos (no pause or resume)."""
        return tuple(ro for ro in self.rollouts if ro.action in ("deploy", "undo"))

    def pause_pairs(self) -> list[tuple[int, int | None, Rollout | None]]:
        """Each pause of ``rollouts`` in the order the run takes the entries: the index of its pause entry, of the
        resume entry that ends it (``None``: never resumed), and the last template change (deploy or undo) before
        it (``None``: none)."""
        out: list[tuple[int, int | None, Rollout | None]] = []
        began: int | None = None
        last: Rollout | None = None
        for i, ro in sorted(enumerate(self.rollouts), key=lambda e: e[1].at_s):  # stable: one time's in their order
            if ro.action in ("deploy", "undo"):
                last = ro
            elif ro.pause:
                began, before = i, last
            elif ro.resume and began is not None:
                out.append((began, i, before))
                began = None
        if began is not None:
            out.append((began, None, before))
        return out

    def analysis_times(self) -> dict[int, list[float]]:
        """Per resume entry (its index) whose pipeline measures the canary during the pause (``check_interval_s``):
        the times of those measurements, from the pause plus ``check_initial_delay_s``, every ``check_interval_s``,
        before the resume (which measures last, at its own time)."""
        out: dict[int, list[float]] = {}
        for a, b, _ in self.pause_pairs():
            ro = None if b is None else self.rollouts[b]
            if b is None or ro is None or ro.check_interval_s is None:
                continue
            first, times = self.rollouts[a].at_s + ro.check_initial_delay_s, list[float]()
            while (t := first + len(times) * ro.check_interval_s) < ro.at_s:
                times.append(t)
            out[b] = times
        return out

    def check_times(self) -> dict[int, list[float]]:
        """Per resume entry (its index) with a metric check: the times of its measurements, those of the pause
        (``analysis_times``) and then its own."""
        during = self.analysis_times()
        return {i: [*during.get(i, []), ro.at_s] for i, ro in enumerate(self.rollouts) if ro.metrics_checked}

    def pauses(self) -> list[tuple[float, float]]:
        """The spans in which ``rollouts`` keep the Deployment paused, each ``(pause, resume)`` (``inf``: never
        resumed)."""
        return [(self.rollouts[a].at_s, math.inf if b is None else self.rollouts[b].at_s)
                for a, b, _ in self.pause_pairs()]

    @model_validator(mode="after")
    def _strategy_fields(self) -> Self:
        if self.strategy == "Recreate" and self.rolling_update != RollingUpdateStrategy():
            # upstream's validation: "may not be specified when strategy `type` is 'Recreate'" (Kubernetes' defaults,
            # 25% and 25%, are taken as unset: a scenario read back from its dump carries them)
            raise ValueError("rolling_update may not be set with strategy Recreate (it has no surge and no "
                             "unavailability to set): drop one of them")
        return self

    @property
    def spread_min_nodes(self) -> int:
        """The nodes ``spread`` asks the pods over at least (``min_nodes``); 0 without one."""
        return (self.spread.min_nodes or 0) if self.spread is not None else 0

    @property
    def spread_min_zones(self) -> int:
        """The zones ``zone_spread`` asks the pods over at least (``min_zones``); 0 without one."""
        return (self.zone_spread.min_zones or 0) if self.zone_spread is not None else 0


class OutlierEjection(_Section):
    """Envoy's passive outlier detection (``capsim.policy.outlier``), with Envoy's defaults but one: a pod that fails
    ``consecutive_failures`` requests in a row (refused or reset: crashed; a draining pod's 503; the pod's own 503 in
    a Redis outage) is ejected for ``base_ejection_s`` x its ejections (at most ``max_ejection_s``), if with it at
    most ``max_ejection_percent`` of the endpoints are out, or none is and ``always_eject_one_host`` is on. That
    option is on here and off in Envoy: since Envoy 1.27 its 10 % ejects no pod of a fleet under 10, and an Istio
    DestinationRule cannot turn it on (docs/studies.md, "Envoy's own default"). ``count_answered_5xx: false`` counts only the proxy's
    own failures (refused, reset, timed out), not the 5xx a pod answers. ``interval_s`` adds Envoy's analysis sweeps
    (a pod returns at the first after its ejection time; docs/studies.md, "Envoy's sweeps")."""

    consecutive_failures: Int = Field(5, ge=1, description="Envoy's consecutive_5xx")
    base_ejection_s: Float = Field(30.0, ge=0, description="Envoy's base_ejection_time")
    max_ejection_s: Float = Field(300.0, ge=0, description="Envoy's max_ejection_time")
    max_ejection_percent: Float = Field(10.0, ge=0, le=100, description="Envoy's max_ejection_percent")
    count_answered_5xx: bool = Field(
        True, description="count the 5xx a pod answers (a draining pod's, a Redis outage's), as Envoy's "
        "consecutive_5xx does; false: only refused, reset and timed-out requests, as Istio's "
        "splitExternalLocalOriginErrors with consecutiveLocalOriginFailures (consecutive5xxErrors 0)",
    )
    always_eject_one_host: bool = Field(
        True, description="Envoy's always_eject_one_host (1.31+): eject one pod while none is out, whatever "
        "max_ejection_percent allows (as every Envoy before 1.27 did); false: Envoy's default and what an Istio "
        "DestinationRule gets, which at 10 % ejects no pod of a fleet under 10",
    )
    interval_s: Float | None = Field(
        None, gt=0, description="Envoy's interval: a pod returns at the first analysis sweep (every interval_s "
        "from the start) after its ejection time, and each sweep one interval after its return lowers its "
        "backoff by one, as Envoy's (10 there, and in the export's DestinationRule); null: capsim's older "
        "simplification, a pod back at its ejection time exactly and its backoff reset by a success "
        "(docs/studies.md, \"Envoy's sweeps\")",
    )
    max_ejection_time_jitter_s: Float = Field(
        0.0, ge=0, description="Envoy's max_ejection_time_jitter: each ejection lasts a further whole number of "
        "milliseconds drawn uniformly from 0 to this, so pods ejected together do not all return at once "
        "(the simulator draws it from the seed's ejection_jitter stream); 0: none, Envoy's default",
    )

    def settings(self) -> OutlierSettings:
        """The shared policy's settings (``capsim.policy.outlier``), for the simulated router and the real one."""
        return OutlierSettings(self.consecutive_failures, self.base_ejection_s, self.max_ejection_s,
                               self.max_ejection_percent, self.count_answered_5xx, self.always_eject_one_host,
                               self.interval_s, self.max_ejection_time_jitter_s)


#: the routers that stand for a proxy (Envoy, a gateway) and so eject failing pods (``router.outlier_ejection``)
PROXY_ROUTERS = ("least_outstanding", "prefix_aware")


def router_ejects(kind: str, ejection: OutlierEjection | OutlierSettings | None) -> bool:
    """Whether a router of ``kind`` with ``ejection`` ejects failing pods: a proxy's (``PROXY_ROUTERS``) with it
    set. The scenario (``Router.ejects``), the simulated router and the real one (``RouterConfig.ejects``) ask this."""
    return ejection is not None and kind in PROXY_ROUTERS


class Router(_Section):
    """Which pod gets a request (docs/sessions.md): ``prefix_aware`` scores pods as the Kubernetes inference
    gateway's endpoint picker does, by the expected prefix-cache hit, the queue and the KV-cache use.
    Least outstanding and prefix-aware pick at random among equals (seeded), and eject failing pods."""

    kind: Literal["random", "round_robin", "least_outstanding", "session_affinity", "prefix_aware"] = \
        "least_outstanding"
    prefix_weight: Float = Field(3.0, ge=0, description="prefix_aware: weight of the expected prefix hit")
    queue_weight: Float = Field(1.0, ge=0, description="prefix_aware: weight of the (short) queue")
    kv_cache_weight: Float = Field(1.0, ge=0, description="prefix_aware: weight of the free KV cache")
    fallback: Literal["random", "least_outstanding"] = Field(
        "random", description="session_affinity: how a session with no pod that can take it is placed (its "
        "first turn, or a turn whose pod crashed, went or drains): at random as kube-proxy, or least outstanding",
    )
    outlier_ejection: OutlierEjection | None = Field(
        OutlierEjection(), description="least_outstanding and prefix_aware (an Envoy proxy or gateway): eject "
        "a pod after consecutive refused requests, as Envoy's outlier detection; null: never (docs/reliability.md)",
    )
    hold_when_no_pod_s: Float | None = Field(
        None, gt=0, description="a gateway that holds a request while the Service has no ready pod, up to this "
        "long, and sends it on when one is (Knative's activator, KEDA's HTTP add-on interceptor); null: a 503 at "
        "once, which the client retries")

    @property
    def ejects(self) -> bool:
        """Whether this router ejects failing pods: a proxy's (``PROXY_ROUTERS``) with ``outlier_ejection``."""
        return router_ejects(self.kind, self.outlier_ejection)


# ---- autoscaler ---------------------------------------------------------------------------------------
class MetricQuery(_Section):
    """How the adapter computes one metric from the scraped series (``autoscaler.queries``).

    ``instant``: the newest sample (a gauge); ``avg_over_time``: the mean of the samples in the window (a
    gauge); ``max_over_time``: their highest (a gauge; as llm-d's variant autoscaler reads saturation);
    ``rate``: a counter's increase per second over the window, or for a histogram the increase of its sum
    over the increase of its count (the mean observation); ``histogram_quantile``: the ``quantile`` of a
    histogram's observations in the window. ``window_s`` defaults to ``query_window_s``
    (``rate`` of a counter: the adapter's 5 minutes).
    """

    query: Literal["instant", "avg_over_time", "max_over_time", "rate", "histogram_quantile"]
    window_s: Float | None = Field(None, gt=0)
    quantile: Float = Field(0.99, gt=0, lt=1)


class KedaFallback(_Section):
    """KEDA's ``fallback`` (``capsim.policy.keda``): once more than ``failure_threshold`` consecutive reads of
    a metric by the HPA have failed, KEDA answers the HPA the value that makes it propose ``replicas`` (or by
    ``behavior`` the Deployment's count, or the higher or lower of the two): from release 2.18 the target times
    that count (divided by the ready pods for a ``Value`` target); before, an ``AverageValue`` target only,
    truncated to an integer; with ``keda.release`` 2.16 its operator also sets ``replicas`` at each poll in
    error."""

    failure_threshold: Int = Field(3, ge=0, description="KEDA fallback.failureThreshold")
    replicas: Int = Field(ge=0, description="KEDA fallback.replicas")
    behavior: FallbackBehavior = Field("static", description="KEDA fallback.behavior (2.17 on): static, "
                                       "currentReplicas, currentReplicasIfHigher or currentReplicasIfLower")


class CronTrigger(_Section):
    """A KEDA ``cron`` trigger (``autoscaler.keda.cron``): ``desired_replicas`` between the wall-clock times its
    ``start`` and ``end`` schedules fire, in ``timezone`` (``capsim.policy.keda_cron``, as KEDA's cron scaler)."""

    timezone: str = Field("UTC", description="the schedules' IANA time zone (KEDA's timezone)")
    start: str = Field(description="five-field cron schedule at which the window opens (KEDA's start)")
    end: str = Field(description="five-field cron schedule at which it closes (KEDA's end)")
    desired_replicas: Int = Field(ge=0, description="replicas the trigger asks for in the window (KEDA's "
                                                    "desiredReplicas); 1 outside it")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"must be an IANA time zone (Europe/Berlin, UTC), got {v!r}") from None
        return v

    @field_validator("start", "end")
    @classmethod
    def _cron(cls, v: str) -> str:
        if not valid_schedule(v):
            raise ValueError(f"must be a five-field cron schedule (minute hour day-of-month month day-of-week, "
                             f"as KEDA takes it: '0 18 * * 5'), got {v!r}")
        return v

    @model_validator(mode="after")
    def _not_the_same(self) -> Self:
        if self.start.split() == self.end.split():
            raise ValueError(f"start and end must differ (KEDA refuses the same schedule), got {self.start!r} for both")
        return self

    def window(self, clock_start: datetime) -> CronWindow:
        """The trigger read at simulated times, time 0 being ``clock_start``."""
        return CronWindow(self.timezone, self.start, self.end, self.desired_replicas, clock_start)


class ScalingModifiers(_Section):
    """KEDA's ``advanced.scalingModifiers`` (``autoscaler.keda.scaling_modifiers``): one composite metric, the
    ``formula`` over the triggers' values (``capsim.policy.keda_formula``), takes the place of the triggers' own
    metrics for the HPA KEDA creates and for KEDA's step to and from zero. A formula names a trigger by its metric's
    name with every character other than a letter, digit or underscore as ``_`` (``vllm:num_requests_waiting`` is
    ``vllm_num_requests_waiting``) and a cron trigger as ``cron_0``, ``cron_1`` ... in the order of ``cron``.
    The HPA scales on the composite against ``target`` (``metric_type``: ``AverageValue`` divides it by the pods,
    ``Value`` compares it whole); KEDA's operator finds the ScaledObject active when the composite is above
    ``activation_target``, and not active when any trigger's query failed (``pkg/scaling/scale_handler.go``)."""

    formula: str = Field(description="KEDA scalingModifiers.formula: an expression over the triggers' names "
                                     "(expr's language: + - * / ** %, comparisons, c ? x : y, max(), min(), "
                                     "count([...], {# > 1}) ...)")
    target: Float = Field(gt=0, description="KEDA scalingModifiers.target: the composite's target for the HPA")
    activation_target: Float = Field(0.0, description="KEDA scalingModifiers.activationTarget: the ScaledObject "
                                                      "is active while the composite is above it")
    metric_type: Literal["AverageValue", "Value"] = Field(
        "AverageValue", description="KEDA scalingModifiers.metricType: AverageValue (the composite over the pods) "
                                    "or Value")


def _named(setting: bool | tuple[str, ...], names: Sequence[str]) -> frozenset[str]:
    """The names a per-trigger setting covers: every one (true), none (false) or those it lists."""
    return frozenset(names if setting is True else () if setting is False else setting)


class Keda(_Section):
    """KEDA drives the autoscaler (``autoscaler.keda``): a ScaledObject whose triggers are the External metrics.

    ``minReplicas`` is then KEDA's ``minReplicaCount`` (0 lets the Deployment scale to zero) and
    ``maxReplicas`` its ``maxReplicaCount``; the HPA that KEDA creates scales between ``max(1, minReplicas)``
    and ``maxReplicas`` as the scenario's HPA does, and KEDA's operator takes the Deployment from zero to
    ``max(1, minReplicas)`` when a trigger is active (its value above its ``activation`` threshold) and back
    to zero ``cooldown_period_s`` after the last poll that found one active (``capsim.policy.keda``). With
    ``idle_replica_count`` (KEDA's ``idleReplicaCount``, only 0) it goes to zero whatever ``minReplicas`` is,
    and an active trigger takes it back to ``minReplicas``.
    """

    # whole seconds, as KEDA's fields are
    polling_interval_s: Int = Field(30, ge=1, description="KEDA pollingInterval: how often the operator asks "
                                                          "the triggers whether they are active")
    cooldown_period_s: Int = Field(300, ge=0, description="KEDA cooldownPeriod: seconds without an active "
                                                          "trigger before the Deployment goes to zero")
    activation: dict[str, Float] = Field(
        default_factory=dict, description="metric name (as in metrics) -> its trigger's activationThreshold "
                                          "(default 0: any value above 0 activates)")
    fallback: KedaFallback | None = Field(
        None, description="KEDA fallback: the replicas the HPA is given while the triggers' queries fail (None: "
                          "none)")
    use_cached_metrics: Bool | tuple[str, ...] = Field(
        False, description="the triggers' useCachedMetrics: true for every trigger, or the metric names of those "
                           "that set it; the HPA that KEDA creates reads such a metric as KEDA's last poll found it "
                           "(every polling_interval_s), not afresh at each of its syncs")
    ignore_null_values: Bool | tuple[str, ...] = Field(
        True, description="the triggers' ignoreNullValues: true for every trigger (KEDA's default), false for none, "
                          "or the metric names of those that keep it; a trigger that keeps it reads an empty "
                          "query result (no pod with a value, a rate with fewer than two samples) as 0, one that "
                          "drops it as an error (its poll in error, a failed read for the HPA and the fallback)")
    initial_cooldown_period_s: Int | None = Field(
        None, ge=0, description="KEDA initialCooldownPeriod, and the run starts as the ScaledObject is created (a "
                                "deploy): until a poll finds a trigger active, KEDA takes a Deployment that can go "
                                "to zero there once this long has passed (KEDA's default 0: at the first idle poll); "
                                "null: the run starts from a Deployment serving for long, as if a trigger was last "
                                "active at time 0")
    idle_replica_count: Int | None = Field(
        None, description="KEDA idleReplicaCount (only 0, the one value KEDA supports): with no trigger active for "
                          "cooldown_period_s the Deployment goes to zero whatever minReplicas is, and an active "
                          "trigger takes it back to minReplicas (null: not set)")
    release: Release = Field(
        "2.18", description="the KEDA release simulated: 2.20, 2.18 (and later) and 2.17 change nothing on a poll in "
                            "error, so a Prometheus outage keeps a serving Deployment's pods and a Deployment at zero "
                            "at zero; 2.16 (and earlier) sets fallback.replicas, or without a fallback takes a "
                            "minReplicas-0 Deployment to zero a cooldown into the outage; from 2.18 a fallback also "
                            "covers Value targets and answers the target times its count unrounded; with "
                            "scaling_modifiers and a fallback, 2.17 to 2.19 answer each failed trigger's fallback "
                            "value, summed by the HPA, and 2.20 one")

    scaling_modifiers: ScalingModifiers | None = Field(
        None, description="KEDA advanced.scalingModifiers: the HPA and KEDA's activation take one composite metric, "
                          "a formula over the triggers, instead of each trigger's (null: none)")
    cron: tuple[CronTrigger, ...] = Field(
        (), description="KEDA cron triggers besides the metrics' (each asks for its desired_replicas in its window; "
                        "KEDA answers them itself, not Prometheus); they need clock_start")
    clock_start: datetime | None = Field(
        None, description="the wall-clock time of the run's start, for the cron triggers' schedules (ISO 8601, "
                          "'2026-12-04T17:00:00+01:00'; without an offset, UTC)")

    @field_validator("clock_start")
    @classmethod
    def _aware(cls, v: datetime | None) -> datetime | None:
        return v.replace(tzinfo=UTC) if v is not None and v.tzinfo is None else v

    @model_validator(mode="after")
    def _cron_needs_a_clock(self) -> Self:
        if self.cron and self.clock_start is None:
            raise ValueError("cron triggers need clock_start: the wall-clock time of the run's start, at which "
                             "their schedules are read (clock_start: '2026-12-04T17:00:00+01:00')")
        return self

    def cron_windows(self) -> list[CronWindow]:
        """The cron triggers, read at simulated times."""
        if not self.cron:
            return []
        assert self.clock_start is not None
        return [c.window(self.clock_start) for c in self.cron]

    @field_validator("release", mode="before")
    @classmethod
    def _release_as_text(cls, v: Any) -> Any:
        # YAML reads an unquoted 2.17 as a number, and 2.20 as 2.2
        if isinstance(v, float) and not isinstance(v, bool):
            return f"{v:.2f}" if f"{v:.2f}" in RELEASES else f"{v:g}"
        return v

    @field_validator("use_cached_metrics", "ignore_null_values", mode="before")
    @classmethod
    def _cached_as_given(cls, v: Any) -> Any:
        if isinstance(v, bool) or type(v).__name__ == "bool_" or (
                isinstance(v, list | tuple) and all(isinstance(n, str) for n in v)):
            return v
        raise ValueError(f"must be true, false or a list of metric names, got {v!r}")

    def cached(self, names: Sequence[str]) -> frozenset[str]:
        """The metrics among ``names`` (the triggers') whose trigger sets ``useCachedMetrics``."""
        return _named(self.use_cached_metrics, names)

    def null_as_zero(self, names: Sequence[str]) -> frozenset[str]:
        """The metrics among ``names`` (the triggers') whose trigger keeps ``ignoreNullValues`` (an empty result
        reads 0; the others' reads fail)."""
        return _named(self.ignore_null_values, names)

    def every_null_as_zero(self, names: Sequence[str]) -> bool:
        """Whether every trigger among ``names`` keeps ``ignoreNullValues``: no empty result puts a poll in error."""
        return self.null_as_zero(names) >= frozenset(names)

    @field_validator("idle_replica_count")
    @classmethod
    def _idle_only_zero(cls, v: int | None) -> int | None:
        if v is not None and v != 0:  # any other count the HPA (minReplicas = minReplicaCount) takes back up
            raise ValueError(f"must be 0, the only value KEDA supports (kedacore/keda#2314), got {v}")
        return v

    @model_validator(mode="after")
    def _behavior_needs_2_17(self) -> Self:
        if self.fallback is not None and self.fallback.behavior != "static" and self.release == "2.16":
            raise ValueError(f"fallback.behavior {self.fallback.behavior!r} needs release 2.17 or later (KEDA added "
                             f"it in 2.17; release {self.release} knows only static)")
        return self


class Autoscaler(_Section):
    """An autoscaling/v2 HPA ``spec`` (Kubernetes spelling) plus the metric pipeline around it.

    The pipeline, with phases as in a cluster: Prometheus scrapes each pod every ``scrape_interval_s`` at
    the pod's own random offset; the adapter answers the HPA with the query of each metric (``queries``,
    the adapter's defaults otherwise: a gauge's instant value, a histogram's mean over ``query_window_s``)
    over the samples as they were ``adapter_lag_s`` ago (any real number of seconds); the controller syncs
    every ``sync_period_s`` from its own random phase.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_by_name=True, validate_by_alias=True)

    min_replicas: Int = Field(1, ge=0, alias="minReplicas")
    max_replicas: Int = Field(ge=1, le=100_000, alias="maxReplicas")
    metrics: tuple[dict[str, Any], ...] = Field(min_length=1)
    behavior: dict[str, Any] | None = None
    scale_target_ref: dict[str, Any] | None = Field(None, alias="scaleTargetRef")
    sync_period_s: Float = Field(15.0, gt=0)
    scrape_interval_s: Float = Field(15.0, gt=0)
    query_window_s: Float = Field(60.0, gt=0)
    adapter_lag_s: Float = Field(0.0, ge=0)
    dcgm_collect_interval_s: Float = Field(
        30.0, gt=0, description="dcgm-exporter --collect-interval (its default 30000 ms): how often the exporter reads "
                                "the GPUs' fields, which Prometheus scrapes from it every scrape_interval_s (metrics "
                                "DCGM_FI_DEV_GPU_UTIL and DCGM_FI_PROF_GR_ENGINE_ACTIVE)")
    dcgm_util_period_s: Float = Field(
        1.0, gt=0, description="NVML's sample period behind DCGM_FI_DEV_GPU_UTIL: the percent of this last stretch "
                               "before a collection in which a kernel ran (NVML: between 1/6 s and 1 s by product)")
    queries: dict[str, MetricQuery] = Field(
        default_factory=dict, description="metric name (as in metrics) -> its query; the adapter's default otherwise"
    )
    tolerance: Float = Field(0.1, ge=0, lt=1)
    downscale_window_s: Float = Field(300.0, ge=0, description="controller default scale-down window")
    keda: Keda | None = Field(None, description="KEDA drives the HPA and the step to and from zero replicas")

    @model_validator(mode="after")
    def _k8s(self) -> Self:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"maxReplicas must be >= minReplicas ({self.min_replicas}), got {self.max_replicas}")
        if self.dcgm_util_period_s > self.dcgm_collect_interval_s:
            raise ValueError(f"dcgm_util_period_s ({self.dcgm_util_period_s:g}) must not pass dcgm_collect_interval_s "
                             f"({self.dcgm_collect_interval_s:g}): NVML's sample period ends at each collection")
        hpa = self.to_hpa()  # validates metrics and behavior with the policy's own messages
        for i, m in enumerate(hpa.metrics):
            if m.type == "External":
                if m.name not in POD_METRIC_ALIASES and m.name not in EXTERNAL_METRICS:
                    raise ValueError(
                        f"metrics[{i}].external.metric.name must be a pod metric (summed over the Deployment's "
                        f"pods) or one of {sorted(EXTERNAL_METRICS)}, got {m.name!r}"
                    )
                continue
            if m.type != "Pods":
                raise ValueError(f"metrics[{i}].type must be 'Pods' or 'External' in the simulator, got {m.type!r}")
            if m.name not in POD_METRIC_ALIASES:
                raise ValueError(
                    f"metrics[{i}].pods.metric.name must be one of {sorted(POD_METRICS)}, got {m.name!r}"
                )
        names = [m.name for m in hpa.metrics]
        if self.keda is not None:
            for i, m in enumerate(hpa.metrics):
                if m.type != "External":
                    raise ValueError(f"metrics[{i}].type must be 'External' with keda (KEDA's triggers are "
                                     f"External metrics to the HPA it creates), got {m.type!r}")
            for name in self.keda.activation:
                if name not in names:
                    raise ValueError(f"keda.activation.{name}: no metric of this name in metrics (names: {names})")
            for field in ("use_cached_metrics", "ignore_null_values"):
                given = getattr(self.keda, field)
                for i, name in enumerate(given if isinstance(given, tuple) else ()):
                    if name not in names:
                        raise ValueError(f"keda.{field}.{i}: {name!r} is not a metric of metrics (names: {names})")
            if self.keda.scaling_modifiers is not None:
                self._check_scaling_modifiers(hpa.metrics)
            elif self.keda.fallback is not None and not release_at_least(self.keda.release, "2.18"):
                for i, m in enumerate(hpa.metrics):
                    if m.target_type != "AverageValue":  # KEDA's admission webhook refuses it (CheckFallbackValid)
                        raise ValueError(f"keda.fallback needs every trigger's metric type AverageValue before release "
                                         f"2.18 (KEDA {self.keda.release} refuses a fallback otherwise), but "
                                         f"metrics[{i}] ({m.name}) targets a {m.target_type}")
        for name, q in self.queries.items():
            if name not in names:
                raise ValueError(f"queries.{name}: no metric of this name in metrics (names: {names})")
            kind = METRIC_TYPES.get(metric_kind(name), "gauge")
            if q.query not in QUERIES[kind]:
                raise ValueError(f"queries.{name}.query must be one of {list(QUERIES[kind])} for a {kind}, "
                                 f"got {q.query!r}")
            if q.query == "histogram_quantile" and metric_kind(name) != "ttft":
                # the simulated pod counts its TTFT observations per bucket, its inter-token gaps only as a sum
                # and a count: a quantile of them would read nothing the simulator has
                raise ValueError(f"queries.{name}.query: histogram_quantile is simulated for the TTFT histogram "
                                 f"only; the inter-token latency is read as its mean over the window (query: rate)")
        return self

    def _check_scaling_modifiers(self, metrics: Sequence[Any]) -> None:
        """KEDA's admission of ``keda.scaling_modifiers`` (``ValidateAndCompileScalingModifiers``,
        ``CheckFallbackValid``), and what capsim does not model with it."""
        keda = self.keda
        assert keda is not None and keda.scaling_modifiers is not None
        sm = keda.scaling_modifiers
        names = self.trigger_names
        seen: dict[str, str] = {}
        for metric, name in zip([m.name for m in metrics] + [f"cron[{i}]" for i in range(len(keda.cron))], names,
                                strict=True):
            if name in seen:
                raise ValueError(f"keda.scaling_modifiers: metrics {seen[name]!r} and {metric!r} both make the "
                                 f"trigger name {name!r}, so a formula could not tell them apart")
            seen[name] = metric
        try:
            compile_formula(sm.formula, names)
        except FormulaError as e:
            raise ValueError(f"keda.scaling_modifiers.formula: {e}") from None
        if keda.activation:
            raise ValueError("keda.activation: with scaling_modifiers KEDA decides activity on the composite "
                             "(scaling_modifiers.activation_target), not on each trigger's activationThreshold; "
                             "drop keda.activation")
        fb = keda.fallback
        if fb is not None:
            if keda.release == "2.16":
                raise ValueError("keda.fallback with scaling_modifiers is simulated from release 2.17 (KEDA 2.17 "
                                 "made the fallback follow scalingModifiers.metricType, kedacore/keda#6521); set "
                                 "keda.release to 2.17, 2.18 or 2.20")
            if sm.target != int(sm.target):
                raise ValueError(f"keda.fallback with scaling_modifiers needs a whole-number "
                                 f"scaling_modifiers.target (KEDA parses it as an integer and otherwise ignores the "
                                 f"fallback, HasValidFallback), got {sm.target:g}")
            if not release_at_least(keda.release, "2.18") and sm.metric_type != "AverageValue":
                raise ValueError(f"keda.fallback needs scaling_modifiers.metric_type AverageValue before release "
                                 f"2.18 (KEDA {keda.release} has no fallback for a Value composite), got "
                                 f"{sm.metric_type}")

    @property
    def trigger_names(self) -> list[str]:
        """KEDA's trigger names as a ``keda.scaling_modifiers`` formula calls them: each metric's
        (``capsim.policy.keda_formula.trigger_name``), then ``cron_0``, ``cron_1`` ... for ``keda.cron``."""
        cron = self.keda.cron if self.keda is not None else ()
        return [trigger_name(m.name) for m in self.to_hpa().metrics] + [f"cron_{i}" for i in range(len(cron))]

    def formula(self) -> Formula | None:
        """The compiled ``keda.scaling_modifiers`` formula (None: none)."""
        if self.keda is None or self.keda.scaling_modifiers is None:
            return None
        return compile_formula(self.keda.scaling_modifiers.formula, self.trigger_names)

    def query_of(self, name: str) -> tuple[str, float, float]:
        """The query of metric ``name``: (query, window in seconds, quantile), defaults filled in."""
        kind = METRIC_TYPES.get(metric_kind(name), "gauge")
        q = self.queries.get(name)
        query = q.query if q is not None else QUERIES[kind][0]
        default_window = ADAPTER_RATE_INTERVAL_S if kind == "counter" else self.query_window_s
        window = q.window_s if q is not None and q.window_s is not None else default_window
        return query, window, q.quantile if q is not None else 0.99

    def k8s_spec(self) -> dict[str, Any]:
        """The HPA ``spec`` in Kubernetes spelling."""
        spec: dict[str, Any] = {"minReplicas": self.min_replicas, "maxReplicas": self.max_replicas,
                                "metrics": [dict(m) for m in self.metrics]}
        if self.behavior is not None:
            spec["behavior"] = self.behavior
        if self.scale_target_ref is not None:
            spec["scaleTargetRef"] = self.scale_target_ref
        return spec

    @property
    def cron_metric_names(self) -> list[str]:
        """The External metric of each ``keda.cron`` trigger, as KEDA names them (``s<trigger index>-cron-...``)."""
        if self.keda is None:
            return []
        n = len(self.metrics)
        return [f"s{n + i}-cron-{c.timezone.lower().replace('/', '-')}" for i, c in enumerate(self.keda.cron)]

    @property
    def goes_to_zero(self) -> bool:
        """Whether the Deployment can be taken to zero pods: ``minReplicas: 0``, or KEDA's idle mode
        (``keda.idle_replica_count``)."""
        return self.min_replicas == 0 or (self.keda is not None and self.keda.idle_replica_count is not None)

    @property
    def can_wake_from_zero(self) -> bool:
        """Whether a metric has a value when no pod runs: the gateway's counter (the pods' own series are 0)."""
        return any(EXTERNAL_METRICS.get(m.name) == "gateway" for m in self.to_hpa().metrics)

    def to_hpa(self, with_cron: bool = False) -> Any:
        """A fresh ``capsim.policy.autoscaling.HorizontalPodAutoscaler`` for this spec: with ``keda``, the
        HPA that KEDA creates (``minReplicas`` at least 1; the step to and from zero is KEDA's own); ``with_cron``:
        with an External metric per cron trigger after the scenario's (``cron_metric_names``), each with an
        ``AverageValue`` target of 1, as KEDA's cron scaler gives it to the HPA."""
        from capsim.policy.autoscaling import HorizontalPodAutoscaler, Tolerance
        from capsim.policy.keda import hpa_min_replicas

        spec = self.k8s_spec()
        if self.keda is not None:
            spec["minReplicas"] = hpa_min_replicas(self.min_replicas)
        if with_cron:
            spec["metrics"] += [{"type": "External", "external": {
                "metric": {"name": name}, "target": {"type": "AverageValue", "averageValue": "1"}}}
                for name in self.cron_metric_names]
        return HorizontalPodAutoscaler.from_k8s(
            spec,
            downscale_window_seconds=self.downscale_window_s,
            tolerance=Tolerance(scale_down=self.tolerance, scale_up=self.tolerance),
        )


def metric_kind(name: str) -> str:
    """What metric ``name`` (a pod metric, an alias, or an External-only series) measures: ``queue_depth`` ..."""
    return POD_METRIC_ALIASES.get(name) or EXTERNAL_METRICS[name]


class Spot(_Section):
    """Spot (preemptible) GPU nodes: cheaper, and reclaimed by the cloud with a short notice. Beyond the first
    ``on_demand_nodes`` (an on-demand node group that cluster-autoscaler fills first), new nodes are spot.
    On an interruption's notice the node is cordoned and drained by a termination handler (``drain``: every
    pod at once, or those the PodDisruptionBudget lets go), its pods are replaced elsewhere, and it is gone
    ``notice_s`` later, with whatever still runs on it (``capsim.sim.nodes``)."""

    price_ratio: Float = Field(gt=0, le=1, description="a spot GPU-hour's price over pods.gpu_cost_per_hour "
                                                       "(the on-demand price)")
    on_demand_nodes: Int = Field(0, ge=0, description="nodes of an on-demand node group: a new node is "
                                                      "on-demand while fewer than this many are, spot after")
    notice_s: Float = Field(120.0, ge=0, description="the interruption's notice: the node is gone this long "
                                                     "after it (AWS 120 s; GCP and Azure 30 s)")
    mtbf_s: Float | None = Field(None, gt=0, description="mean time between interruptions of one spot node, "
                                                         "from when it is ready; none: only faults.spot_interruptions")
    drain: Literal["force", "eviction"] = Field(
        "force", description="how the termination handler drains a reclaimed node: force, every pod deleted at "
                             "once whatever the PodDisruptionBudget (GKE's graceful node shutdown); eviction, "
                             "through the eviction API as AWS's Node Termination Handler and Karpenter do: the "
                             "pods pods.disruption_budget protects wait (asked again every 5 s) and die with the "
                             "node at the notice's end")


#: cluster-autoscaler's scale-down flags: Karpenter removes nodes by its own consolidation (``cluster.karpenter``)
CLUSTER_AUTOSCALER_SCALE_DOWN = ("scale_down_enabled", "scale_down_unneeded_time_s", "scale_down_utilization_threshold",
                                 "scale_down_delay_after_add_s", "scale_down_delay_after_delete_s",
                                 "max_scale_down_parallelism", "unremovable_node_recheck_timeout_s",
                                 "scale_down_unready_time_s")


class Karpenter(_Section):
    """Karpenter's NodePool disruption settings (``karpenter.sh/v1``): Karpenter, not cluster-autoscaler, removes
    the GPU nodes, by consolidation (``capsim.sim.karpenter``). Defaults are the NodePool's own."""

    consolidation_policy: Literal["WhenEmpty", "WhenEmptyOrUnderutilized"] = Field(
        "WhenEmptyOrUnderutilized", description="spec.disruption.consolidationPolicy: WhenEmpty removes nodes "
                                                "with no pod; WhenEmptyOrUnderutilized also a node whose pods fit "
                                                "on the other nodes (they are evicted and start again there)")
    consolidate_after_s: Float | None = Field(
        0.0, ge=0, description="spec.disruption.consolidateAfter: a node is a candidate this long after a pod was "
                               "last placed on it or began terminating there (after it was ready, if none); none: "
                               "Never, no consolidation")
    budget_nodes: Int | str = Field(
        "10%", description="spec.disruption.budgets[0].nodes: nodes Karpenter may be disrupting at once, a count "
                           "or a percentage of the NodePool's ready nodes (rounded up)")
    drift_budget_nodes: Int | str | None = Field(
        None, description="spec.disruption.budgets[1] with reasons: [Drifted]: nodes drift may be disrupting at "
                          "once (a count or a percentage, as budget_nodes; the smaller of the two applies to drift); "
                          "none: budget_nodes alone")
    drift_at_s: list[Float] = Field(
        default_factory=list, description="moments the NodePool's node template changes (a new AMI or EC2NodeClass "
                                          "edit): every node created before one is drifted from then, and Karpenter "
                                          "replaces it, launching a replacement node first and deleting the old one "
                                          "(its pods evicted) once that is ready; empty: no drift")

    @model_validator(mode="after")
    def _budget(self) -> Self:
        after = self.consolidate_after_s
        if after is not None and after != round(after):
            raise ValueError(f"consolidate_after_s must be whole seconds (a NodePool duration), got {after:g}")
        for name in ("budget_nodes", "drift_budget_nodes"):
            b = getattr(self, name)
            if isinstance(b, str):
                text = b.strip()
                digits = text[:-1] if text.endswith("%") else text
                if not digits.isdigit() or (text.endswith("%") and int(digits) > 100):
                    raise ValueError(f"{name} must be a count of nodes or a percentage from 0% to 100%, got {b!r}")
            elif b is not None and b < 0:
                raise ValueError(f"{name} must not be negative, got {b}")
        for i, t in enumerate(self.drift_at_s):
            if t < 0:
                raise ValueError(f"drift_at_s[{i}] must not be negative, got {t:g}")
        return self

    @staticmethod
    def _nodes(budget: int | str, nodes: int) -> int:
        """A budget's ``nodes`` out of ``nodes`` ready ones (Karpenter's ``GetAllowedDisruptionsByReason``: a
        percentage scaled and rounded up)."""
        if isinstance(budget, int):
            return budget
        text = budget.strip()
        if text.endswith("%"):
            return math.ceil(int(text[:-1]) * nodes / 100)
        return int(text)

    def allowed(self, nodes: int, drift: bool = False) -> int:
        """Nodes the budgets let be disrupted at once out of ``nodes`` ready ones; for drift (``drift``) the
        smaller of ``budget_nodes`` and ``drift_budget_nodes``, as Karpenter takes the least of the budgets that
        apply to a reason."""
        allowed = self._nodes(self.budget_nodes, nodes)
        if drift and self.drift_budget_nodes is not None:
            allowed = min(allowed, self._nodes(self.drift_budget_nodes, nodes))
        return allowed

    def drifted_s(self, created_s: float) -> float | None:
        """When a node created at ``created_s`` drifts: the first ``drift_at_s`` after its creation (``None``: it
        never does)."""
        later = [t for t in self.drift_at_s if t > created_s]
        return min(later) if later else None


class ClusterSpec(_Section):
    """GPU nodes: pods wait Pending for free GPUs on one node; missing nodes are provisioned, whole, up to
    ``max_gpus``, and cluster-autoscaler removes unneeded ones (its flags' defaults; see ``capsim.sim.nodes``), or
    with ``karpenter`` a Karpenter NodePool's consolidation does (``capsim.sim.karpenter``)."""

    max_gpus: Int = Field(ge=1, description="GPUs the node group may have (cluster-autoscaler's --gpu-total "
                                            "maximum): whole nodes of node_gpus within it")
    node_gpus: Int = Field(8, ge=1, description="GPUs of one node (its instance type)")
    zones: Int = Field(1, ge=1, le=64, description="availability zones the nodes span: one node group per zone, "
                                                   "kept balanced (cluster-autoscaler "
                                                   "--balance-similar-node-groups); a new node goes to the "
                                                   "zone with the fewest")
    min_nodes_per_zone: Int = Field(
        0, ge=0, description="each zone's node group minimum size: nodes there from the start, empty or not, "
                             "that scale-down never takes below (a zone with no node is no domain of "
                             "pods.zone_spread)")
    max_gpus_per_zone: Int | None = Field(
        None, ge=1, description="GPUs one zone's node group may have (its maximum size, or what the zone has in "
                                "stock): whole nodes within it; none: only max_gpus bounds them")
    node_provision_s: Float = Field(240.0, ge=0)
    billing: Literal["node", "pod"] = Field(
        "node", description="node: every GPU of a node from its creation to its removal; pod: GPUs pods hold"
    )
    scale_down_enabled: Bool = Field(True, description="cluster-autoscaler --scale-down-enabled")
    scale_down_unneeded_time_s: Float = Field(600.0, ge=0, description="--scale-down-unneeded-time")
    scale_down_utilization_threshold: Float = Field(
        0.5, ge=0, le=1, description="--scale-down-gpu-utilization-threshold: GPUs requested / GPUs of the node"
    )
    scale_down_delay_after_add_s: Float = Field(600.0, ge=0, description="--scale-down-delay-after-add")
    scale_down_delay_after_delete_s: Float = Field(
        0.0, ge=0, description="--scale-down-delay-after-delete: no scale-down until this long after a scan "
                               "deleted a node or started a drain (0, the flag's default: the next scan may)")
    scan_interval_s: Float = Field(10.0, gt=0, description="--scan-interval")
    max_scale_down_parallelism: Int = Field(
        10, ge=1, description="--max-scale-down-parallelism (and --max-empty-bulk-delete, kept equal): nodes "
                              "scale-down deletes at once, the empty ones a scan removes and the one draining "
                              "counted together")
    unremovable_node_recheck_timeout_s: Float = Field(
        300.0, ge=0, description="--unremovable-node-recheck-timeout: a node the removal simulation found "
                                 "unremovable (its pods fit nowhere else, or the PodDisruptionBudget has no "
                                 "disruption left) is not considered for scale-down again until this long after")
    # a node that fails (faults.node_failures): when its pods leave the endpoints, are replaced, and it goes
    node_monitor_grace_s: Float = Field(
        40.0, ge=0, description="kube-controller-manager --node-monitor-grace-period: a node silent this long is "
                                "NotReady and its pods' Ready condition false")
    unreachable_toleration_s: Float = Field(
        300.0, ge=0, description="kube-apiserver --default-unreachable-toleration-seconds: a NotReady node's pods "
                                 "are evicted (and replaced) this long after it is tainted")
    # the node lifecycle controller taints NotReady nodes through a rate-limited queue per zone
    # (capsim.sim.nodelifecycle): its flags, and the nodes outside the GPU node group it counts
    other_nodes_per_zone: Int = Field(
        1, ge=0, description="nodes outside the GPU node group in each zone (a system pool, CPU workers), Ready "
                             "unless their zone is dark: the node lifecycle controller counts them when it judges "
                             "a zone's health")
    node_eviction_rate: Float = Field(
        0.1, gt=0, description="kube-controller-manager --node-eviction-rate: NotReady nodes a second tainted "
                               "(their pods evicted after the toleration) in a healthy zone")
    secondary_node_eviction_rate: Float = Field(
        0.01, ge=0, description="--secondary-node-eviction-rate: the rate in an unhealthy zone larger than "
                                "large_cluster_size_threshold (a smaller one: none)")
    unhealthy_zone_threshold: Float = Field(
        0.55, gt=0, le=1, description="--unhealthy-zone-threshold: a zone with more than 2 nodes NotReady and at "
                                      "least this share of its nodes is unhealthy (partial disruption)")
    large_cluster_size_threshold: Int = Field(
        50, ge=0, description="--large-cluster-size-threshold: an unhealthy zone of at most this many nodes "
                              "evicts nothing; a larger one at secondary_node_eviction_rate")
    max_total_unready_percentage: Float = Field(
        45.0, ge=0, le=100, description="cluster-autoscaler --max-total-unready-percentage: with more of the "
                                        "cluster's nodes NotReady (and more than ok_total_unready_count), it "
                                        "halts: no node added, none removed")
    ok_total_unready_count: Int = Field(3, ge=0, description="cluster-autoscaler --ok-total-unready-count")
    node_auto_repair_s: Float | None = Field(
        None, gt=0, description="a managed cloud's node auto-repair: a node NotReady this long is deleted with the "
                                "pods still on it, which the ReplicaSet replaces, evicted or not (GKE and AKS "
                                "document about 600 s); none: off, as on a self-managed cluster")
    spot: Spot | None = Field(None, description="spot GPU nodes (billing: node); none: every node on-demand")
    karpenter: Karpenter | None = Field(
        None, description="Karpenter's NodePool removes the nodes (its consolidation) instead of cluster-autoscaler's "
                          "scale-down; none: cluster-autoscaler")
    scale_down_unready_time_s: Float = Field(
        1200.0, ge=0, description="cluster-autoscaler --scale-down-unready-time: a failed node is removed (and "
                                  "no longer billed) this long after it failed, with scale-down enabled")
    # a node the cloud cannot create (faults.gpu_stockouts): when cluster-autoscaler learns it, and how long it
    # then leaves the node group (the zone) alone (capsim.policy.node_group_backoff)
    stockout_error_s: Float | None = Field(
        60.0, ge=0, description="how long after cluster-autoscaler asks for a node the cloud reports that it could "
                                "not create it (an out-of-capacity error: AWS's InsufficientInstanceCapacity, "
                                "GCE's ZONE_RESOURCE_POOL_EXHAUSTED); none: never reported, the scale-up times out "
                                "after max_node_provision_s")
    max_node_provision_s: Float = Field(
        900.0, gt=0, description="cluster-autoscaler --max-node-provision-time: a node not registered this long "
                                 "after it was asked for is a failed scale-up")
    initial_node_group_backoff_s: Float = Field(
        300.0, ge=0, description="cluster-autoscaler --initial-node-group-backoff-duration: a node group (zone) "
                                 "whose scale-up failed is not scaled up for this long")
    max_node_group_backoff_s: Float = Field(
        1800.0, ge=0, description="cluster-autoscaler --max-node-group-backoff-duration: the backoff doubles with "
                                  "each failure after the last backoff ended, up to this")
    node_group_backoff_reset_s: Float = Field(
        10800.0, ge=0, description="cluster-autoscaler --node-group-backoff-reset-timeout: this long after its "
                                   "last failure a node group's backoff starts over")

    @property
    def stockout_known_s(self) -> float:
        """How long after a node is asked for in a GPU stockout cluster-autoscaler knows it was not created: the
        cloud's error (``stockout_error_s``), or the scale-up's timeout (``max_node_provision_s``) if sooner."""
        error_s = self.stockout_error_s if self.stockout_error_s is not None else math.inf
        return min(error_s, self.max_node_provision_s)

    @property
    def stockout_reported(self) -> bool:
        """Whether the cloud's out-of-capacity error reaches cluster-autoscaler before the scale-up times out."""
        return self.stockout_known_s == self.stockout_error_s

    def pods_per_node(self, gpus_per_pod: int) -> int:
        """Pods of ``gpus_per_pod`` GPUs one node holds (a pod's GPUs share its node)."""
        return self.node_gpus // gpus_per_pod

    @property
    def max_nodes(self) -> int:
        """Nodes the cluster may have at once: whole nodes within ``max_gpus`` and each zone's
        ``max_gpus_per_zone``."""
        nodes = self.max_gpus // self.node_gpus
        if self.max_gpus_per_zone is not None:
            nodes = min(nodes, self.zones * (self.max_gpus_per_zone // self.node_gpus))
        return nodes

    def pods_held(self, gpus_per_pod: int) -> int:
        """Pods the node groups hold at most: ``max_nodes`` nodes, each ``pods_per_node``."""
        return self.max_nodes * self.pods_per_node(gpus_per_pod)

    @model_validator(mode="after")
    def _whole_node(self) -> Self:
        if self.initial_node_group_backoff_s > self.max_node_group_backoff_s:
            raise ValueError(f"initial_node_group_backoff_s ({self.initial_node_group_backoff_s}) must not pass "
                             f"max_node_group_backoff_s ({self.max_node_group_backoff_s})")
        if self.max_gpus < self.node_gpus:
            raise ValueError(f"max_gpus must hold one whole node of node_gpus ({self.node_gpus}) GPUs, got "
                             f"{self.max_gpus}")
        if self.max_gpus_per_zone is not None and self.max_gpus_per_zone < max(self.min_nodes_per_zone, 1) * self.node_gpus:
            raise ValueError(f"max_gpus_per_zone must hold max(min_nodes_per_zone, 1) ({max(self.min_nodes_per_zone, 1)}) "
                             f"whole nodes of node_gpus ({self.node_gpus}) GPUs, got {self.max_gpus_per_zone}")
        if self.karpenter is not None:
            # set away from its default (a scenario's overrides write back every field, so not model_fields_set)
            ca = [f for f in CLUSTER_AUTOSCALER_SCALE_DOWN if getattr(self, f) != type(self).model_fields[f].default]
            if ca:
                raise ValueError(f"karpenter: Karpenter removes the nodes by its consolidation, so {ca[0]} "
                                 "(cluster-autoscaler's scale-down) does not apply; drop it, or drop karpenter "
                                 "(consolidate_after_s: null turns consolidation off)")
            if self.min_nodes_per_zone:
                raise ValueError("karpenter: a Karpenter NodePool keeps no minimum of nodes, so min_nodes_per_zone "
                                 f"({self.min_nodes_per_zone}) does not apply; set it to 0, or drop karpenter")
            if self.spot is not None:
                raise ValueError("karpenter: spot nodes under Karpenter (its own choice of capacity type, spot "
                                 "consolidation) are not modelled; drop spot, or drop karpenter")
        if self.spot is not None and self.billing != "node":
            raise ValueError("spot needs billing: node (a spot price is the node's, whatever its pods hold)")
        if self.min_nodes_per_zone * self.zones * self.node_gpus > self.max_gpus:
            raise ValueError(f"max_gpus must hold min_nodes_per_zone ({self.min_nodes_per_zone}) nodes of node_gpus "
                             f"({self.node_gpus}) GPUs in each of the {self.zones} zones, got {self.max_gpus}")
        return self


# ---- faults, state, client, SLO ------------------------------------------------------------------------
class Crash(_Section):
    at_s: Float = Field(ge=0)
    pods: Int = Field(1, ge=1, description="how many ready pods crash (chosen by the crash stream)")
    pod: Int | None = Field(None, ge=0, description="crash this pod id instead")


class NodeFailure(_Section):
    """A GPU node dies at ``at_s`` (a kernel panic, a GPU falling off the bus, lost power): see
    ``capsim.sim.cluster`` for what Kubernetes does next."""

    at_s: Float = Field(ge=0)
    node: Int | None = Field(None, ge=0, description="fail this node (numbered 0, 1, ... as created) instead "
                                                     "of a ready node with pods, chosen by the node_failures stream")
    duration_s: Float | None = Field(
        None, gt=0, description="a network partition: the node is back this long after, its pods with it when "
                                "they were not evicted yet; none: it is gone for good")


class ZoneFailure(_Section):
    """An availability zone goes dark at ``at_s`` (power, cooling, the zone's network): every node in it
    fails as one node failure does, nodes booting there fail as they come up, and cluster-autoscaler adds
    no node there until it is back."""

    at_s: Float = Field(ge=0)
    zone: Int = Field(0, ge=0, description="the zone (numbered 0 .. cluster.zones - 1)")
    duration_s: Float | None = Field(
        None, gt=0, description="the zone is back this long after, with its nodes (those not removed yet) and "
                                "their pods not evicted yet; none: gone for the rest of the run")


class SpotInterruption(_Section):
    """The cloud reclaims a spot node at ``at_s`` (cluster.spot: its notice, then it is gone)."""

    at_s: Float = Field(ge=0)
    node: Int | None = Field(None, ge=0, description="this node (numbered 0, 1, ... as created) instead of a "
                                                     "spot node holding pods, drawn by the spot stream")


class SlowPod(_Section):
    """Pods that run slow from ``at_s`` and stay ready (a gray failure: a GPU throttling on heat or power, a
    degraded link, a noisy neighbour on a shared GPU, a bad driver): their model steps take ``factor`` times
    as long, their probes pass, and the router and the HPA see only their longer queues
    (``capsim.sim.faults``)."""

    at_s: Float = Field(ge=0)
    factor: Float = Field(
        le=100, description="each batch or step on the slow pods takes this many times as long (2: half "
                            "speed); the cached-KV copy too, not the pod's HTTP work")
    duration_s: Float | None = Field(None, gt=0, description="back to full speed this long after; none: for the "
                                                             "rest of the run")
    pods: Int | Literal["all"] = Field(
        1, description="how many ready pods (drawn from the slow_pods stream), or all: every pod, those started "
                       "during it too (a fleet-wide spell)")
    pod: Int | None = Field(None, ge=0, description="slow this pod id instead")

    @field_validator("factor")
    @classmethod
    def _a_multiplier(cls, v: float) -> float:
        if v < 1:
            raise ValueError(f"must be at least 1: it multiplies the batch and step times (half speed is 2), got {v}")
        return v

    @field_validator("pods")
    @classmethod
    def _some(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"pods must be at least 1 or 'all', got {v}")
        return v

    @model_validator(mode="after")
    def _one_target(self) -> Self:
        if self.pod is not None and self.pods == "all":
            raise ValueError(f"pods: all slows every pod; leave it out to slow pod {self.pod}")
        return self


class GpuStockout(_Section):
    """The cloud has no GPU nodes to give from ``at_s`` (a GPU stockout: the zone's capacity for the instance
    type is exhausted): a node cluster-autoscaler asks for meanwhile is never created; the cloud reports it
    ``cluster.stockout_error_s`` later and cluster-autoscaler backs the zone's node group off
    (``capsim.sim.nodes``). Nodes that exist, or were created before, are not touched."""

    at_s: Float = Field(ge=0)
    duration_s: Float | None = Field(None, gt=0, description="capacity is back this long after; none: not in this run")
    zone: Int | None = Field(None, ge=0, description="the zone out of capacity; none: every zone")


class RandomSlowdowns(_Section):
    """Pods that run slow at random (a fleet's gray failures over time): each pod, from its creation, runs
    ``factor`` times slower for ``duration_s`` after an exponential time of mean ``mtbf_s``, again and again; a
    spell is a ``faults.slow_pods`` entry's, drawn (``capsim.sim.faults``)."""

    mtbf_s: Float = Field(gt=0, description="mean time between slow spells of one pod, from its creation or its "
                                            "last spell's end")
    duration_s: Duration = Field(ConstantDuration(kind="constant", value_s=600.0),
                                 description="how long a spell lasts: a number, or a distribution")
    factor: Float = Field(2.0, le=100, description="each batch or step takes this many times as long in a spell")

    @field_validator("factor")
    @classmethod
    def _a_multiplier(cls, v: float) -> float:
        return SlowPod._a_multiplier(v)


class RedisOutage(_Section):
    at_s: Float = Field(ge=0)
    duration_s: Float = Field(gt=0)


class MetricsOutage(_Section):
    """Prometheus is down from ``at_s`` for ``duration_s``: it scrapes nothing and answers no query, so the
    HPA's metrics (prometheus-adapter's) fail and KEDA's prometheus triggers return errors
    (``capsim.sim.hpa``); samples scraped before it stay in its storage."""

    at_s: Float = Field(ge=0)
    duration_s: Float = Field(gt=0)


class TriggerOutage(_Section):
    """The source of some metrics fails from ``at_s`` for ``duration_s`` (their own Prometheus, a metrics API a
    KEDA trigger asks): each query of the ``metrics`` named (as in ``autoscaler.metrics``) fails, the HPA's read
    and KEDA's trigger alike, while the others answer and Prometheus scrapes on (``capsim.sim.hpa``)."""

    at_s: Float = Field(ge=0)
    duration_s: Float = Field(gt=0)
    metrics: tuple[str, ...] = Field(min_length=1, description="the metric names whose queries fail")


class Faults(_Section):
    pod_mtbf_s: Float | None = Field(
        None, gt=0, description="mean time between crashes of one running container (starting or ready)"
    )
    crashes: tuple[Crash, ...] = ()
    node_mtbf_s: Float | None = Field(
        None, gt=0, description="mean time between failures of one GPU node, from when it is ready (needs a "
                                "cluster section)")
    node_failures: tuple[NodeFailure, ...] = ()
    zone_failures: tuple[ZoneFailure, ...] = ()
    spot_interruptions: tuple[SpotInterruption, ...] = ()
    redis_outages: tuple[RedisOutage, ...] = ()
    gpu_stockouts: tuple[GpuStockout, ...] = Field(
        (), description="the cloud cannot create GPU nodes for a while (needs a cluster section)")
    slow_pods: tuple[SlowPod, ...] = Field(
        (), description="pods that run slow and stay ready (a gray failure), or a spell of the whole fleet")
    random_slowdowns: RandomSlowdowns | None = Field(
        None, description="pods that run slow at random, spell after spell (mean time between them, duration, "
                          "factor)")
    metrics_outages: tuple[MetricsOutage, ...] = Field(
        (), description="Prometheus down: no scrape, and every query of the HPA's adapter and KEDA's triggers fails")
    trigger_outages: tuple[TriggerOutage, ...] = Field(
        (), description="some metrics' source down: their queries fail, the other metrics answer (a partial outage)")
    #: keys older files hold that still load (with a warning): an override path may name them
    _deprecated_keys: ClassVar[frozenset[str]] = frozenset({"restart_s"})

    @model_validator(mode="before")
    @classmethod
    def _restart_s_is_gone(cls, data: Any) -> Any:
        # ``restart_s`` (a constant crash-to-restart delay) was replaced by the kubelet's CrashLoopBackOff
        # (``pods.crash_loop_backoff``); older scenario files still load, with a warning, and it has no effect
        if isinstance(data, Mapping) and "restart_s" in data:
            import warnings

            warnings.warn(
                f"faults.restart_s ({data['restart_s']!r}) is deprecated and ignored: a crashed container "
                "restarts as the kubelet restarts it (pods.crash_loop_backoff: at once, then 10, 20, 40 ... "
                "300 s); remove it from the scenario",
                DeprecationWarning, stacklevel=2,
            )
            data = {k: v for k, v in data.items() if k != "restart_s"}
        return data


class State(_Section):
    """Where sessions live (docs/state.md, docs/sessions.md).

    ``ttl_s``: the store's sliding expiry; a session idle longer loses its history and its next turn starts
    fresh (None: never). ``on_unavailable``: what a pod does when the store is out: ``fail`` the turn (503),
    or ``serve_local`` from its own cache of the session when it served the session's last turn (else 503),
    marking the session at risk.
    """

    store: Literal["redis", "pod_local"] = "redis"
    ttl_s: Float | None = Field(None, gt=0)
    on_unavailable: Literal["fail", "serve_local"] = "fail"


class Client(_Section):
    """The agent's HTTP client: gives up after ``timeout_s``, retries with exponential backoff."""

    timeout_s: Float = Field(60.0, gt=0)
    max_retries: Int = Field(2, ge=0, le=100)
    backoff_s: Float = Field(1.0, ge=0, description="wait before the first retry")
    backoff_multiplier: Float = Field(2.0, ge=1)
    backoff_jitter: Float = Field(
        0.0, ge=0, le=1,
        description="share of each backoff drawn at random (capsim.policy.retry): 1 full jitter, 0.5 equal jitter",
    )
    cancel_on_timeout: Literal["all", "none"] = Field(
        "all",
        description="all: a request whose client timed out leaves the pod's queue; none: it stays queued and "
                    "runs, using capacity, its answer discarded (the reference pod: its handler is not "
                    "cancelled by a disconnect before the response starts; static batching only)",
    )


class Slo(_Section):
    ttft_p99_s: Float = Field(1.0, gt=0)
    max_error_rate: Float = Field(0.001, ge=0, le=1)
    max_wake_s: Float | None = Field(
        None, gt=0, description="a plan that scales to zero: the longest a request that came while no pod served "
        "may wait for its first token (a wake: the controller, a node, a cold start); ttft_p99_s then judges "
        "the other requests. null: every request counts in ttft_p99_s")
    max_session_failure_rate: Float = Field(
        0.001, ge=0, le=1, description="sessions that failed a request or were lost in a crash, per session"
    )
    max_rollout_s: Float | None = Field(
        None, gt=0, description="the longest a rolling update (pods.rollouts) may take, from its start until every "
        "pod runs the new template and is available; one not done by the end of the run misses it. null: not judged")


class Scenario(BaseModel):
    """Everything one simulation run needs besides the seed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    horizon_s: Float = Field(gt=0, le=10_000_000)
    warmup_s: Float = Field(0.0, ge=0)
    drain_s: Float = Field(
        0.0, ge=0, le=10_000_000,
        description="after the horizon nothing new is sent (no arrival, retry or next turn), and the run goes on "
                    "this long so that requests in flight finish, as a load generator waits for its last answers; "
                    "the summary still measures the requests sent before the horizon. 0: the run stops at the "
                    "horizon and what is in flight there is left out of the latencies (the slowest requests of a "
                    "backlog, so a short run near saturation reads a light tail)")
    workload: Workload
    service: Service
    batching: BatchSettings = BatchSettings()
    pods: Pods = Pods()
    router: Router = Router()
    autoscaler: Autoscaler | None = None
    cluster: ClusterSpec | None = None
    faults: Faults | None = None
    state: State = State()
    client: Client = Client()
    slo: Slo = Slo()
    timeseries_interval_s: Float = Field(10.0, gt=0)
    name: str = ""
    description: str = ""

    _source: Path | None = PrivateAttr(None)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise SettingsError(_format(exc)) from None

    @model_validator(mode="after")
    def _cross(self) -> Self:
        if self.warmup_s >= self.horizon_s:
            raise ValueError(f"warmup_s must be < horizon_s ({self.horizon_s}), got {self.warmup_s}")
        if self.autoscaler is None and self.pods.replicas < 1:
            raise ValueError(f"pods.replicas must be >= 1 without an autoscaler, got {self.pods.replicas}")
        self._check_crash_pods()
        if self.faults is not None and self.cluster is None:
            for key in ("node_failures", "node_mtbf_s", "zone_failures", "gpu_stockouts"):
                if getattr(self.faults, key):
                    raise ValueError(f"faults.{key} needs a cluster section: the GPU nodes that can fail or be "
                                     "out of stock (without one every pod has a node of its own; faults.crashes "
                                     "and pod_mtbf_s crash pods)")
        if self.faults is not None and self.faults.trigger_outages:
            names = [m.name for m in self.autoscaler.to_hpa().metrics] if self.autoscaler is not None else []
            for i, o in enumerate(self.faults.trigger_outages):
                for name in o.metrics:
                    if name not in names:
                        raise ValueError(f"faults.trigger_outages.{i}.metrics: {name!r} is not a metric of "
                                         f"autoscaler.metrics (names: {names})")
        if self.faults is not None and self.cluster is not None:
            zoned: list[tuple[str, int, int | None]] = [
                ("zone_failures", i, z.zone) for i, z in enumerate(self.faults.zone_failures)]
            zoned += [("gpu_stockouts", i, z.zone) for i, z in enumerate(self.faults.gpu_stockouts)]
            for key, i, zone in zoned:
                if zone is not None and zone >= self.cluster.zones:
                    raise ValueError(f"faults.{key}.{i}.zone must name a zone of the cluster (0.."
                                     f"{self.cluster.zones - 1}, cluster.zones {self.cluster.zones}), got {zone}")
        tp = self.batching.tensor_parallel_size
        if self.cluster is not None and tp > self.cluster.node_gpus:
            raise ValueError(f"batching.tensor_parallel_size must fit on one node: a pod's GPUs share a node "
                             f"(cluster.node_gpus {self.cluster.node_gpus}), got {tp}")
        if self.service.ingress_noise is not None and self.batching.mode != "continuous":
            raise ValueError("service.ingress_noise needs batching.mode: continuous (a static pod's ingress "
                             "is the constant service.ingress_ms)")
        if self.service.ingress_noise is not None and not sum(self.service.ingress_noise) > 0:
            raise ValueError("service.ingress_noise must have a positive factor (they are scaled to mean 1)")
        for i, ro in enumerate(self.pods.rollouts):
            if ro.batching is None:
                continue
            if self.batching.mode != "continuous":
                raise ValueError(f"pods.rollouts.{i}.batching: a template's engine flags need batching.mode: "
                                 "continuous (a static pod's batches are the scenario's)")
            try:
                ro.batching.apply(self.batching)
            except ValueError as e:
                raise ValueError(f"pods.rollouts.{i}.batching: {e}") from None
        if self.batching.mode != "continuous":
            for i, ro in enumerate(self.pods.rollouts):
                if ro.itl_checked:
                    raise ValueError(f"pods.rollouts.{i}: the inter-token latency check (undo_if_itl_mean_over_s, "
                                     "undo_if_itl_mean_over_baseline) needs batching.mode: continuous (a static pod "
                                     "answers a batch at once and exports no inter-token latency)")
        if self.autoscaler is not None and self.batching.mode != "continuous":
            for i, m in enumerate(self.autoscaler.to_hpa().metrics):
                if POD_METRIC_ALIASES.get(m.name) in CONTINUOUS_METRIC_KINDS:
                    raise ValueError(f"autoscaler.metrics[{i}].pods.metric.name {m.name!r} needs batching.mode: "
                                     "continuous (a static pod has no KV cache and no per-token steps)")
        from capsim.model.scenario_limits import check_limits

        problems = check_limits(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _check_crash_pods(self) -> None:
        """A scheduled crash of pod ``k`` needs a pod ``k``: pods are numbered 0, 1, ... as they are created."""
        if self.faults is None:
            return
        most = self.pods.replicas if self.autoscaler is None else max(self.pods.replicas,
                                                                      self.autoscaler.max_replicas)
        why = (f"the scenario runs pods 0..{most - 1}" if most else "the scenario starts no pod")
        named = [("crashes", i, c.pod) for i, c in enumerate(self.faults.crashes)]
        named += [("slow_pods", i, s.pod) for i, s in enumerate(self.faults.slow_pods)]
        for key, i, pod in named:
            if pod is not None and pod >= most:
                raise ValueError(f"faults.{key}.{i}.pod must name a pod the scenario can have ({why}), got {pod}")

    # ---- loading ---------------------------------------------------------------------------------
    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Self:  # type: ignore[override]
        """Validate a mapping; errors are ``SettingsError`` naming the field path and the value."""
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as exc:
            raise SettingsError(_format(exc)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> Scenario:
        """Load a scenario file, with the sections of the files its ``include:`` names under its own
        (:mod:`capsim.model.includes`); relative paths inside resolve as :meth:`resolve` says."""
        from capsim.model.yaml_load import YamlFileError, load_yaml_file

        path = Path(path)
        try:
            data = load_yaml_file(path, "scenario file")
        except YamlFileError as exc:
            raise SettingsError(str(exc)) from None
        if not isinstance(data, Mapping):
            raise SettingsError(f"{path}: must be a mapping of settings, got {type(data).__name__}")
        from capsim.model.includes import with_includes

        data = with_includes(path, data)  # include: other files' sections, under this file's own
        try:
            scenario = cls.model_validate(data)
        except SettingsError as exc:
            raise SettingsError(f"{path}: {exc}") from None
        scenario._source = path.resolve()
        return scenario

    @property
    def source(self) -> Path | None:
        """The YAML file this scenario came from, if any."""
        return self._source

    def total_trigger_outages(self) -> tuple[TriggerOutage, ...]:
        """The spans in which the ``faults.trigger_outages`` in force together name every metric of the
        autoscaler, each as one outage of them all: to the HPA and KEDA, a Prometheus outage (no metric
        answers). One entry naming every metric is such a span; so is the overlap of two that each name some
        (the gateway's source down from 600 s, the other trigger's from 900 to 1200 s: every query fails from
        900 to 1200 s). Spans that touch are one. Outside them some metrics answer."""
        if self.faults is None or self.autoscaler is None or not self.faults.trigger_outages:
            return ()
        names = frozenset(m.name for m in self.autoscaler.to_hpa().metrics)
        entries = self.faults.trigger_outages
        cuts = sorted({t for o in entries for t in (o.at_s, o.at_s + o.duration_s)})
        spans: list[list[float]] = []
        for lo, hi in itertools.pairwise(cuts):  # between two cuts the same entries are in force
            down = {m for o in entries if o.at_s <= lo and hi <= o.at_s + o.duration_s for m in o.metrics}
            if down >= names:
                if spans and spans[-1][1] == lo:
                    spans[-1][1] = hi
                else:
                    spans.append([lo, hi])
        every = tuple(sorted(names))
        return tuple(TriggerOutage(at_s=lo, duration_s=hi - lo, metrics=every) for lo, hi in spans)

    def resolve(self, path: Path) -> Path:
        """Resolve a path named in the scenario, never against the working directory first.

        Absolute paths stand. A relative one resolves against the scenario file's folder and then its
        parents (so ``data/traces/x.csv`` works from a scenario inside ``data/scenarios/``), then against
        the data shipped with capsim (:mod:`capsim.paths`), and last against the working directory. A
        scenario built in memory (no file) tries the working directory first, then the shipped data. A
        path found nowhere comes back as the scenario folder would have it, so the error names a place
        the user can check.
        """
        from capsim.paths import find_near

        if path.is_absolute():
            return path
        start = self._source.parent if self._source is not None else None
        found = find_near(path, start)
        if found is not None:
            return found
        return start / path if start is not None else path

    def override(self, changes: Mapping[str, Any]) -> Scenario:
        """A validated copy with dotted-path changes applied: ``{"pods.replicas": 2, "horizon_s": 60}``.

        A path goes through lists by index (``autoscaler.metrics.0.pods.target.averageValue``); an index
        equal to the list's length appends. A missing or null section on the way is created as a mapping.
        Paths use the names the YAML uses (the Kubernetes spelling in the autoscaler). A path that cannot
        be followed raises ``SettingsError`` naming it.
        """
        data = self.model_dump(mode="python", by_alias=True, exclude_none=False)
        for dotted, value in changes.items():
            _set_path(data, aliased_path(type(self), dotted), value)
        new = type(self).model_validate(data)
        new._source = self._source
        return new


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``dotted`` (keys and list indices) in the nested ``data`` to a copy of ``value``, in place (a copy: a later
    path into it must not change the caller's object, a grid's bundle shared by every setting of a sweep)."""
    value = copy.deepcopy(value)
    parts = dotted.split(".")
    if not dotted or any(not p for p in parts):
        raise SettingsError(f"override path {dotted!r}: empty part")
    node: Any = data
    for depth, key in enumerate(parts):
        leaf = depth == len(parts) - 1
        where = ".".join(parts[:depth]) or "the scenario"
        if isinstance(node, list):
            if not key.isdigit():
                raise SettingsError(f"override path {dotted!r}: {where} is a list, {key!r} is not an index")
            i = int(key)
            if i > len(node):
                raise SettingsError(f"override path {dotted!r}: index {i} is past the end of {where} "
                                    f"(length {len(node)})")
            if i == len(node):
                node.append(None)
            if leaf:
                node[i] = value
                return
            if isinstance(node[i], tuple):
                node[i] = list(node[i])
            elif node[i] is None:
                node[i] = {}
            node = node[i]
        elif isinstance(node, dict):
            if leaf:
                node[key] = value
                return
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif isinstance(child, tuple):
                child = node[key] = list(child)
            node = child
        else:
            raise SettingsError(f"override path {dotted!r}: {where} is a {type(node).__name__}, not a section")


def _format(exc: ValidationError) -> str:
    """Render a pydantic error as ``path must ..., got X`` lines, the paths as the user wrote them.

    Section-level checks raise messages that start with a field of the section (``maxReplicas must be
    >= minReplicas (3), got 2``): they are prefixed with the section path. Field-level checks say what is
    wrong with the value and are joined with a colon.
    """
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p))
        if err["type"] == "value_error":
            msg = str(err["msg"]).removeprefix("Value error, ")
            if not path or msg.startswith(path + "."):
                lines.append(msg)
            elif isinstance(err.get("input"), Mapping):
                lines.append(f"{path}.{msg}")
            else:
                lines.append(f"{path}: {msg}")
        else:
            line = format_error({**err, "loc": tuple(path.split(".")) if path else ()})
            if err["type"] == "extra_forbidden":
                line += suggest(did_you_mean(Scenario, tuple(err["loc"]), skip=_is_union_tag))
            lines.append(line)
    return "; ".join(lines)


def _is_union_tag(part: object) -> bool:
    # discriminated unions add the tag ('poisson', 'lognormal', ...) to the error path; users never write it
    return isinstance(part, str) and (part in _UNION_TAGS or part.startswith(("tagged-union", "function-")))


_UNION_TAGS = frozenset({"poisson", "piecewise", "trace", "constant", "lognormal", "uniform", "exponential"})
