"""Does session affinity pay on real pods? Two continuous pods with prefix caching behind ``capsim router``.

The pods share a private redis-server (the sessions' history), as in production. Closed-loop sessions
(each turn sent when the previous answer arrives, no think time), each turn a new message of ``--new``
distinct tokens and a short answer, so turn k prefills the whole history. Run once
per router policy on fresh pods (fresh caches), sessions concurrently. Reports per policy: the pods'
prefix-cache hit rate (``vllm:prefix_cache_hits / queries``, tokens), the median and p90 prefill time of
later turns (time to first token less queue wait), and turns per second. The baseline for the ratio is
round robin in the same run. (The real half only; ``capsim validate --mode sessions`` compares it with the simulator.)

    python benchmarks/bench_affinity.py [--quick] [--sessions N] [--turns N] [--new N]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, sized_option, write_result
from capsim.studies.validate_sessions_real import start_fleet


def counter(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M))


async def drive(url: str, sessions: int, turns: int, new: int) -> list[float]:
    prefills: list[float] = []

    async def session(c: httpx.AsyncClient, s: int) -> None:
        for t in range(turns):
            msg = [(s * 97 + t * 31 + 5 * i + 1) % 512 for i in range(new)]
            r = await c.post(f"{url}/v1/sessions/aff-{s}/turns", json={"prompt_tokens": msg, "max_new_tokens": 4})
            r.raise_for_status()
            if t > 0:
                tm = r.json()["timings"]
                prefills.append(tm["ttft_s"] - tm["queue_s"])

    async with httpx.AsyncClient(timeout=120) as c:
        await asyncio.gather(*[session(c, s) for s in range(sessions)])
    return prefills


def run(policy: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    # one redis-server for both pods, as in production: with a store per pod (memory://), a turn on the
    # other pod found no history and prefilled its message alone, which made round robin look cheap
    settings: dict[str, object] = {"batch_mode": "continuous", "enable_prefix_caching": "true", "torch_threads": 1,
                                   "max_prompt_tokens": 4096, "warmup": "false"}
    fleet = start_fleet(tmp, policy, settings, [None, None])
    try:
        t0 = time.perf_counter()
        prefills = asyncio.run(drive(fleet.router_url, args.sessions, args.turns, args.new))
        took = time.perf_counter() - t0
        texts = [httpx.get(f"{p.url}/metrics", timeout=10).text for p in fleet.pods]
    finally:
        fleet.stop()
    hits = sum(counter(t, "vllm:prefix_cache_hits_total") for t in texts)
    queries = sum(counter(t, "vllm:prefix_cache_queries_total") for t in texts)
    prefills.sort()
    return {"policy": policy, "hit_rate": hits / queries if queries else 0.0,
            "prefill_p50_s": statistics.median(prefills), "prefill_p90_s": prefills[int(0.9 * len(prefills))],
            "turns_per_s": args.sessions * args.turns / took}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="4 sessions of 3 turns (make bench BENCH_ARGS=--quick)")
    sessions = sized_option(ap, "--sessions", 8, 4, "sessions")
    turns = sized_option(ap, "--turns", 6, 3, "turns a session")
    ap.add_argument("--new", type=int, default=96)
    args = ap.parse_args()
    args.sessions, args.turns = sessions(args), turns(args)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(p, args, Path(tmp)) for p in ("round_robin", "session_affinity", "prefix_aware")]
    base = rows[0]
    print_table(f"{args.sessions} sessions x {args.turns} turns ({args.new} new tokens each), 2 continuous pods",
                ["policy", "hit rate", "prefill p50 ms", "p90 ms", "turns/s", "p50 vs round robin"],
                [[r["policy"], r["hit_rate"], 1000 * r["prefill_p50_s"], 1000 * r["prefill_p90_s"], r["turns_per_s"],
                  r["prefill_p50_s"] / base["prefill_p50_s"]] for r in rows])
    write_result("affinity", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
