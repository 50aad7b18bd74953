"""Study speed: tuning the Friday rush under its stresses, and a sweep on Dask with 1 and 2 workers.

Targets (issue 9): tuning 200 settings x 3 seeds of the one-hour Friday-rush scenario with its stresses
finishes in under 10 minutes on this 2-core machine; a Dask ``LocalCluster`` with 2 workers runs a
sweep at least 1.7x faster than with 1 worker. Both are measured with the cache off (a fresh folder), so
every run is simulated.

The tuning part runs ``--budget`` settings (default 8; ``--budget 200`` is the full target, an hour or
more here) and reports the measured wall time, the CPU seconds of every process (this one and the
pool's workers, from ``getrusage``), and what 200 settings would take at the measured rate (labelled as
a projection). On a shared machine the wall time mostly measures the neighbours; CPU seconds divided by
the workers is what the same work takes on an idle 2-core machine. The Dask part times only
the sweep: the cluster is started and its workers have imported capsim before the clock starts.

    python benchmarks/bench_studies.py               # 8 settings, 12-run Dask sweep (about 10 min idle)
    python benchmarks/bench_studies.py --quick       # 4 settings, 8-run sweep on short horizons
    python benchmarks/bench_studies.py --budget 200  # the full tuning target
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, sized_option, write_result
from capsim.model.scenario import Scenario
from capsim.studies.space import load_space
from capsim.studies.sweep import sweep
from capsim.studies.tune import tune

ROOT = Path(__file__).resolve().parent.parent
SPACE = ROOT / "data" / "studies" / "friday_space.yaml"


def bench_tune(budget: int, seeds: int, workers: int) -> dict[str, Any]:
    space = load_space(SPACE)
    assert space.scenario is not None
    base = Scenario.from_yaml(space.scenario)
    before = _cpu_s()
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        result = tune(base, space, seeds=seeds, budget=budget, executor=f"processes:{workers}", cache=cache,
                      progress=False)
        wall = time.perf_counter() - t0
    cpu = _cpu_s() - before  # the pool has shut down: its workers' time is in RUSAGE_CHILDREN
    p = result.provenance
    idle_wall = cpu / workers
    return {"settings": budget, "seeds": seeds, "stresses": list(space.stresses), "workers": workers,
            "wall_s": wall, "cpu_s": cpu, "idle_wall_s": idle_wall, "runs": p["runs"],
            "accepted": p["accepted"], "dominated": p["dominated"], "rejected": p["rejected"],
            "cpu_s_per_run": cpu / max(p["runs"], 1), "s_per_setting": wall / budget,
            "projected_200_settings_min": wall / budget * 200 / 60,
            "projected_200_settings_idle_min": idle_wall / budget * 200 / 60,
            "best": {k: str(v) for k, v in result.best_params.items()}}


def _cpu_s() -> float:
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bench_dask(n_settings: int, horizon_s: float) -> dict[str, Any]:
    from distributed import Client, LocalCluster

    sc = Scenario.from_yaml(ROOT / "data" / "scenarios" / "steady_poisson.yaml").override(
        {"horizon_s": horizon_s, "warmup_s": horizon_s / 10})
    grid = {"batching.max_wait_ms": [float(5 + 5 * k) for k in range(n_settings)]}
    out: dict[str, Any] = {"runs": n_settings, "horizon_s": horizon_s}
    frames = {}
    for n in (1, 2):
        with (LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
              Client(cluster) as client):
            client.run(lambda: __import__("capsim.sim.simulate"))  # workers import capsim before the clock
            with tempfile.TemporaryDirectory() as cache:
                t0 = time.perf_counter()
                frames[n] = sweep(sc, grid, 1, executor=client, progress=False, cache=cache)
                out[f"wall_s_{n}_workers"] = time.perf_counter() - t0
    out["speedup"] = out["wall_s_1_workers"] / out["wall_s_2_workers"]
    out["identical_frames"] = bool(frames[1].equals(frames[2]))
    out["differing_columns"] = [c for c in frames[1].columns if not frames[1][c].equals(frames[2][c])]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 settings and a short sweep")
    budget_of = sized_option(ap, "--budget", 8, 4, "settings to tune (200 is the target)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    budget = budget_of(args)

    dask = bench_dask(8 if args.quick else 12, 300.0 if args.quick else 900.0)
    print_table("Dask LocalCluster sweep (steady Poisson, one seed per setting; target 2 workers >= 1.7x)",
                ["workers", "runs", "wall s", "speedup"],
                [[1, dask["runs"], dask["wall_s_1_workers"], 1.0],
                 [2, dask["runs"], dask["wall_s_2_workers"], dask["speedup"]]])
    print(f"  frames identical on 1 and 2 workers: {dask['identical_frames']}"
          + (f" (columns {dask['differing_columns']} differ)" if dask["differing_columns"] else ""))

    t = bench_tune(budget, args.seeds, args.workers)
    print_table(f"Tuning the Friday rush ({', '.join(t['stresses'])}; {t['seeds']} seeds; {t['workers']} processes)",
                ["settings", "runs", "accepted", "dominated", "rejected", "wall s", "CPU s", "CPU s/run",
                 "200 settings, min", "idle 2 cores, min"],
                [[t["settings"], t["runs"], t["accepted"], t["dominated"], t["rejected"], t["wall_s"], t["cpu_s"],
                  t["cpu_s_per_run"], t["projected_200_settings_min"], t["projected_200_settings_idle_min"]]])
    label = "measured" if budget >= 200 else "projected from the measured rate"
    print(f"  200 settings: {t['projected_200_settings_min']:.1f} min wall here, "
          f"{t['projected_200_settings_idle_min']:.1f} min of CPU / {t['workers']} ({label}); target under 10 min")
    write_result("studies", {"quick": args.quick, "dask": dask, "tune": t,
                             "target_tune_200_min": 10.0, "target_dask_speedup": 1.7})


if __name__ == "__main__":
    main()
