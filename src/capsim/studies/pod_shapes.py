"""What-if: which pod shape -- which GPU, how many of them a pod (tensor parallelism) -- carries a rush for the
fewest GPUs and the lowest cost.

For each :class:`PodShape` the scenario is given that shape's service times (a measured profile, or a
roofline estimate of the GPU and the model, ``capsim.model.roofline``, marked as one), its
``batching.tensor_parallel_size``, one GPU's memory for the KV cache, and its price; then
``capsim.studies.batch_modes.pods_needed`` finds, per seed, the fewest pods of a fixed fleet that meet the
scenario's SLO through the rush. The GPUs follow: held (pods x GPUs a pod) and, with a ``cluster`` section,
billed as whole nodes (each node holds ``node_gpus // tensor_parallel_size`` pods). A fleet carries the
rush without waiting for an autoscaler, so this sizes the floor a plan needs, not what an HPA adds to it.

``capsim pod-shapes`` runs it (by default on ``data/scenarios/h100x4_llama3_70b_rush.yaml`` for Llama 3 70B
on 4 and 8 H100s and on 2 H200s: docs/continuous.md, "Pods of several GPUs").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from capsim.errors import CapsimError
from capsim.model.profile import ServiceTimeProfile
from capsim.model.roofline import GPUS, ModelArch, is_estimate, load_gpu, load_model, roofline_profile
from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.studies.batch_modes import pods_needed


@dataclass(frozen=True)
class PodShape:
    """A pod of ``tensor_parallel`` GPUs of kind ``gpu`` (a key of ``capsim.model.roofline.GPUS``) at
    ``price_per_gpu_hour``; ``profile``: its measured service times (``None``: a roofline estimate)."""

    gpu: str
    tensor_parallel: int
    price_per_gpu_hour: float
    profile: Path | None = None

    @property
    def name(self) -> str:
        return f"{self.tensor_parallel} x {self.gpu}"


def shape_scenario(scenario: Scenario, shape: PodShape, model: ModelArch, profile_dir: Path) -> Scenario:
    """``scenario`` on pods of ``shape``: its profile (estimated into ``profile_dir`` unless measured), GPUs a
    pod, its price, and, when the scenario sizes its KV cache from memory, one GPU's memory and ``model``'s
    shape (the activation peak kept). Raises ``SettingsError`` naming the shape."""
    spec = load_gpu(shape.gpu)
    path = shape.profile
    if path is None:
        path = Path(profile_dir) / f"roofline-{shape.gpu}x{shape.tensor_parallel}-{model.name}.csv"
        roofline_profile(spec, model, tensor_parallel=shape.tensor_parallel).to_csv(path)
    changes: dict[str, Any] = {"service.profile": str(Path(path).resolve()),
                               "batching.tensor_parallel_size": shape.tensor_parallel,
                               "pods.gpu_cost_per_hour": shape.price_per_gpu_hour}
    b = scenario.batching
    if b.mode == "continuous" and b.gpu_memory_gb is not None:  # the cache from this GPU's memory and this model
        peak = b.model.activation_peak_gb if b.model is not None else 0.0
        changes["batching.gpu_memory_gb"] = spec.memory_gib
        changes["batching.model"] = model.shape(activation_peak_gb=peak).model_dump()
    try:
        return scenario.override(changes)
    except SettingsError as exc:
        raise SettingsError(f"pod shape {shape.name}: {exc}") from None


def billed_gpus(scenario: Scenario, pods: int) -> int:
    """GPUs ``pods`` pods of the scenario's shape are billed for: whole nodes with a ``cluster`` section."""
    tp = scenario.batching.tensor_parallel_size
    if scenario.cluster is None:
        return pods * tp
    return math.ceil(pods / scenario.cluster.pods_per_node(tp)) * scenario.cluster.node_gpus


