"""A scenario file's ``include:``: sections from other YAML files, under the file's own.

``capsim validate`` writes the pod it calibrated as a fragment (``service.yaml``: a ``service`` and a
``batching`` section). A plan takes it with one line instead of a paste::

    include: [../validation/continuous/service.yaml]   # or one path, without the brackets
    batching: {max_model_len: 4096}                     # the plan's own keys win

The included files are read in order, then the scenario's own sections; a later mapping section is merged
key by key into the earlier one of the same name (one level deep: ``batching.max_model_len`` replaces that
key, ``batching`` keeps the rest), anything else replaces it. An included path resolves as a scenario's
data paths do (:meth:`capsim.model.scenario.Scenario.resolve`): against the including file's folder and its
parents, then capsim's shipped data, then the working directory. The paths an included file names
(``service.profile``, ``workload.arrivals.path``) resolve against *its* folder and parents first, so a
fragment and the profile beside it move together. An included file may include others in turn (a plan
on a shipped scenario that takes the calibrated pod): its includes merge under its own sections, as the
scenario's do under the scenario's; a file that includes itself, directly or through others, is an error
naming the loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from capsim.model.settings import SettingsError
from capsim.paths import find_near, shipped_hint

INCLUDE_KEY = "include"
#: the data paths a fragment may name, as (section, ..., key)
_PATH_FIELDS: tuple[tuple[str, ...], ...] = (("service", "profile"), ("workload", "arrivals", "path"))


def merge_sections(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``top``'s keys over it; a mapping over a mapping merges one level deep."""
    out = dict(base)
    for key, value in top.items():
        below = out.get(key)
        out[key] = {**below, **value} if isinstance(value, Mapping) and isinstance(below, Mapping) else value
    return out


def _anchor_paths(fragment: dict[str, Any], where: Path) -> dict[str, Any]:
    """The fragment with its relative data paths made absolute where they exist near it."""
    for fields in _PATH_FIELDS:
        node: Any = fragment
        for key in fields[:-1]:
            node = node.get(key) if isinstance(node, Mapping) else None
        if not isinstance(node, dict):
            continue
        value = node.get(fields[-1])
        if isinstance(value, str) and value and not Path(value).is_absolute():
            found = find_near(Path(value), where.parent)
            if found is not None:
                node[fields[-1]] = str(found.resolve())
    return fragment


def with_includes(path: Path, data: Mapping[str, Any]) -> dict[str, Any]:
    """The scenario file ``path``'s settings ``data`` with its ``include:`` files read in under them (see the
    module's docstring); ``data`` itself when it includes nothing. Errors name the file and the entry (for a
    nested include, the chain: ``plan.yaml: include.0: base.yaml: include.1: ...``)."""
    return _with_includes(path, data, (path.resolve(),), f"{path}")


def _with_includes(path: Path, data: Mapping[str, Any], chain: tuple[Path, ...], label: str) -> dict[str, Any]:
    """``with_includes`` for a file reached through ``chain`` (the files including it, itself last);
    ``label`` names it in errors."""
    from capsim.model.yaml_load import YamlFileError, load_yaml_file

    if INCLUDE_KEY not in data:
        return dict(data)
    names = data[INCLUDE_KEY]
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise SettingsError(f"{label}: include must be a file path or a list of file paths, got {names!r}")
    merged: dict[str, Any] = {}
    for i, name in enumerate(names):
        entry = f"{label}: include.{i}"
        where = Path(name) if Path(name).is_absolute() else find_near(Path(name), path.parent)
        if where is None or not where.exists():
            raise SettingsError(f"{entry}: {name} not found (looked in {path.parent} and its parents, "
                                f"the shipped data and the working directory){shipped_hint(Path(name))}")
        real = where.resolve()
        if real in chain:
            loop = " -> ".join(str(p) for p in (*chain[chain.index(real):], real))
            raise SettingsError(f"{entry}: {where} includes itself ({loop})")
        try:
            fragment = load_yaml_file(where, "included file")
        except YamlFileError as exc:
            raise SettingsError(f"{entry}: {exc}") from None
        if not isinstance(fragment, dict):
            raise SettingsError(f"{entry}: {where} must be a mapping of settings, got {type(fragment).__name__}")
        # its own paths against its own folder; those of the files it includes against theirs (the recursion)
        fragment = _with_includes(where, _anchor_paths(fragment, where), (*chain, real), f"{entry}: {where}")
        merged = merge_sections(merged, fragment)
    return merge_sections(merged, {k: v for k, v in data.items() if k != INCLUDE_KEY})
