"""InferenceMetrics: names, units, per-instance registries, scrape-time queue depth, and its reporters."""

from __future__ import annotations

import asyncio
import inspect
import math

import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from capsim.core.batcher import BatcherMetrics, DynamicBatcher
from capsim.core.metrics import CONTENT_TYPE, REQUEST_OUTCOMES, InferenceMetrics
from capsim.core.state import StoreMetrics, open_store
from capsim.model.settings import BatchSettings


def value(m: InferenceMetrics, sample: str, **labels: str) -> float:
    """One sample's value from the text exposition (so the tests read what Prometheus would)."""
    for family in text_string_to_metric_families(m.render()):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise KeyError(f"{sample} {labels}")


@pytest.mark.parametrize("protocol", [BatcherMetrics, StoreMetrics], ids=lambda p: p.__name__)
def test_implements_the_batcher_and_store_protocols(protocol: type) -> None:
    # mypy checks the assignment statically; this checks at run time that every method the protocol
    # declares exists on InferenceMetrics with the same parameters, so a renamed or dropped method fails
    declared = {
        name: member
        for name, member in vars(protocol).items()
        if callable(member) and not name.startswith("_")
    }
    assert declared, f"{protocol.__name__} declares no methods?"
    m = InferenceMetrics()
    for name, member in declared.items():
        impl = getattr(m, name, None)
        assert callable(impl), f"InferenceMetrics lacks {protocol.__name__}.{name}"
        want = list(inspect.signature(member).parameters)[1:]  # without self
        assert list(inspect.signature(impl).parameters) == want, name


def test_every_metric_has_its_prometheus_name_and_type() -> None:
    families = {f.name: f.type for f in text_string_to_metric_families(InferenceMetrics().render())}
    expected = {
        "capsim_request_latency_seconds": "histogram",
        "capsim_time_to_first_token_seconds": "histogram",
        "capsim_queue_wait_seconds": "histogram",
        "capsim_batch_size": "histogram",
        "capsim_batch_service_seconds": "histogram",
        "capsim_queue_depth": "gauge",
        "capsim_requests": "counter",
        "capsim_state_store_operations": "counter",
        "capsim_state_store_operation_seconds": "histogram",
    }
    for name, kind in expected.items():
        assert families.get(name) == kind, name
    assert "text/plain" in CONTENT_TYPE


def test_outcomes_start_at_zero_and_count() -> None:
    m = InferenceMetrics()
    for outcome in REQUEST_OUTCOMES:
        assert value(m, "capsim_requests_total", outcome=outcome) == 0
    m.observe_request("ok", 0.002, 0.1, 0.8)
    m.observe_request("ok", 0.004, 0.3, 1.2)
    m.observe_request("rejected", None, None, None)
    m.observe_request("failed", 0.01, None, None)
    assert value(m, "capsim_requests_total", outcome="ok") == 2
    assert value(m, "capsim_requests_total", outcome="rejected") == 1
    assert value(m, "capsim_requests_total", outcome="failed") == 1
    # None means "did not happen": nothing observed for it.
    assert value(m, "capsim_queue_wait_seconds_count") == 3
    assert value(m, "capsim_time_to_first_token_seconds_count") == 2
    assert value(m, "capsim_time_to_first_token_seconds_sum") == pytest.approx(0.4)
    assert value(m, "capsim_request_latency_seconds_count") == 2
    assert value(m, "capsim_request_latency_seconds_sum") == pytest.approx(2.0)
    assert value(m, "capsim_time_to_first_token_seconds_bucket", le="0.1") == 1
    assert value(m, "capsim_time_to_first_token_seconds_bucket", le="0.3") == 2


def test_bad_reports_are_refused() -> None:
    m = InferenceMetrics()
    with pytest.raises(ValueError, match="outcome must be one of"):
        m.observe_request("timeout", None, None, None)
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        m.observe_batch(0, 0.1)


def test_batches() -> None:
    m = InferenceMetrics()
    for size in (1, 3, 8, 8):
        m.observe_batch(size, 0.05)
    assert value(m, "capsim_batch_size_count") == 4
    assert value(m, "capsim_batch_size_sum") == 20
    assert value(m, "capsim_batch_size_bucket", le="4.0") == 2
    assert value(m, "capsim_batch_service_seconds_sum") == pytest.approx(0.2)


