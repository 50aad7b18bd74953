"""The simulated pod's service time equals the profile's definition; arrivals and trace reading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from capsim.model.profile import ProfilePoint, ProfileRangeError, ServiceTimeProfile, make_profile
from capsim.model.scenario import PiecewiseArrivals, PoissonArrivals
from capsim.sim.arrivals import TraceError, read_trace, session_starts
from capsim.sim.service import ProfileService
from capsim.sim.streams import STREAM_NAMES, BufferedDraws, Streams

ROOT = Path(__file__).resolve().parent.parent
TRACE = ROOT / "data" / "traces" / "azure_llm_conv_2023.csv"


def synthetic_profile() -> ServiceTimeProfile:
    pts = []
    for b in (1, 2, 4, 8, 16, 32):
        for t in (16, 64, 256, 1024):
            pre = 1.0 + 0.01 * b * t
            dec = 2.0 + 0.1 * b + 0.001 * t
            pts.append(ProfilePoint("prefill", b, t, 10, pre, pre, pre, pre, 0.1 * pre))
            pts.append(ProfilePoint("decode", b, t, 10, dec, dec, dec, dec, 0.05 * dec))
    return make_profile(pts, {"device": "cpu", "device_name": "t", "model": "m", "dtype": "f32",
                              "torch_version": "-", "created": "-"})


CPU = ROOT / "data" / "profiles" / "cpu-tiny-float32.csv"  # committed: a missing file must fail, not shrink the cases
PROFILES = [synthetic_profile(), ServiceTimeProfile.from_csv(CPU)]


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.source)
@pytest.mark.parametrize("noise", [False, True])
def test_profile_service_equals_batch_timing(profile: ServiceTimeProfile, noise: bool) -> None:
    svc = ProfileService(profile, np.random.default_rng(7) if noise else None)
    ref_gen = np.random.default_rng(7)
    draw = np.random.default_rng(0)
    for _ in range(3000):
        b, p, o = int(draw.integers(1, 40)), int(draw.integers(1, 1500)), int(draw.integers(1, 3000))
        try:
            bt = profile.batch_timing(b, p, o, rng=ref_gen if noise else None)
        except ProfileRangeError:
            with pytest.raises(ProfileRangeError):
                svc.batch_time(b, p, o)
            continue
        pre, total = svc.batch_time(b, p, o)
        assert pre == pytest.approx(bt.prefill_s, rel=1e-9)
        assert total == pytest.approx(bt.total_s, rel=1e-9)


def test_streams_are_named_and_independent() -> None:
    a, b = Streams(5), Streams(5)
    assert STREAM_NAMES[:5] == ("arrivals", "lengths", "service", "crashes", "routing")
    assert a["arrivals"].random() == b["arrivals"].random()
    assert a["service"].random() != Streams(5)["arrivals"].random()
    with pytest.raises(KeyError, match="unknown stream"):
        a["weather"]


def test_buffered_draws_equal_one_long_draw() -> None:
    d = BufferedDraws(np.random.default_rng(1), "exponential", block=7)
    got = [d.next() for _ in range(30)]
    assert got == np.random.default_rng(1).standard_exponential(35)[:30].tolist()


def test_poisson_and_piecewise_counts() -> None:
    gen = np.random.default_rng(0)
    t = session_starts(PoissonArrivals(kind="poisson", rate_per_s=50), 1000, gen)
    assert abs(len(t) - 50_000) < 4 * 50_000**0.5
    assert np.all(np.diff(t) >= 0) and t[-1] < 1000
    steps = PiecewiseArrivals(kind="piecewise", rate_per_s=((0, 10), (100, 0), (200, 40)))
    t = session_starts(steps, 300, gen)
    assert not np.any((t >= 100) & (t < 200))
    assert abs(np.sum(t < 100) - 1000) < 4 * 1000**0.5
    assert abs(np.sum(t >= 200) - 4000) < 4 * 4000**0.5


def test_trace_is_read_relative_to_its_first_row() -> None:
    times, prompt, output = read_trace(TRACE)
    rows = sum(1 for _ in TRACE.open()) - 1
    assert len(times) == rows
    assert times[0] == 0 and np.all(np.diff(times) >= 0)
    assert prompt[0] == 374 and output[0] == 44


@pytest.mark.parametrize(
    ("body", "line"),
    [
        ("2023-11-16 18:15:46.68,374,44\nyesterday,1,2\n", "line 3"),
        ("2023-11-16 18:15:46.68,374,44\n2023-11-16 18:15:47,x,2\n", "line 3"),
        ("2023-11-16 18:15:46.68,374\n", "line 2"),
        ("2023-11-16 18:15:46.68,374,44\n2023-11-16 18:15:40,1,2\n", "line 3"),
    ],
)
def test_malformed_trace_rows_name_file_and_line(tmp_path: Path, body: str, line: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + body)
    with pytest.raises(TraceError, match=rf"t\.csv: {line}"):
        read_trace(path)
    with pytest.raises(TraceError, match="not found"):
        read_trace(tmp_path / "none.csv")
