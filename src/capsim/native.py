"""Compiled builds of the simulator's hottest pure modules, with mypyc, used only while they match the source.

The continuous-batching simulator spends about half its time in the shared scheduler and the step-time
model: small integer loops over the running requests that CPython runs an opcode at a time. mypyc (part
of mypy, which also compiles mypy and black) turns these typed modules into C extensions with the same
semantics. ``python -m capsim.native`` (``make native``, run by ``make setup``) builds them into
``build/native/`` beside ``src/``, with a manifest of each source file's SHA-256.

On ``import capsim`` (:func:`install`), a finder serves those modules from the build only if every
module's source still has the hash it was built from, the build is for this Python, and
``CAPSIM_NATIVE`` is not ``0``; otherwise every module is imported from its source, as without a build
(the compiled modules call one another directly, so it is all or nothing). An edited source therefore
never runs stale compiled code: it runs pure until ``make native`` again. :func:`status` says which
(the benchmarks print it). The pure modules stay the reference: the tests run the scheduler's
properties and a simulation's frames both ways (``tests/test_native.py``).

A wheel install has no ``build/native/`` and runs pure; so does a machine without a C compiler
(the build says why and leaves a manifest that records it).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

#: the modules compiled, in dependency order (each imports only earlier ones among them)
MODULES = (
    "capsim.policy.sched_types",
    "capsim.policy.block_pool",
    "capsim.policy.decode_runs",
    "capsim.policy.scheduling",
    "capsim.policy.least",
    "capsim.sim.step_time",
)
GROUP = "capsim_native"  # mypyc's shared library: ``capsim_native__mypyc``
SRC = Path(__file__).resolve().parents[1]  # the directory holding the ``capsim`` package
BUILD = SRC.parent / "build" / "native"
MANIFEST = "manifest.json"
ENV = "CAPSIM_NATIVE"


def source_path(module: str) -> Path:
    return SRC.joinpath(*module.split(".")).with_suffix(".py")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _abi() -> str:
    return f"{sys.implementation.cache_tag}-{sysconfig.get_config_var('EXT_SUFFIX')}"


@dataclass(frozen=True)
class Status:
    """Whether the compiled modules are in use, and if not, why."""

    compiled: bool
    reason: str

    def __str__(self) -> str:
        return "compiled (mypyc)" if self.compiled else f"pure Python ({self.reason})"


_status = Status(False, "not checked")


def status() -> Status:
    """Which build of :data:`MODULES` this process runs."""
    return _status


def check(build: Path = BUILD) -> tuple[dict[str, Path] | None, str]:
    """The compiled files to use (module -> path), or ``None`` and why not."""
    if os.environ.get(ENV, "1") == "0":
        return None, f"{ENV}=0"
    try:
        manifest = json.loads((build / MANIFEST).read_text())
    except FileNotFoundError:
        return None, f"no build in {build} (make native)"
    except (OSError, ValueError) as e:
        return None, f"unreadable {build / MANIFEST}: {e}"
    if not manifest.get("built"):
        return None, f"the build failed: {manifest.get('error', 'no reason recorded')}"
    if manifest.get("abi") != _abi():
        return None, f"built for {manifest.get('abi')}, this is {_abi()} (make native)"
    files: dict[str, Path] = {}
    for module in (*MODULES, f"{GROUP}__mypyc"):
        entry = manifest.get("modules", {}).get(module)
        if entry is None:
            return None, f"{module} is not in the build (make native)"
        if module in MODULES:
            src = source_path(module)
            if not src.exists() or digest(src) != entry["sha256"]:
                return None, f"{src.relative_to(SRC.parent)} changed since the build (make native)"
        path = build / entry["file"]
        if not path.exists():
            return None, f"{path} is missing (make native)"
        files[module] = path
    return files, "compiled"


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files

    def find_spec(self, fullname: str, path: object = None, target: ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        file = self.files.get(fullname)
        if file is None:
            return None
        loader = importlib.machinery.ExtensionFileLoader(fullname, str(file))
        return importlib.util.spec_from_file_location(fullname, file, loader=loader)


def install(build: Path = BUILD) -> Status:
    """Serve :data:`MODULES` from the build when it matches the source (see the module docstring)."""
    global _status
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return _status
    loaded = [m for m in MODULES if m in sys.modules]
    files, why = check(build)
    if files is not None and loaded:
        files, why = None, f"{', '.join(loaded)} imported before capsim"
    if files is not None:
        sys.meta_path.insert(0, _Finder(files))
    _status = Status(files is not None, why)
    return _status


def build(out: Path = BUILD) -> Status:
    """Compile :data:`MODULES` with mypyc into ``out`` and write its manifest; a failure is recorded, not
    raised (the modules then run pure)."""
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, object] = {"built": False, "abi": _abi(), "modules": {}}
    try:
        exts = _compile(out)
        modules: dict[str, dict[str, str]] = {}
        for ext in exts:
            file = out / (ext.name.replace(".", "/") + sysconfig.get_config_var("EXT_SUFFIX"))
            entry = {"file": str(file.relative_to(out))}
            if ext.name in MODULES:
                entry["sha256"] = digest(source_path(ext.name))
            modules[ext.name] = entry
        manifest.update(built=True, modules=modules)
        import mypy.version

        manifest["mypy"] = mypy.version.__version__
    except Exception as e:  # any failure leaves the pure modules in use, said in the manifest
        manifest["error"] = f"{type(e).__name__}: {e}"
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    files, why = check(out)
    return Status(files is not None, why)


def _compile(out: Path) -> list[Any]:
    from mypyc.build import mypycify
    from setuptools import Distribution
    from setuptools.command.build_ext import build_ext

    here = Path.cwd()
    os.chdir(SRC)  # mypyc names the modules by their paths from here
    os.environ["MYPY_CACHE_DIR"] = str(out / "mypy_cache")  # not in src/
    try:
        paths = [str(source_path(m).relative_to(SRC)) for m in MODULES]
        exts = mypycify(paths, opt_level="3", group_name=GROUP, target_dir=str(out / "c"))
        dist = Distribution({"name": "capsim-native", "ext_modules": exts})
        cmd = build_ext(dist)
        cmd.build_lib = str(out)
        cmd.build_temp = str(out / "tmp")
        cmd.ensure_finalized()
        cmd.run()
    finally:
        os.chdir(here)
    return list(exts)


def main() -> int:
    result = build()
    print(f"capsim.native: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
