"""Capacity: the highest arrival rate a pod (or a fixed fleet) sustains while meeting the SLO.

The number every capacity plan starts from. ``capacity(scenario, replicas=N)`` turns the scenario into a
steady Poisson load on a fixed fleet of N pods (no autoscaler, the scenario's batching, service, client,
faults and SLO unchanged) and bisects on the session rate, as Vidur's capacity search does
(microsoft/vidur, ``vidur/config_optimizer/config_explorer/capacity_search.py``: the largest QPS whose
scheduling delay stays under the SLO, by binary search). A rate passes when every seed meets the SLO
(TTFT p99 and error rate). The search assumes that passing is monotone in the rate: it first doubles an
upper bound until a rate fails, then halves the bracket until it is narrower than ``rel_tol``.

``headroom(scenario)`` asks the planner's other question with the same search: how many times its own traffic
(its rush or its trace, ``workload.load_scale``) the plan as it is carries, its autoscaler, cluster and faults
included.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.studies.executors import ExecutorSpec, open_executor
from capsim.studies.runs import DEFAULT_CACHE, portable, provenance, run_key, run_one, slo_miss
from capsim.studies.sweep import seed_list


@dataclass(frozen=True)
class Probe:
    """One rate tried: sessions per second, whether every seed met the SLO, the worst seed's numbers, and why it
    failed (an error, or the first seed's miss)."""

    rate_per_s: float
    passed: bool
    ttft_p99_s: float
    error_rate: float
    error: str | None = None


@dataclass(frozen=True)
class CapacityResult:
    """``rate_per_s``: the highest session rate that passed (0 when even the lowest failed);
    ``requests_per_s``: the same in requests (sessions x turns); ``proof``: the summaries of the passing
    runs at that rate (one per seed); ``scenario``: the steady scenario at that rate, to re-run."""

    rate_per_s: float
    requests_per_s: float
    replicas: int
    scenario: Scenario
    proof: list[dict[str, Any]]
    probes: list[Probe]
    provenance: dict[str, Any] = field(default_factory=dict)


def steady(scenario: Scenario, rate_per_s: float, replicas: int | None = None) -> Scenario:
    """The scenario with a constant Poisson session rate on a fixed fleet (no autoscaler)."""
    n = replicas if replicas is not None else scenario.pods.replicas
    if scenario.autoscaler is not None and replicas is None:
        n = max(scenario.autoscaler.min_replicas, 1)
    return scenario.override({
        "workload.arrivals": {"kind": "poisson", "rate_per_s": rate_per_s},
        "autoscaler": None, "cluster": None, "pods.replicas": n,
    })


#: one probe of ``_bisect``: the value tried, whether every seed passed, the worst TTFT p99 and error rate, why not
_Tried = tuple[float, bool, float, float, str | None]


def _bisect(make: Callable[[float], Scenario], start: float, seeds: list[int], rel_tol: float, max_probes: int,
            executor: ExecutorSpec, cache: bool | str | Path, check_below: Sequence[float] = ()
            ) -> tuple[float, dict[float, list[dict[str, Any]]], list[_Tried]]:
    """The largest ``x`` whose scenario ``make(x)`` meets the SLO under every seed: from ``start``, doubled until
    an ``x`` fails, then the bracket halved until narrower than ``rel_tol`` (or ``max_probes`` tried). Returns
    it (0 when none passed), the passing runs' summaries by ``x``, and each probe as ``(x, passed, worst TTFT
    p99, worst error rate, first error)``; then, when one passed, ``x`` times each of ``check_below`` (fractions
    under 1) is tried as well, after the search's probes: the search never tries below a value that passed, so
    only these can show that passing is not monotone."""
    cache_root = None if cache is False else str(DEFAULT_CACHE if cache is True else Path(cache))
    probes: list[_Tried] = []
    proofs: dict[float, list[dict[str, Any]]] = {}
    with open_executor(executor, tasks=len(seeds)) as ex:
        def probe(x: float) -> bool:
            sc = make(x)
            futs = [ex.submit(run_one, sc, s, run_key(sc, s), cache_root) for s in seeds]
            outs = [f.result() for f in futs]
            errors = [o["error"] for o in outs if o["error"]]
            sums = [o["summary"] for o in outs if o["summary"] is not None]
            passed = not errors and all(s["slo_met"] for s in sums)
            worst_t = max((s["ttft_p99_s"] for s in sums), default=math.nan)
            worst_e = max((s["error_rate"] for s in sums), default=math.nan)
            slo = sc.slo
            missed = next(((seed, o["summary"]) for seed, o in zip(seeds, outs, strict=True)
                           if o["summary"] is not None and not o["summary"]["slo_met"]), None)
            why = None if missed is None else (
                f"seed {missed[0]}: {slo_miss(missed[1], slo.ttft_p99_s, slo.max_error_rate, slo.max_wake_s)[0]}")
            probes.append((x, passed, worst_t, worst_e, errors[0] if errors else why))
            if passed:
                proofs[x] = sums
            return passed

        hi, lo = start, 0.0
        while probe(hi):  # grow until one fails
            lo, hi = hi, hi * 2
            if len(probes) >= max_probes:
                break
        while hi - lo > rel_tol * hi and len(probes) < max_probes:
            mid = (lo + hi) / 2 if lo > 0 else hi / 2
            if probe(mid):
                lo = mid
            else:
                hi = mid
            if lo == 0 and hi < 1e-6:
                break
        tried = {p[0] for p in probes}
        for f in check_below if lo > 0 else ():
            if lo * f not in tried:
                probe(lo * f)
    return lo, proofs, probes


def capacity(scenario: Scenario | str | Path, *, replicas: int | None = None, seeds: int | Iterable[int] = 1,
             start_rate: float | None = None, rel_tol: float = 0.02, max_probes: int = 30,
             executor: ExecutorSpec = "serial", cache: bool | str | Path = True) -> CapacityResult:
    """Bisect on the session rate (see the module docstring). ``replicas`` defaults to the scenario's
    (its ``minReplicas`` when it has an autoscaler); ``start_rate`` to the fleet's throughput at full
    batches estimated from the service model; the seeds of one rate run on ``executor``."""
    base = scenario if isinstance(scenario, Scenario) else Scenario.from_yaml(scenario)
    base = portable(base)
    if base.workload.arrivals.kind == "trace":
        raise SettingsError("capacity needs a rate to vary: the scenario replays a trace; use a poisson workload")
    seeds_ = seed_list(seeds)
    n = steady(base, 1.0, replicas).pods.replicas
    turns = base.workload.sessions.turns
    start = start_rate or _throughput_guess(base, n) / turns
    rate, proofs, tried = _bisect(lambda r: steady(base, r, replicas), start, seeds_, rel_tol, max_probes,
                                  executor, cache)
    final = steady(base, rate if rate > 0 else 1.0, replicas)
    return CapacityResult(rate, rate * turns, n, final, proofs.get(rate, []), [Probe(*p) for p in tried],
                          {**provenance(final), "seeds": seeds_, "rel_tol": rel_tol})


@dataclass(frozen=True)
class HeadroomResult:
    """``scale``: the largest multiple of the scenario's own traffic (``workload.load_scale`` over the one it
    has) that met the SLO under every seed, 0 when even the smallest tried failed; ``scenario``: the scenario at
    that traffic, to re-run; ``proof``: its runs' summaries; ``probes``: each multiple tried, the checks below
    ``scale`` last."""

    scale: float
    scenario: Scenario
    proof: list[dict[str, Any]]
    probes: list[ScaleProbe]
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def failing_below(self) -> list[ScaleProbe]:
        """The multiples under ``scale`` that missed the SLO, lowest first: the checks below it (``headroom``'s
        ``check_below``) that show passing is not monotone in the traffic here."""
        return sorted((p for p in self.probes if not p.passed and p.scale < self.scale), key=lambda p: p.scale)

    @property
    def safe_scale(self) -> float:
        """``scale`` when nothing under it failed; otherwise the largest multiple that passed below the lowest one
        that failed (0 when none did): every multiple tried up to it met the SLO."""
        below = self.failing_below
        if not below:
            return self.scale
        return max((p.scale for p in self.probes if p.passed and p.scale < below[0].scale), default=0.0)


@dataclass(frozen=True)
class ScaleProbe:
    """One multiple of the traffic tried: whether every seed met the SLO, the worst seed's numbers, and why it
    failed (an error, or the first seed's miss)."""

    scale: float
    passed: bool
    ttft_p99_s: float
    error_rate: float
    error: str | None = None


#: the fractions of the headroom ``headroom`` tries after its search, to see that the plan passes below it too
CHECK_BELOW = (0.5, 0.75, 0.9)


def headroom(scenario: Scenario | str | Path, *, seeds: int | Iterable[int] = 1, rel_tol: float = 0.02,
             max_probes: int = 30, executor: ExecutorSpec = "serial", cache: bool | str | Path = True,
             check_below: Sequence[float] = CHECK_BELOW) -> HeadroomResult:
    """How much more of its own traffic a plan carries within its SLO: the scenario as it is (its rush or trace,
    autoscaler, cluster, faults), its arrivals multiplied (``workload.load_scale``: rates times it, a trace
    replayed that much faster), bisected as :func:`capacity` bisects the rate, from 1 (today's traffic) up,
    or down when today's already fails. The search assumes passing is monotone in the multiple; the same
    seed's arrivals stay as more come between them (``capsim.sim.arrivals.session_starts``), which keeps it
    close to that, but an autoscaler's step or a retry storm can make a smaller multiple miss where a larger
    one met the SLO. So the headroom times each of ``check_below`` is tried too (``()``: none):
    ``HeadroomResult.failing_below`` lists the ones that missed, ``safe_scale`` the largest multiple every probe
    up to which passed."""
    if any(not 0 < f < 1 for f in check_below):
        raise SettingsError(f"headroom check_below: fractions between 0 and 1, not {list(check_below)}")
    base = scenario if isinstance(scenario, Scenario) else Scenario.from_yaml(scenario)
    base = portable(base)
    seeds_ = seed_list(seeds)
    own = base.workload.load_scale

    def at(k: float) -> Scenario:
        return base.override({"workload.load_scale": own * k})

    k, proofs, tried = _bisect(at, 1.0, seeds_, rel_tol, max_probes, executor, cache, check_below)
    final = at(k if k > 0 else 1.0)
    return HeadroomResult(k, final, proofs.get(k, []), [ScaleProbe(*p) for p in tried],
                          {**provenance(final), "seeds": seeds_, "rel_tol": rel_tol, "check_below": list(check_below)})


def capacity_per_setting(scenario: Scenario | str | Path, grid: Mapping[str, Sequence[Any]], *,
                         replicas: int | None = None, seeds: int | Iterable[int] = 1, rel_tol: float = 0.02,
                         executor: ExecutorSpec = None, cache: bool | str | Path = True,
                         progress: bool = True) -> Any:
    """``capacity`` for every setting of a sweep grid: one row per setting with its rate, in grid order.

    Each setting's search runs as one task on ``executor`` (a process pool by default); a setting that
    does not validate gets its error instead of a rate."""
    import pandas as pd

    from capsim.studies.sweep import _progress, expand_grid

    base = scenario if isinstance(scenario, Scenario) else Scenario.from_yaml(scenario)
    base = portable(base)
    settings = expand_grid(grid)
    rows: dict[int, dict[str, Any]] = {}
    jobs = {}
    with open_executor(executor, tasks=len(settings)) as ex:
        for st in settings:
            try:
                sc = base.override(st.changes)
            except SettingsError as exc:
                rows[st.index] = {"setting": st.index, **st.values, "rate_per_s": math.nan,
                                  "requests_per_s": math.nan, "probes": 0, "error": str(exc)}
                continue
            fut = ex.submit(capacity, sc, replicas=replicas, seeds=seeds, rel_tol=rel_tol, executor="serial",
                            cache=cache)
            jobs[fut] = st
        for fut in _progress(as_completed(jobs), len(jobs), progress, "capacity"):
            st = jobs[fut]
            r = fut.result()
            rows[st.index] = {"setting": st.index, **st.values, "rate_per_s": r.rate_per_s,
                              "requests_per_s": r.requests_per_s, "probes": len(r.probes), "error": None}
    return pd.DataFrame([rows[k] for k in sorted(rows)])


def _throughput_guess(sc: Scenario, replicas: int) -> float:
    """Requests per second the fleet serves at full batches of the mean request (the service model's
    mean batch time, plus the pod's CPU per request: ``request_overhead_ms`` on its batch and, busy as a
    pod at capacity is, ``arrival_overhead_ms`` on the batch running when it arrives): a starting upper
    bound for the search; 10/s a pod when it cannot be estimated."""
    svc = sc.service
    b = sc.batching.max_batch_size
    try:
        if svc.kind == "profile":
            from capsim.model.profile import ServiceTimeProfile

            assert svc.profile is not None
            prof = ServiceTimeProfile.from_csv(sc.resolve(svc.profile))
            wl = sc.workload
            total = prof.batch_timing(b, _mean(wl.prompt_tokens), _mean(wl.output_tokens),
                                      extrapolate=svc.extrapolate).total_s
        else:
            assert svc.mean_s is not None
            total = svc.mean_s
        total = svc.time_scale * total + b * (svc.request_overhead_ms + svc.arrival_overhead_ms) / 1000.0
        if total > 0:
            return replicas * b / total
    except Exception:  # only a starting point: the doubling finds a failing rate anyway
        pass
    return 10.0 * replicas


def _mean(tokens: Any) -> int:
    return int(tokens.value if tokens.kind == "constant" else tokens.mean)
