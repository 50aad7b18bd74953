"""A validation's real runs, kept beside its results so its simulated side can be run again offline.

``capsim validate`` spends minutes on the real pod and a second on the simulator. It keeps each real
replication in ``runs/`` under its output folder: the load generator's request frame
(``{level}-{replication}.csv``) and the pod's batch trace with the run's clock and seed
(``{level}-{replication}.json``). :func:`load_runs` reads them back exactly (the frame's dtypes and
``attrs`` included), and ``capsim validate --from-runs DIR`` simulates them again with the calibration
and profile that ``provenance.json`` and ``profile.csv`` kept, so a change of the model is judged on the
same real runs instead of new ones, whose machine drifts between them (docs/validation.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from capsim.errors import CapsimError
from capsim.model.request import REQUEST_COLUMNS, requests_frame
from capsim.model.settings import BatchSettings

#: the folder under a validation's output that holds its real runs
RUNS_DIR = "runs"
#: the request frame's ``attrs`` a kept run carries (what the validation's diagnostics read)
KEPT_ATTRS = ("t0_monotonic", "send_error_s", "token_span_s", "failures", "pod_clock_rows", "pod_clock_rejected",
              "way_in_s", "load_s", "generator_cpu_s", "generator_busy")
#: what a real run's time to first token counts from (``provenance.json``'s ``real_ttft_from``): the client's
#: send, the pod's times placed on the host's clock (``run_load(pod_clock=True)``, since stop 28), as the
#: simulator counts it; or, in runs kept before, the pod's receipt of the request (the way in left out)
TTFT_FROM_SEND, TTFT_FROM_RECEIPT = "send", "the pod's receipt"


class KeptRunsError(CapsimError, ValueError):
    """A validation folder's kept runs or provenance cannot be read back (names the file and what is wrong)."""


@dataclass(frozen=True)
class RealRun:
    """One replication of a load level on the real pod: the load generator's request frame (with its
    ``attrs``: the run's zero on the monotonic clock, the sends' lateness) and the pod's batch trace
    (``GET /debug/batches`` rows since the run began)."""

    level: float
    replication: int
    seed: int
    rate_per_s: float
    requests: Any
    trace: list[list[Any]]

    @property
    def stem(self) -> str:
        return f"{self.level:g}-{self.replication}"


def save_run(out_dir: Path, run: RealRun) -> None:
    """Write ``run`` under ``out_dir/runs/`` (two files, named by level and replication)."""
    folder = Path(out_dir) / RUNS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    run.requests.to_csv(folder / f"{run.stem}.csv", index=False)
    attrs = {k: run.requests.attrs[k] for k in KEPT_ATTRS if k in run.requests.attrs}
    meta = {"level": run.level, "replication": run.replication, "seed": run.seed, "rate_per_s": run.rate_per_s,
            "attrs": attrs, "trace": run.trace}
    (folder / f"{run.stem}.json").write_text(json.dumps(meta, default=_plain))


#: the calibrated pod as a scenario fragment, beside a validation's results (:func:`write_service_fragment`)
SERVICE_FILE = "service.yaml"


#: the validation's own batching keys, which a plan's fragment leaves to the plan: the queue (deep, so the
#: levels reject nothing) and ``max_model_len`` (the validation's prompt plus output, which would reject a
#: plan's longer requests); the step model and the profile do not depend on either
HARNESS_KEYS = ("queue_capacity", "max_model_len")


def fragment_batching(batching: dict[str, Any]) -> dict[str, Any]:
    """A validation pod's ``batching`` as its ``service.yaml`` gives it: without :data:`HARNESS_KEYS`."""
    return {k: v for k, v in batching.items() if k not in HARNESS_KEYS}


def write_service_fragment(out_dir: Path, what: str, service: dict[str, Any], batching: dict[str, Any]) -> Path:
    """``out_dir/service.yaml``: the ``service`` and ``batching`` sections of the pod a validation calibrated,
    to paste into a scenario that plans for that pod; ``what`` (one line) says which pod and workload. Its
    profile is named as the validation named it (under its ``--out-dir``; a scenario's paths resolve against
    its folder and up, then the working directory; or ``include:`` it, docs/studies.md). ``batching`` goes
    through :func:`fragment_batching`. Lists of numbers (the steps' spread) are written inline."""
    import yaml

    import capsim

    body = yaml.safe_dump({"service": service, "batching": fragment_batching(batching)}, sort_keys=False,
                          default_flow_style=None)
    path = Path(out_dir) / SERVICE_FILE
    path.write_text(f"# The pod `capsim validate` calibrated ({what}), capsim {capsim.__version__}:\n"
                    "# paste these sections into a scenario that plans for this pod (docs/validation.md).\n" + body)
    return path


