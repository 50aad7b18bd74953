"""The kubelet's restart rule for a crashed container (CrashLoopBackOff), as a pure per-container decision.

Upstream (Kubernetes ``pkg/kubelet/kuberuntime/kuberuntime_manager.go``, ``doBackOff``; client-go
``util/flowcontrol/backoff.go``, ``Backoff``), when a container has exited at ``finishedAt``:

- ``IsInBackOffSince(key, finishedAt)``: with no backoff entry, or an entry that has expired
  (``finishedAt - lastUpdate > 2 * maxDuration``), the container is not in backoff and restarts at once;
  otherwise it waits until ``finishedAt + backoff`` (the pod shows ``CrashLoopBackOff``).
- ``Next(key, finishedAt)`` when it restarts: a new or expired entry starts at ``backOffPeriod`` (10 s),
  otherwise the backoff doubles, capped at ``MaxContainerBackOff`` (300 s); ``lastUpdate`` is the restart time.

So the first exit restarts at once, and exits within 10 minutes of the last restart wait 10, 20, 40, ...
up to 300 s; ten minutes of running (``2 * MaxContainerBackOff``) start the sequence over. The kubelet
backoff has no jitter. The three constants are settings (``pods.crash_loop_backoff``) because clusters
differ: Kubernetes 1.32+ feature gates (``KubeletCrashLoopBackOffMax``, ``ReduceDefaultCrashLoopBackOffDecay``,
KEP-4603) change the initial delay and the cap. Kubernetes is Apache-2.0 (c) The Kubernetes Authors; the
rule is re-implemented here from its source, no code is copied.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ContainerBackOff:
    """One container's backoff entry; :meth:`exited` says how long its restart waits (s)."""

    initial_s: float = 10.0  # kubelet backOffPeriod
    max_s: float = 300.0  # kubelet MaxContainerBackOff
    reset_s: float = 600.0  # client-go hasExpired: 2 * maxDuration
    backoff_s: float | None = None  # the entry's current backoff (None: no entry yet)
    last_update_s: float = 0.0  # when the entry last changed: the last restart

    def exited(self, at_s: float) -> float:
        """The container exited at ``at_s`` (s): the delay (s) until the kubelet restarts it.

        Advances the entry as the restart does (``Next``), so call it once per exit."""
        if self.backoff_s is None or at_s - self.last_update_s > self.reset_s:
            self.backoff_s = self.initial_s
            self.last_update_s = at_s
            return 0.0
        delay = self.backoff_s
        self.backoff_s = min(2.0 * self.backoff_s, self.max_s)
        self.last_update_s = at_s + delay
        return delay
