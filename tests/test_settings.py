"""BatchSettings: defaults, validation messages that name the field and the value, immutability."""

import pydantic
import pytest

from capsim.model.settings import BatchSettings, SettingsError


def test_defaults_are_valid_and_frozen():
    s = BatchSettings()
    assert (s.max_batch_size, s.max_wait_ms, s.queue_capacity, s.overflow, s.max_concurrent_batches) == (
        32,
        10.0,
        1024,
        "reject",
        1,
    )
    assert s.max_wait_s == pytest.approx(0.01)
    with pytest.raises(pydantic.ValidationError, match="frozen") as info:
        s.max_batch_size = 4  # type: ignore[misc]
    assert [e["type"] for e in info.value.errors()] == ["frozen_instance"]
    assert s.max_batch_size == 32  # and the value did not change


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("max_batch_size", 0, "batching.max_batch_size must be >= 1, got 0"),
        ("max_wait_ms", -1, "batching.max_wait_ms must be >= 0, got -1"),
        ("queue_capacity", 0, "batching.queue_capacity must be >= 1, got 0"),
        ("overflow", "drop", "batching.overflow must be 'reject' or 'wait', got 'drop'"),
        ("max_concurrent_batches", 0, "batching.max_concurrent_batches must be >= 1, got 0"),
    ],
)
def test_invalid_values_name_field_and_value(field, value, expected):
    with pytest.raises(ValueError) as info:
        BatchSettings(**{field: value})
    assert isinstance(info.value, SettingsError)
    assert str(info.value) == expected


def test_unknown_field_is_rejected_by_name():
    with pytest.raises(SettingsError, match="batching.max_batch is not a known setting"):
        BatchSettings(max_batch=3)


def test_wrong_type_names_field():
    with pytest.raises(SettingsError, match="batching.max_batch_size"):
        BatchSettings(max_batch_size="many")
