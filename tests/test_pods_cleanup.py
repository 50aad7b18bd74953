"""Pods die with their parent: a validate-like parent stopped by SIGTERM, Ctrl-C or SIGKILL leaves no pod
listening on its port, and (when it could run its exit handlers) no scratch folder."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

STOP_S = 20.0  # PodProcess.stop's promise: SIGTERM, then SIGKILL once the pod outlasts this

# what `capsim validate` does: a scratch folder, a pod in it, a long measurement in try/finally
PARENT = f"""
import signal, sys, time
# Ctrl-C as a terminal delivers it: a shell without job control starts background commands with SIGINT
# ignored, and Python then keeps ignoring it (CI launched that way failed this test, the parent never saw
# the signal)
signal.signal(signal.SIGINT, signal.default_int_handler)
from capsim.studies.pods import PodProcess, scratch_dir
work = scratch_dir("capsim-validate-test-")
pod = PodProcess(work, "validate", max_wait_ms=0, torch_threads=1)
try:
    pod.start()
    print(pod.port, work, flush=True)
    time.sleep(600)
finally:
    print("stopping", time.monotonic(), file=sys.stderr, flush=True)
    pod.stop(timeout_s={STOP_S})
    print("stopped", time.monotonic(), file=sys.stderr, flush=True)
"""

# the pod's stop bound plus the parent's own exit, with room for a loaded machine (a CI run once took
# over 40 s here, where an idle machine takes 4): the test asserts the bound, not how fast the OS is
DEADLINE_S = STOP_S + 40.0


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_closed(port: int, folder: Path | None) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if not _listening(port) and (folder is None or not folder.exists()):
            return
        time.sleep(0.2)
    raise AssertionError(f"port {port} open: {_listening(port)}; folder {folder} left: "
                         f"{folder is not None and folder.exists()}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_stopping_the_parent_stops_its_pod_and_removes_its_folder(sig: signal.Signals) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        line = parent.stdout.readline() if parent.stdout else ""
        assert line, "the parent did not start its pod"
        port_s, folder_s = line.split()
        port, folder = int(port_s), Path(folder_s)
        assert _listening(port) and folder.is_dir()
        sent = time.monotonic()
        parent.send_signal(sig)
        try:
            parent.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            parent.kill()
            err = parent.stderr.read() if parent.stderr else ""
            raise AssertionError(f"the parent outlived {DEADLINE_S} s after {sig.name} (sent at {sent:.1f}); "
                                 f"its stderr: {err[-3000:]}") from None
        # SIGKILL runs no handler in the parent: the kernel's death signal stops the pod; the folder stays
        _wait_closed(port, None if sig == signal.SIGKILL else folder)
        if sig == signal.SIGTERM:
            assert parent.returncode == 128 + signal.SIGTERM  # SystemExit, as a shell reports a SIGTERM
    finally:
        if parent.poll() is None:
            parent.kill()
        if sig == signal.SIGKILL and "folder" in locals():
            import shutil

            shutil.rmtree(folder, ignore_errors=True)


def test_a_pod_is_a_context_manager(tmp_path: Path) -> None:
    from capsim.studies.pods import PodProcess

    with PodProcess(tmp_path, max_wait_ms=0, torch_threads=1) as pod:
        assert _listening(pod.port)
    assert pod.proc is not None and pod.proc.poll() is not None
    assert not _listening(pod.port)


def test_metric_totals_sums_a_counter_over_its_labels_from_a_real_metrics_endpoint() -> None:
    from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

    from capsim.studies.pods import free_port, metric_totals

    reg = CollectorRegistry()
    hits = Counter("vllm:prefix_cache_hits", "hit tokens", ["model_name", "engine"], registry=reg)
    hits.labels("tiny", "0").inc(30)
    hits.labels("tiny", "1").inc(12)
    Gauge("vllm:num_requests_running", "running", registry=reg).set(3)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=reg)
    try:
        got = metric_totals(f"http://127.0.0.1:{port}", ("vllm:prefix_cache_hits_total",
                                                         "vllm:num_requests_running", "vllm:absent_total"))
    finally:
        server.shutdown()
        thread.join(5)
    assert got == {"vllm:prefix_cache_hits_total": 42.0, "vllm:num_requests_running": 3.0, "vllm:absent_total": 0.0}


def test_free_port_never_hands_out_a_port_twice() -> None:
    # the kernel may pick a closed probe's port again; two pods made one after the other must not share one
    import socket

    from capsim.studies.pods import free_port

    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", ports[-1]))  # and each is free to bind


def test_a_first_start_whose_port_was_taken_moves_to_a_fresh_one_and_a_restart_keeps_its_port(tmp_path: Path) -> None:
    # another process may bind the port free_port gave before the pod does (CI runs several suites at once)
    from capsim.studies.pods import PodProcess, PortTakenError

    pod = PodProcess(tmp_path, max_wait_ms=0, torch_threads=1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", pod.port))
        squatter.listen()
        taken = pod.port
        try:
            pod.start()
            assert pod.port != taken and _listening(pod.port)
            assert f"-{pod.port}.log" in pod.log_path.name
            first = pod.port
            pod.stop()
            squatter.close()
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as again:
                again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                again.bind(("127.0.0.1", first))
                again.listen()
                with pytest.raises(PortTakenError, match="address already in use"):
                    pod.start()  # its clients know this port: a restart does not move
            assert pod.port == first
        finally:
            pod.stop()
