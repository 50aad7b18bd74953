"""How long the continuous pod takes from its receipt of a turn to the engine (the history read, history.load_s),
against the TTFT parts, at a fixed Poisson rate: the validation's pod settings, pod on core 0, generator on core 1."""
import asyncio, os, sys, time
import numpy as np, httpx
from capsim.studies.pods import PodProcess
from capsim.studies.validate_continuous import ContinuousSpec

rate = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
spec = ContinuousSpec()
os.sched_setaffinity(0, {1})
pod = PodProcess(__import__("pathlib").Path(__import__("tempfile").mkdtemp()), "loadprobe", core=0, torch_threads=spec.threads, model=spec.model,
                 batch_mode="continuous", queue_capacity=4096, **spec.limits(spec.num_blocks)).start()

async def main():
    rows = []
    async with httpx.AsyncClient(timeout=30) as c:
        async def one(k):
            sent = time.perf_counter()
            r = await c.post(f"{pod.url}/v1/sessions/p-{k}/turns", json={"prompt_tokens": spec.prompt_tokens, "max_new_tokens": spec.output_tokens})
            a = r.json(); t = a["timings"]
            rows.append((t["received_at"] - sent, a["history"]["load_s"], t["queue_s"], t["ttft_s"] - t["queue_s"], t["ttft_s"]))
        at = np.cumsum(np.random.default_rng(0).exponential(1 / rate, int(rate * 10)))
        t0 = time.perf_counter(); tasks = []
        for k, t in enumerate(at):
            d = t0 + t - time.perf_counter()
            if d > 0: await asyncio.sleep(d)
            tasks.append(asyncio.create_task(one(k)))
        await asyncio.gather(*tasks)
    return np.array(rows)

try:
    a = asyncio.run(main())
finally:
    pod.stop()
a = a[50:]  # past the start
for name, col in zip(["way in", "load_s (receipt to engine)", "queue_s (receipt to first step)", "first step (to first token)", "pod ttft_s"], a.T):
    print(f"{name:32s} mean {col.mean()*1e3:6.3f} ms  p50 {np.median(col)*1e3:6.3f}  p90 {np.percentile(col, 90)*1e3:6.3f}")
