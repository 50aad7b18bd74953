"""KEDA's own step between zero and one replica: the scale executor of a ScaledObject, pure and clock-free.

KEDA (keda.sh) drives a Deployment in two parts. Between one and ``maxReplicaCount`` replicas the HPA it
creates scales on the triggers' External metrics (that HPA's ``minReplicas`` is ``minReplicaCount``, or 1
when that is 0: :func:`hpa_min_replicas`; at zero replicas the HPA's scaling is disabled). The step to and
from zero is KEDA's: every ``pollingInterval`` its operator asks each trigger whether it is *active* (a
Prometheus trigger: its query's value above ``activationThreshold``, 0 by default; a trigger whose query
fails is not active) and :meth:`ScaleExecutor.request_scale` acts on the answer, as ``RequestScale`` in
``pkg/scaling/executor/scale_scaledobjects.go`` (kedacore/keda, Apache-2.0; the rule is re-implemented):

* zero replicas and a trigger active: scale to ``minReplicaCount`` (1 if it is 0), and note the time as
  the last active one;
* no trigger active, replicas above zero and ``minReplicaCount`` 0: scale to zero once the last active
  time is more than ``cooldownPeriod`` ago (at once if there was never one: the Deployment was scaled
  outside KEDA);
* no trigger active and fewer replicas than ``minReplicaCount``: set ``minReplicaCount``;
* a trigger active otherwise: only note the time as the last active one.

A trigger whose query fails (Prometheus down) is not active, and the poll is *in error*. With a
``fallback`` whose ``replicas`` is not 0, a poll in error with no trigger active sets ``fallback.replicas``
(``doFallbackScaling``), before any other rule. Without one the rules above apply as to an idle
Deployment: a ``minReplicaCount`` of 0 goes to zero once the cooldown has passed since the last active
poll, in the middle of traffic (kedacore/keda#965, open). The rule is re-implemented from the
``RequestScale`` that takes ``isError`` (recent releases; older ones had no fallback in the executor).

The HPA that KEDA creates reads each trigger's metric from KEDA's metrics server, which counts the
consecutive failed reads of each metric (``status.health``, ``pkg/fallback/fallback.go``
``GetMetricsWithFallback``): a success resets the count; a failure answers the HPA with an error (the HPA
holds, as with any failed metric), unless a fallback is set, the target is an ``AverageValue`` and the
count is above ``failureThreshold``: then the answer is ``int(target) x fallback.replicas``
(:class:`FallbackHealth`), so the HPA proposes ``fallback.replicas`` (for an integer target). KEDA's
``fallback.behavior`` (recent releases' ``currentReplicas`` and its variants) is not modelled: it is
``static``, the default. ``idleReplicaCount`` (whose only supported value is 0) is not modelled either.
"""

from __future__ import annotations

from dataclasses import dataclass

from capsim.policy.hpa_types import check_int, check_number

#: KEDA's default ``cooldownPeriod`` (seconds).
DEFAULT_COOLDOWN_PERIOD_S = 300.0


def hpa_min_replicas(min_replica_count: int) -> int:
    """``minReplicas`` of the HPA that KEDA creates for a ScaledObject (``getHPAMinReplicas``)."""
    return min_replica_count if min_replica_count > 0 else 1


@dataclass
class ScaleExecutor:
    """One ScaledObject's scale executor: ``minReplicaCount``, ``cooldownPeriod``, ``fallback.replicas``
    (None: no fallback) and its last active time."""

    min_replica_count: int = 0
    cooldown_period_s: float = DEFAULT_COOLDOWN_PERIOD_S
    #: ``status.lastActiveTime``: the last poll that found a trigger active (None: never)
    last_active_s: float | None = None
    fallback_replicas: int | None = None

    def __post_init__(self) -> None:
        check_int("min_replica_count", self.min_replica_count, minimum=0)
        check_number("cooldown_period_s", self.cooldown_period_s, minimum=0.0)
        if self.fallback_replicas is not None:
            check_int("fallback_replicas", self.fallback_replicas, minimum=0)

    def request_scale(self, now: float, current_replicas: int, active: bool, error: bool = False) -> int | None:
        """One poll at ``now``: the replica count KEDA sets, or None when it leaves the count alone.

        ``error``: a trigger's query failed this poll (a failed trigger is never active)."""
        check_number("now", now)
        check_int("current_replicas", current_replicas, minimum=0)
        low = self.min_replica_count
        if current_replicas == 0 and active:
            self.last_active_s = now
            return low if low > 0 else 1
        if not active and error and self.fallback_replicas:  # doFallbackScaling: set even when equal
            return self.fallback_replicas
        if not active and current_replicas > 0 and low == 0:
            last = self.last_active_s
            if last is None or last + self.cooldown_period_s < now:
                return 0
            return None  # cooling down
        if not active and current_replicas < low:
            return low
        if active:
            self.last_active_s = now
        return None


class FallbackHealth:
    """KEDA's metrics server answering the HPA: the consecutive failed reads of each metric and, past
    ``failure_threshold`` of them, the fallback's value (``GetMetricsWithFallback``, ``doFallback``)."""

    def __init__(self, failure_threshold: int | None, replicas: int) -> None:
        """``failure_threshold`` None: no fallback (every failed read is an error to the HPA)."""
        if failure_threshold is not None:
            check_int("failure_threshold", failure_threshold, minimum=0)
        check_int("replicas", replicas, minimum=0)
        self.failure_threshold = failure_threshold
        self.replicas = replicas
        #: metric index -> consecutive failed reads (``status.health[metric].numberOfFailures``)
        self.failures: dict[int, int] = {}
        self.fallbacks = 0  # reads answered with the fallback's value

    def read(self, metric: int, value: float | None, failed: bool, average_target: float | None) -> float | None:
        """What the HPA gets for ``metric`` whose query gave ``value`` (``failed``: the query failed):
        ``value`` on success; on a failure None (an error) or, with a fallback, an ``AverageValue`` target
        and more than ``failure_threshold`` failures in a row, ``int(average_target) x replicas``."""
        if not failed:
            self.failures[metric] = 0
            return value
        n = self.failures[metric] = self.failures.get(metric, 0) + 1
        if self.failure_threshold is None or average_target is None or n <= self.failure_threshold:
            return None
        self.fallbacks += 1
        return float(int(average_target) * self.replicas)  # doFallback: int64(target's float) x replicas
