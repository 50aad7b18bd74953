"""A Deployment's rolling update: upstream's Deployment controller, as pure rules over its ReplicaSets.

When a Deployment's pod template changes (a new image, new engine flags: a *rollout*), the Deployment
controller creates a ReplicaSet for the new template and moves pods to it step by step, within
``maxSurge`` pods over the Deployment's replicas and ``maxUnavailable`` under them. Re-implemented from
Kubernetes' ``pkg/controller/deployment`` (``rolling.go``: ``rolloutRolling``, ``reconcileNewReplicaSet``,
``reconcileOldReplicaSets``, ``cleanupUnhealthyReplicas``, ``scaleDownOldReplicaSetsForRollingUpdate``;
``sync.go``: ``scale``, the proportional scaling of a scaling event mid-rollout, and ``isScalingEvent``;
``util/deployment_util.go``: ``NewRSNewReplicas``, ``ResolveFenceposts``, ``MaxUnavailable``,
``MaxSurge``, ``GetProportion``, ``IsSaturated``, ``FindActiveOrLatest``). Kubernetes is Apache-2.0 (c)
The Kubernetes Authors; the rules are re-implemented from its source, no code is copied.

The ``Recreate`` strategy (``recreate.go``: ``rolloutRecreate``, ``scaleDownOldReplicaSetsForRecreate``,
``oldPodsRunning``, ``scaleUpNewReplicaSetForRecreate``) takes every old pod down first and scales the new
ReplicaSet up only once none of them runs any more, terminating ones included: no surge, a whole outage.

One call of :func:`sync` is one ``syncDeployment`` of a Deployment that is not paused: a
scaling event (an active ReplicaSet whose ``deployment.kubernetes.io/desired-replicas`` annotation is not
the Deployment's replicas: the HPA changed them) is handled by ``scale``, anything else by
``rolloutRolling`` or ``rolloutRecreate``. The caller applies the ReplicaSets' new sizes (the ReplicaSet controller creates or
deletes pods) and calls again when something changed, as the controller is requeued by the ReplicaSets'
and pods' updates. Available means ready (``minReadySeconds`` 0, the default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ReplicaSetState:
    """What the Deployment controller reads and writes of one of its ReplicaSets. ``revision`` orders them by
    creation (the higher the newer; the highest is the new one); ``desired`` and ``max`` are its
    ``desired-replicas`` and ``max-replicas`` annotations (None: not set)."""

    revision: int
    replicas: int  # spec.replicas
    available: int  # status.availableReplicas
    desired: int | None = None
    max: int | None = None


def int_or_percent(value: int | str, total: int, round_up: bool) -> int:
    """``intstr.GetScaledValueFromIntOrPercent``: an integer as it is, ``"N%"`` of ``total`` rounded up (maxSurge)
    or down (maxUnavailable)."""
    if isinstance(value, int):
        return value
    pct = float(value.rstrip("%"))
    v = pct * total / 100.0
    return math.ceil(v) if round_up else math.floor(v)


def resolve_fenceposts(max_surge: int | str, max_unavailable: int | str, desired: int) -> tuple[int, int]:
    """``ResolveFenceposts``: (surge, unavailable) for ``desired`` replicas; both 0 would stall a rollout, so the
    unavailable is then 1."""
    surge = int_or_percent(max_surge, desired, True)
    unavailable = int_or_percent(max_unavailable, desired, False)
    if surge == 0 and unavailable == 0:
        unavailable = 1
    return surge, unavailable


@dataclass(frozen=True)
class RollingUpdate:
    """A Deployment's ``strategy.rollingUpdate``: ``max_surge`` and ``max_unavailable`` as integers or ``"N%"``."""

    max_surge: int | str = "25%"
    max_unavailable: int | str = "25%"

    def surge(self, desired: int) -> int:
        """``MaxSurge``: the resolved surge."""
        return resolve_fenceposts(self.max_surge, self.max_unavailable, desired)[0]

    def unavailable(self, desired: int) -> int:
        """``MaxUnavailable``: the resolved unavailable, never over ``desired`` (0 for a Deployment of 0)."""
        if desired == 0:
            return 0
        return min(resolve_fenceposts(self.max_surge, self.max_unavailable, desired)[1], desired)


@dataclass(frozen=True)
class Recreate:
    """A Deployment's ``strategy.type: Recreate``: no surge and no unavailability to resolve (``MaxSurge`` and
    ``MaxUnavailable`` are 0 for it); every old pod goes before a new one is created."""

    def surge(self, desired: int) -> int:
        return 0

    def unavailable(self, desired: int) -> int:
        return 0


