"""How much work a scenario asks of the simulator, and the limits that keep every run bounded.

A schema-valid scenario can still ask for a run that never ends or does not fit in memory: a time-series
row every nanosecond, a crash loop with no restart or startup time, an HPA syncing every microsecond,
ten million seconds at 40 requests per second. ``check_limits`` refuses such a scenario before the run
and says which setting to change and to what; ``event_budget`` gives the simulator a cap on SimPy events
so that anything these estimates miss ends with ``SimulationBudgetError`` instead of a hang.

The estimates are expectations (a Poisson workload makes about ``rate x horizon`` sessions); the limits
are far above every study capsim ships (the largest, 10^7 requests, is what ``docs/performance`` calls the
ten-million-request run) and far below what makes a run last hours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from capsim.model.scenario import Scenario

#: Requests one run may expect. A run's peak memory grows by ~350 bytes per request (measured: 400,000
#: requests on 20 pods raised the peak RSS by 140 MB), so 2e7 requests take ~7 GB; benchmarks/bench_sim.py
#: runs 1e7.
MAX_REQUESTS = 20_000_000
#: Rows of the time series (one per ``timeseries_interval_s``), HPA syncs, and metric scrapes.
MAX_TIMESERIES_ROWS = 1_000_000
MAX_HPA_SYNCS = 1_000_000
MAX_SCRAPES = 1_000_000
#: Per-pod samples: every time-series row and every scrape visits each pod, so their count times the most
#: pods the scenario can run bounds that work (a million rows on 200 pods; ~2 minutes of Python).
MAX_POD_SAMPLES = 200_000_000
#: Pod crashes one run may expect (random crashes with ``faults.pod_mtbf_s``).
MAX_CRASHES = 1_000_000
#: SimPy events per request attempt in the shipped scenarios are about 2 (scripts measured 1.8 to 2.0); the
#: budget allows this many times the estimate before it calls the run runaway.
BUDGET_FACTOR = 20
BUDGET_FLOOR = 1_000_000


@dataclass(frozen=True)
class Workload:
    """The expected size of a run: requests, time-series rows, HPA syncs and scrapes, crashes, node failures and
    spot reclaims."""

    requests: float
    timeseries_rows: float
    hpa_syncs: float
    scrapes: float
    crashes: float
    node_failures: float = 0.0
    spot_reclaims: float = 0.0


def expected_sessions(scenario: Scenario) -> float | None:
    """Sessions a Poisson or piecewise workload starts in the horizon (mean); None for a trace."""
    arrivals = scenario.workload.arrivals
    horizon = scenario.horizon_s
    scale = scenario.workload.load_scale
    if arrivals.kind == "poisson":
        return float(arrivals.rate_per_s) * horizon * scale  # type: ignore[union-attr]
    if arrivals.kind == "piecewise":
        steps = list(arrivals.rate_per_s)  # type: ignore[union-attr]
        total = 0.0
        for k, (t, rate) in enumerate(steps):
            end = steps[k + 1][0] if k + 1 < len(steps) else horizon
            total += rate * max(0.0, min(end, horizon) - t)
        return total * scale
    return None


def min_pods(scenario: Scenario) -> int:
    """The fewest pods the scenario runs: the HPA's minReplicas, or the fixed replicas."""
    return scenario.autoscaler.min_replicas if scenario.autoscaler is not None else scenario.pods.replicas


def max_pods(scenario: Scenario) -> int:
    """The most replicas the scenario can run at once."""
    n = scenario.pods.replicas
    if scenario.autoscaler is not None:
        n = max(n, scenario.autoscaler.max_replicas)
    return max(n, 1)


def estimate(scenario: Scenario, n_requests: float | None = None) -> Workload:
    """The expected size of a run of ``scenario``; ``n_requests`` when known (a trace's rows)."""
    horizon = scenario.horizon_s + scenario.drain_s  # the run's length; sessions start before the horizon
    if n_requests is None:
        sessions = expected_sessions(scenario)
        n_requests = 0.0 if sessions is None else sessions * scenario.workload.sessions.turns
    hpa = scenario.autoscaler
    crashes = 0.0
    faults = scenario.faults
    if faults is not None and faults.pod_mtbf_s is not None:
        # a container may crash while it starts and the first restart is immediate (CrashLoopBackOff):
        # one crash per MTBF per pod is the most a crash loop makes on average
        crashes = max_pods(scenario) * horizon / faults.pod_mtbf_s
    node_failures = spot_reclaims = 0.0
    cluster = scenario.cluster
    if cluster is not None:
        # at most max_gpus / node_gpus nodes live at once (a failed one counts until removed), each failing
        # (or reclaimed, when spot) once per MTBF on average
        nodes = cluster.max_gpus // cluster.node_gpus
        if faults is not None and faults.node_mtbf_s is not None:
            node_failures = nodes * horizon / faults.node_mtbf_s
        if cluster.spot is not None and cluster.spot.mtbf_s is not None:
            spot_reclaims = nodes * horizon / cluster.spot.mtbf_s
    return Workload(
        requests=n_requests,
        timeseries_rows=horizon / scenario.timeseries_interval_s,
        hpa_syncs=horizon / hpa.sync_period_s if hpa else 0.0,
        scrapes=horizon / hpa.scrape_interval_s if hpa else 0.0,
        crashes=crashes,
        node_failures=node_failures,
        spot_reclaims=spot_reclaims,
    )


