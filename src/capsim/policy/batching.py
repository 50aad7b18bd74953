"""The dynamic-batching dispatch rule: when a pod sends its queued requests to the model as one batch.

The real asyncio batcher calls it with ``loop.time()`` and the simulated pod with ``env.now``; both
pass absolute times in seconds on the same monotonic clock as the enqueue times.
"""

from __future__ import annotations

from dataclasses import dataclass

from capsim.model.settings import BatchSettings


@dataclass(frozen=True, slots=True)
class Dispatch:
    """What a pod should do now.

    ``size`` requests (0 means none) leave the head of the queue as one batch. ``wake_at`` is the
    absolute time (s) at which the rule must be asked again if nothing else happens first (a new
    arrival or a batch completing); ``None`` means only an event can change the answer.
    """

    size: int
    wake_at: float | None


def decide(
    now: float,
    queued: int,
    oldest_enqueued_at: float | None,
    settings: BatchSettings,
    in_flight: int = 0,
) -> Dispatch:
    """Decide whether to dispatch a batch.

    A batch leaves when the queue holds ``max_batch_size`` requests, or when the oldest queued request
    (the batch's first) has waited ``max_wait_ms``; never while ``max_concurrent_batches`` batches are
    already in flight. ``now`` and ``oldest_enqueued_at`` are seconds on one monotonic clock.
    """
    if queued < 0 or in_flight < 0:
        raise ValueError(f"queued and in_flight must be >= 0, got {queued} and {in_flight}")
    if queued == 0:
        return Dispatch(0, None)
    if in_flight >= settings.max_concurrent_batches:
        return Dispatch(0, None)
    if queued >= settings.max_batch_size:
        return Dispatch(settings.max_batch_size, None)
    if oldest_enqueued_at is None:
        raise ValueError("oldest_enqueued_at is required when the queue is not empty")
    deadline = oldest_enqueued_at + settings.max_wait_ms / 1000.0
    if now >= deadline:
        return Dispatch(queued, None)
    return Dispatch(0, deadline)
