"""When a real Prometheus ends the series of a target that left its discovery (a deleted pod), against the rule the
simulator follows (``capsim.sim.hpa.Autoscaling._scrape``, ``sd_removal``): the scrape loop stops once discovery
has passed the change on, the stale marker is stamped at the loop's next slot, and it is written only a scrape
interval and a tenth after that (``endOfRunStaleness`` in ``scrape/scrape.go``), so for that long an instant query
still returns the target's last sample."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from capsim.studies.pods import free_port, stop_process

INTERVAL_S = 1.0
QUERY_TIMEOUT_S = 10.0


def _write(path: Path, targets: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([{"targets": targets, "labels": {"job": "pod"}}] if targets else []))
    os.replace(tmp, path)  # file SD reads whole files: never a half-written one


def _query(url: str, expr: str, at: float | None = None) -> list[dict[str, object]]:
    params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
    body = httpx.get(f"{url}/api/v1/query", params=params, timeout=QUERY_TIMEOUT_S).json()
    assert body["status"] == "success", body
    return body["data"]["result"]  # type: ignore[no-any-return]


def _wait(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll ``check`` (bounded) until it holds; the wall-clock time it first did."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return time.time()
        time.sleep(0.05)
    pytest.fail(f"{what} within {timeout_s:g} s")


def test_a_target_that_leaves_discovery_keeps_its_last_sample_until_the_end_of_run_marker(
        prometheus_binaries: tuple[str, str], tmp_path: Path) -> None:
    registry = CollectorRegistry()
    Gauge("capsim_waiting", "requests waiting", registry=registry).set(7)
    target_port = free_port()
    server, _ = start_http_server(target_port, addr="127.0.0.1", registry=registry)
    targets = tmp_path / "targets.json"
    _write(targets, [f"127.0.0.1:{target_port}"])
    config = tmp_path / "prometheus.yml"
    config.write_text(
        f"global: {{scrape_interval: {INTERVAL_S:g}s, scrape_timeout: {INTERVAL_S:g}s}}\n"
        f"scrape_configs:\n- job_name: pod\n  file_sd_configs: [{{files: ['{targets}'], refresh_interval: 1s}}]\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen([prometheus_binaries[0], f"--config.file={config}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            try:
                return bool(_query(url, "count_over_time(capsim_waiting[30s]) >= 3"))
            except (httpx.HTTPError, ValueError, KeyError):
                return False

        _wait(ready, 60.0, "Prometheus scraped the target three times")
        removed = time.time()
        _write(targets, [])  # the pod is deleted; its server still answers (the end-of-run case, not a failed scrape)
        gone = _wait(lambda: not _query(url, "capsim_waiting"), 60.0, "the series went stale")
        samples = _query(url, "capsim_waiting[120s]")[0]["values"]  # the real samples (markers are not returned)
        times = [float(t) for t, _ in samples]  # type: ignore[union-attr]
        last = times[-1]
        # the loop scraped on until discovery passed the change on: a 5-s send tick, then a 5-s reload tick
        assert removed - INTERVAL_S - 0.5 <= last <= removed + 10.0 + 2 * INTERVAL_S
        # the marker's time: the earliest evaluation time at which the series is gone (bisection to 10 ms)
        lo, hi = last, last + 15.0
        assert _query(url, "capsim_waiting", lo) and not _query(url, "capsim_waiting", hi)
        while hi - lo > 0.01:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _query(url, "capsim_waiting", mid) else (lo, mid)
        # stamped at the loop's next slot, one interval after its last sample (before the slot after it, whatever
        # the scheduler's delay of the tick) ...
        assert last + 0.5 * INTERVAL_S < hi < last + 2 * INTERVAL_S
        # ... and written only after another tick and a tenth: until then the live query still saw the last sample
        assert gone - hi >= INTERVAL_S
    finally:
        stop_process(proc, 10.0)
        log.close()
        server.shutdown()


def _deleted_pods_markers(seed: int) -> tuple[Any, dict[int, float], dict[int, tuple[float, float]]]:
    """A KEDA run of two bursts (pods deleted after each): the Autoscaling, each deleted pod's deletion time, and,
    for each that served, when its stale marker appeared in its samples and the marker's time."""
    from capsim.sim import Simulation
    from test_autoscaler_validation import GATEWAY, bursts

    sim = Simulation(bursts(GATEWAY).override({"autoscaler.keda": {"cooldown_period_s": 300}}), seed=seed)
    auto = sim.autoscaling
    assert auto is not None
    gone_at: dict[int, float] = {}
    seen: dict[int, tuple[float, float]] = {}
    retire = auto.retire

    def watch(pod: Any) -> None:
        gone_at[pod.id] = sim.env.now
        retire(pod)

    def probe() -> Any:
        while True:
            for pid, pod in auto._retired.items():
                # a pod that served: a real sample before its marker
                if pid not in seen and len(pod.samples) > 1 and len(pod.samples[-1]) == 1:
                    seen[pid] = (sim.env.now, pod.samples[-1][0])
            yield sim.env.timeout(0.05)

    auto.retire = watch  # type: ignore[method-assign]
    sim.env.process(probe())
    sim.run()
    return auto, gone_at, seen


def test_the_simulated_prometheus_ends_a_deleted_pod_s_series_by_the_same_rule() -> None:
    """The simulator's side: a deleted pod's next scrape slot fails, and ends its series at once, while discovery
    still lists it; past discovery's two ticks the marker keeps that slot's time but lands 1.1 intervals later."""
    cases = {"failed scrape": 0, "end of run": 0}
    for seed in range(4):
        auto, gone_at, seen = _deleted_pods_markers(seed)
        every = auto.spec.scrape_interval_s
        assert seen, "no pod that served was deleted"
        for pid, (when, marker) in seen.items():
            g = gone_at[pid]
            assert g <= marker < g + every + 1e-9  # its first scrape slot after the deletion
            if marker < auto.sd_removal(g):
                cases["failed scrape"] += 1
                assert when - marker < 0.05 + 1e-9
            else:
                cases["end of run"] += 1
                assert 1.1 * every <= when - marker < 1.1 * every + 0.05 + 1e-9
    assert cases["failed scrape"] >= 1 and cases["end of run"] >= 1, cases


def test_discovery_passes_a_deletion_on_at_its_send_tick_then_the_reload_tick() -> None:
    from capsim.sim import Simulation
    from capsim.sim.hpa import SD_TICK_S
    from test_autoscaler_validation import GATEWAY, bursts

    auto = Simulation(bursts(GATEWAY), seed=0).autoscaling
    assert auto is not None
    sd, reload = auto._sd_phases
    for t in (0.0, 1.234, 99.9, 1000.0):
        r = auto.sd_removal(t)
        send = next(sd + k * SD_TICK_S for k in range(-1, 10_000) if sd + k * SD_TICK_S > t)
        assert r == next(reload + k * SD_TICK_S for k in range(-1, 10_000) if reload + k * SD_TICK_S > send)
        assert t < r <= t + 2 * SD_TICK_S
