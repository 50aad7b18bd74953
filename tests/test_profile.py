"""ServiceTimeProfile: the file format, its errors, interpolation, range checks and the noise model."""

import math

import numpy as np
import pytest

from capsim.model.profile import (
    ProfileError,
    ProfilePoint,
    ProfileRangeError,
    ServiceTimeProfile,
    make_profile,
)

META = {
    "device": "cpu",
    "device_name": "test",
    "model": {"name": "tiny"},
    "dtype": "float32",
    "torch_version": "x",
    "created": "2026-11-27",
}


def linear_profile(std: float = 0.0) -> ServiceTimeProfile:
    """prefill = 1 + 0.01*b*t ms; decode step = 0.5 + 0.1*b + 0.001*c ms."""
    pts = []
    for b in (1, 2, 4, 8):
        for t in (16, 64, 256):
            v = 1 + 0.01 * b * t
            pts.append(ProfilePoint("prefill", b, t, 10, v, v, v, v, std))
        for c in (16, 256, 1024):
            v = 0.5 + 0.1 * b + 0.001 * c
            pts.append(ProfilePoint("decode", b, c, 10, v, v, v, v, std))
    return make_profile(pts, META)


def test_round_trip_through_csv(tmp_path):
    prof = linear_profile(std=0.2)
    path = prof.to_csv(tmp_path / "p.csv")
    back = ServiceTimeProfile.from_csv(path)
    assert back.metadata["schema_version"] == 1
    assert back.metadata["device_name"] == "test"
    assert len(back.points) == len(prof.points)
    assert back.batch_timing(4, 64, 32) == pytest.approx(prof.batch_timing(4, 64, 32))
    frame = back.to_frame()
    assert list(frame.columns)[:3] == ["phase", "batch_size", "tokens"]
    assert len(frame) == 24


def test_exact_points_and_bilinear_interpolation():
    prof = linear_profile()
    assert prof.phase_ms("prefill", 4, 64)[0] == pytest.approx(1 + 0.01 * 4 * 64)
    # decode is linear in both axes, so interpolation is exact between grid points
    assert prof.phase_ms("decode", 3, 100)[0] == pytest.approx(0.5 + 0.3 + 0.1)
    # prefill is bilinear (b*t): exact on the cell's corners, interpolated inside
    mid = prof.phase_ms("prefill", 3, 40)[0]
    corners = [1 + 0.01 * b * t for b in (2, 4) for t in (16, 64)]
    assert min(corners) < mid < max(corners)


def test_batch_timing_is_prefill_plus_decode_steps_of_longest_output():
    prof = linear_profile()
    timing = prof.batch_timing(2, 64, 11)
    prefill = 1 + 0.01 * 2 * 64
    # 10 decode steps over contexts 64..73: linear, so the mean context 69 gives the exact sum
    decode = sum(0.5 + 0.2 + 0.001 * c for c in range(64, 74))
    assert timing.prefill_s == pytest.approx(prefill / 1000)
    assert timing.total_s == pytest.approx((prefill + decode) / 1000)
    assert prof.batch_timing(2, 64, 1).total_s == pytest.approx(prefill / 1000)


def test_outside_range_raises_unless_extrapolating():
    prof = linear_profile()
    with pytest.raises(ProfileRangeError, match="batch_size=16 is outside the measured range"):
        prof.batch_timing(16, 64, 4)
    with pytest.raises(ProfileRangeError, match="decode context"):
        prof.batch_timing(2, 64, 2000)
    with pytest.raises(ProfileRangeError, match="tokens=1000"):
        prof.batch_timing(2, 1000, 2)
    far = prof.batch_timing(16, 64, 4, extrapolate=True)
    assert far.total_s > prof.batch_timing(8, 64, 4).total_s


def test_noise_matches_measured_mean_and_spread():
    prof = linear_profile(std=0.3)
    rng = np.random.default_rng(7)
    draws = np.array([prof.batch_timing(4, 64, 1, rng=rng).prefill_s for _ in range(20000)]) * 1000
    mean = 1 + 0.01 * 4 * 64
    assert draws.mean() == pytest.approx(mean, rel=0.01)
    assert draws.std() == pytest.approx(0.3, rel=0.05)
    assert draws.min() > 0
    # same seed, same draws
    a = [prof.batch_timing(4, 64, 9, rng=np.random.default_rng(3)) for _ in range(2)]
    assert a[0] == a[1]


def write(tmp_path, text):
    p = tmp_path / "bad.csv"
    p.write_text(text)
    return p


HEADER = "phase,batch_size,tokens,count,mean_ms,p50_ms,p90_ms,p99_ms,std_ms\n"


def meta_line(**extra):
    import json

    return "# capsim-profile: " + json.dumps({**META, "schema_version": 1, **extra}) + "\n"


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ProfileError, match="profile file not found: .*nope.csv"):
        ServiceTimeProfile.from_csv(tmp_path / "nope.csv")


def test_missing_column_names_file_and_column(tmp_path):
    p = write(tmp_path, meta_line() + HEADER.replace(",p99_ms", "") + "prefill,1,16,3,1,1,1,1\n")
    with pytest.raises(ProfileError, match=r"bad.csv: missing column 'p99_ms'"):
        ServiceTimeProfile.from_csv(p)


def test_unknown_schema_version(tmp_path):
    p = write(tmp_path, meta_line(schema_version=99) + HEADER)
    with pytest.raises(ProfileError, match="bad.csv: unknown schema_version 99"):
        ServiceTimeProfile.from_csv(p)


def test_missing_metadata_line(tmp_path):
    p = write(tmp_path, HEADER)
    with pytest.raises(ProfileError, match="line 1 must be"):
        ServiceTimeProfile.from_csv(p)


def test_bad_row_names_line_and_column(tmp_path):
    rows = "prefill,1,16,3,1,1,1,1,0\ndecode,1,16,3,abc,1,1,1,0\n"
    p = write(tmp_path, meta_line() + HEADER + rows)
    with pytest.raises(ProfileError, match=r"bad.csv: line 4: column 'mean_ms' must be a number, got 'abc'"):
        ServiceTimeProfile.from_csv(p)


def test_bad_phase_and_incomplete_grid(tmp_path):
    p = write(tmp_path, meta_line() + HEADER + "warmup,1,16,3,1,1,1,1,0\n")
    with pytest.raises(ProfileError, match="line 3: column 'phase'"):
        ServiceTimeProfile.from_csv(p)
    rows = "prefill,1,16,3,1,1,1,1,0\nprefill,2,64,3,1,1,1,1,0\ndecode,1,16,3,1,1,1,1,0\n"
    p = write(tmp_path, meta_line() + HEADER + rows)
    with pytest.raises(ProfileError, match="prefill grid is incomplete: no row for batch_size=1, tokens=64"):
        ServiceTimeProfile.from_csv(p)


def test_batch_timing_rejects_nonsense():
    with pytest.raises(ValueError, match="must be >= 1"):
        linear_profile().batch_timing(0, 10, 10)


def test_committed_cpu_profile_loads_and_is_monotone_in_batch():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "data" / "profiles" / "cpu-tiny-float32.csv"
    prof = ServiceTimeProfile.from_csv(path)
    assert prof.metadata["device"] == "cpu"
    times = [prof.batch_timing(b, 64, 32).total_s for b in prof.batch_sizes()]
    assert all(math.isfinite(t) and t > 0 for t in times)
    # a batch of 32 costs far less than 32 batches of 1: the point of batching
    assert times[-1] < 0.5 * prof.batch_sizes()[-1] * times[0]
