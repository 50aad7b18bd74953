"""Real agent pods as local processes: ``capsim serve`` on a free loopback port, optionally pinned to a core.

Studies (validation), benchmarks and integration tests start pods this way, so they all exercise the
same command an engineer deploys.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

START_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cmd: list[str], core: int | None) -> list[str]:
    """``cmd`` run under ``taskset -c core`` when a core is given and taskset exists."""
    return ["taskset", "-c", str(core), *cmd] if core is not None and shutil.which("taskset") else cmd


class PodProcess:
    """One pod process; ``url`` is its base URL. ``settings`` become ``CAPSIM_<NAME>`` variables.

    ``start()`` launches it (and by default waits until ``/readyz`` answers 200); a restart reuses the
    port. ``stop()`` sends SIGTERM and waits for the drain; ``kill()`` is SIGKILL.
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

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "pod not started"
        return self.proc.pid

    def start(self, wait_ready: bool = True) -> PodProcess:
        env = dict(os.environ)
        env.setdefault("CAPSIM_DEVICE", "cpu")
        env.update({f"CAPSIM_{k.upper()}": str(v) for k, v in self.settings.items()})
        env["CAPSIM_POD_NAME"] = self.name
        cmd = [sys.executable, "-m", "capsim.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--log-level", "warning"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(pinned(cmd, self.core), env=env, stdout=log, stderr=subprocess.STDOUT)
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Poll ``/readyz`` (each probe bounded by 1 s) until 200, the process dies, or the timeout."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"pod exited with code {self.proc.returncode}: {self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
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

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM, wait for the drain; SIGKILL if it outlasts ``timeout_s``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
