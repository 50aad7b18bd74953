"""The dispatch rule shared by the real batcher and the simulated pod, tested without any clock."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from capsim.model.settings import BatchSettings
from capsim.policy.batching import Dispatch, decide

S = BatchSettings(max_batch_size=4, max_wait_ms=10, max_concurrent_batches=2)


def test_empty_queue_waits_for_an_event():
    assert decide(5.0, 0, None, S) == Dispatch(0, None)


def test_full_batch_leaves_at_once():
    assert decide(5.0, 4, 5.0, S) == Dispatch(4, None)
    assert decide(5.0, 9, 5.0, S) == Dispatch(4, None)


def test_partial_batch_waits_until_oldest_deadline():
    d = decide(5.0, 2, 4.995, S)
    assert d.size == 0
    assert d.wake_at == pytest.approx(5.005)


def test_partial_batch_leaves_at_deadline_inclusive():
    assert decide(5.01, 3, 5.0, S) == Dispatch(3, None)
    assert decide(5.02, 3, 5.0, S) == Dispatch(3, None)


def test_zero_wait_dispatches_whatever_is_queued():
    s = BatchSettings(max_batch_size=8, max_wait_ms=0)
    assert decide(1.0, 1, 1.0, s) == Dispatch(1, None)


def test_concurrency_limit_blocks_dispatch():
    assert decide(5.0, 4, 0.0, S, in_flight=2) == Dispatch(0, None)
    assert decide(5.0, 4, 0.0, S, in_flight=1) == Dispatch(4, None)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"^queued and in_flight must be >= 0, got -1 and 0$"):
        decide(0.0, -1, None, S)
    with pytest.raises(ValueError, match=r"^queued and in_flight must be >= 0, got 2 and -1$"):
        decide(0.0, 2, 0.0, S, in_flight=-1)  # either one alone is refused
    with pytest.raises(ValueError, match=r"^oldest_enqueued_at is required when the queue is not empty$"):
        decide(0.0, 2, None, S)


@given(
    now=st.floats(0, 1e6),
    age=st.floats(0, 10),
    queued=st.integers(0, 100),
    in_flight=st.integers(0, 4),
    max_batch=st.integers(1, 64),
    wait_ms=st.floats(0, 5000),
    conc=st.integers(1, 4),
)
def test_properties(now, age, queued, in_flight, max_batch, wait_ms, conc):
    s = BatchSettings(max_batch_size=max_batch, max_wait_ms=wait_ms, max_concurrent_batches=conc)
    d = decide(now, queued, now - age if queued else None, s, in_flight)
    assert 0 <= d.size <= min(queued, max_batch)
    if in_flight >= conc:
        assert d.size == 0
    if d.size == 0 and d.wake_at is not None:
        assert d.wake_at > now  # never asks to be woken in the past
        assert queued < max_batch
    if queued >= max_batch and in_flight < conc:
        assert d.size == max_batch
