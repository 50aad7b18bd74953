"""KEDA's cron scaler: a window of wall-clock time in which it asks for a number of replicas.

Re-implemented from kedacore/keda ``pkg/scalers/cron_scaler.go`` (Apache-2.0), whose semantics have held from
release 2.0 to 2.18: at a read at time *t* the scaler takes the next time after *t* at which its ``start``
schedule fires and the next at which its ``end`` fires (robfig/cron ``Schedule.Next``, strictly after *t*, in the
trigger's ``timezone``); the trigger is **active** when the next end comes before the next start (*t* lies in a
window that has started and not yet ended), and its metric is then ``desiredReplicas``, else 1. The HPA KEDA
creates reads it as an External metric with an ``AverageValue`` target of 1, so it proposes ``desiredReplicas``
in the window and 1 outside it (the other triggers and ``minReplicaCount`` decide there), and KEDA's operator
counts it as an active trigger in the window (it wakes a Deployment at zero). The value comes from KEDA itself,
not from Prometheus: it answers through a Prometheus outage.

The schedules are standard five-field cron (minute, hour, day of month, month, day of week; a day restricted
in both the month and the week fires on either, as robfig/cron and Vixie cron do), evaluated with ``croniter``.
The simulated run's time 0 is the wall-clock time ``clock_start`` (``autoscaler.keda.clock_start``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import croniter

__all__ = ["CronWindow", "valid_schedule"]


def valid_schedule(spec: str) -> bool:
    """Whether ``spec`` is a five-field cron schedule KEDA's cron scaler takes."""
    return len(spec.split()) == 5 and bool(croniter.is_valid(spec))


@dataclass(frozen=True)
class CronWindow:
    """One cron trigger, read at simulated times (seconds from ``clock_start``)."""

    timezone: str
    start: str
    end: str
    desired_replicas: int
    clock_start: datetime

    def _next(self, spec: str, at: datetime) -> datetime:
        return croniter(spec, at).get_next(datetime)  # type: ignore[no-any-return]

    def active(self, at_s: float) -> bool:
        """Whether the window is open at ``at_s``: the end schedule fires before the start schedule next."""
        at = (self.clock_start + timedelta(seconds=at_s)).astimezone(ZoneInfo(self.timezone))
        at = at.replace(microsecond=0)  # robfig/cron works in whole seconds
        return self._next(self.end, at) < self._next(self.start, at)

    def opens_within(self, horizon_s: float) -> bool:
        """Whether the window is open at some time of a run of ``horizon_s``: at its start, or its start schedule
        fires before its end."""
        first = self.clock_start.astimezone(ZoneInfo(self.timezone)).replace(microsecond=0) - timedelta(seconds=1)
        return self.active(0.0) or self._next(self.start, first) < self.clock_start + timedelta(seconds=horizon_s)

    def value(self, at_s: float) -> float:
        """The scaler's metric at ``at_s``: ``desired_replicas`` in the window, 1 outside it."""
        return float(self.desired_replicas) if self.active(at_s) else 1.0
