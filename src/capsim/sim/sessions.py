"""Sessions that grow: each turn's prompt from the session's history, its block hashes, and what a turn costs.

A growing session (``workload.sessions.new_tokens``) keeps an append-only token stream: turn k's prompt is
every earlier prompt and answer plus the new message, so the stream's full blocks are shared by all later
turns and :class:`SessionPrefix` can hash block ``j`` of session ``s`` from ``(s, epoch, j)`` alone.
The epoch counts the session's history losses (TTL expiry, the oldest turns dropped to fit
``max_model_len``): after one the prompt's tokens no longer start as before, so every block hashes anew.

:class:`SessionBook` is the client's record of each session (its context, epoch, the pod and pod life that
served its last turn, when that turn was answered) and the run's session counters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from capsim.model.scenario import (
    ConstantDuration,
    ExponentialDuration,
    LognormalDuration,
    Sessions,
    UniformDuration,
)

if TYPE_CHECKING:
    from capsim.sim.pod import Pod

_TOP = 1 << 61  # every stream hash is at least this: never one of a trace's ids (capsim.sim.prefix)
_INDEX = 39  # bits below a block's index: the stream's id
_EPOCH_BITS, _SESSION_BITS, _INDEX_BITS = 12, 27, 22


def _stream_id(session: int, epoch: int, n: int) -> int:
    """The id (below 2**39) of session ``session``'s stream in epoch ``epoch``, checking that its hashes
    stay distinct and within int64 for blocks up to ``n``."""
    if not 0 <= session < 1 << _SESSION_BITS:
        raise ValueError(f"session {session}: block hashes cover sessions 0 .. {(1 << _SESSION_BITS) - 1}")
    if not 0 <= epoch < 1 << _EPOCH_BITS:
        raise ValueError(f"session {session}: epoch {epoch} (history losses) past {(1 << _EPOCH_BITS) - 1}")
    if n >= 1 << _INDEX_BITS:
        raise ValueError(f"session {session}: {n} KV blocks in one stream, past {(1 << _INDEX_BITS) - 1}")
    return session << _EPOCH_BITS | epoch


def stream_hash_list(session: int, epoch: int, n: int, start: int = 0) -> list[int]:
    """The hashes of blocks ``start .. n-1`` of session ``session``'s stream in epoch ``epoch``:
    ``2**61 + (j + 1) * 2**39 + id`` for block ``j``, with the stream's id ``session * 4096 + epoch``. Distinct
    for distinct (session, epoch, block) (no collision to rule out), positive int64, and a block's index
    fixes its place, as a chained hash does. The id sits in the low bits, so that a dict spreads the
    streams' blocks (Python hashes an int by its value)."""
    base = _TOP + _stream_id(session, epoch, n)
    return list(range(base + (start + 1 << _INDEX), base + (n + 1 << _INDEX), 1 << _INDEX))


def stream_hashes(session: int, epoch: int, n: int, start: int = 0) -> np.ndarray:
    """``stream_hash_list`` as an int64 array."""
    return np.array(stream_hash_list(session, epoch, n, start), dtype=np.int64)


