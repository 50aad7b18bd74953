"""The states a store last wrote or read, kept decoded: a read that returns the same bytes skips decoding,
and an update of a session this store holds starts with one compare-and-set instead of a read.

An entry is the exact bytes stored and the state they encode. Bytes compare equal only to themselves:
every write carries a fresh random ``write_id``, so a matching value is the very state we hold, and a
compare-and-set against those bytes fails on any other writer's value (see ``CAS_EXACT_LUA``).
An entry is ``optimistic`` when the update that wrote it lost no race: where several writers take
turns on a session, what we hold is usually stale, and the update reads first instead.
"""

from __future__ import annotations

from collections import OrderedDict

from capsim.core.state_model import SessionState


class StateCache:
    """A least-recently-used map of session key to (stored bytes, decoded state), bounded in entries
    and in bytes; ``max_entries=0`` keeps nothing."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0
        self._entries: OrderedDict[str, tuple[bytes, SessionState, bool]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def optimistic(self, key: str) -> tuple[bytes, SessionState] | None:
        """The bytes and state held for ``key`` if an update may start from them, else None."""
        entry = self._entries.get(key)
        if entry is None or not entry[2]:
            return None
        self._entries.move_to_end(key)
        return entry[0], entry[1]

    def decoded(self, key: str, raw: bytes) -> SessionState | None:
        """The state we hold for ``key`` if it is exactly ``raw``, else None."""
        entry = self._entries.get(key)
        if entry is None or entry[0] != raw:
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: str, raw: bytes, state: SessionState, optimistic: bool = False) -> None:
        if self._max_entries == 0 or len(raw) > self._max_bytes:
            self.forget(key)
            return
        self.forget(key)
        self._entries[key] = (raw, state, optimistic)
        self._bytes += len(raw)
        while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
            _, (old, _, _) = self._entries.popitem(last=False)
            self._bytes -= len(old)

    def forget(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry[0])
