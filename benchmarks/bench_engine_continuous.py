"""The real continuous engine's mixed step: one 64-token prompt chunk joining 16 decodes at context ~200,
run as one padded pass (the engine's first design, every row padded to the longest chunk) against the
split step it runs now (the decodes in one batched pass, the chunk alone on its own cache), in one run.

The engine is brought to the state once: 16 requests with 200-token prompts prefilled (each has emitted
its first token, so its next step is a decode at context 200) and a 64-token prompt queued. Each
repetition then times the step's forward passes on those rows, interleaved so drift in machine load hits
both: padded, split, and for scale the 16 decodes alone (both ways) and the prompt chunk alone. Re-running a pass
writes the same keys and values into the same slots, so the state does not change. Times are the
thread's CPU time with torch on one thread; the table gives medians and the padded/split ratio.

    python benchmarks/bench_engine_continuous.py [--quick] [--model tiny] [--repeat 21]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, print_table, sized_option, write_result
from capsim.core.continuous import ContinuousEngine
from capsim.core.continuous_forward import Row, forward_padded, forward_split
from capsim.core.engine import GenerationRequest, ReferenceEngine
from capsim.policy.scheduling import SchedulerLimits

DECODES, CONTEXT, PROMPT = 16, 200, 64


def mixed_rows(engine: ReferenceEngine) -> tuple[list[Row], list[Row]]:
    """The decode rows (context ``CONTEXT``) and the prompt's chunk row of a real engine's mixed step."""
    ce = ContinuousEngine(engine, SchedulerLimits(max_num_seqs=32, max_num_batched_tokens=4096, block_size=16,
                                                  num_blocks=1024, max_model_len=1024))
    for i in range(DECODES):
        ce.add(i, GenerationRequest(engine.request(CONTEXT, 8, salt=i).prompt, 8))
    ce.step()  # every prompt prefilled, first token emitted
    ce.add(DECODES, GenerationRequest(engine.request(PROMPT, 8, salt=99).prompt, 8))
    ids = list(range(DECODES + 1))
    rows = ce._rows(ids, [1] * DECODES + [PROMPT], [CONTEXT] * DECODES + [0])
    return rows[:DECODES], rows[DECODES:]


def cpu_seconds(fn: Callable[[], object]) -> float:
    with torch.inference_mode():
        t0 = time.thread_time()
        fn()
        return time.thread_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--quick", action="store_true", help="5 repeats (make bench BENCH_ARGS=--quick)")
    repeat = sized_option(ap, "--repeat", 21, 5, "timed repeats")
    args = ap.parse_args()
    args.repeat = repeat(args)
    engine = ReferenceEngine(args.model, device="cpu", dtype="float32", seed=0, threads=1)
    decodes, prompt = mixed_rows(engine)
    model = engine.model
    cases: dict[str, Callable[[], object]] = {
        "mixed, one padded pass (before)": lambda: forward_padded(model, decodes + prompt),
        "mixed, split (now)": lambda: forward_split(model, decodes + prompt),
        f"{DECODES} decodes alone, padded (before)": lambda: forward_padded(model, decodes),
        f"{DECODES} decodes alone (now)": lambda: forward_split(model, decodes),
        f"{PROMPT}-token prompt alone (now)": lambda: forward_split(model, prompt),
    }
    with torch.inference_mode():
        same = forward_padded(model, decodes + prompt) == forward_split(model, decodes + prompt)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm-up
        cpu_seconds(fn)
    for _ in range(args.repeat):
        for name, fn in cases.items():
            times[name].append(cpu_seconds(fn))
    med = {name: median(ts) for name, ts in times.items()}
    before, now = med["mixed, one padded pass (before)"], med["mixed, split (now)"]
    rows = [[name, m * 1000, before / m] for name, m in med.items()]
    print_table(f"{PROMPT}-token prompt + {DECODES} decodes at context {CONTEXT}, {args.model}, "
                f"CPU ms on one thread, median of {args.repeat} (same tokens: {same})",
                ["case", "ms", "mixed padded / this"], rows)
    write_result("engine_continuous", {"model": args.model, "repeat": args.repeat, "times_s": times,
                                       "median_s": med, "ratio_padded_over_split": before / now,
                                       "same_tokens": same})


if __name__ == "__main__":
    main()
