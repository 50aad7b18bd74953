"""How a SIGKILLed pod fails the turns sent just after the kill (stop 54): accepted and then reset, or refused.

One continuous pod (the sessions validation's engine limits), a turn every 5 ms straight to it (no router), the
pod killed with SIGKILL at the 200th send; prints each turn sent from 100 ms before the kill to 100 ms after
it (its send and its end relative to the kill, and its outcome) and a summary line. Run from the repository:

    .venv/bin/python data/validation/sessions/teardown-2026-12-05/killtest.py
"""
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "src"))
from capsim.studies.pods import PodProcess  # noqa: E402

pod = PodProcess(Path(tempfile.mkdtemp()), "victim", batch_mode="continuous", num_blocks=1024, max_num_seqs=16,
                 max_model_len=1024, max_prompt_tokens=1024, max_new_tokens=64).start()


async def main() -> tuple[float, list[tuple[float, float, str]]]:
    res: list[tuple[float, float, str]] = []
    async with httpx.AsyncClient(timeout=5) as c:
        t0 = time.perf_counter()

        async def one(k: int) -> None:
            sent = time.perf_counter() - t0
            try:
                r = await c.post(f"{pod.url}/v1/sessions/s{k}/turns", json={"prompt_tokens": 192, "max_new_tokens": 8})
                res.append((sent, time.perf_counter() - t0, str(r.status_code)))
            except httpx.HTTPError as e:
                res.append((sent, time.perf_counter() - t0, type(e).__name__))
        tasks, kill_at = [], 0.0
        for k in range(260):
            tasks.append(asyncio.create_task(one(k)))
            await asyncio.sleep(0.005)
            if k == 200:
                kill_at = time.perf_counter() - t0
                os.kill(pod.pid, signal.SIGKILL)
        await asyncio.gather(*tasks)
    return kill_at, res


kill_at, res = asyncio.run(main())
for sent, end, what in sorted(res):
    if kill_at - 0.1 < sent < kill_at + 0.1:
        print(f"sent {1e3 * (sent - kill_at):+7.1f} ms  ended {1e3 * (end - kill_at):+7.1f} ms  {what}")
lost = [(s, e) for s, e, w in res if w not in ("200", "ConnectError")]
after = [(s, e) for s, e in lost if s >= kill_at]
print(f"summary: {len(lost)} turns accepted and lost ({len(after)} sent after the kill, the last "
      f"{1e3 * (max(s for s, _ in after) - kill_at) if after else float('nan'):.1f} ms after it); their ends "
      f"{1e3 * (min(e for _, e in lost) - kill_at):.1f} to {1e3 * (max(e for _, e in lost) - kill_at):.1f} ms after "
      f"the kill; the first refused send {1e3 * (min(s for s, _, w in res if w == 'ConnectError') - kill_at):.1f} ms "
      "after it")
