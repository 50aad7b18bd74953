"""One simulation run of a study -- its content address, its cached result and its provenance.

A run is a scenario (after overrides) and a seed. Its key hashes what determines its result: the
scenario with every file it names replaced by that file's SHA-256 (so moving the profile does not
invalidate the cache and editing it does), the seed, the capsim version and the SHA-256 of the
simulator's own source (so a changed model never answers from an old result). ``RunCache`` keeps one JSON
file per key under ``.capsim/cache/`` by default; ``run_one`` is the function executors run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import capsim
from capsim.model.scenario import Scenario

DEFAULT_CACHE = Path(".capsim/cache")


def _summary_fields() -> tuple[str, ...]:
    from capsim.sim.summary import Summary

    return tuple(f.name for f in fields(Summary))


SUMMARY_FIELDS: tuple[str, ...] = _summary_fields()


@functools.lru_cache(maxsize=64)
def _file_hash(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hash(path: Path) -> str:
    """SHA-256 of a file's bytes (memoized on path, mtime and size)."""
    st = path.stat()
    return _file_hash(str(path), st.st_mtime_ns, st.st_size)


def portable(scenario: Scenario) -> Scenario:
    """The scenario with the files it names as absolute paths, so any worker process can open them."""
    changes: dict[str, Any] = {}
    if scenario.service.profile is not None:
        changes["service.profile"] = str(scenario.resolve(scenario.service.profile).resolve())
    arrivals = scenario.workload.arrivals
    if arrivals.kind == "trace":
        changes["workload.arrivals.path"] = str(scenario.resolve(arrivals.path).resolve())
    return scenario.override(changes) if changes else scenario


def fingerprint(scenario: Scenario) -> dict[str, Any]:
    """The scenario as JSON with every named file replaced by ``sha256:<hash of its bytes>``."""
    data = scenario.model_dump(mode="json", by_alias=True)
    data.pop("name", None)
    data.pop("description", None)
    if scenario.service.profile is not None:
        path = scenario.resolve(scenario.service.profile)
        data["service"]["profile"] = f"sha256:{file_hash(path)}" if path.exists() else str(path)
    arrivals = scenario.workload.arrivals
    if arrivals.kind == "trace":
        path = scenario.resolve(arrivals.path)
        data["workload"]["arrivals"]["path"] = f"sha256:{file_hash(path)}" if path.exists() else str(path)
    return data


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """SHA-256 of the simulator's source (``capsim.sim``, ``capsim.policy``, ``capsim.model``): an edit to
    the model invalidates the cache even when the version number did not move."""
    root = Path(capsim.__file__).resolve().parent
    h = hashlib.sha256()
    for sub in ("sim", "policy", "model"):
        for path in sorted((root / sub).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def run_key(scenario: Scenario, seed: int) -> str:
    """The content address of one run (hex SHA-256)."""
    payload = {"scenario": fingerprint(scenario), "seed": int(seed), "capsim": capsim.__version__,
               "code": code_hash()}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def provenance(scenario: Scenario, seed: int | None = None) -> dict[str, Any]:
    """What a result was computed from: scenario after overrides, seed, capsim version, file hashes."""
    fp = fingerprint(scenario)
    out: dict[str, Any] = {
        "scenario": scenario.model_dump(mode="json", by_alias=True),
        "capsim_version": capsim.__version__,
        "capsim_code_sha256": code_hash(),
    }
    if seed is not None:
        out["seed"] = int(seed)
    if scenario.service.profile is not None:
        out["profile"] = str(scenario.service.profile)
        out["profile_sha256"] = str(fp["service"]["profile"]).removeprefix("sha256:")
    return out


class RunCache:
    """Run summaries by content address, one JSON file each under ``root/<2 hex>/<key>.json``."""

    def __init__(self, root: Path | str = DEFAULT_CACHE) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self._path(key).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return data

    def put(self, key: str, value: dict[str, Any]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(value, default=str))
        os.replace(tmp, path)  # atomic: a reader sees the whole file or none


def run_one(scenario: Scenario, seed: int, key: str, cache_root: str | None) -> dict[str, Any]:
    """Simulate ``scenario`` with ``seed`` (or read the cache); never raises for a bad scenario.

    Returns ``{"summary": {...} | None, "error": str | None, "cached": bool, "wall_s": float}``.
    """
    cache = RunCache(cache_root) if cache_root is not None else None
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            return {"summary": hit["summary"], "error": None, "cached": True, "wall_s": 0.0}
    from capsim.sim import simulate

    t0 = time.perf_counter()
    try:
        result = simulate(scenario, seed)
    except Exception as exc:  # a bad setting is a row with its error, not a crashed study
        return {"summary": None, "error": f"{type(exc).__name__}: {exc}", "cached": False,
                "wall_s": time.perf_counter() - t0}
    summary = result.summary.to_dict()
    wall = time.perf_counter() - t0
    if cache is not None:
        cache.put(key, {"summary": summary, "provenance": provenance(scenario, seed), "wall_s": wall})
    return {"summary": summary, "error": None, "cached": False, "wall_s": wall}


def empty_summary() -> dict[str, Any]:
    """A summary row of NaNs for a run that did not happen (its error says why)."""
    return {name: math.nan for name in SUMMARY_FIELDS}


def slo_miss(s: Mapping[str, Any], ttft_slo: float, max_err: float,
             max_wake: float | None = None) -> tuple[str, float]:
    """Why a run misses (empty when it passes) and by how much (relative, > 0 when it misses). With
    ``max_wake`` (``slo.max_wake_s``) the TTFT p99 is that of the requests that did not come during a wake
    from zero pods, and the longest of those that did must stay within ``max_wake``."""
    t = s["ttft_p99_s"] if max_wake is None else s.get("ttft_p99_warm_s", math.nan)
    if t is None or (isinstance(t, float) and math.isnan(t)):
        return "no request completed", 2.0
    if t > ttft_slo:
        return (f"TTFT p99 {t:.3g} s > SLO {ttft_slo:g} s" if max_wake is None else
                f"TTFT p99 outside wakes {t:.3g} s > SLO {ttft_slo:g} s"), t / ttft_slo - 1.0
    wake = s.get("longest_wake_s", math.nan)
    if max_wake is not None and isinstance(wake, float) and wake > max_wake:
        return f"a wake from zero pods kept a request {wake:.3g} s > max_wake_s {max_wake:g} s", wake / max_wake - 1.0
    if s["error_rate"] > max_err:
        return (f"error rate {s['error_rate']:.3%} > {max_err:.3%}",
                s["error_rate"] / max_err - 1.0 if max_err > 0 else 1.0)
    if s["lost_sessions"] > 0:
        return f"{s['lost_sessions']} sessions lost", float(s["lost_sessions"])
    if not s.get("rollout_slo_met", True):  # slo.max_rollout_s
        undone, unfinished = s.get("rollouts_undone") or 0, s.get("rollouts_unfinished") or 0
        if undone and undone >= unfinished:
            return ("a rollout was undone before it was done (slo.max_rollout_s needs every deploy done within it)",
                    1.0)
        late = " (not done by the end of the run)" if unfinished else ""
        return f"a rollout took {s['longest_rollout_s']:.4g} s{late}, over slo.max_rollout_s", 1.0
    if not s.get("slo_met", True):  # any further SLO the summary judges (the session failure rate)
        rate = s.get("session_failure_rate")
        return (f"session failure rate {rate:.3%} over the SLO" if isinstance(rate, float) and rate == rate
                else "the run's summary says the SLO was not met"), 1.0
    return "", 0.0