def observed_speed(speeds: Any) -> dict[str, float] | None:
    """The range of the speeds a validation's runs measured after its calibration (each run's cycle over the
    calibrated one: 1.1 is 10% slower), ``{"min", "max", "runs"}``; None when none is a positive number."""
    v = [float(x) for x in speeds if x is not None and np.isfinite(x) and x > 0]
    return {"min": min(v), "max": max(v), "runs": len(v)} if v else None


def note_observed_speed(out_dir: Path, observed: dict[str, float] | None, what: str) -> str | None:
    """One line on the speed ``what`` (the pod, the fleet) ran at after the calibration (:func:`observed_speed`)
    and the margin a plan on it needs (``service.slowdown``, docs/studies.md), also appended to
    ``out_dir/service.yaml`` as a comment when that file is there; None when nothing was measured."""
    if observed is None:
        return None
    line = (f"{what} ran {observed['min']:.2f} to {observed['max']:.2f} times this calibration over "
            f"{observed['runs']:.0f} runs: to hold at those speeds, plan on it with service.slowdown "
            f"{max(1.0, observed['max']):.2f} or more (docs/studies.md, \"A margin on the pods' speed\")")
    path = Path(out_dir) / SERVICE_FILE
    if path.exists():
        with path.open("a") as f:
            f.write(f"# After the calibration, {line}.\n")
    return line


#: the calibration's batch traces beside a validation's results: the closed-loop runs' (``calibration``), the
#: open-loop probe's (``probe``) and the probe's sends on the monotonic clock (``probe_sends``)
TRACES_FILE = "calibration_traces.json"


def save_traces(out_dir: Path, traces: dict[str, Any]) -> None:
    """Write the calibration's batch traces (:data:`TRACES_FILE`) under ``out_dir``, so its fit can be
    studied again offline (``load_traces``)."""
    (Path(out_dir) / TRACES_FILE).write_text(json.dumps(traces, default=_plain))


def probe_requests(frame: Any) -> dict[str, Any]:
    """The open-loop probe's request frame as ``save_traces`` keeps it: its columns and the attrs
    ``probe_answers`` reads (``t0_monotonic``, ``pod_clock_rows``); ``probe_frame`` reads it back."""
    return {"columns": {c: frame[c].tolist() for c in REQUEST_COLUMNS if c in frame},
            "attrs": {k: frame.attrs.get(k) for k in ("t0_monotonic", "pod_clock_rows")}}


def probe_frame(kept: dict[str, Any]) -> Any:
    """A request frame from ``probe_requests``' dict (``load_traces(...)["probe_requests"]``)."""
    frame = requests_frame({c: np.asarray(v) for c, v in kept["columns"].items()})
    frame.attrs.update(kept["attrs"])
    return frame


