"""A tuning search space: dotted scenario paths with choices or ranges, and the stresses to survive.

The YAML an engineer writes (``capsim tune --space SPACE.yaml``; see ``data/studies/``)::

    scenario: ../scenarios/friday_rush.yaml     # optional; relative to this file
    seeds: 3                                     # optional defaults for tune()
    budget: 200
    objective: cost
    params:
      batching.max_batch_size: {choices: [8, 16, 32]}
      batching.max_wait_ms: {low: 0, high: 40, step: 5}          # ints when low/high/step are ints
      autoscaler.metrics.0.pods.target.averageValue: {low: 2, high: 24, step: 2}
      scale_up: {choices: [{name: fast, set: {autoscaler.behavior.scaleUp.policies.0.value: 8}}, ...]}
    stresses:                                   # each a set of dotted overrides of the base scenario
      rush: {}
      pod-crash: {faults.crashes: [{at_s: 1900, pods: 2}]}

A choice may be a named bundle (``{name, set}``) that sets several paths at once, as in a sweep grid.
A number chosen for a path whose value in the base scenario is a string (a Kubernetes quantity such as
``averageValue: "8"``) is written back as a quantity string, so the result keeps the Kubernetes spelling.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsim.model.settings import SettingsError
from capsim.studies.sweep import check_axis, check_paths, is_bundle


@dataclass(frozen=True)
class Param:
    """One searched dimension: ``choices`` (any values, bundles included) or a numeric range."""

    path: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    @property
    def is_int(self) -> bool:
        return all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high, self.step or 1))

    def labels(self) -> list[Any]:
        """The choices as Optuna categorical values (bundles by name, other non-scalars as JSON)."""
        assert self.choices is not None
        return [label_of(c) for c in self.choices]

    def size(self) -> float:
        """How many values the dimension has (inf for a continuous range)."""
        if self.choices is not None:
            return len(self.choices)
        if self.step is None and not self.is_int:
            return math.inf
        assert self.low is not None and self.high is not None
        return math.floor((self.high - self.low) / (self.step or 1)) + 1


def label_of(choice: Any) -> Any:
    if is_bundle(choice):
        return str(choice["name"])
    if choice is None or isinstance(choice, bool | int | float | str):
        return choice
    return json.dumps(choice, sort_keys=True)


@dataclass(frozen=True)
class Space:
    """A parsed space file; ``scenario`` is the path it names (resolved), if any."""

    params: tuple[Param, ...]
    stresses: dict[str, dict[str, Any]] = field(default_factory=dict)
    scenario: Path | None = None
    seeds: int | None = None
    budget: int | None = None
    objective: str | None = None

    def size(self) -> float:
        return math.prod(p.size() for p in self.params) if self.params else 1


def parse_space(data: Mapping[str, Any], where: str = "space", base_dir: Path | None = None) -> Space:
    """Validate a space mapping (the YAML's content); errors name ``where`` and the field."""
    known = {"scenario", "seeds", "budget", "objective", "params", "stresses"}
    if "params" not in data:  # a bare mapping of params
        data = {"params": data}
    extra = set(data) - known
    if extra:
        raise SettingsError(f"{where}: unknown keys {sorted(extra)}; expected some of {sorted(known)}")
    params_raw = data.get("params") or {}
    if not isinstance(params_raw, Mapping):
        raise SettingsError(f"{where}.params must be a mapping of dotted paths, got {type(params_raw).__name__}")
    params = tuple(_param(str(k), v, f"{where}.params.{k}") for k, v in params_raw.items())
    stresses_raw = data.get("stresses") or {}
    if not isinstance(stresses_raw, Mapping):
        raise SettingsError(f"{where}.stresses must map names to dotted overrides, got {stresses_raw!r}")
    stresses: dict[str, dict[str, Any]] = {}
    for name, changes in stresses_raw.items():
        if changes is None:
            changes = {}
        if not isinstance(changes, Mapping):
            raise SettingsError(f"{where}.stresses.{name} must be a mapping of dotted overrides, got {changes!r}")
        check_paths(changes, f"{where}.stresses.{name}")
        stresses[str(name)] = dict(changes)
    scenario = data.get("scenario")
    scenario_path = None
    if scenario is not None:
        scenario_path = Path(str(scenario))
        if not scenario_path.is_absolute() and base_dir is not None and not scenario_path.exists():
            scenario_path = base_dir / scenario_path
    for key in ("seeds", "budget"):
        v = data.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise SettingsError(f"{where}.{key} must be an integer >= 1, got {v!r}")
    objective = data.get("objective")
    if objective is not None and (not isinstance(objective, str) or objective not in OBJECTIVES):
        raise SettingsError(f"{where}.objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
    return Space(params, stresses, scenario_path, data.get("seeds"), data.get("budget"), objective)


#: objective name -> the Summary-derived trial metric it minimizes first
OBJECTIVES = {"cost": "cost", "ttft": "ttft_p99_s"}


def load_space(path: str | Path) -> Space:
    """Read and validate a space YAML file."""
    from capsim.model.yaml_load import load_yaml_file

    p = Path(path)
    data = load_yaml_file(p, "space file")  # a SettingsError naming the file and line; duplicate keys refused
    if not isinstance(data, Mapping):
        raise SettingsError(f"{p}: a space is a mapping with params (and stresses), got {type(data).__name__}")
    return parse_space(data, where=str(p), base_dir=p.parent)


def _param(path: str, spec: Any, where: str) -> Param:
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, Mapping):
        raise SettingsError(f"{where} must be {{choices: [...]}} or {{low, high[, step, log]}}, got {spec!r}")
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) != {"choices"} or not isinstance(choices, list) or not choices:
            raise SettingsError(f"{where}: choices must be a non-empty list and stand alone, got {spec!r}")
        labels = [label_of(c) for c in choices]
        if len(set(map(repr, labels))) != len(labels):
            raise SettingsError(f"{where}: choices must be distinct, got {labels}")
        check_axis(path, choices, where)
        return Param(path, choices=tuple(choices))
    extra = set(spec) - {"low", "high", "step", "log"}
    if extra or "low" not in spec or "high" not in spec:
        raise SettingsError(f"{where} must be {{choices: [...]}} or {{low, high[, step, log]}}, got {spec!r}")
    low, high, step, log = spec["low"], spec["high"], spec.get("step"), bool(spec.get("log", False))
    for name, v in (("low", low), ("high", high), ("step", step)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
            raise SettingsError(f"{where}.{name} must be a number, got {v!r}")
    if high < low:
        raise SettingsError(f"{where}.high must be >= low ({low}), got {high}")
    if step is not None and step <= 0:
        raise SettingsError(f"{where}.step must be > 0, got {step}")
    if log and (low <= 0 or step is not None):
        raise SettingsError(f"{where}: log ranges need low > 0 and no step, got {spec!r}")
    check_paths([path], where)
    return Param(path, low=low, high=high, step=step, log=log)


def value_at(data: Any, dotted: str) -> Any:
    """The value at a dotted path of a dumped scenario, or None when the path does not exist there."""
    node = data
    for key in dotted.split("."):
        if isinstance(node, list | tuple) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        elif isinstance(node, Mapping) and key in node:
            node = node[key]
        else:
            return None
    return node


def as_quantity(v: float) -> str:
    """A number in Kubernetes quantity spelling: ``8`` -> ``"8"``, ``0.75`` -> ``"750m"``."""
    if float(v).is_integer():
        return str(int(v))
    return f"{round(v * 1000)}m"