def compare_pod_shapes(scenario: Scenario, shapes: Sequence[PodShape], model: ModelArch | str, *,
                       profile_dir: Path, seeds: Iterable[int] = (0,), max_pods: int = 32) -> pd.DataFrame:
    """One row per shape and seed: the fewest pods meeting the SLO (NaN: not even ``max_pods``), the GPUs
    they hold and are billed for, the fleet's cost an hour either way, and that run's TTFT p99, ITL p50,
    prefix-cache hit rate (cached over prompt tokens; 0 without hashes or prefix caching) and KV-cache blocks
    a pod; ``estimated`` says whether the service times were an estimate's (the profile's
    metadata says so), not a measurement's."""
    arch = load_model(model) if isinstance(model, str) else model
    rows = []
    for shape in shapes:
        sc = shape_scenario(scenario, shape, arch, profile_dir)
        blocks = sc.batching.kv_cache_blocks() if sc.batching.mode == "continuous" else math.nan
        assert sc.service.profile is not None  # shape_scenario sets it
        estimated = is_estimate(ServiceTimeProfile.from_csv(sc.resolve(sc.service.profile)))
        for seed in seeds:
            found = pods_needed(sc, max_replicas=max_pods, seed=seed)
            pods = found.pods
            s = found.summary
            held = pods * shape.tensor_parallel if pods is not None else math.nan
            billed = billed_gpus(sc, pods) if pods is not None else math.nan
            rows.append({
                "shape": shape.name, "gpu": shape.gpu, "tensor_parallel": shape.tensor_parallel, "seed": seed,
                "pods": pods if pods is not None else math.nan, "gpus_held": held, "gpus_billed": billed,
                "cost_per_hour_pod_billing": held * shape.price_per_gpu_hour,
                "cost_per_hour_node_billing": billed * shape.price_per_gpu_hour,
                "ttft_p99_s": s["ttft_p99_s"], "itl_p50_s": s.get("itl_p50_s", math.nan),
                "prefix_hit_rate": s.get("prefix_hit_rate", math.nan), "kv_blocks_per_pod": blocks, "estimated": estimated,
            })
    return pd.DataFrame(rows)


def format_shapes(frame: pd.DataFrame) -> str:
    """A markdown table: per shape the median over seeds (and the range of the pods); TTFT and ITL are those
    of the run at the fleet found (or at the largest fleet tried, when none was)."""
    lines = ["| pods of | pods (range over seeds) | GPUs held | GPUs billed (whole nodes) | $/h pod billing | "
             "$/h node billing | TTFT p99 s | ITL p50 ms | prefix hits | KV blocks a pod |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, g in frame.groupby("shape", sort=False):
        med = g.median(numeric_only=True)
        pods = g["pods"]
        shape = f"{name}{' (estimated)' if g['estimated'].all() else ''}"
        if pods.isna().any():  # some seed found no fleet: the medians would mix fleets and failures
            lines.append(f"| {shape} | none within the largest fleet tried ({pods.notna().sum()} of {len(pods)} "
                         f"seeds found one) | - | - | - | - | {med['ttft_p99_s']:.2f} | {med['itl_p50_s'] * 1e3:.1f} | "
                         f"{med['prefix_hit_rate']:.3f} | {med['kv_blocks_per_pod']:,.0f} |")
            continue
        lines.append(f"| {shape} | {med['pods']:g} ({pods.min():g}-{pods.max():g}) | {med['gpus_held']:g} | "
                     f"{med['gpus_billed']:g} | {med['cost_per_hour_pod_billing']:.2f} | "
                     f"{med['cost_per_hour_node_billing']:.2f} | {med['ttft_p99_s']:.2f} | "
                     f"{med['itl_p50_s'] * 1e3:.1f} | {med['prefix_hit_rate']:.3f} | {med['kv_blocks_per_pod']:,.0f} |")
    return "\n".join(lines)


#: The shapes of the shipped 70B what-if, at assumed prices a GPU-hour (edit them for your cloud).
DEFAULT_SHAPES = (PodShape("h100", 4, 4.0), PodShape("h100", 8, 4.0), PodShape("h200", 2, 5.0))


class ShapeError(CapsimError, ValueError):
    """A pod shape written as text is not ``GPU:TP:PRICE``; the message quotes it."""


def parse_shape(text: str) -> PodShape:
    """``"h100:4:4.0"`` -> 4 H100s a pod at $4.00 a GPU-hour (the GPU must be one of ``GPUS``), timed by a
    roofline estimate; ``"h100:4:4.0:PATH"`` times it by the profile at PATH (measured on such a pod)."""
    parts = text.split(":", 3)
    try:
        gpu, tp, price, *profile = parts
        shape = PodShape(gpu, int(tp), float(price), Path(profile[0]) if profile else None)
    except ValueError:
        raise ShapeError(f"pod shape {text!r}: expected GPU:TP:PRICE[:PROFILE], e.g. h100:4:4.0") from None
    if shape.profile is not None and not shape.profile.is_file():
        raise ShapeError(f"pod shape {text!r}: the profile {shape.profile} is not a file")
    if gpu not in GPUS or shape.tensor_parallel < 1 or shape.price_per_gpu_hour < 0:
        raise ShapeError(f"pod shape {text!r}: the GPU must be one of {sorted(GPUS)}, TP at least 1 and the price "
                         "not negative")
    return shape