def load_traces(out_dir: Path) -> dict[str, Any]:
    """The calibration's batch traces a validation kept (:func:`save_traces`)."""
    path = Path(out_dir) / TRACES_FILE
    try:
        traces = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KeptRunsError(f"{path}: cannot read the calibration's traces ({type(exc).__name__}: {exc})") from exc
    if not isinstance(traces, dict) or not all(isinstance(v, list) for k, v in traces.items()
                                               if k != "probe_requests"):
        raise KeptRunsError(f"{path}: must be an object of lists (batch traces, sends) and the probe's requests")
    kept = traces.get("probe_requests")
    if kept is not None and not (isinstance(kept, dict) and isinstance(kept.get("columns"), dict)
                                 and isinstance(kept.get("attrs"), dict)):
        raise KeptRunsError(f"{path}: probe_requests must be an object with 'columns' and 'attrs' (probe_requests)")
    return traces


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as JSON's numbers and lists."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def load_runs(out_dir: Path) -> list[RealRun]:
    """The real runs kept under ``out_dir/runs/``, ordered by level, then replication."""
    import pandas as pd

    folder = Path(out_dir) / RUNS_DIR
    metas = sorted(folder.glob("*.json"))
    if not metas:
        raise KeptRunsError(f"{folder}: no kept runs (a validation writes them since 2026-12-01; rerun it)")
    runs = []
    for path in metas:
        try:
            meta = json.loads(path.read_text())
            level, rep = float(meta["level"]), int(meta["replication"])
            seed, rate, trace, attrs = int(meta["seed"]), float(meta["rate_per_s"]), meta["trace"], meta["attrs"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KeptRunsError(f"{path}: not a kept run ({type(exc).__name__}: {exc})") from exc
        if not isinstance(trace, list) or not isinstance(attrs, dict):
            raise KeptRunsError(f"{path}: 'trace' must be a list and 'attrs' an object")
        csv = path.with_suffix(".csv")
        try:
            raw = pd.read_csv(csv, keep_default_na=False, na_values=[""])
        except (OSError, ValueError) as exc:
            raise KeptRunsError(f"{csv}: cannot read the run's requests ({type(exc).__name__}: {exc})") from exc
        missing = [c for c in REQUEST_COLUMNS if c not in raw.columns]
        if missing:
            raise KeptRunsError(f"{csv}: lacks the request columns {', '.join(missing)}")
        frame = requests_frame({c: raw[c].to_numpy() for c in REQUEST_COLUMNS})
        for c in raw.columns:
            if c not in REQUEST_COLUMNS:
                frame[c] = raw[c].to_numpy()
        frame.attrs.update(attrs)
        runs.append(RealRun(level, rep, seed, rate, frame, trace))
    runs.sort(key=lambda r: (r.level, r.replication))
    return runs


def ttft_from(runs: list[RealRun]) -> str:
    """What the runs' real time to first token counts from: :data:`TTFT_FROM_SEND` when every answered
    request of every run was placed on the pod's clock, else :data:`TTFT_FROM_RECEIPT`."""
    from capsim.core.loadgen import off_pod_clock

    return TTFT_FROM_SEND if all(off_pod_clock(run.requests) is None for run in runs) else TTFT_FROM_RECEIPT


def run_caveats(frame: Any, where: str, echo: Callable[[str], None], *, pod_clock: bool = True
                ) -> tuple[str | None, str | None]:
    """The load generator's two caveats on a real run's frame, each echoed as a ``WARNING``: its answers not
    on this host's clock (``loadgen.off_pod_clock``; only asked when the run wanted ``pod_clock``), and the
    generator itself short of CPU (``loadgen.generator_saturated``), prefixed with ``where`` (the run's level
    or policy and seed) for ``provenance.json``'s ``generator_saturated``. ``None`` for each that is not so."""
    from capsim.core.loadgen import generator_saturated, off_pod_clock

    off = off_pod_clock(frame) if pod_clock else None
    if off is not None:
        echo(f"  WARNING: {off}")
    busy = generator_saturated(frame)
    if busy is not None:
        echo(f"  WARNING: {busy}")
    return off, None if busy is None else f"{where}: {busy}"


def read_provenance(out_dir: Path) -> dict[str, Any]:
    """``provenance.json`` of a validation folder."""
    path = Path(out_dir) / "provenance.json"
    try:
        prov = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KeptRunsError(f"{path}: cannot read the validation's provenance ({type(exc).__name__}: {exc})") from exc
    for key in ("spec", "calibration", "capacity_per_s"):
        if key not in prov:
            raise KeptRunsError(f"{path}: lacks {key!r}")
    return dict(prov)


def spec_fields(spec: dict[str, Any]) -> dict[str, Any]:
    """A ``ValidationSpec``'s fields from its ``asdict`` in the provenance (tuples and batch settings back)."""
    out = dict(spec)
    out["levels"] = tuple(float(v) for v in out["levels"])
    out["batching"] = BatchSettings(**out["batching"])
    return out


def calibration_fields(cal: dict[str, Any]) -> dict[str, Any]:
    """A ``Calibration``'s fields from its ``asdict`` in the provenance (its tuples back)."""
    out = dict(cal)
    out["points"] = tuple(tuple(float(x) for x in p) for p in out.get("points", ()))
    for key in ("residuals_s", "cycle_noise"):
        out[key] = tuple(float(x) for x in out.get(key, ()))
    out["warnings"] = tuple(out.get("warnings", ()))
    return out
