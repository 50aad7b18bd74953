"""The pod-shape what-if: each shape's scenario, the fewest pods that meet the SLO, and the GPUs they take."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from capsim.cli import app
from capsim.errors import CapsimError
from capsim.model.profile import ServiceTimeProfile
from capsim.model.roofline import GPUS, MODELS
from capsim.model.scenario import Scenario
from capsim.sim import simulate
from capsim.studies.batch_modes import fixed_fleet
from capsim.studies.checks import run_checks
from capsim.studies.pod_shapes import (
    PodShape,
    ShapeError,
    billed_gpus,
    compare_pod_shapes,
    format_shapes,
    parse_shape,
    shape_scenario,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rush() -> Scenario:
    """The H100 rush of Llama 3 8B, shortened to 300 s (1 -> 6 -> 1 sessions/s)."""
    return Scenario.from_yaml(ROOT / "data/scenarios/h100_llama3_8b_rush.yaml").override({
        "horizon_s": 300, "warmup_s": 30, "workload.arrivals.rate_per_s": [[0, 1], [60, 6], [240, 1]]})


def test_a_shape_gets_its_profile_gpus_memory_and_price(rush: Scenario, tmp_path: Path) -> None:
    sc = shape_scenario(rush, PodShape("l4", 2, 0.8), MODELS["llama-3-8b"], tmp_path)
    assert sc.batching.tensor_parallel_size == 2 and sc.pods.gpu_cost_per_hour == 0.8
    assert sc.batching.gpu_memory_gb == GPUS["l4"].memory_gib
    est = ServiceTimeProfile.from_csv(sc.service.profile).metadata["estimate"]
    assert est["tensor_parallel"] == 2 and est["gpu"]["name"] == GPUS["l4"].name
    # the estimate is for the pod's GPUs; the HPA's 32 pods would now need 64 GPUs, over the cluster's 32
    assert [f.check for f in run_checks(sc)] == ["estimated-profile", "max-replicas-over-gpus"]
    # another model than the scenario's: the cache is sized for its weights and heads (the activations kept)
    mixtral = shape_scenario(rush, PodShape("h100", 2, 4.0), MODELS["mixtral-8x7b"], tmp_path)
    assert rush.batching.model is not None and mixtral.batching.model is not None
    assert mixtral.batching.model.weights_gb == round(MODELS["mixtral-8x7b"].weights_gib, 3)
    assert mixtral.batching.model.activation_peak_gb == rush.batching.model.activation_peak_gb
    measured = ROOT / "data/profiles/cpu-tiny-float32.csv"
    kept = shape_scenario(rush, PodShape("h100", 1, 4.0, profile=measured), MODELS["llama-3-8b"], tmp_path / "x")
    assert Path(kept.service.profile) == measured and not (tmp_path / "x").exists()
    frame = compare_pod_shapes(rush, [PodShape("h100", 1, 4.0, profile=measured)], "llama-3-8b",
                               profile_dir=tmp_path / "x", seeds=[0], max_pods=1)
    assert not frame["estimated"].any()  # a measured profile's times, said so


def test_a_shape_that_cannot_be_is_named(rush: Scenario, tmp_path: Path) -> None:
    with pytest.raises(CapsimError, match="GPU 'tpu' is not one of"):
        shape_scenario(rush, PodShape("tpu", 1, 1.0), MODELS["llama-3-8b"], tmp_path)
    with pytest.raises(CapsimError, match=r"pod shape 16 x h100: batching.tensor_parallel_size must fit on one node"):
        shape_scenario(rush, PodShape("h100", 16, 4.0), MODELS["llama-3-8b"], tmp_path)


def test_billed_gpus_are_whole_nodes(rush: Scenario) -> None:
    assert rush.cluster is not None and rush.cluster.node_gpus == 8
    two = rush.override({"batching.tensor_parallel_size": 2})
    assert billed_gpus(two, 4) == 8 and billed_gpus(two, 5) == 16
    three = rush.override({"batching.tensor_parallel_size": 3})  # two pods a node, 2 GPUs of each unused
    assert billed_gpus(three, 3) == 16
    assert billed_gpus(three.override({"cluster": None}), 3) == 9


def test_the_fewest_pods_meet_the_slo_and_one_fewer_does_not(rush: Scenario, tmp_path: Path) -> None:
    shapes = [PodShape("l4", 1, 0.8), PodShape("l4", 2, 0.8), PodShape("h100", 1, 4.0)]
    frame = compare_pod_shapes(rush, shapes, "llama-3-8b", profile_dir=tmp_path, seeds=[0], max_pods=16)
    rows = frame.set_index("shape")
    # one L4 (22 GiB) holds 15 GiB of weights and 1,455 blocks: no fleet of up to 16 carries the rush
    assert math.isnan(rows.loc["1 x l4", "pods"]) and rows.loc["1 x l4", "kv_blocks_per_pod"] == 1455
    assert "none within the largest fleet tried (0 of 1 seeds found one)" in format_shapes(frame)
    for name in ("2 x l4", "1 x h100"):
        row = rows.loc[name]
        shape = next(s for s in shapes if s.name == name)
        pods = int(row["pods"])
        sc = shape_scenario(rush, shape, MODELS["llama-3-8b"], tmp_path)
        assert simulate(fixed_fleet(sc, pods), seed=0).summary.slo_met
        assert not simulate(fixed_fleet(sc, pods - 1), seed=0).summary.slo_met
        assert row["gpus_held"] == pods * shape.tensor_parallel
        assert row["gpus_billed"] == billed_gpus(sc, pods) >= row["gpus_held"]
        assert row["cost_per_hour_node_billing"] == pytest.approx(row["gpus_billed"] * shape.price_per_gpu_hour)
        assert row["cost_per_hour_pod_billing"] == pytest.approx(row["gpus_held"] * shape.price_per_gpu_hour)
    # a pod of two L4s splits the weights: faster steps than one L4 could make, and a cache 7 times as large
    assert rows.loc["2 x l4", "kv_blocks_per_pod"] > 7 * rows.loc["1 x l4", "kv_blocks_per_pod"]
    assert frame["estimated"].all()
    # the rush's sessions do not grow and carry no block hashes: no prefix hit on any shape
    assert (frame["prefix_hit_rate"].fillna(0) == 0).all()


def test_agents_growing_histories_hit_the_prefix_cache_on_every_shape(tmp_path: Path) -> None:
    # the 70B agents, shortened: each turn re-sends the conversation, and the pods cache its prefix
    agents = Scenario.from_yaml(ROOT / "data/scenarios/h100x4_llama3_70b_agents.yaml").override({
        "horizon_s": 400, "warmup_s": 100, "workload.arrivals.rate_per_s": [[0, 1.0]]})
    shapes = [PodShape("h100", 4, 4.0), PodShape("h100", 8, 4.0)]
    frame = compare_pod_shapes(agents, shapes, "llama-3-70b", profile_dir=tmp_path, seeds=[0], max_pods=4)
    assert frame["pods"].notna().all() and (frame["prefix_hit_rate"] > 0.5).all()
    assert " | prefix hits | " in format_shapes(frame)
    # without prefix caching the same fleet prefills every history again: no hits, and a slower first token
    plain = agents.override({"batching.enable_prefix_caching": False})
    sc = shape_scenario(plain, shapes[0], MODELS["llama-3-70b"], tmp_path)
    cached = shape_scenario(agents, shapes[0], MODELS["llama-3-70b"], tmp_path)
    pods = int(frame.set_index("shape").loc["4 x h100", "pods"])
    a, b = (simulate(fixed_fleet(x, pods), seed=0).summary for x in (cached, sc))
    assert b.prefix_hit_rate == 0 and a.prefix_hit_rate > 0.5 and b.ttft_p50_s > 2 * a.ttft_p50_s


def test_the_command_prints_the_table_and_writes_the_frame(tmp_path: Path) -> None:
    path = tmp_path / "rush.yaml"
    rush_file = (ROOT / "data/scenarios/h100_llama3_8b_rush.yaml").read_text()
    path.write_text(rush_file.replace("horizon_s: 3600", "horizon_s: 300").replace("warmup_s: 300", "warmup_s: 30")
                    .replace("profile: data/profiles/", f"profile: {ROOT}/data/profiles/"))
    runner = CliRunner()
    got = runner.invoke(app, ["pod-shapes", str(path), "--model", "llama-3-8b", "--shape", "h100:1:4", "--seeds", "1",
                              "--max-pods", "4", "--out", str(tmp_path / "out")])
    assert got.exit_code == 0, got.output
    assert "| 1 x h100 (estimated) |" in got.output and "pods by seed {0:" in got.output
    frame = pd.read_csv(tmp_path / "out" / "shapes.csv")
    assert list(frame["shape"]) == ["1 x h100"] and (tmp_path / "out" / "shapes.png").stat().st_size > 0
    assert (tmp_path / "out" / "roofline-h100x1-llama-3-8b.csv").exists()
    for bad, says in (("h100:1", "expected GPU:TP:PRICE"), ("tpu:1:1", "the GPU must be one of"),
                      ("h100:0:1", "TP at least 1"), ("h100:1:4:nowhere.csv", "the profile nowhere.csv is not a file")):
        got = runner.invoke(app, ["pod-shapes", str(path), "--shape", bad])
        assert got.exit_code == 2 and says in got.output and f"pod shape {bad!r}" in got.output, got.output


def test_parse_shape() -> None:
    assert parse_shape("h200:2:5.5") == PodShape("h200", 2, 5.5)
    measured = ROOT / "data/profiles/cpu-tiny-float32.csv"
    assert parse_shape(f"h100:1:4:{measured}") == PodShape("h100", 1, 4.0, measured)
    with pytest.raises(ShapeError, match="expected GPU:TP:PRICE"):
        parse_shape("h200:two:5")