def check_limits(scenario: Scenario) -> list[str]:
    """What makes ``scenario`` too big to simulate, one message per problem naming the setting and limit."""
    w = estimate(scenario)
    h = scenario.horizon_s
    problems = []
    if w.requests > MAX_REQUESTS:
        problems.append(
            f"workload: about {w.requests:.3g} requests in horizon_s {h:g}, over the limit of {MAX_REQUESTS:.0e} "
            "per run (~350 bytes of memory each); shorten horizon_s or lower the arrival rate, or split the study"
        )
    if w.timeseries_rows > MAX_TIMESERIES_ROWS:
        problems.append(
            f"timeseries_interval_s {scenario.timeseries_interval_s:g} makes {w.timeseries_rows:.3g} time-series "
            f"rows in horizon_s {h:g}, over the limit of {MAX_TIMESERIES_ROWS:.0e}; "
            f"use at least {h / MAX_TIMESERIES_ROWS:.3g} s"
        )
    if scenario.autoscaler is not None:
        a = scenario.autoscaler
        if w.hpa_syncs > MAX_HPA_SYNCS:
            problems.append(
                f"autoscaler.sync_period_s {a.sync_period_s:g} makes {w.hpa_syncs:.3g} HPA syncs in horizon_s "
                f"{h:g}, over the limit of {MAX_HPA_SYNCS:.0e}; use at least {h / MAX_HPA_SYNCS:.3g} s "
                "(Kubernetes syncs every 15 s)"
            )
        if w.scrapes > MAX_SCRAPES:
            problems.append(
                f"autoscaler.scrape_interval_s {a.scrape_interval_s:g} makes {w.scrapes:.3g} metric scrapes in "
                f"horizon_s {h:g}, over the limit of {MAX_SCRAPES:.0e}; use at least {h / MAX_SCRAPES:.3g} s"
            )
    keda = scenario.autoscaler.keda if scenario.autoscaler is not None else None
    if keda is not None and h / keda.polling_interval_s > MAX_HPA_SYNCS:
        problems.append(
            f"autoscaler.keda.polling_interval_s {keda.polling_interval_s} makes {h / keda.polling_interval_s:.3g} "
            f"KEDA polls in horizon_s {h:g}, over the limit of {MAX_HPA_SYNCS:.0e}; use at least "
            f"{math.ceil(h / MAX_HPA_SYNCS)} s (KEDA polls every 30 s)"
        )
    if scenario.cluster is not None and h / scenario.cluster.scan_interval_s > MAX_HPA_SYNCS:
        problems.append(
            f"cluster.scan_interval_s {scenario.cluster.scan_interval_s:g} makes {h / scenario.cluster.scan_interval_s:.3g} "
            f"cluster-autoscaler scans in horizon_s {h:g}, over the limit of {MAX_HPA_SYNCS:.0e}; use at least "
            f"{h / MAX_HPA_SYNCS:.3g} s (cluster-autoscaler scans every 10 s)"
        )
    pod_samples = (w.timeseries_rows + w.scrapes) * max_pods(scenario)
    if pod_samples > MAX_POD_SAMPLES and not problems:
        problems.append(
            f"timeseries_interval_s {scenario.timeseries_interval_s:g}"
            + (f" and autoscaler.scrape_interval_s {scenario.autoscaler.scrape_interval_s:g}"
               if scenario.autoscaler is not None else "")
            + f" visit up to {max_pods(scenario)} pods {w.timeseries_rows + w.scrapes:.3g} times in horizon_s "
            f"{h:g}: {pod_samples:.3g} pod samples, over the limit of {MAX_POD_SAMPLES:.0e}; raise the intervals "
            "or shorten horizon_s"
        )
    if w.crashes > MAX_CRASHES:
        f = scenario.faults
        assert f is not None
        problems.append(
            f"faults.pod_mtbf_s {f.pod_mtbf_s:g} makes up to about "
            f"{w.crashes:.3g} crashes on {max_pods(scenario)} pods in horizon_s {h:g} (a crash loop), over the "
            f"limit of {MAX_CRASHES:.0e}; raise pod_mtbf_s"
        )
    for count, path, mtbf, what in (
            (w.node_failures, "faults.node_mtbf_s", scenario.faults and scenario.faults.node_mtbf_s, "node failures"),
            (w.spot_reclaims, "cluster.spot.mtbf_s",
             scenario.cluster and scenario.cluster.spot and scenario.cluster.spot.mtbf_s, "spot reclaims")):
        if count > MAX_CRASHES:
            problems.append(f"{path} {mtbf:g} makes up to about {count:.3g} {what} in horizon_s {h:g}, over the "
                            f"limit of {MAX_CRASHES:.0e}; raise {path.rsplit('.', 1)[1]}")
    return problems


def event_budget(scenario: Scenario, n_requests: int) -> int:
    """The most SimPy events a run of ``scenario`` with ``n_requests`` requests may take before it is runaway."""
    w = estimate(scenario, float(n_requests))
    attempts = w.requests * (1 + scenario.client.max_retries)
    # cluster-autoscaler scans (``capsim.sim.nodes``): one event each, bounded like the HPA's syncs
    scans = scenario.horizon_s / scenario.cluster.scan_interval_s if scenario.cluster is not None else 0.0
    # each pod is scraped at its own offset (``capsim.sim.hpa``): one event per pod per scrape
    # a failed or reclaimed node's pods are replaced: a crash's events for each pod it held
    cluster = scenario.cluster
    per_node = cluster.pods_per_node(scenario.batching.tensor_parallel_size) if cluster is not None else 0
    replaced = per_node * (w.node_failures + w.spot_reclaims)
    expected = (2 * attempts + w.timeseries_rows + w.hpa_syncs + w.scrapes * max_pods(scenario)
                + 4 * (w.crashes + replaced) + scans)
    return int(BUDGET_FACTOR * expected) + BUDGET_FLOOR
