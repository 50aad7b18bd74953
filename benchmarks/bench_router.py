"""What ``capsim router`` adds to a turn, and what a session's growing history costs the pod.

One real pod (tiny model, static batching, one torch thread) and one router process on loopback. Part 1:
short turns (a new session each, 8 prompt tokens, 1 new token) sent one at a time, alternating direct
to the pod and through the router, so both see the same machine load; the medians and their ratio
(target: the router adds at most a few milliseconds, well under a turn's model time). Part 2: one session
of ``--turns`` turns through the router (96 new tokens, 4 answered each); each turn's engine prompt
(history + message, from the answer) and its prefill time (time to first token less queue wait), against
turn 1's: the history the store holds is GPU work. Part 3: a continuous pod with prefix caching; a
session's second turn (``--history`` tokens of its first turn's prompt and answer, then 16 new) against a
first turn of the same length sharing nothing, alternating: the prefill a cached history saves on the pod
that served the last turn (what session affinity buys; a turn on another pod pays the miss).

    python benchmarks/bench_router.py [--quick] [--rounds N] [--turns N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, sized_option, write_result
from capsim.studies.pods import PodProcess
from capsim.studies.validate_sessions_real import start_router


def prefix_pairs(tmp: Path, pairs: int, history: int) -> tuple[tuple[int, float], tuple[int, float]]:
    """Median prefill of a cached second turn and of an uncached prompt as long (see the docstring)."""
    pod = PodProcess(tmp, "cpod", batch_mode="continuous", enable_prefix_caching="true", torch_threads=1,
                     max_prompt_tokens=4096, warmup="false").start()

    def prefill(a: dict[str, Any]) -> float:
        return float(a["timings"]["ttft_s"] - a["timings"]["queue_s"])

    hit, miss, length = [], [], 0
    try:
        with httpx.Client(timeout=120) as c:
            for k in range(pairs):
                first = [(k * 131 + 7 * i + 1) % 512 for i in range(history)]  # no two sessions share a block
                url = f"{pod.url}/v1/sessions/p{k}/turns"
                c.post(url, json={"prompt_tokens": first, "max_new_tokens": 4}).raise_for_status()
                two = c.post(url, json={"prompt_tokens": [5] * 16, "max_new_tokens": 1}).json()
                length = two["history"]["prompt_tokens"]
                cold = [(k * 257 + 11 * i + 3) % 512 for i in range(length)]
                three = c.post(f"{pod.url}/v1/sessions/q{k}/turns", json={"prompt_tokens": cold,
                                                                         "max_new_tokens": 1}).json()
                hit.append(prefill(two))
                miss.append(prefill(three))
    finally:
        pod.stop()
    return (length, statistics.median(hit)), (length, statistics.median(miss))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    rounds_of = sized_option(ap, "--rounds", 100, 20, "rounds of each part")
    turns_of = sized_option(ap, "--turns", 8, 4, "turns of the growing session")
    ap.add_argument("--history", type=int, default=1000, help="part 3: the first turn's prompt tokens")
    args = ap.parse_args()
    rounds, turns = rounds_of(args), turns_of(args)
    with tempfile.TemporaryDirectory() as tmp:
        pod = PodProcess(Path(tmp), "pod", max_wait_ms=0, torch_threads=1).start()
        router, rurl = start_router([pod.url])
        try:
            with httpx.Client(timeout=60) as c:
                lat: dict[str, list[float]] = {"direct": [], "router": []}
                for k in range(rounds):
                    for name, base in (("direct", pod.url), ("router", rurl)):
                        t0 = time.perf_counter()
                        r = c.post(f"{base}/v1/sessions/o-{name}-{k}/turns", json={"prompt_tokens": 8,
                                                                                 "max_new_tokens": 1})
                        lat[name].append(time.perf_counter() - t0)
                        assert r.status_code == 200, r.text
                grow = []
                for _ in range(turns):
                    a = c.post(f"{rurl}/v1/sessions/grow/turns", json={"prompt_tokens": 96,
                                                                      "max_new_tokens": 4}).json()
                    t = a["timings"]
                    grow.append((a["turn"], a["history"]["prompt_tokens"], t["ttft_s"] - t["queue_s"]))
        finally:
            router.terminate()
            router.wait(10)
            pod.stop()
        pairs = max(5, rounds // 2)
        cached, cold = prefix_pairs(Path(tmp), pairs, args.history)
    d, r = statistics.median(lat["direct"]), statistics.median(lat["router"])
    print_table(f"one short turn, {rounds} rounds alternating (median)", ["path", "median ms", "p90 ms"],
                [[n, 1000 * statistics.median(v), 1000 * sorted(v)[int(0.9 * len(v))]] for n, v in lat.items()])
    print(f"  router / direct: {r / d:.2f}x  (+{1000 * (r - d):.1f} ms)")
    print_table("one growing session through the router", ["turn", "engine prompt", "prefill ms", "vs turn 1"],
                [[t, p, 1000 * m, m / grow[0][2]] for t, p, m in grow])
    print_table(f"continuous pod, prefix caching: second turn vs an uncached prompt as long ({pairs} "
                "pairs, median prefill ms)", ["prompt", "cached history", "no shared prefix", "ratio"],
                [[cached[0], 1000 * cached[1], 1000 * cold[1], cached[1] / cold[1]]])
    write_result("router", {"prefix": {"prompt_tokens": cached[0], "cached_prefill_s": cached[1],
                                       "uncached_prefill_s": cold[1], "pairs": pairs},
                            "rounds": rounds, "direct_median_s": d, "router_median_s": r, "ratio": r / d,
                            "growing_session": [{"turn": t, "prompt_tokens": p, "prefill_s": m} for t, p, m in grow]})


if __name__ == "__main__":
    main()
