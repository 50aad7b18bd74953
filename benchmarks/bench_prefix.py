"""Prefix caching in the real engine: the prefill of a request whose 1,024-token prefix is cached, against
the same prefill with nothing cached, in one run.

Each repetition builds a fresh engine with prefix caching on, sends a 1,024-token prompt (prefix) with one
output token, then times the first step of a request that shares it and adds 32 new tokens (a hit: 1,024
tokens reused, 32 computed). The miss is the same request's first step on an engine with caching off (all
1,056 tokens computed). Times are the step's CPU time on one torch thread (``cpu_clock``), so a busy
machine slows both alike; the table gives medians and the miss/hit ratio.

    python benchmarks/bench_prefix.py [--quick] [--model tiny] [--repeat 7]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, print_table, sized_option, write_result
from capsim.core.continuous import ContinuousEngine
from capsim.core.engine import GenerationRequest, ReferenceEngine
from capsim.policy.scheduling import SchedulerLimits

PREFIX, NEW = 1024, 32


def first_step(engine: ReferenceEngine, limits: SchedulerLimits, prefix: list[int], new: list[int]) -> tuple[float, int]:
    """Seconds and tokens of the first step of ``prefix + new`` after ``prefix`` alone was served."""
    ce = ContinuousEngine(engine, limits, cpu_clock=True)
    ce.generate([GenerationRequest(list(prefix), 1)])
    ce.add(1, GenerationRequest(list(prefix) + list(new), 1))
    report = ce.step()
    while ce.has_work:
        ce.step()
    return report.seconds, report.scheduled_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--quick", action="store_true", help="3 repeats (make bench BENCH_ARGS=--quick)")
    repeat = sized_option(ap, "--repeat", 7, 3, "timed repeats")
    args = ap.parse_args()
    args.repeat = repeat(args)
    engine = ReferenceEngine(args.model, device="cpu", dtype="float32", seed=0, threads=1)
    on = SchedulerLimits(max_num_seqs=8, max_num_batched_tokens=4096, block_size=16, num_blocks=1024,
                         max_model_len=2048, enable_prefix_caching=True)
    off = replace(on, enable_prefix_caching=False)
    prefix = engine.request(PREFIX, 1, salt=1).prompt
    new = engine.request(NEW, 1, salt=2).prompt
    first_step(engine, on, prefix, new)  # warm-up
    hits, misses = [], []
    tokens = {}
    for _ in range(args.repeat):  # interleaved, so drift in machine load hits both
        s, tokens["hit"] = first_step(engine, on, prefix, new)
        hits.append(s)
        s, tokens["miss"] = first_step(engine, off, prefix, new)
        misses.append(s)
    hit, miss = median(hits), median(misses)
    rows = [["miss (caching off)", tokens["miss"], miss * 1000, 1.0],
            ["hit (1,024 cached)", tokens["hit"], hit * 1000, miss / hit]]
    print_table(f"prefill of {PREFIX} shared + {NEW} new tokens, {args.model}, median of {args.repeat}",
                ["case", "tokens computed", "step ms (CPU)", "speed-up"], rows)
    write_result("prefix", {"model": args.model, "repeat": args.repeat, "hit_s": hits, "miss_s": misses,
                            "hit_median_s": hit, "miss_median_s": miss, "ratio": miss / hit, "tokens": tokens})


if __name__ == "__main__":
    main()
