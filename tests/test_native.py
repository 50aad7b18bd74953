"""capsim.native: the compiled modules are used only while they match their source, and change nothing.

``make test`` compiles them first (``make native``); CI sets ``CAPSIM_REQUIRE_NATIVE=1`` so a build that
failed or went unused fails these tests instead of skipping them.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import capsim.native as native

ROOT = Path(__file__).resolve().parents[1]


def fake_build(tmp: Path, **changes: object) -> Path:
    """A build folder whose manifest matches today's sources, with empty files standing for the libraries."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    modules: dict[str, dict[str, str]] = {}
    for m in (*native.MODULES, f"{native.GROUP}__mypyc"):
        file = m.replace(".", "/") + suffix
        (tmp / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp / file).write_bytes(b"")
        modules[m] = {"file": file}
        if m in native.MODULES:
            modules[m]["sha256"] = native.digest(native.source_path(m))
    manifest: dict[str, object] = {"built": True, "abi": native._abi(), "modules": modules, **changes}
    (tmp / native.MANIFEST).write_text(json.dumps(manifest))
    return tmp


def test_a_build_that_matches_the_sources_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(native.ENV, raising=False)
    files, why = native.check(fake_build(tmp_path))
    assert why == "compiled"
    assert files is not None and set(files) == {*native.MODULES, f"{native.GROUP}__mypyc"}
    assert all(p.is_relative_to(tmp_path) for p in files.values())


def test_an_edited_source_runs_pure_and_the_reason_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(native.ENV, raising=False)
    build = fake_build(tmp_path)
    manifest = json.loads((build / native.MANIFEST).read_text())
    manifest["modules"]["capsim.policy.scheduling"]["sha256"] = "0" * 64  # built from another version
    (build / native.MANIFEST).write_text(json.dumps(manifest))
    files, why = native.check(build)
    assert files is None
    assert "src/capsim/policy/scheduling.py changed since the build" in why


@pytest.mark.parametrize(("change", "reason"), [
    ({"built": False, "error": "CompileError: gcc not found"}, "the build failed: CompileError: gcc not found"),
    ({"abi": "cpython-310-x"}, "built for cpython-310-x"),
])
def test_a_failed_or_foreign_build_runs_pure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             change: dict[str, object], reason: str) -> None:
    monkeypatch.delenv(native.ENV, raising=False)
    files, why = native.check(fake_build(tmp_path, **change))
    assert files is None and why.startswith(reason)


def test_no_build_a_missing_file_or_the_switch_off_runs_pure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(native.ENV, raising=False)
    assert native.check(tmp_path / "nowhere") == (None, f"no build in {tmp_path / 'nowhere'} (make native)")
    build = fake_build(tmp_path)
    monkeypatch.setenv(native.ENV, "0")
    assert native.check(build) == (None, "CAPSIM_NATIVE=0")
    monkeypatch.delenv(native.ENV)
    lib = next(build.glob(f"{native.GROUP}__mypyc*"))
    lib.unlink()
    files, why = native.check(build)
    assert files is None and why == f"{lib} is missing (make native)"


def require_compiled() -> None:
    """Skip unless this process runs the compiled modules; fail instead under CAPSIM_REQUIRE_NATIVE=1."""
    st = native.status()
    if not st.compiled:
        if os.environ.get("CAPSIM_REQUIRE_NATIVE") == "1":
            pytest.fail(f"CAPSIM_REQUIRE_NATIVE=1 but capsim.native runs {st}")
        pytest.skip(f"capsim.native: {st}")


def test_the_compiled_modules_are_the_ones_imported() -> None:
    require_compiled()
    for m in native.MODULES:
        file = Path(importlib.import_module(m).__file__ or "")
        assert file.is_relative_to(native.BUILD) and file.name.endswith(sysconfig.get_config_var("EXT_SUFFIX")), m


FRAMES = """
import pickle, sys
import capsim.native
from capsim.model.scenario import Scenario
from capsim.sim import simulate
out = {"status": str(capsim.native.status())}
for path, over in %r:
    r = simulate(Scenario.from_yaml(path).override(over), seed=0)
    out[path + repr(over)] = (r.requests, r.timeseries, r.summary.steps)
pickle.dump(out, open(sys.argv[1], "wb"))
"""

CASES = [
    # the Friday rush's climb with continuous pods: HPA, cold starts, 32-request batches
    ("data/scenarios/friday_rush_continuous.yaml", {"horizon_s": 240, "warmup_s": 0,
                                                    "workload.arrivals.rate_per_s": [[0, 8], [60, 96]]}),
    # growing agent sessions with prefix caching (the block pool's registrations and evictions)
    ("data/scenarios/agent_sessions.yaml", {"horizon_s": 300}),
    # a cache small enough that requests are preempted
    ("data/scenarios/friday_rush_continuous.yaml", {"horizon_s": 120, "warmup_s": 0, "batching.num_blocks": 96,
                                                    "workload.arrivals.rate_per_s": [[0, 30]]}),
]


def frames(tmp: Path, env_native: str) -> dict[str, object]:
    out = tmp / f"frames-{env_native}.pkl"
    env = {**os.environ, native.ENV: env_native}
    subprocess.run([sys.executable, "-c", FRAMES % (CASES,), str(out)], cwd=ROOT, env=env, check=True,
                   timeout=600)
    with out.open("rb") as f:
        return pickle.load(f)  # type: ignore[no-any-return]


@pytest.mark.slow
def test_compiled_and_pure_simulations_give_the_same_frames(tmp_path: Path) -> None:
    require_compiled()
    pure, compiled = frames(tmp_path, "0"), frames(tmp_path, "1")
    assert pure.pop("status") == "pure Python (CAPSIM_NATIVE=0)"
    assert compiled.pop("status") == "compiled (mypyc)"
    preempted = 0
    for key, (req, ts, steps) in pure.items():
        req2, ts2, steps2 = compiled[key]  # type: ignore[misc]
        assert steps == steps2 and steps > 1000, key
        assert req.equals(req2), key
        assert ts.equals(ts2), key
        preempted += int(req["preemptions"].sum())
    assert preempted > 0  # the small cache preempted: that path ran both ways


@pytest.mark.slow
def test_the_scheduler_properties_hold_in_pure_python_too() -> None:
    """The main run tests the compiled scheduler (when built); its properties run here on the source."""
    require_compiled()
    env = {**os.environ, native.ENV: "0"}
    tests = ["tests/test_scheduling.py", "tests/test_block_pool.py", "tests/test_prefix_scheduling.py"]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.splitlines()[-1]

