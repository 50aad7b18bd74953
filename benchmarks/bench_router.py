"""What ``capsim router`` adds to a turn, and what a session's growing history costs the pod.

One real pod (tiny model, static batching, one torch thread) and one router process on loopback. Part 1:
short turns (a new session each, 8 prompt tokens, 1 new token) sent one at a time, alternating direct
to the pod and through the router, so both see the same machine load; the medians and their ratio
(target: the router adds at most a few milliseconds, well under a turn's model time). Part 2: one session
of ``--turns`` turns through the router (96 new tokens, 4 answered each); each turn's engine prompt
(history + message, from the answer) and its prefill time (time to first token less queue wait), against
turn 1's: the history the store holds is GPU work.

    python benchmarks/bench_router.py [--quick] [--rounds N] [--turns N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_result
from capsim.studies.pods import PodProcess, free_port


def start_router(pod_url: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "capsim.cli", "router", "--pod", pod_url, "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise TimeoutError("router did not start")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--turns", type=int, default=None)
    args = ap.parse_args()
    rounds = args.rounds or (20 if args.quick else 100)
    turns = args.turns or (4 if args.quick else 8)
    with tempfile.TemporaryDirectory() as tmp:
        pod = PodProcess(Path(tmp), "pod", max_wait_ms=0, torch_threads=1).start()
        router, rurl = start_router(pod.url)
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
    d, r = statistics.median(lat["direct"]), statistics.median(lat["router"])
    print_table(f"one short turn, {rounds} rounds alternating (median)", ["path", "median ms", "p90 ms"],
                [[n, 1000 * statistics.median(v), 1000 * sorted(v)[int(0.9 * len(v))]] for n, v in lat.items()])
    print(f"  router / direct: {r / d:.2f}x  (+{1000 * (r - d):.1f} ms)")
    print_table("one growing session through the router", ["turn", "engine prompt", "prefill ms", "vs turn 1"],
                [[t, p, 1000 * m, m / grow[0][2]] for t, p, m in grow])
    write_result("router", {"rounds": rounds, "direct_median_s": d, "router_median_s": r, "ratio": r / d,
                            "growing_session": [{"turn": t, "prompt_tokens": p, "prefill_s": m} for t, p, m in grow]})


if __name__ == "__main__":
    main()