Strategy = RollingUpdate | Recreate


def _scaled(rs: ReplicaSetState, size: int, desired: int, strategy: Strategy,
            always_annotate: bool = False) -> ReplicaSetState:
    """``rs`` scaled to ``size`` by the controller (``scaleReplicaSet``): the annotations take the Deployment's
    replicas and replicas + surge. ``scaleReplicaSetAndRecordEvent`` (the rollout's path) does nothing when
    the size is already ``size``; ``scale``'s own path (``always_annotate``) updates the annotations anyway."""
    if rs.replicas == size and not always_annotate:
        return rs
    return replace(rs, replicas=size, desired=desired, max=desired + strategy.surge(desired))


def is_scaling_event(rss: Sequence[ReplicaSetState], desired: int) -> bool:
    """``isScalingEvent``: an active ReplicaSet's desired-replicas annotation differs from ``desired``."""
    return any(rs.replicas > 0 and rs.desired is not None and rs.desired != desired for rs in rss)


def _proportion(rs: ReplicaSetState, desired: int, strategy: Strategy, to_add: int, added: int,
                status_replicas: int) -> int:
    """``GetProportion``: how many of ``to_add`` go to ``rs`` (``getReplicaSetFraction``: its size scaled by the
    Deployment's new size + surge over its max-replicas annotation, rounded half away from zero)."""
    if rs.replicas == 0 or to_add == 0 or to_add == added:
        return 0
    if desired == 0:
        fraction = -rs.replicas
    else:
        annotated = rs.max if rs.max is not None else status_replicas
        size = rs.replicas * (desired + strategy.surge(desired)) / annotated if annotated else 0.0
        fraction = int(math.floor(size + 0.5) if size >= 0 else math.ceil(size - 0.5)) - rs.replicas
    allowed = to_add - added
    return min(fraction, allowed) if to_add > 0 else max(fraction, allowed)


def scale(rss: Sequence[ReplicaSetState], desired: int, strategy: Strategy) -> list[ReplicaSetState]:
    """``scale`` (``sync.go``): the ReplicaSets after a scaling event. One active ReplicaSet (or none: the newest)
    takes ``desired``; a saturated new one takes everything from the old; otherwise the change is shared in
    proportion to their sizes, the larger first (newer first among equals scaling up, older first scaling
    down), what rounding leaves going to the first; under ``Recreate`` nothing more."""
    out = list(rss)
    new = out[-1]
    active = [i for i, rs in enumerate(out) if rs.replicas > 0]
    if len(active) <= 1:
        i = active[0] if active else len(out) - 1
        if out[i].replicas != desired:
            out[i] = _scaled(out[i], desired, desired, strategy, always_annotate=True)
        return out
    if new.desired == desired and new.replicas == desired and new.available == desired:  # IsSaturated
        return [_scaled(rs, 0, desired, strategy) if k in active and k != len(out) - 1 else rs
                for k, rs in enumerate(out)]
    if isinstance(strategy, Recreate):  # proportional scaling is a rolling update's only
        return out
    total = sum(out[i].replicas for i in active)
    allowed = desired + strategy.surge(desired) if desired > 0 else 0
    to_add = allowed - total
    if to_add > 0:  # ReplicaSetsBySizeNewer
        order = sorted(active, key=lambda i: (-out[i].replicas, -out[i].revision))
    elif to_add < 0:  # ReplicaSetsBySizeOlder
        order = sorted(active, key=lambda i: (-out[i].replicas, out[i].revision))
    else:
        order = list(active)
    added = 0
    size: dict[int, int] = {}
    for i in order:
        p = _proportion(out[i], desired, strategy, to_add, added, total) if to_add else 0
        size[i] = out[i].replicas + p
        added += p
    for n, i in enumerate(order):
        if n == 0 and to_add:
            size[i] = max(size[i] + to_add - added, 0)
        out[i] = _scaled(out[i], size[i], desired, strategy, always_annotate=True)
    return out


def new_rs_new_replicas(rss: Sequence[ReplicaSetState], desired: int, strategy: RollingUpdate) -> int:
    """``NewRSNewReplicas``: the new ReplicaSet's next size, within ``desired + surge`` pods in all."""
    new = rss[-1]
    current = sum(rs.replicas for rs in rss)
    most = desired + strategy.surge(desired)
    if current >= most:
        return new.replicas
    return new.replicas + min(most - current, desired - new.replicas)


