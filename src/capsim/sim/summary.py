"""The headline numbers of a run, computed once from the request columns and the run's counters."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from capsim.sim.recorder import FAILED, OK, REJECTED, TIMED_OUT, percentiles

if TYPE_CHECKING:
    from capsim.sim.sessions import SessionBook


@dataclass(frozen=True)
class Summary:
    """Client-side latencies (s) and rates over requests that arrived after the warm-up.

    TTFT and end-to-end latency run from a request's first send to its first token / answer, retries
    included (what the agent feels). ``error_rate`` is the share of finished measured requests that did
    not end ok. Counts without ``measured_`` cover the whole run.

    ``gpu_hours`` are the GPUs pods held; ``node_gpu_hours`` the GPUs of the nodes from their creation to
    their removal (NaN without a ``cluster`` section); ``cost`` bills the one ``cluster.billing`` names
    (pods without a cluster section; a spot node's GPU-hours at ``cluster.spot.price_ratio``), all three over the window the latencies cover: from ``warmup_s`` to
    the horizon (``Simulation`` subtracts what was held at the warm-up's end).

    A session fails when one of its requests finally failed or it was lost in a crash (pod-local state: it
    never sends its next turns, so no request records it). ``session_failure_rate`` is the share of the
    sessions started after the warm-up that failed; ``lost_turns`` counts the turns lost sessions never
    sent. ``slo_met`` needs the request-level SLO (TTFT p99, error rate) and the session-level one
    (``session_failure_rate <= slo.max_session_failure_rate``); ``session_slo_met`` is the latter alone.
    """

    arrived: int
    completed: int
    failed: int
    timed_out: int
    rejected: int
    in_flight: int
    retries: int
    measured: int
    ttft_p50_s: float
    ttft_p95_s: float
    ttft_p99_s: float
    e2e_p50_s: float
    e2e_p95_s: float
    e2e_p99_s: float
    throughput_per_s: float
    error_rate: float
    lost_sessions: int
    abandoned_sessions: int
    gpu_hours: float
    cost: float
    mean_batch_size: float
    scale_events: int
    max_replicas: int
    crashes: int
    slo_met: bool
    # continuous batching only (NaN / 0 in static mode): inter-token latency (the mean per request, over
    # measured ok requests of 2+ tokens), preemptions, engine steps, KV-cache use weighted by step time
    itl_p50_s: float = math.nan
    itl_p99_s: float = math.nan
    preemptions: int = 0
    steps: int = 0
    kv_cache_usage_mean: float = math.nan
    kv_cache_usage_peak: float = math.nan
    node_gpu_hours: float = math.nan
    lost_turns: int = 0
    session_failure_rate: float = math.nan
    session_slo_met: bool = True
    # sessions (docs/sessions.md): prompt tokens served from a pod's prefix cache over prompt tokens (measured
    # ok requests; 0 without prefix caching), history tokens re-prefilled because the pod that cached them
    # crashed, restarted, went or drains, later turns that did not go to the pod of their session's last turn
    # (and those of them whose pod could not take them), and what happened to sessions' histories
    prefix_hit_rate: float = 0.0
    reprefill_tokens: int = 0
    affinity_misses: int = 0
    affinity_fallbacks: int = 0
    sessions_expired: int = 0
    sessions_truncated: int = 0
    sessions_ended_on_overflow: int = 0
    sessions_at_risk: int = 0
    served_local: int = 0
    local_turns_lost: int = 0
    # router.hold_when_no_pod_s: attempts the gateway held while the Service had no ready pod
    held_at_gateway: int = 0
    # router.outlier_ejection: the pods the router ejected over the run (Envoy's ejections_enforced_total)
    ejections: int = 0
    # scaling to zero (capsim.sim.wakes): the TTFT p99 of the measured requests that did not come while the
    # Deployment was at zero or waking, the longest TTFT of those that did, and slo.max_wake_s met
    ttft_p99_warm_s: float = math.nan
    longest_wake_s: float = math.nan
    wake_slo_met: bool = True
    # rolling updates (pods.rollouts): the longest one's time (to its undo for one undone first; one not done by the
    # horizon counted to it), how many were not done (undone ones too), the fewest pods ready while any ran, and
    # how many were undone before they were done (NaN, 0, NaN, 0 without rollouts), and how many of the deploy
    # pipeline's undos kubectl refused because the Deployment was paused (pods.rollouts' pause)
    longest_rollout_s: float = math.nan
    rollouts_unfinished: int = 0
    rollout_fewest_ready: float = math.nan
    rollouts_undone: int = 0
    rollout_undos_refused: int = 0
    # the longest a rollout undone before it was done ran before its undo (a canary's exposure: from its deploy to the
    # pipeline's undo; NaN: none undone). longest_rollout_s may be the undo's own rollout instead, which brings the old
    # template's pods back through their cold starts
    undone_after_s: float = math.nan
    # slo.max_rollout_s met (True without it): every rollout done within it; slo_met needs it
    rollout_slo_met: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(cols: dict[str, np.ndarray], *, warmup_s: float, horizon_s: float, retries: int,
              lost_sessions: int, gpu_seconds: float, gpu_cost_per_hour: float, batch_sizes: np.ndarray,
              scale_events: int, max_replicas: int, crashes: int, ttft_slo_s: float,
              max_error_rate: float, turns: int, node_gpu_seconds: float | None = None,
              billing: str = "pod", lost_session_ids: np.ndarray | None = None, lost_turns: int = 0,
              session_start_s: np.ndarray | None = None, max_session_failure_rate: float = 1.0,
              node_priced_seconds: float | None = None) -> Summary:
    """The summary of a run from its request columns (``Records.columns()``); ``node_priced_seconds``: the
    nodes' GPU-seconds with a spot node's at its price ratio (what node billing charges)."""
    outcome = cols["outcome"]
    arrival = cols["arrival_s"]
    m = arrival >= warmup_s
    mo = outcome[m]
    ok = mo == OK
    finished = int(np.count_nonzero(mo >= 0))
    bad = finished - int(np.count_nonzero(ok))
    ttft = (cols["first_token_s"] - arrival)[m][ok]
    e2e = (cols["end_s"] - arrival)[m][ok]
    t50, t95, t99 = percentiles(ttft)
    e50, e95, e99 = percentiles(e2e)
    error_rate = bad / finished if finished else 0.0
    # a session is abandoned when one of its requests finally failed
    failed_rows = outcome >= 0
    failed_rows &= outcome != OK
    abandoned = len(np.unique(cols["session_id"][failed_rows]))
    gpu_hours = gpu_seconds / 3600.0
    node_gpu_hours = node_gpu_seconds / 3600.0 if node_gpu_seconds is not None else math.nan
    billed = gpu_hours
    if billing == "node" and node_gpu_seconds is not None:
        billed = (node_priced_seconds if node_priced_seconds is not None else node_gpu_seconds) / 3600.0
    session_failure_rate = math.nan
    if session_start_s is not None and len(session_start_s):
        failed_sessions = np.zeros(len(session_start_s), dtype=bool)
        failed_sessions[cols["session_id"][failed_rows]] = True
        if lost_session_ids is not None:
            failed_sessions[lost_session_ids] = True
        measured_sessions = session_start_s >= warmup_s
        n_sessions = int(np.count_nonzero(measured_sessions))
        if n_sessions:
            session_failure_rate = int(np.count_nonzero(failed_sessions & measured_sessions)) / n_sessions
    session_slo_met = math.isnan(session_failure_rate) or session_failure_rate <= max_session_failure_rate
    slo_met = ((not math.isnan(t99)) and t99 <= ttft_slo_s and error_rate <= max_error_rate
               and session_slo_met)
    return Summary(
        arrived=len(outcome),
        completed=int(np.count_nonzero(outcome == OK)),
        failed=int(np.count_nonzero(outcome == FAILED)),
        timed_out=int(np.count_nonzero(outcome == TIMED_OUT)),
        rejected=int(np.count_nonzero(outcome == REJECTED)),
        in_flight=int(np.count_nonzero(outcome < 0)),
        retries=retries,
        measured=int(np.count_nonzero(m)),
        ttft_p50_s=t50, ttft_p95_s=t95, ttft_p99_s=t99,
        e2e_p50_s=e50, e2e_p95_s=e95, e2e_p99_s=e99,
        throughput_per_s=int(np.count_nonzero(ok)) / (horizon_s - warmup_s),
        error_rate=error_rate,
        lost_sessions=lost_sessions,
        abandoned_sessions=abandoned,
        gpu_hours=gpu_hours,
        cost=billed * gpu_cost_per_hour,
        mean_batch_size=float(batch_sizes.mean()) if len(batch_sizes) else math.nan,
        scale_events=scale_events,
        max_replicas=max_replicas,
        crashes=crashes,
        slo_met=bool(slo_met),
        node_gpu_hours=node_gpu_hours,
        lost_turns=lost_turns,
        session_failure_rate=session_failure_rate,
        session_slo_met=bool(session_slo_met),
    )


def session_results(summary: Summary, requests: Any, book: SessionBook | None, warmup_s: float) -> Summary:
    """The summary with the session numbers filled in: the prefix-cache hit rate (from the requests'
    ``cached_tokens`` column, if the run has one) and the counters of ``book``; with growing sessions the
    requests frame gains the column ``reprefill_tokens`` (in place)."""
    hit = 0.0
    if "cached_tokens" in requests.columns and len(requests):
        m = ((requests["outcome"] == "ok") & (requests["arrival_s"] >= warmup_s)).to_numpy()
        prompt = float(requests["prompt_tokens"].to_numpy()[m].sum())
        hit = float(requests["cached_tokens"].to_numpy()[m].sum()) / prompt if prompt > 0 else 0.0
    if book is None:
        return dataclasses.replace(summary, prefix_hit_rate=hit)
    if book.message is not None:  # growing sessions: per request, so a crash's TTFT spike shows who paid it
        requests["reprefill_tokens"] = book.reprefill[requests["request_id"].to_numpy()]
    return dataclasses.replace(
        summary, prefix_hit_rate=hit, reprefill_tokens=book.reprefill_tokens,
        affinity_misses=book.affinity_misses, affinity_fallbacks=book.fallbacks, sessions_expired=book.expired,
        sessions_truncated=book.truncated,
        sessions_ended_on_overflow=book.ended_on_overflow, sessions_at_risk=int(book.at_risk.sum()),
        served_local=book.served_local, local_turns_lost=book.local_turns_lost,
    )
