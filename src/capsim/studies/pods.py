"""Real agent pods as local processes: ``capsim serve`` on a free loopback port, optionally pinned to a core.

Studies (validation), benchmarks and integration tests start pods this way, so they all exercise the
same command an engineer deploys.

Pods die with their parent, so an interrupted ``capsim validate`` leaves no pod holding its port and its
core: on Linux each pod asks the kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``: even a
SIGKILL of the parent, when the pod was started from the main thread, as the signal follows the thread
that started it); and once a pod or a ``scratch_dir`` exists, SIGTERM to the parent raises ``SystemExit``
(the default action would skip every ``finally``), so its cleanup runs, and at exit the parent stops the
pods it started (SIGTERM, SIGKILL after 10 s) and removes its scratch folders. Ctrl-C (SIGINT) raises
``KeyboardInterrupt`` and ends the same way.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

START_TIMEOUT_S = 60.0
PORT_TRIES = 3  # a first start whose port another process took before the pod bound it tries fresh ones
EXIT_STOP_TIMEOUT_S = 10.0  # at the parent's exit a pod gets this long to drain before SIGKILL
_PR_SET_PDEATHSIG = 1  # linux/prctl.h

_live: set[PodProcess] = set()  # started and not stopped: stopped at exit
_scratch: list[Path] = []  # removed at exit, after the pods that write their logs there


class PortTakenError(RuntimeError):
    """The pod exited at start because its port was already in use."""


def scratch_dir(prefix: str) -> Path:
    """A new folder under the system's temporary directory, removed when this process exits (normally, by
    an exception, Ctrl-C or SIGTERM: see the module docstring)."""
    _exit_on_sigterm()
    path = Path(tempfile.mkdtemp(prefix=prefix))
    _scratch.append(path)
    return path


def remove_scratch(path: Path) -> None:
    """Remove a ``scratch_dir`` now (a long-lived process, a notebook, should not keep it until exit)."""
    shutil.rmtree(path, ignore_errors=True)
    if path in _scratch:
        _scratch.remove(path)


def _exit_on_sigterm() -> None:
    """Make SIGTERM raise SystemExit(143), so ``finally`` blocks and exit handlers run; only where SIGTERM
    still has its default action (an application's own handler is kept) and from the main thread (the
    only one that may set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_exit)


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


_prctl: Any = None  # libc's prctl, looked up in the parent: the child between fork and exec only calls it


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@atexit.register
def _cleanup_at_exit() -> None:
    for pod in list(_live):
        pod.stop(EXIT_STOP_TIMEOUT_S)
    while _scratch:
        shutil.rmtree(_scratch.pop(), ignore_errors=True)


def metric_totals(url: str, names: Any, timeout_s: float = 5.0) -> dict[str, float]:
    """The samples named ``names`` on a pod's ``/metrics`` (counters with their ``_total``), each summed over
    its labels; a name the pod does not export is 0. Parsed with prometheus_client's text parser."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out = dict.fromkeys(names, 0.0)
    text = httpx.get(f"{url}/metrics", timeout=timeout_s).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in out:
                out[sample.name] += float(sample.value)
    return out


#: the ports free_port has handed out in this process (the kernel may pick a port again once its probe
#: socket is closed, before whoever was given it binds it: two pods made one after the other could share one)
_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now and that this process has not been given
    before."""
    for _ in range(64):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port
    raise OSError("no loopback port left that this process was not given before (64 tries)")


def stop_process(proc: subprocess.Popen[Any] | None, timeout_s: float) -> None:
    """SIGTERM ``proc`` and wait up to ``timeout_s``; SIGKILL it (and reap it) if it outlasts that. Nothing for a
    process that is not running."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


def pinned(cmd: list[str], core: int | None) -> list[str]:
    """``cmd`` run under ``taskset -c core`` when a core is given and taskset exists."""
    return ["taskset", "-c", str(core), *cmd] if core is not None and shutil.which("taskset") else cmd


class PodProcess:
    """One pod process; ``url`` is its base URL. ``settings`` become ``CAPSIM_<NAME>`` variables.

    ``start()`` launches it (and by default waits until ``/readyz`` answers 200); a restart reuses the
    port. ``stop()`` sends SIGTERM and waits for the drain; ``kill()`` is SIGKILL. As a context manager it
    is started on entry and stopped on exit; a pod still running when the parent exits is stopped then.
    """

    def __init__(
        self, log_dir: Path, name: str = "pod", *, core: int | None = None, **settings: object
    ) -> None:
        self.port = free_port()
        self.name = name
        self.core = core
        self.settings = settings
        self.log_path = Path(log_dir) / f"{name}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._was_ready = False  # once ready, a restart keeps the port its clients know

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "pod not started"
        return self.proc.pid

    def start(self, wait_ready: bool = True) -> PodProcess:
        """Launch the pod and, with ``wait_ready``, wait until it answers ``/readyz``. A first start whose
        port was taken between ``free_port`` and the pod's bind (another process on this host got it)
        moves to a fresh port, up to ``PORT_TRIES`` times; a restart keeps its port, which its clients know."""
        for tries_left in range(PORT_TRIES - 1, -1, -1):
            self._launch()
            if not wait_ready:
                return self
            try:
                self.wait_ready()
            except PortTakenError:
                if self._was_ready or tries_left == 0:
                    raise
                self.port = free_port()
                self.log_path = self.log_path.with_name(f"{self.name}-{self.port}.log")
                continue
            return self
        raise AssertionError("unreachable")  # the loop returns or raises

    def _launch(self) -> None:
        env = dict(os.environ)
        env.setdefault("CAPSIM_DEVICE", "cpu")
        env.update({f"CAPSIM_{k.upper()}": str(v) for k, v in self.settings.items()})
        env["CAPSIM_POD_NAME"] = self.name
        cmd = [sys.executable, "-m", "capsim.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--log-level", "warning"]
        _exit_on_sigterm()
        # the death signal follows the thread that forks: only the main thread lives as long as the parent
        linux_main = sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()
        global _prctl
        if linux_main and _prctl is None:
            _prctl = ctypes.CDLL(None, use_errno=True).prctl
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(pinned(cmd, self.core), env=env, stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=_die_with_parent if linux_main else None)
        _live.add(self)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Poll ``/readyz`` (each probe bounded by 1 s) until 200, the process dies, or the timeout."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                _live.discard(self)
                log = self.log()
                kind = PortTakenError if "address already in use" in log.lower() else RuntimeError
                raise kind(f"pod exited with code {self.proc.returncode}: {log}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    self._was_ready = True
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"pod on port {self.port} not ready within {timeout_s} s: {self.log()}")

    def log(self) -> str:
        """The last 3,000 characters of the pod's output."""
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def __enter__(self) -> PodProcess:
        return self.start() if self.proc is None or self.proc.poll() is not None else self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        _live.discard(self)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM, wait for the drain; SIGKILL if it outlasts ``timeout_s``."""
        if self.proc is None or self.proc.poll() is not None:
            _live.discard(self)
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
        _live.discard(self)