def rollout_rolling(rss: Sequence[ReplicaSetState], desired: int, strategy: RollingUpdate) -> list[ReplicaSetState]:
    """``rolloutRolling``: scale the new ReplicaSet up within the surge if it can; if it did not, scale the old
    ones down within the unavailability, their unavailable pods first (``cleanupUnhealthyReplicas``), then
    available ones while more than ``desired - maxUnavailable`` are available, the oldest ReplicaSets first."""
    out = list(rss)
    new = out[-1]
    # reconcileNewReplicaSet
    if new.replicas != desired:
        size = desired if new.replicas > desired else new_rs_new_replicas(out, desired, strategy)
        if size != new.replicas:
            out[-1] = _scaled(new, size, desired, strategy)
            return out
    # reconcileOldReplicaSets
    old = [i for i in range(len(out) - 1) if out[i].replicas > 0]  # FilterActiveReplicaSets
    if not old:
        return out
    all_pods = sum(rs.replicas for rs in out)
    min_available = desired - strategy.unavailable(desired)
    new_unavailable = new.replicas - new.available
    most_down = all_pods - min_available - new_unavailable
    if most_down <= 0:
        return out
    cleaned = 0
    for i in sorted(old, key=lambda k: out[k].revision):  # cleanupUnhealthyReplicas, oldest first
        if cleaned >= most_down:
            break
        rs = out[i]
        if rs.replicas == 0 or rs.replicas == rs.available:
            continue
        down = min(most_down - cleaned, rs.replicas - rs.available)
        out[i] = _scaled(rs, rs.replicas - down, desired, strategy)
        cleaned += down
    # scaleDownOldReplicaSetsForRollingUpdate (the status, availability, is the one read at the sync's start)
    available = sum(rs.available for rs in out)
    if available <= min_available:
        return out
    budget = available - min_available
    done = 0
    for i in sorted(old, key=lambda k: out[k].revision):
        if done >= budget:
            break
        rs = out[i]
        if rs.replicas == 0:
            continue
        down = min(rs.replicas, budget - done)
        out[i] = _scaled(rs, rs.replicas - down, desired, strategy)
        done += down
    return out


def rollout_recreate(rss: Sequence[ReplicaSetState], desired: int, old_pods_running: bool) -> list[ReplicaSetState]:
    """``rolloutRecreate``: scale every active old ReplicaSet to 0 and stop there if any was; while an old pod still
    runs (``old_pods_running``: any pod of an old ReplicaSet not yet gone, a terminating one too, which
    ``oldPodsRunning`` reads from the pods), wait; then scale the new ReplicaSet to ``desired``."""
    out = list(rss)
    recreate = Recreate()
    scaled_down = False
    for i in range(len(out) - 1):  # scaleDownOldReplicaSetsForRecreate
        if out[i].replicas > 0:
            out[i] = _scaled(out[i], 0, desired, recreate)
            scaled_down = True
    if scaled_down or old_pods_running:
        return out
    out[-1] = _scaled(out[-1], desired, desired, recreate)  # scaleUpNewReplicaSetForRecreate
    return out


def sync(rss: Sequence[ReplicaSetState], desired: int, strategy: Strategy,
         old_pods_running: bool = False) -> list[ReplicaSetState]:
    """One ``syncDeployment``: its ReplicaSets (oldest first, the new one last) after it. A scaling event goes to
    :func:`scale` (whatever the strategy, as upstream checks for one first), anything else to
    :func:`rollout_rolling` or, for ``Recreate``, :func:`rollout_recreate` (``old_pods_running``: whether a pod
    of an old ReplicaSet is still there, read by the caller from its pods)."""
    if not rss:
        return []
    if is_scaling_event(rss, desired):
        return scale(rss, desired, strategy)
    if isinstance(strategy, Recreate):
        return rollout_recreate(rss, desired, old_pods_running)
    return rollout_rolling(rss, desired, strategy)


def complete(rss: Sequence[ReplicaSetState], desired: int) -> bool:
    """``DeploymentComplete``-like: every pod on the new ReplicaSet, all of them available, none left on an old one."""
    new = rss[-1]
    return new.replicas == desired and new.available >= desired and all(rs.replicas == 0 for rs in rss[:-1])


def progressing(before: tuple[int, int, int, int], after: tuple[int, int, int, int]) -> bool:
    """``DeploymentProgressing``: between two syncs' statuses (updated, old, ready, available pods), more pods on the
    new template, fewer on the old ones, more ready or more available is progress (what resets
    ``progressDeadlineSeconds``); an HPA adding pods mid-rollout is progress too."""
    updated, old, ready, available = before
    u, o, r, a = after
    return u > updated or o < old or r > ready or a > available
