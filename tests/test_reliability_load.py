"""Under load a full connection pool is not an outage: 1,000 concurrent turns on one pod, never a 503.

Reproduces issue 12 section 1: redis-py's pools (and fakeredis's) refuse the 101st concurrent call with
"Too many connections", which the pod used to answer as 503 "session store unavailable" while the
store was healthy. The store now queues for a connection within its deadline.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx
import pytest

from podproc import PodProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TURNS = 1000


async def burst(url: str) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=TURNS, max_keepalive_connections=TURNS)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120.0, connect=60.0)) as c:
        return await asyncio.gather(*[
            c.post(f"{url}/v1/sessions/load-{i}/turns", json={"prompt_tokens": 4, "max_new_tokens": 1})
            for i in range(TURNS)
        ])


@pytest.mark.parametrize("backend", ["redis", "memory"])
def test_a_thousand_concurrent_turns_are_never_503(tmp_path: Any, backend: str, request: Any) -> None:
    url = request.getfixturevalue("redis_server").url if backend == "redis" else "memory://"
    p = PodProcess(tmp_path, redis_url=url, max_batch_size=32, max_wait_ms=2, queue_capacity=1024,
                   torch_threads=1).start()
    try:
        responses = asyncio.run(burst(p.url))
        ready = httpx.get(f"{p.url}/readyz", timeout=10).status_code
    finally:
        p.stop()
    codes = Counter(r.status_code for r in responses)
    assert set(codes) <= {200, 429}, (codes, [r.text for r in responses if r.status_code not in (200, 429)][:3])
    assert codes[200] >= 1
    for r in responses:
        if r.status_code == 200:
            assert r.json()["turn"] == 1
    assert ready == 200
