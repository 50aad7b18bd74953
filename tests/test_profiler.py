"""The profiler: a small real sweep yields a valid, loadable profile whose numbers behave."""

import statistics
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from capsim.cli import app
from capsim.core.engine import ReferenceEngine
from capsim.core.profiler import (
    ProfileSpec,
    _Timer,
    measure,
    measure_rounds,
    powers_of_two,
    profile_engine,
    profile_filename,
)
from capsim.model.profile import ServiceTimeProfile

SMALL = ProfileSpec(
    batch_sizes=(1, 8),
    prompt_tokens=(8, 64),
    context_tokens=(8, 128),
    warmup=1,
    min_reps=3,
    max_reps=6,
    max_point_s=0.2,
)


def test_powers_of_two():
    assert powers_of_two(1) == (1,)
    assert powers_of_two(48) == (1, 2, 4, 8, 16, 32)
    with pytest.raises(ValueError):
        powers_of_two(0)


def test_spec_validation():
    with pytest.raises(ValueError, match="ProfileSpec.batch_sizes"):
        ProfileSpec(batch_sizes=())
    with pytest.raises(ValueError, match="min_reps"):
        ProfileSpec(min_reps=2)


def test_measure_stops_at_cap():
    calls = []
    from capsim.core.profiler import _Timer

    class FakeTimer(_Timer):
        def __call__(self, fn):
            fn()
            return float(len(calls))  # ever-growing: never stable

    samples = measure(lambda: calls.append(1), FakeTimer(None), SMALL)  # type: ignore[arg-type]
    assert len(samples) == SMALL.max_reps
    assert len(calls) == SMALL.max_reps + SMALL.warmup


class SpellTimer(_Timer):
    """Each call of point ``fn`` takes its base time, 1.8 times as long while the call count is in ``slow``."""

    def __init__(self, slow: range) -> None:
        self.calls, self.slow = 0, slow

    def __call__(self, fn):
        t = fn() * (1.8 if self.calls in self.slow else 1.0)
        self.calls += 1
        return t


def test_shuffled_rounds_spread_a_slow_spell_over_every_point_where_one_pass_bends_the_profile():
    spec = ProfileSpec(batch_sizes=(1,), warmup=1, min_reps=3, max_reps=9, rel_tol=-1.0, max_point_s=60.0)  # never settles
    fns = [lambda b=b: float(b) for b in (1, 2, 3, 4)]  # each "kernel" returns its base time in ms
    slow = range(20, 36)  # 16 calls at 1.8 times the base time
    one_pass = [statistics.median(measure(fn, SpellTimer(slow), spec)) for fn in fns]
    assert one_pass == [1.0, 2.0, 3.0, 4.0]  # each point on a fresh timer: no spell reaches it, as a check
    timer = SpellTimer(slow)
    in_order = [statistics.median(measure(fn, timer, spec)) for fn in fns]
    assert in_order == pytest.approx([1.0, 2.0, 5.4, 7.2])  # the points timed during the spell read slow
    timer = SpellTimer(slow)
    rounds = measure_rounds(fns, timer, spec, seed=1)
    # 4 warm-ups, then 3 rounds of 4 visits, each one untimed call and 3 timed: the spell is the second round
    assert timer.calls == 4 + 3 * 4 * 4 and [len(r) for r in rounds] == [9] * 4
    assert [statistics.median(r) for r in rounds] == [1.0, 2.0, 3.0, 4.0]  # 3 of each point's 9 samples slow


def test_shuffled_rounds_stop_when_every_median_settles():
    spec = ProfileSpec(batch_sizes=(1,), warmup=0, min_reps=3, max_reps=30, rel_tol=0.02)
    rounds = measure_rounds([lambda: 1.0, lambda: 2.0], SpellTimer(range(0)), spec)
    assert [len(r) for r in rounds] == [6, 6]  # the first check sets each median, the second finds it unmoved


def test_profile_engine_writes_a_loadable_profile(tmp_path):
    engine = ReferenceEngine("tiny", device="cpu")
    prof = profile_engine(engine, SMALL, progress=False)
    assert len(prof.points) == 2 * 2 + 2 * 2
    assert prof.metadata["device"] == "cpu" and prof.metadata["timer"] == "perf_counter"
    assert prof.metadata["model"]["name"] == "tiny"
    assert profile_filename(prof) == "cpu-tiny-float32.csv"
    back = ServiceTimeProfile.from_csv(prof.to_csv(tmp_path / profile_filename(prof)))
    for p in back.points:
        assert p.count >= SMALL.min_reps
        assert 0 < p.p50_ms <= p.p99_ms
    # longer prompts cost more to prefill than short ones at the largest batch (about 2.8 against 1.1 ms), read
    # from the points' medians: a mean of 3 to 6 wall-clock samples moves by a few ms when the OS holds the
    # process off its core during some of them, which the median of the short point shrugs off
    p50 = {(p.phase, p.batch_size, p.tokens): p.p50_ms for p in back.points}
    assert p50[("prefill", 8, 64)] > p50[("prefill", 8, 8)]


def test_an_interleaved_sweep_measures_every_point_in_rounds(tmp_path):
    engine = ReferenceEngine("tiny", device="cpu")
    prof = profile_engine(engine, replace(SMALL, interleave=True), progress=False)
    assert len(prof.points) == 8 and prof.metadata["sweep"]["interleave"] is True
    counts = {p.count for p in prof.points}  # every point the same number of rounds (less dropped outliers)
    assert max(counts) <= SMALL.max_reps and min(counts) >= SMALL.min_reps
    p50 = {(p.phase, p.batch_size, p.tokens): p.p50_ms for p in prof.points}
    assert p50[("prefill", 8, 64)] > p50[("prefill", 8, 8)]


def test_cli_profile_quick_with_small_sweep(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "profile",
            "--quick",
            "--max-batch-size",
            "2",
            "--prompt-tokens",
            "8,16",
            "--context-tokens",
            "8,16",
            "--out-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    path = Path(tmp_path) / "cpu-tiny-float32-quick.csv"
    assert path.exists()
    assert "median latency" in result.output
    assert ServiceTimeProfile.from_csv(path).metadata["quick"] is True


def test_cli_profile_rejects_bad_lists(tmp_path):
    result = CliRunner().invoke(app, ["profile", "--prompt-tokens", "a,b", "--out-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "--prompt-tokens takes comma-separated integers" in result.output
