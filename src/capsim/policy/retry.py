"""The client's retry delay, shared by the simulated client and the real load generator.

Exponential backoff, ``backoff_s x multiplier^(k-1)`` before retry ``k``, with optional jitter: a share
``jitter`` of the delay is drawn at random, ``delay x (1 - jitter x u)`` for ``u`` uniform on [0, 1).
``jitter: 1`` is "full jitter" and ``0.5`` "equal jitter" in the terms of M. Brooker, "Exponential Backoff
And Jitter", AWS Architecture Blog, 2015: spreading retries keeps clients that failed together (a crash,
a full queue) from all coming back at the same instant.
"""

from __future__ import annotations


def retry_delay_s(k: int, backoff_s: float, multiplier: float, jitter: float = 0.0, u: float = 0.0) -> float:
    """Seconds to wait before retry ``k`` (1 for the first); ``u`` is a uniform draw on [0, 1)."""
    if k < 1:
        raise ValueError(f"retry number must be >= 1, got {k}")
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be in [0, 1], got {jitter}")
    if not 0.0 <= u < 1.0:
        raise ValueError(f"u must be in [0, 1), got {u}")
    return backoff_s * multiplier ** (k - 1) * (1.0 - jitter * u)
