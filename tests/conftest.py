"""Shared pytest fixtures: generic helpers only (a private redis-server on loopback, ...)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import Phase
from hypothesis import settings as hypothesis_settings

from capsim.studies.pods import free_port, stop_process

# Mutation testing (scripts/mutate.py) only needs a failing example, not the smallest one: its profile
# skips shrinking, so a mutant that breaks a property is reported in seconds.
hypothesis_settings.register_profile(
    "mutation", phases=(Phase.explicit, Phase.reuse, Phase.generate), print_blob=False
)
# CI (.ci/run) runs the same examples on every run: a property that fails there fails every time, and
# landing does not hang on a rare draw. Exploring new examples is what a developer's `make test` does
# (the "dev" profile, random), and what found the decode-run bug pinned in test_prefix_scheduling.
# No per-example deadline in either: an example of about a millisecond held off its core for 200 ms by
# the OS (a loaded 2-core machine) would fail as "unreliable timings", which no property of capsim's is;
# pytest-timeout still bounds every test.
hypothesis_settings.register_profile("ci", derandomize=True, database=None, print_blob=True, deadline=None)
hypothesis_settings.register_profile("dev", deadline=None)
hypothesis_settings.load_profile(os.environ.get("CAPSIM_HYPOTHESIS_PROFILE", "dev"))

# ---------------------------------------------------------------------------------------------
# Time limits and a loud report of skipped real-Redis tests
# ---------------------------------------------------------------------------------------------

# pytest-timeout's default (pyproject) is generous; the store's tests get a tighter bound, so a lost
# reply fails in a minute. (The batcher's own file sets its bound with ``pytestmark``.)
TIGHT_TIMEOUTS_S: dict[str, float] = {"test_state.py": 60.0, "test_state_faults.py": 60.0}
REDIS_FIXTURES = frozenset({"redis_binary", "redis_server", "redis_server_factory"})
_redis_items: set[str] = set()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        bound = TIGHT_TIMEOUTS_S.get(item.path.name)
        if bound is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(bound))


@pytest.fixture(autouse=True)
def _note_real_redis(request: pytest.FixtureRequest) -> Iterator[None]:
    """Remember which tests asked for a real redis-server (getfixturevalue included)."""
    yield
    if REDIS_FIXTURES & set(request.fixturenames):
        # on the item's reports, so the count below also sees the tests pytest-xdist's workers ran
        request.node.user_properties.append(("real_redis", True))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "teardown" and ("real_redis", True) in report.user_properties:
        _redis_items.add(report.nodeid)


def _skipped_for_redis(report: pytest.TestReport) -> bool:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return "redis-server" in reason


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Say how many real-Redis tests ran and how many were skipped, and why, so a green run without
    a redis-server cannot pass for a full one."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if _skipped_for_redis(r)]
    ran = len(_redis_items - {r.nodeid for r in skipped})
    if not skipped:
        if ran:
            terminalreporter.write_line(f"real-Redis tests: {ran} ran, none skipped")
        return
    reasons = sorted({r.longrepr[2] if isinstance(r.longrepr, tuple) else str(r.longrepr) for r in skipped})
    terminalreporter.write_sep("!", f"{len(skipped)} REAL-REDIS TESTS SKIPPED", red=True, bold=True)
    for reason in reasons:
        terminalreporter.write_line(f"  {reason}", red=True)
    terminalreporter.write_line(
        "  The production Lua path and the fault tests did not run. Install redis-server and run "
        "`make test-all` (sets CAPSIM_REQUIRE_REDIS=1, which fails instead of skipping).",
        red=True,
    )


# ---------------------------------------------------------------------------------------------
# A private redis-server
# ---------------------------------------------------------------------------------------------

REDIS_START_TIMEOUT_S = 10.0


class RedisServer:
    """One redis-server process on 127.0.0.1 that a test may kill, freeze, thaw and restart.

    ``url`` (TCP) and ``unix_url`` (Unix socket) stay the same across restarts; so does the data
    directory, which is what makes an AOF restart meaningful.
    """

    def __init__(self, binary: str, directory: Path, *, aof: bool = False) -> None:
        self.binary = binary
        self.dir = directory
        self.aof = aof
        self.port = free_port()
        self.socket_path = directory / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.frozen = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}?db=0"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "redis-server is not running"
        return self.proc.pid

    def start(self) -> None:
        """Start the server and wait (bounded) until it answers PING."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        durability = (
            ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        )
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--protected-mode", "yes",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.dir),
            "--save", "",
            *durability,
            "--daemonize", "no",
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.frozen = False
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {err}\n{log}")
            if _answers_ping(self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(
            f"redis-server on port {self.port} did not answer within {REDIS_START_TIMEOUT_S} s"
        )

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final fsync; whatever the AOF holds is what survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.frozen = False

    def freeze(self) -> None:
        """SIGSTOP: the kernel still accepts connections, but nothing ever answers."""
        os.kill(self.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        """SIGCONT after freeze()."""
        os.kill(self.pid, signal.SIGCONT)
        self.frozen = False

    def restart(self) -> None:
        """kill -9, then start again on the same port and data directory."""
        self.kill()
        self.start()

    def stop(self) -> None:
        """Stop gracefully if possible (SIGTERM), else SIGKILL; safe to call twice."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.frozen:
            self.thaw()
        stop_process(self.proc, 5.0)


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_binary() -> str:
    """Path of redis-server; skips the test without it, or fails it when CAPSIM_REQUIRE_REDIS=1."""
    found = shutil.which("redis-server")
    if found is None:
        msg = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("CAPSIM_REQUIRE_REDIS") == "1":
            pytest.fail(f"{msg}, and CAPSIM_REQUIRE_REDIS=1 requires it")
        pytest.skip(msg)
    return found


@pytest.fixture(scope="session")
def prometheus_binaries() -> tuple[str, str]:
    """Paths of ``prometheus`` and ``promtool`` (the parity tests' real Prometheus); skips the test without them, or
    fails it when CAPSIM_REQUIRE_PROMETHEUS=1 (.ci/run installs Debian's prometheus package)."""
    found = shutil.which("prometheus"), shutil.which("promtool")
    if found[0] is None or found[1] is None:
        msg = "prometheus and promtool are not installed (apt-get install prometheus)"
        if os.environ.get("CAPSIM_REQUIRE_PROMETHEUS") == "1":
            pytest.fail(f"{msg}, and CAPSIM_REQUIRE_PROMETHEUS=1 requires them")
        pytest.skip(msg)
    return found[0], found[1]


@pytest.fixture(scope="session")
def redis_server(redis_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server shared by the session (no persistence); tests isolate themselves by key prefix.

    Do not kill or freeze it: use ``redis_server_factory`` for a private one.
    """
    server = RedisServer(redis_binary, tmp_path_factory.mktemp("redis-shared"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_server_factory(
    redis_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., RedisServer]]:
    """Make private, started redis-servers (``aof=True``: append-only file, fsync always); stops them."""
    servers: list[RedisServer] = []

    def make(*, aof: bool = False) -> RedisServer:
        server = RedisServer(redis_binary, tmp_path_factory.mktemp("redis"), aof=aof)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()
