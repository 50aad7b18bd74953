"""The real engine's first generation at a batch size it has not run before, against its second.

On the H200 (torch 2.11.0+cu130, gpt2-small in bfloat16; stop 47, docs/benchmarks.md) the first generate of
each new batch size took 45 to 65 ms a decode step and the second 3.2 to 6.2: every decode step's attention
reads one more key than the last, so every step is a shape that process had not run, and something on
the way to the kernel pays seconds over a 64-token generation once per shape. A new thread paid it again.
The engine benchmark's rows, each on a fresh thread, measured nothing else until they warmed up first.

This benchmark says which attention backend carries the cost: each of PyTorch's scaled-dot-product
backends (``torch.nn.attention.sdpa_kernel``: math, efficient, flash, cudnn; ``default`` lets PyTorch
choose) runs in its own process, which warms up at one batch size and then times, at each batch size it
has not seen, one generation and the same generation again (the first is the cold one), and last the
warm batch size once more on a new thread. A backend the device cannot run with this model's masks
is reported as not run. On the CPU the cold pass costs little; the table is for GPU sessions
(scripts/device_profile.sh runs it).

    python benchmarks/bench_engine_cold.py [--quick] [--model gpt2-small --device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_result

PROMPT, OUTPUT, WARM_BATCH = 16, 64, 3
BACKENDS = ("default", "math", "efficient", "flash", "cudnn")


def _one(backend: str, model: str, device: str, dtype: str, batches: list[int]) -> list[dict[str, object]]:
    """In this process: warm up at ``WARM_BATCH``, then a cold and a warm generation at each batch size."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from capsim.core.engine import ReferenceEngine

    engine = ReferenceEngine(model, device=device, dtype=dtype)
    chosen = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
              "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}.get(backend)

    def per_decode_ms(b: int) -> tuple[float, float]:
        with contextlib.nullcontext() if chosen is None else sdpa_kernel(chosen):
            r = engine.generate([engine.request(PROMPT, OUTPUT, salt=i) for i in range(b)])[0]
        return (r.total_s - r.first_token_s) / (OUTPUT - 1) * 1e3, r.first_token_s * 1e3

    rows: list[dict[str, object]] = []
    try:
        per_decode_ms(WARM_BATCH)
        per_decode_ms(WARM_BATCH)
    except RuntimeError as exc:  # no kernel of this backend for these inputs
        return [{"backend": backend, "batch": "-", "error": "not run: " + str(exc).splitlines()[0][:48]}]
    for b in batches:
        t0 = time.perf_counter()
        cold, cold_prefill = per_decode_ms(b)
        warm, warm_prefill = per_decode_ms(b)
        rows.append({"backend": backend, "batch": b, "cold_ms": cold, "warm_ms": warm, "cold_prefill_ms": cold_prefill,
                     "warm_prefill_ms": warm_prefill, "wall_s": time.perf_counter() - t0})
    with ThreadPoolExecutor(1) as pool:  # the warmed batch size, on a thread that has run nothing
        cold, cold_prefill = pool.submit(per_decode_ms, WARM_BATCH).result()
        warm, warm_prefill = pool.submit(per_decode_ms, WARM_BATCH).result()
    rows.append({"backend": backend, "batch": f"{WARM_BATCH}, new thread", "cold_ms": cold, "warm_ms": warm,
                 "cold_prefill_ms": cold_prefill, "warm_prefill_ms": warm_prefill})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two new batch sizes instead of four")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated, of " + ", ".join(BACKENDS))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # run one backend in this process, print its rows as JSON
    args = ap.parse_args()
    batches = [1, 8] if args.quick else [1, 8, 32, 64]
    if args.one:
        print(json.dumps(_one(args.one, args.model, args.device, args.dtype, batches)))
        return
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        ap.error(f"--backends: unknown {', '.join(unknown)} (one of {', '.join(BACKENDS)})")
    rows: list[dict[str, object]] = []
    for backend in backends:
        cmd = [sys.executable, __file__, "--one", backend, "--model", args.model, "--device", args.device,
               "--dtype", args.dtype] + (["--quick"] if args.quick else [])
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"backend": backend, "batch": "-", "error": f"not run: exit {done.returncode}, {tail[:40]}"})
            continue
        rows.extend(json.loads(done.stdout.strip().splitlines()[-1]))
    print_table(
        f"{args.model} ({args.device}, {args.dtype}): the first generation at a batch size against the second, "
        f"prompt {PROMPT}, output {OUTPUT}; ms a decode step, and the prefill's",
        ["backend", "batch", "cold ms", "warm ms", "cold / warm", "cold prefill", "warm prefill"],
        [[r["backend"], r["batch"], "-", "-", r["error"], "", ""] if "error" in r else
         [r["backend"], r["batch"], r["cold_ms"], r["warm_ms"], float(r["cold_ms"]) / float(r["warm_ms"]),  # type: ignore[arg-type]
          r["cold_prefill_ms"], r["warm_prefill_ms"]] for r in rows],
    )
    write_result(f"engine-cold-{args.model}", {"model": args.model, "device": args.device, "dtype": args.dtype,
                                                 "rows": rows})


if __name__ == "__main__":
    main()