class SessionPrefix:
    """``PrefixSource`` of growing sessions: request ``i`` is turn ``i % turns`` of session ``i // turns``;
    its blocks cover its prompt and answer (the answer is known in advance in the simulator)."""

    def __init__(self, turns: int, n_requests: int) -> None:
        self.turns = turns
        self.epoch = np.zeros(n_requests, dtype=np.int32)  # the session's epoch when the request was sent
        self.prompt: np.ndarray | None = None
        self.output: np.ndarray | None = None

    def bind(self, prompt: np.ndarray, output: np.ndarray) -> None:
        """Read the token counts from these (the run's records, whose prompts the client sets per turn)."""
        self.prompt, self.output = prompt, output

    def block_hashes(self, request: int, block_size: int) -> np.ndarray:
        return np.array(self.block_hash_list(request, block_size), dtype=np.int64)

    def block_hash_list(self, request: int, block_size: int) -> list[int]:
        """:meth:`block_hashes` as a new list of Python ints (the continuous pod's hot path: one ``range``)."""
        if self.prompt is None or self.output is None or request >= len(self.epoch):
            return []  # not bound, or a spare slot: nothing shared
        n = (int(self.prompt[request]) + int(self.output[request])) // block_size
        return stream_hash_list(request // self.turns, int(self.epoch[request]), n)

    def __repr__(self) -> str:
        return f"SessionPrefix(turns={self.turns})"


class ThinkTimes:
    """Think (or tool) times drawn one at a time, in vectorized blocks, from the ``sessions`` stream."""

    def __init__(self, spec: Sessions, gen: np.random.Generator, block: int = 4096) -> None:
        self.spec = spec.think_time_s
        self.constant = self.spec.value_s if isinstance(self.spec, ConstantDuration) else None
        self._gen = gen
        self._block = block
        self._buf: list[float] = []
        self._pos = 0

    def next(self) -> float:
        if self.constant is not None:
            return self.constant
        if self._pos >= len(self._buf):
            self._buf = self._draw(self._block).tolist()
            self._pos = 0
        v = self._buf[self._pos]
        self._pos += 1
        return v

    def _draw(self, n: int) -> np.ndarray:
        s, g = self.spec, self._gen
        if isinstance(s, UniformDuration):
            return g.uniform(s.low_s, s.high_s, n)
        if isinstance(s, ExponentialDuration):
            return g.exponential(s.mean_s, n)
        assert isinstance(s, LognormalDuration)
        return g.lognormal(np.log(s.mean_s) - s.sigma**2 / 2.0, s.sigma, n)  # mean s.mean_s


class SessionBook:
    """Per-session state of the client and the session counters of the run.

    ``message[i]`` is request ``i``'s new message (turn 0: its whole first prompt). ``prompt`` and ``output``
    are the run's record columns; ``begin_turn`` writes a later turn's prompt there when it is first sent.
    """

    def __init__(self, turns: int, message: np.ndarray | None, prompt: np.ndarray, output: np.ndarray,
                 max_model_len: int, policy: str, ttl_s: float | None, prefix: SessionPrefix | None) -> None:
        n_sessions = len(prompt) // turns if turns else 0
        self.turns = turns
        self.message = message  # None: prompts do not grow
        self.prompt = prompt
        self.output = output
        self.max_len = max_model_len
        self.truncate = policy == "truncate_oldest"
        self.ttl_s = ttl_s
        self.prefix = prefix
        self.context = np.zeros(n_sessions, dtype=np.int64)  # history tokens of the current epoch ...
        self.stored = np.zeros(n_sessions, dtype=np.int64)  # ... of which the store holds these (serve_local)
        self.local_turns = np.zeros(n_sessions, dtype=np.int32)  # turns only a pod's local copy holds
        self.first_kept = np.zeros(n_sessions, dtype=np.int32)  # the oldest turn still in the history
        self.epoch = np.zeros(n_sessions, dtype=np.int32)
        self.answered_at = np.full(n_sessions, np.nan)  # when the last turn was answered (the store's write)
        self.last_pod = np.full(n_sessions, -1, dtype=np.int32)  # the pod that served the last turn ...
        self.last_life = np.zeros(n_sessions, dtype=np.int32)  # ... and its incarnation then
        self._routed = np.zeros(len(prompt), dtype=bool)  # a later turn's move was counted
        self.expired = 0
        self.truncated = 0
        self.ended_on_overflow = 0
        self.reprefill_tokens = 0
        self.reprefill = np.zeros(len(prompt), dtype=np.int32)  # per request: its history re-prefilled
        self.affinity_misses = 0
        self.fallbacks = 0
        self.served_local = 0
        self.local_turns_lost = 0
        self.at_risk = np.zeros(n_sessions, dtype=bool)

    # ---- a later turn is sent ---------------------------------------------------------------------------
    def begin_turn(self, i: int, t: float, store_up: bool = True) -> bool:
        """Turn ``i`` (not a first turn) is sent for the first time at ``t``: expire an idle history, set its
        prompt; False when the session ends here instead (it would pass ``max_model_len``).

        ``store_up`` False (``serve_local`` in an outage): the prompt is built from the pod's local copy,
        which may hold turns the store does not. With the store up, those turns are gone (the store is
        the truth, as on the real pod): counted in ``local_turns_lost``."""
        s = i // self.turns
        k = i - s * self.turns
        if self.ttl_s is not None and t - self.answered_at[s] > self.ttl_s:
            # the store dropped the history: the turn starts a fresh conversation
            self.expired += 1
            self.context[s] = self.stored[s] = 0
            self.local_turns[s] = 0
            self.first_kept[s] = k
            self.epoch[s] += 1
        elif store_up and self.local_turns[s]:
            # the turns served from a local copy in an outage never reached the store: the history is shorter
            # (its blocks are still a prefix of the stream, so the epoch stays)
            self.local_turns_lost += int(self.local_turns[s])
            self.local_turns[s] = 0
            self.context[s] = self.stored[s]
        if self.message is None:
            self._stamp(i, s)
            return True
        msg = int(self.message[i])
        ctx = int(self.context[s])
        if ctx + msg + int(self.output[i]) > self.max_len:
            if not self.truncate:
                self.ended_on_overflow += 1
                return False
            first = int(self.first_kept[s])
            base = s * self.turns
            while ctx > 0 and ctx + msg + int(self.output[i]) > self.max_len and first < k:
                ctx -= int(self.message[base + first]) + int(self.output[base + first])
                first += 1
            ctx = max(ctx, 0)
            if ctx + msg + int(self.output[i]) > self.max_len:
                self.ended_on_overflow += 1  # the new message alone does not fit
                return False
            self.truncated += 1
            self.first_kept[s] = first
            self.context[s] = ctx
            if not self.local_turns[s]:
                self.stored[s] = ctx
            self.epoch[s] += 1  # the prompt's first tokens changed: no block is shared any more
        self.prompt[i] = ctx + msg
        self._stamp(i, s)
        return True

    def _stamp(self, i: int, s: int) -> None:
        if self.prefix is not None:
            self.prefix.epoch[i] = self.epoch[s]

    def history_tokens(self, i: int) -> int:
        """Tokens of turn ``i``'s prompt that an earlier turn of its session put there."""
        if self.message is None:
            return 0
        return max(int(self.prompt[i]) - int(self.message[i]), 0)

    # ---- where the turn goes ------------------------------------------------------------------------------
    def cached_on(self, s: int, pod: Pod) -> bool:
        """Whether ``pod`` served session ``s``'s last turn and has lived since (its cache may still hold it)."""
        return int(self.last_pod[s]) == pod.id and int(self.last_life[s]) == pod.incarnation

    def home_usable(self, s: int, pods: list[Pod]) -> bool:
        """Whether the pod that served session ``s``'s last turn still runs the life it served it in and
        takes traffic (not crashed, restarted, scaled down, draining or failing its readiness probe)."""
        p = int(self.last_pod[s])
        if p < 0:
            return False
        pod = pods[p]
        return pod.incarnation == int(self.last_life[s]) and pod.routable

    def placed(self, i: int, pod: Pod, pods: list[Pod]) -> None:
        """An attempt of later turn ``i`` was queued on ``pod``: count, once per turn, a move away from the pod
        that served the session's last turn, and, when that pod could not take it (crashed, restarted, gone,
        draining), the move as a fallback and the history as re-prefilled (a retry after the crash of the
        pod the first attempt went to counts too)."""
        if self._routed[i]:
            return
        s = i // self.turns
        if self.last_pod[s] < 0 or self.cached_on(s, pod):
            return
        self._routed[i] = True
        self.affinity_misses += 1
        if not self.home_usable(s, pods):
            self.fallbacks += 1
            h = self.history_tokens(i)
            self.reprefill[i] = h
            self.reprefill_tokens += h

    def answered(self, i: int, now: float, pod: Pod, stored: bool = True) -> None:
        """Turn ``i`` was answered by ``pod`` at ``now``: the store holds its prompt and answer (``stored``
        False: only the pod's local copy does, the store being out; ``serve_local``)."""
        s = i // self.turns
        if self.message is not None:
            self.context[s] = int(self.prompt[i]) + int(self.output[i])
        if not stored:
            self.local_turns[s] += 1
            self.at_risk[s] = True
            self.served_local += 1
        else:
            self.stored[s] = self.context[s]
            self.local_turns[s] = 0
            self.answered_at[s] = now  # the store's sliding expiry restarts at its write
        self.last_pod[s] = pod.id
        self.last_life[s] = pod.incarnation
