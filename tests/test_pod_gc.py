"""The pod freezes its start-up heap once ready (``PodConfig.gc_freeze``): CPython's full collections then
skip the model's and the libraries' objects (docs/pod.md, "Garbage collection")."""

from __future__ import annotations

import gc

from fastapi.testclient import TestClient

from capsim.core.engine import ReferenceEngine
from capsim.core.service import PodConfig, create_app


def test_the_pod_freezes_its_start_up_heap_while_it_serves_and_gives_it_back() -> None:
    engine = ReferenceEngine("tiny", device="cpu", threads=1)
    before = gc.get_freeze_count()
    with TestClient(create_app(PodConfig(device="cpu", warmup=False), engine=engine)) as client:
        assert client.get("/readyz").status_code == 200
        # torch, the model and the app: tens of thousands of objects no full collection walks any more
        assert gc.get_freeze_count() > before + 10_000
        r = client.post("/v1/sessions/g-1/turns", json={"prompt_tokens": 4, "max_new_tokens": 2})
        assert r.status_code == 200, r.text
    assert gc.get_freeze_count() == 0  # unfrozen when the app stops (gc.unfreeze: all of it)


def test_without_gc_freeze_nothing_is_frozen() -> None:
    engine = ReferenceEngine("tiny", device="cpu", threads=1)
    before = gc.get_freeze_count()
    with TestClient(create_app(PodConfig(device="cpu", warmup=False, gc_freeze=False), engine=engine)) as client:
        assert client.get("/readyz").status_code == 200
        assert gc.get_freeze_count() == before
