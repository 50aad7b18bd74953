"""cluster-autoscaler's backoff of a node group whose scale-up failed, as a pure rule.

Upstream (``cluster-autoscaler/utils/backoff/exponential_backoff.go``; ``clusterstate/clusterstate.go``,
``registerFailedScaleUpNoLock`` and ``updateScaleRequests``): when a scale-up fails (the cloud reports that
the instances could not be created, an out-of-resources error such as a GPU stockout, or the nodes do not
register within ``--max-node-provision-time``), the node group is backed off:

- ``Backoff(group, now)``: a group with no entry is backed off for ``--initial-node-group-backoff-duration``
  (5 min). A group with an entry keeps its duration if it is backed off still (concurrent failures do not
  double it), and doubles it, capped at ``--max-node-group-backoff-duration`` (30 min), if its backoff has
  passed ("not currently in backoff, but was recently"). It is backed off until ``now`` plus the duration,
  and its last failure is ``now``.
- ``IsBackedOff(group, now)``: while ``now`` is before the end (strictly: at the end it may scale again).
  cluster-autoscaler does not scale a backed-off group up; with several groups (capsim's zones) it picks
  among the others.
- ``RemoveStaleBackoffData(now)``, at every loop: an entry whose last failure is more than
  ``--node-group-backoff-reset-timeout`` (3 h) ago is dropped, so the next failure starts at the initial
  duration again. Here an entry is dropped when it is next read, which gives the same answers.

The cases of upstream's ``exponential_backoff_test.go`` are ported in ``tests/test_gpu_stockouts.py``.
Kubernetes is Apache-2.0 (c) The Kubernetes Authors; the rule is re-implemented here from its source, no code
is copied. Pure: times are passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Entry:
    duration_s: float
    until_s: float
    last_failed_s: float


@dataclass
class NodeGroupBackoff:
    """The backoff entries of the node groups, by key (capsim's zone)."""

    initial_s: float = 300.0  # --initial-node-group-backoff-duration
    max_s: float = 1800.0  # --max-node-group-backoff-duration
    reset_s: float = 10800.0  # --node-group-backoff-reset-timeout
    _entries: dict[int, _Entry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.initial_s <= self.max_s:
            raise ValueError(f"need 0 <= initial_s <= max_s, got {self.initial_s} and {self.max_s}")
        if self.reset_s < 0:
            raise ValueError(f"reset_s must not be negative, got {self.reset_s}")

    def _entry(self, key: int, now: float) -> _Entry | None:
        e = self._entries.get(key)
        if e is not None and e.last_failed_s + self.reset_s < now:  # stale: RemoveStaleBackoffData
            del self._entries[key]
            return None
        return e

    def backoff(self, key: int, now: float) -> float:
        """A scale-up of group ``key`` failed at ``now``: the time until which it is backed off."""
        duration = self.initial_s
        e = self._entry(key, now)
        if e is not None:
            duration = e.duration_s
            if e.until_s < now:  # not backed off now, but was recently: twice as long
                duration = min(2.0 * e.duration_s, self.max_s)
        until = now + duration
        self._entries[key] = _Entry(duration, until, now)
        return until

    def backed_off(self, key: int, now: float) -> bool:
        """Whether group ``key`` may not scale up at ``now``."""
        e = self._entry(key, now)
        return e is not None and e.until_s > now

    def until(self, key: int, now: float) -> float | None:
        """When group ``key``'s backoff ends, if it is backed off at ``now``."""
        e = self._entry(key, now)
        return e.until_s if e is not None and e.until_s > now else None

    def entries(self, now: float) -> int:
        """How many groups hold an entry that is not stale at ``now`` (upstream's ``len(backoffInfo)`` after
        ``RemoveStaleBackoffData(now)``)."""
        for key in list(self._entries):
            self._entry(key, now)
        return len(self._entries)
