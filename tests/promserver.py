"""A real Prometheus server for the parity tests: series written as OpenMetrics, backfilled into a TSDB with
``promtool tsdb create-blocks-from openmetrics``, served by ``prometheus`` on a free loopback port, queried over
its HTTP API with a timeout, and stopped.

Times are seconds from ``BASE_S`` (a fixed epoch, so the blocks are not older than the retention), written to the
millisecond, as Prometheus stores them.
"""

from __future__ import annotations

import math
import re
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import httpx

from capsim.studies.pods import free_port, stop_process

BASE_S = 1_700_000_000  # 2023-11-14: the series' time 0
START_TIMEOUT_S = 30.0
QUERY_TIMEOUT_S = 10.0

#: One series: its metric name, its labels, and its samples (time from BASE_S in seconds, value).
Series = tuple[str, Mapping[str, str], Sequence[tuple[float, float]]]


def ms(t: float) -> float:
    """``t`` (s) to the millisecond, as Prometheus keeps a sample's time."""
    return round(t * 1000.0) / 1000.0


def _number(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _labels(labels: Mapping[str, str]) -> str:
    return ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))


def openmetrics(series: Iterable[Series]) -> str:
    """The series as an OpenMetrics exposition with timestamps (every family untyped, its series together)."""
    by_name: dict[str, list[Series]] = {}
    for s in series:
        by_name.setdefault(s[0], []).append(s)
    lines = []
    for name, group in by_name.items():
        for _, labels, samples in group:
            sel = f"{name}{{{_labels(labels)}}}"
            lines += [f"{sel} {_number(v)} {BASE_S + ms(t):.3f}" for t, v in samples]
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


class PrometheusServer:
    """``prometheus`` serving a TSDB backfilled with ``series``; ``query`` evaluates PromQL at a time."""

    def __init__(self, binaries: tuple[str, str], directory: Path, series: Iterable[Series]) -> None:
        self.prometheus, self.promtool = binaries
        self.dir = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        source = directory / "series.om"
        source.write_text(openmetrics(series))
        data = directory / "data"
        done = subprocess.run([self.promtool, "tsdb", "create-blocks-from", "openmetrics", str(source), str(data)],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"promtool could not backfill {source}: {done.stderr[-2000:]}")
        self.data = data

    def __enter__(self) -> PrometheusServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start it on the backfilled TSDB and wait (bounded) until it is ready."""
        config = self.dir / "prometheus.yml"
        config.write_text("global: {}\n")
        log = (self.dir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen([
            self.prometheus, f"--config.file={config}", f"--storage.tsdb.path={self.data}",
            "--storage.tsdb.retention.time=100y", f"--web.listen-address=127.0.0.1:{self.port}",
        ], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.dir / "prometheus.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {tail}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"prometheus on port {self.port} was not ready within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        stop_process(self.proc, 10.0)

    def query(self, expr: str, t: float) -> dict[tuple[tuple[str, str], ...], float]:
        """The instant vector ``expr`` evaluates to at ``t`` (s from BASE_S): its series' labels to values."""
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr, "time": f"{BASE_S + ms(t):.3f}"},
                      timeout=QUERY_TIMEOUT_S)
        body = r.json()
        if body.get("status") != "success":
            raise ValueError(f"Prometheus refused {expr!r}: {body.get('errorType')}: {body.get('error')}")
        data = body["data"]
        if data["resultType"] == "scalar":
            return {(): float(data["result"][1])}
        return {tuple(sorted(s["metric"].items())): float(s["value"][1]) for s in data["result"]}

    def check(self, expr: str) -> str | None:
        """Prometheus's parse error for ``expr`` (None: it parses), without evaluating it."""
        r = httpx.get(f"{self.url}/api/v1/parse_query", params={"query": expr}, timeout=QUERY_TIMEOUT_S)
        if r.status_code == 404:  # before 2.48 there is no parse endpoint: an evaluation says the same
            r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr, "time": f"{BASE_S}"},
                          timeout=QUERY_TIMEOUT_S)
        body = r.json()
        return None if body.get("status") == "success" else f"{body.get('errorType')}: {body.get('error')}"


def major_version(binary: str) -> int:
    """The major version of a ``prometheus`` binary (2 for Debian bookworm's 2.42)."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    m = re.search(r"version (\d+)\.", out.stdout + out.stderr)
    return int(m.group(1)) if m else 0