def test_queue_depth_is_read_at_scrape_time() -> None:
    m = InferenceMetrics()
    assert math.isnan(value(m, "capsim_queue_depth"))  # nothing bound yet
    depth = [0]
    m.bind_queue_depth(lambda: depth[0])
    depth[0] = 7
    assert value(m, "capsim_queue_depth") == 7
    depth[0] = 2
    assert value(m, "capsim_queue_depth") == 2

    def broken() -> int:
        raise RuntimeError("batcher gone")

    m.bind_queue_depth(broken)
    assert math.isnan(value(m, "capsim_queue_depth"))  # the scrape itself still succeeds


def test_each_instance_has_its_own_registry() -> None:
    a, b = InferenceMetrics(), InferenceMetrics()  # two pods in one process: no duplicate-name error
    a.observe_request("ok", 0.0, 0.1, 0.2)
    assert value(a, "capsim_requests_total", outcome="ok") == 1
    assert value(b, "capsim_requests_total", outcome="ok") == 0


def test_store_operations() -> None:
    m = InferenceMetrics()
    m.observe_store_op("get", "ok", 0.0004)
    m.observe_store_op("update", "unavailable", 1.5)
    assert value(m, "capsim_state_store_operations_total", op="get", outcome="ok") == 1
    assert value(m, "capsim_state_store_operations_total", op="update", outcome="unavailable") == 1
    assert value(m, "capsim_state_store_operations_total", op="put", outcome="conflict") == 0
    assert value(m, "capsim_state_store_operation_seconds_count", op="update") == 1


def test_snapshot_is_a_tidy_frame() -> None:
    m = InferenceMetrics()
    m.bind_queue_depth(lambda: 3)
    m.observe_request("ok", 0.001, 0.05, 0.5)
    frame = m.snapshot()
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns[:3]) == ["metric", "type", "sample"] and frame.columns[-1] == "value"
    assert {"outcome", "le", "op"} <= set(frame.columns)
    assert not frame["sample"].str.endswith("_created").any()
    ok = frame[(frame["sample"] == "capsim_requests_total") & (frame["outcome"] == "ok")]
    assert ok["value"].tolist() == [1.0]
    depth = frame[frame["metric"] == "capsim_queue_depth"]
    assert depth["value"].tolist() == [3.0]


async def test_the_batcher_reports_into_it() -> None:
    m = InferenceMetrics()

    async def runner(items: list[int]) -> list[int]:
        await asyncio.sleep(0)
        return [x + 1 for x in items]

    settings = BatchSettings(max_batch_size=4, max_wait_ms=1000.0)  # full batches only
    async with DynamicBatcher(runner, settings, metrics=m) as batcher:
        results = await asyncio.gather(*(batcher.submit(i) for i in range(16)))
        assert value(m, "capsim_queue_depth") == 0
    assert results == [i + 1 for i in range(16)]
    assert value(m, "capsim_requests_total", outcome="ok") == 16
    assert value(m, "capsim_batch_size_count") == 4 and value(m, "capsim_batch_size_sum") == 16
    assert value(m, "capsim_queue_wait_seconds_count") == 16
    assert value(m, "capsim_request_latency_seconds_count") == 16  # every ok request has a latency


async def test_the_store_reports_into_it() -> None:
    m = InferenceMetrics()
    async with open_store("memory://", metrics=m) as store:
        await store.update("s", lambda s: s.with_message("user", "hi"))
        await store.get("s")
        await store.get("nobody")
    assert value(m, "capsim_state_store_operations_total", op="update", outcome="ok") == 1
    assert value(m, "capsim_state_store_operations_total", op="get", outcome="ok") == 1
    assert value(m, "capsim_state_store_operations_total", op="get", outcome="not_found") == 1


def test_in_flight_and_busy_ratio_are_the_names_the_simulated_hpa_scales_on():
    import time

    from capsim.core.metrics import InferenceMetrics

    m = InferenceMetrics()

    def value(name: str) -> float:
        for line in m.render().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise AssertionError(f"{name} not exposed")

    # every render is a scrape; the first reads from the start (a number, never a NaN that would make an
    # average over a window NaN, and the adapter answer 0 for it)
    assert value("capsim_gpu_busy_ratio") == 0.0
    m.request_started()
    m.request_started()
    m.request_finished()
    assert value("capsim_requests_in_flight") == 1
    time.sleep(0.05)
    m.observe_batch(4, 0.02)
    ratio = value("capsim_gpu_busy_ratio")
    assert 0.0 < ratio <= 1.0
    assert value("capsim_gpu_busy_ratio") == 0.0  # nothing ran since the previous scrape
