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
  time is more than ``cooldownPeriod`` ago; if there was never one (a ScaledObject just created, or a
  Deployment scaled outside KEDA), once its creation is more than ``initialCooldownPeriod`` ago (0 by
  default: at once);
* no trigger active and fewer replicas than ``minReplicaCount``: set ``minReplicaCount``;
* a trigger active otherwise: only note the time as the last active one.

With ``idleReplicaCount`` set (*idle mode*; its only supported value is 0, kedacore/keda#2314, and it must be
below the HPA's ``minReplicas``) the Deployment goes to zero whatever ``minReplicaCount`` is: a trigger active
and fewer replicas than ``minReplicaCount`` scales to ``minReplicaCount`` (from zero too); no trigger active and
more replicas than ``idleReplicaCount`` scales to it once the cooldown has passed; and ``minReplicaCount`` is
never set while no trigger is active (``scaleFromZeroOrIdle``, ``scaleToZeroOrIdle``,
``getIdleOrMinimumReplicaCount``). So ``minReplicaCount: 2`` with ``idleReplicaCount: 0`` keeps at least two
pods while there is traffic and none after a cooldown without it; between them the HPA, whose
``minReplicas`` is 2, is disabled at zero.

A trigger whose query fails (Prometheus down) is not active, and the poll is *in error*. What the operator
does then changed in KEDA 2.17 (kedacore/keda#6659, commit 914163cb), and what the fallback answers the HPA
in 2.18, so the executor and :class:`FallbackHealth` take a ``release``:

* ``"2.20"``, ``"2.18"`` (2.18 and later, the default) and ``"2.17"``: a poll in error with no trigger active changes
  nothing, with no fallback or one whose ``replicas`` is not 0 (``RequestScale``'s ``isError`` cases only log and set the
  Ready condition). A Deployment serving when Prometheus goes down keeps its pods; one at zero stays at
  zero, fallback or not (kedacore/keda#7239, open: the HPA, which applies the fallback, is disabled at zero
  replicas). A fallback of ``replicas: 0`` matches neither case, so such a poll falls through to the rules
  above as an idle one: a ``minReplicaCount`` of 0 (or idle mode) goes to zero once the cooldown has passed.
  A poll that finds a trigger active while another fails only sets the Ready condition: it does not count
  as activity.
* ``"2.16"`` (the releases before 2.17 whose executor takes ``isError``): with a ``fallback`` whose
  ``replicas`` is not 0, a poll in error with no trigger active sets ``fallback.replicas``
  (``doFallbackScaling``), before any other rule, also from zero. Without one the rules above apply as to
  an idle Deployment: a ``minReplicaCount`` of 0 goes to zero once the cooldown has passed since the last
  active poll, in the middle of traffic (kedacore/keda#965).

The HPA that KEDA creates reads each trigger's metric from KEDA's metrics server, which counts the
consecutive failed reads of each metric (``status.health``, ``pkg/fallback/fallback.go``
``GetMetricsWithFallback``): a success resets the count; a failure answers the HPA with an error (the HPA
holds, as with any failed metric), unless a fallback is set and the count is above ``failureThreshold``:
then the answer is the value that makes the HPA propose ``n`` (:class:`FallbackHealth`). Until 2.17 only an
``AverageValue`` target has one, ``int(target) x n`` (for an integer target the HPA proposes ``n``); from 2.18
(kedacore/keda#6655; documented for 2.18 in kedacore/keda-docs#1606) ``target x n`` in whole thousandths, and
a ``Value`` target has one too, ``target x n / readyReplicas`` (none while no pod is ready). ``n`` is by
``fallback.behavior`` (``doFallback``, 2.17 on): ``static`` (the default) ``fallback.replicas``;
``currentReplicas`` the Deployment's count; ``currentReplicasIfHigher`` the higher of the two;
``currentReplicasIfLower`` the lower. In 2.17 and later this is the only way a fallback acts, through the
HPA's behavior (its policies and windows). ``"2.20"`` differs from ``"2.18"`` only with scalingModifiers and a fallback
(``capsim.sim.hpa``: the composite while a fallback is on is one fallback value, kedacore/keda#7790, not every
trigger's summed); capsim knows no other change of 2.19 or 2.20 to the rules modelled here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from capsim.policy.hpa_types import check_int, check_number

#: KEDA releases whose operator (2.16 against later), fallback (2.18 against earlier) or fallback with
#: scalingModifiers (2.20 against earlier) differ (see the module docstring)
Release = Literal["2.20", "2.18", "2.17", "2.16"]
RELEASES: tuple[Release, ...] = get_args(Release)

#: ``fallback.behavior`` (KEDA 2.17 on)
FallbackBehavior = Literal["static", "currentReplicas", "currentReplicasIfHigher", "currentReplicasIfLower"]
FALLBACK_BEHAVIORS: tuple[FallbackBehavior, ...] = get_args(FallbackBehavior)

#: KEDA's default ``cooldownPeriod`` (seconds).
DEFAULT_COOLDOWN_PERIOD_S = 300.0


def release_at_least(release: str, floor: str) -> bool:
    """Whether KEDA ``release`` is ``floor`` or later (``"2.20"`` is after ``"2.18"``)."""
    def key(r: str) -> tuple[int, ...]:
        return tuple(int(x) for x in r.split("."))

    return key(release) >= key(floor)


def metric_value(value: float) -> float:
    """A trigger's value as KEDA hands it to the HPA: in whole thousandths, truncated towards zero
    (``GenerateMetricInMili``: ``NewMilliQuantity(int64(value x 1000))``). KEDA decides a trigger's activity on
    the value before this (``value > activationThreshold``)."""
    return math.trunc(value * 1000) / 1000


def hpa_min_replicas(min_replica_count: int) -> int:
    """``minReplicas`` of the HPA that KEDA creates for a ScaledObject (``getHPAMinReplicas``)."""
    return min_replica_count if min_replica_count > 0 else 1


@dataclass
class ScaleExecutor:
    """One ScaledObject's scale executor: ``minReplicaCount``, ``cooldownPeriod``, ``fallback.replicas``
    (None: no fallback), its last active time, the KEDA ``release`` whose rules it follows,
    ``idleReplicaCount`` (None: not set), and ``initialCooldownPeriod`` with the time the ScaledObject was
    created (they matter only while no poll has found a trigger active)."""

    min_replica_count: int = 0
    cooldown_period_s: float = DEFAULT_COOLDOWN_PERIOD_S
    #: ``status.lastActiveTime``: the last poll that found a trigger active (None: never)
    last_active_s: float | None = None
    fallback_replicas: int | None = None
    release: Release = "2.18"
    idle_replica_count: int | None = None
    initial_cooldown_period_s: float = 0.0
    created_s: float = 0.0  # the ScaledObject's creationTimestamp

    def __post_init__(self) -> None:
        check_int("min_replica_count", self.min_replica_count, minimum=0)
        check_number("cooldown_period_s", self.cooldown_period_s, minimum=0.0)
        check_number("initial_cooldown_period_s", self.initial_cooldown_period_s, minimum=0.0)
        check_number("created_s", self.created_s)
        if self.fallback_replicas is not None:
            check_int("fallback_replicas", self.fallback_replicas, minimum=0)
        check_release(self.release)
        if self.idle_replica_count is not None:
            check_idle_replica_count(self.idle_replica_count)

    def request_scale(self, now: float, current_replicas: int, active: bool, error: bool = False) -> int | None:
        """One poll at ``now``: the replica count KEDA sets, or None when it leaves the count alone.

        ``error``: a trigger's query failed this poll (a failed trigger is never active)."""
        check_number("now", now)
        check_int("current_replicas", current_replicas, minimum=0)
        low = self.min_replica_count
        idle = self.idle_replica_count
        if active:
            if current_replicas == 0 or (idle is not None and current_replicas < low):  # scaleFromZeroOrIdle
                self.last_active_s = now
                return low if low > 0 else 1
            if not (error and self.release != "2.16"):  # 2.17 on: some trigger failed, only a condition
                self.last_active_s = now
            return None
        if error:
            if self.release == "2.16":
                if self.fallback_replicas:  # doFallbackScaling: set even when equal
                    return self.fallback_replicas
            elif self.fallback_replicas != 0:
                return None  # 2.17 on: only the conditions change; a fallback acts through the HPA
            # 2.16 without a fallback, or a fallback of 0 replicas: the rules of an idle poll
        if (idle is not None and current_replicas > idle) or (current_replicas > 0 and low == 0):
            last = self.last_active_s
            if (last + self.cooldown_period_s < now if last is not None  # scaleToZeroOrIdle
                    else self.created_s + self.initial_cooldown_period_s < now):
                return idle if idle is not None else low
            return None  # cooling down (or, never active yet, in the initial cooldown)
        if current_replicas < low and idle is None:
            return low
        return None


def check_release(release: str) -> None:
    """``release`` is one of :data:`RELEASES`."""
    if release not in RELEASES:
        raise ValueError(f"release must be one of {', '.join(RELEASES)}, got {release!r}")


def check_idle_replica_count(idle: int) -> None:
    """``idleReplicaCount`` as KEDA takes it: 0, the only value it supports (kedacore/keda#2314: the HPA, whose
    ``minReplicas`` is ``minReplicaCount``, would take any other count straight back up). 0 is below any HPA's
    ``minReplicas`` (at least 1), as the admission webhook's ``CheckReplicaCountBoundsAreValid`` asks."""
    check_int("idle_replica_count", idle, minimum=0)
    if idle != 0:
        raise ValueError(f"idle_replica_count must be 0, the only value KEDA supports (kedacore/keda#2314), "
                         f"got {idle}")


class FallbackHealth:
    """KEDA's metrics server answering the HPA: the consecutive failed reads of each metric and, past
    ``failure_threshold`` of them, the fallback's value (``GetMetricsWithFallback``, ``doFallback``)."""

    def __init__(self, failure_threshold: int | None, replicas: int, behavior: FallbackBehavior = "static",
                 release: Release = "2.18") -> None:
        """``failure_threshold`` None: no fallback (every failed read is an error to the HPA)."""
        if failure_threshold is not None:
            check_int("failure_threshold", failure_threshold, minimum=0)
        check_int("replicas", replicas, minimum=0)
        if behavior not in FALLBACK_BEHAVIORS:
            raise ValueError(f"behavior must be one of {', '.join(FALLBACK_BEHAVIORS)}, got {behavior!r}")
        check_release(release)
        self.failure_threshold = failure_threshold
        self.replicas = replicas
        self.behavior: FallbackBehavior = behavior
        self.release: Release = release
        #: metric index -> consecutive failed reads (``status.health[metric].numberOfFailures``)
        self.failures: dict[int, int] = {}
        self.fallbacks = 0  # reads answered with the fallback's value

    def fallback_replicas(self, current_replicas: int) -> int:
        """The count the fallback's value makes the HPA propose, by ``behavior`` (``doFallback``);
        ``current_replicas`` is the Deployment's (its scale's ``spec.replicas``)."""
        check_int("current_replicas", current_replicas, minimum=0)
        if self.behavior == "currentReplicas":
            return current_replicas
        if self.behavior == "currentReplicasIfHigher":
            return max(current_replicas, self.replicas)
        if self.behavior == "currentReplicasIfLower":
            return min(current_replicas, self.replicas)
        return self.replicas

    def read(self, metric: int, value: float | None, failed: bool, target: float | None,
             current_replicas: int = 0, value_target: bool = False, ready_replicas: int = 0) -> float | None:
        """What the HPA gets for ``metric`` whose query gave ``value`` (``failed``: the query failed):
        ``value`` on success; on a failure None (an error) or, with a fallback and more than
        ``failure_threshold`` failures in a row, the fallback's value for the metric's ``target`` (None: a
        target the fallback does not cover), ``n`` being :meth:`fallback_replicas` of ``current_replicas``:

        * before 2.18, an ``AverageValue`` target only (``value_target`` False; a ``Value`` target stays an
          error): ``int(target) x n``;
        * from 2.18 (kedacore/keda#6655): ``target x n`` for an ``AverageValue`` target and ``target x n /
          ready_replicas`` for a ``Value`` one (the HPA multiplies a Value metric's ratio by its ready pods),
          in whole thousandths (``NewMilliQuantity(int64(target x 1000 x n))``); with no ready pod the
          fallback itself fails (``getReadyReplicasCount``) and the read is an error."""
        if not failed:
            self.failures[metric] = 0
            return value
        n = self.failures[metric] = self.failures.get(metric, 0) + 1
        if self.failure_threshold is None or target is None or n <= self.failure_threshold:
            return None
        replicas: float = self.fallback_replicas(current_replicas)
        if not release_at_least(self.release, "2.18"):
            if value_target:
                return None  # no fallback for a Value target before 2.18
            self.fallbacks += 1
            return float(int(target) * replicas)  # doFallback: int64(target's float) x replicas
        if value_target:
            if ready_replicas <= 0:
                return None  # "status.readyReplicas is 0": the fallback errs, and so does the read
            replicas /= ready_replicas
        self.fallbacks += 1
        return int(target * 1000 * replicas) / 1000
