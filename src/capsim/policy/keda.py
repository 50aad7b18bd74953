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

``idleReplicaCount`` (whose only supported value is 0) and ``fallback`` are not modelled.
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
    """One ScaledObject's scale executor: ``minReplicaCount``, ``cooldownPeriod`` and its last active time."""

    min_replica_count: int = 0
    cooldown_period_s: float = DEFAULT_COOLDOWN_PERIOD_S
    #: ``status.lastActiveTime``: the last poll that found a trigger active (None: never)
    last_active_s: float | None = None

    def __post_init__(self) -> None:
        check_int("min_replica_count", self.min_replica_count, minimum=0)
        check_number("cooldown_period_s", self.cooldown_period_s, minimum=0.0)

    def request_scale(self, now: float, current_replicas: int, active: bool) -> int | None:
        """One poll at ``now``: the replica count KEDA sets, or None when it leaves the count alone."""
        check_number("now", now)
        check_int("current_replicas", current_replicas, minimum=0)
        low = self.min_replica_count
        if current_replicas == 0 and active:
            self.last_active_s = now
            return low if low > 0 else 1
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
