"""Profile inputs: sweep options that parse to something, files read with errors naming them, nothing overwritten."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from capsim.errors import CapsimError
from capsim.model.profile import ProfileError, ServiceTimeProfile

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "data" / "profiles" / "cpu-tiny-float32.csv"


def test_sweep_options_parse_to_values_or_fail() -> None:
    from capsim.core.profiler import parse_lengths

    assert parse_lengths(None, "--prompt-tokens") is None
    assert parse_lengths(" 64, 16,,16 ", "--prompt-tokens") == (16, 64)
    for text, message in ((",", "holds no lengths"), ("", "holds no lengths"), ("16,abc", "'abc'"),
                          ("16,-4", ">= 1, got -4"), ("1.5", "'1.5'")):
        with pytest.raises(ProfileError, match=message):
            parse_lengths(text, "--context-tokens")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "is a directory"),
        (b"\xff\xfe\x00p\x00h", "not UTF-8"),
        (b"phase,batch_size\n", "line 1 must be the '# capsim-profile:"),
    ],
)
def test_unreadable_profiles_are_profile_errors(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "p.csv"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ProfileError, match=message) as err:
        ServiceTimeProfile.from_csv(path)
    assert isinstance(err.value, CapsimError) and "p.csv" in str(err.value)


def test_run_profile_refuses_to_overwrite_before_measuring(tmp_path: Path) -> None:
    from capsim.core.profiler import run_profile

    kept = tmp_path / "cpu-tiny-float32-quick.csv"
    shutil.copy(PROFILE, kept)
    with pytest.raises(ProfileError, match="exists; pass --force"):
        # the refusal comes before the sweep (~20 s here)
        run_profile("tiny", device="cpu", quick=True, out_dir=tmp_path, overwrite=False, progress=False)
    assert kept.read_bytes() == PROFILE.read_bytes()
    (tmp_path / "file").write_text("")
    with pytest.raises(ProfileError, match="is a file, not a folder"):
        run_profile("tiny", device="cpu", quick=True, out_dir=tmp_path / "file", progress=False)


@pytest.mark.parametrize("device", ["tpu", "xyz", "cuda:99"])
def test_a_device_torch_does_not_know_or_this_machine_lacks_is_refused(device: str) -> None:
    from capsim.core.profiler import check_device

    with pytest.raises(ProfileError, match="--device"):
        check_device(device)
    check_device("cpu")
    check_device("auto")
