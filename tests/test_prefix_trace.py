"""Mooncake trace replay: typed errors naming the line, and simulated prefix hits against the trace's bound."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from capsim.model.scenario import Scenario
from capsim.sim.arrivals import TraceError, make_workload
from capsim.sim.prefix import TracePrefix
from capsim.sim.simulate import simulate
from capsim.sim.streams import Streams
from capsim.sim.trace_mooncake import MooncakeTrace, prefix_hit_bound, read_mooncake

TRACE = Path(__file__).parent.parent / "data" / "traces" / "mooncake_conversation_trace.jsonl"


def replay(path: Path | str, horizon_s: float, block_size: int, **over: Any) -> Scenario:
    sc = Scenario.model_validate({
        "horizon_s": horizon_s,
        "workload": {"arrivals": {"kind": "trace", "format": "mooncake", "path": str(path)}},
        "service": {"kind": "deterministic", "mean_s": 0.01},
        # a cache for everything: 300 M tokens, more than the hour's 145 M prompt tokens
        "batching": {"mode": "continuous", "num_blocks": 300_000_000 // block_size, "block_size": block_size,
                     "max_num_seqs": 1024, "max_num_batched_tokens": 262144, "max_model_len": 262144},
        "pods": {"replicas": 1},
        "client": {"timeout_s": 100_000, "max_retries": 0},
    })
    return sc.override(over) if over else sc


def test_the_shipped_trace_reads_whole() -> None:
    mc = read_mooncake(TRACE)
    assert len(mc.prompt) == 12_031
    assert mc.times_s[0] == 0 and np.all(np.diff(mc.times_s) >= 0) and mc.times_s[-1] < 3600
    assert round(float(mc.prompt.mean())) == 12_035 and round(float(mc.output.mean())) == 343


@pytest.mark.slow
def test_replayed_prefix_hits_match_the_bound_from_the_hash_chains_over_the_whole_hour() -> None:
    """The issue's test: one pod, a cache for everything, 512-token blocks (the trace's own), the full hour."""
    r = simulate(replay(TRACE, 4000, 512), 1)
    req = r.requests
    assert len(req) == 12_031 and (req["outcome"] == "ok").all()
    hits = int(req["cached_tokens"].sum())
    bound = prefix_hit_bound(read_mooncake(TRACE))
    assert bound > 50_000_000  # the trace does share prefixes: 37% of its prompt tokens
    assert hits <= bound
    assert hits == pytest.approx(bound, rel=0.01)
    # the time series' vLLM counters count the same tokens
    last = r.timeseries.iloc[-1]
    assert last["prefix_cache_hits"] == hits and last["prefix_cache_queries"] == int(req["prompt_tokens"].sum())


def test_sixteen_token_blocks_match_the_bound_on_the_first_ten_minutes() -> None:
    r = simulate(replay(TRACE, 600, 16), 1)
    req = r.requests
    n = len(req)
    mc = read_mooncake(TRACE)
    head = MooncakeTrace(mc.times_s[:n], mc.prompt[:n], mc.output[:n], mc.hash_ids[:n])
    bound = prefix_hit_bound(head)
    hits = int(req["cached_tokens"].sum())
    assert n > 1500 and hits <= bound and hits == pytest.approx(bound, rel=0.01)


def test_without_prefix_caching_nothing_is_reused_and_steps_compute_every_prompt_token() -> None:
    on = simulate(replay(TRACE, 120, 512), 1)
    off = simulate(replay(TRACE, 120, 512, **{"batching.enable_prefix_caching": False}), 1)
    assert on.requests["cached_tokens"].sum() > 0 and off.requests["cached_tokens"].sum() == 0
    assert on.requests["prompt_tokens"].equals(off.requests["prompt_tokens"])


def test_trace_prefix_expands_512_token_ids_into_full_scheduler_blocks() -> None:
    tp = TracePrefix([np.array([3, 7])], np.array([600]))
    h = tp.block_hashes(0, 128)  # 600 tokens: 4 blocks of id 3, then 0 full blocks of id 7 (600 // 128 = 4)
    assert h.tolist() == [12, 13, 14, 15]
    assert tp.block_hashes(0, 512).tolist() == [3]
    with pytest.raises(ValueError, match="does not divide"):
        tp.block_hashes(0, 100)


def test_a_scenario_reads_the_trace_with_its_prefix(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    rows = [{"timestamp": 0, "input_length": 1100, "output_length": 5, "hash_ids": [0, 1, 2]},
            {"timestamp": 1500, "input_length": 1300, "output_length": 5, "hash_ids": [0, 1, 9]}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    sc = replay(p, 10, 16)
    wl = make_workload(sc, Streams(1))
    assert wl.session_start_s.tolist() == [0.0, 1.5] and wl.prompt_tokens.tolist() == [1100, 1300]
    assert isinstance(wl.prefix, TracePrefix) and len(wl.prefix.block_hashes(1, 16)) == 1300 // 16
    r = simulate(sc, 1)
    # the second request reuses the first's two full 512-token blocks
    assert r.requests["cached_tokens"].tolist() == [0, 1024]


@pytest.mark.parametrize(("line", "message"), [
    ("not json", r"line 2: not a JSON object"),
    ("[1, 2]", r"line 2: expected a JSON object, got list"),
    ('{"timestamp": 5, "input_length": 10, "output_length": 1}', r"line 2: missing field\(s\) hash_ids"),
    ('{"timestamp": -1, "input_length": 10, "output_length": 1, "hash_ids": [1]}', r"line 2: timestamp must be"),
    ('{"timestamp": 5, "input_length": 0, "output_length": 1, "hash_ids": []}', r"line 2: input_length must be"),
    ('{"timestamp": 5, "input_length": 10, "output_length": true, "hash_ids": [1]}', r"line 2: output_length"),
    ('{"timestamp": 5, "input_length": 10, "output_length": 1, "hash_ids": [-1]}', r"line 2: hash_ids must be"),
    ('{"timestamp": 5, "input_length": 10, "output_length": 1, "hash_ids": [99999999999999999999]}',
     r"line 2: hash_ids must be a list of integers in \[0, 2\^63 - 1\]"),  # not numpy's OverflowError
    ('{"timestamp": 5, "input_length": 600, "output_length": 1, "hash_ids": [1]}', r"line 2: hash_ids has 1 ids"),
    ('{"timestamp": 1, "input_length": 10, "output_length": 1, "hash_ids": [1]}', r"line 2: timestamp goes back"),
])
def test_a_malformed_line_is_a_typed_error_naming_it(tmp_path: Path, line: str, message: str) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"timestamp": 2, "input_length": 10, "output_length": 1, "hash_ids": [0]}\n' + line + "\n")
    with pytest.raises(TraceError, match=message):
        read_mooncake(p)


def test_missing_empty_and_binary_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="not found"):
        read_mooncake(tmp_path / "nope.jsonl")
    with pytest.raises(TraceError, match="directory"):
        read_mooncake(tmp_path)
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(TraceError, match="no requests"):
        read_mooncake(tmp_path / "e.jsonl")
    (tmp_path / "b.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TraceError, match="line 1: not UTF-8"):
        read_mooncake(tmp_path / "b.jsonl")
