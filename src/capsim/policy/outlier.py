"""Passive outlier detection: which endpoints a proxy stops sending to after consecutive failures, as Envoy's.

Envoy's ``outlier_detection`` (``config.cluster.v3.OutlierDetection``) ejects a host from the load-balancing
set after ``consecutive_5xx`` failures in a row (default 5; a refused connection counts as one) for
``base_ejection_time`` x the number of times it has been ejected (default 30 s), capped by
``max_ejection_time`` (default 300 s). When fewer than ``healthy_panic_threshold`` (50 %) of the hosts
are left, Envoy is in panic mode and balances over all of them, ejected or not (``panic``).

How many may be out at once (``room``) is Envoy's ``ejectHost`` since 1.27 (envoyproxy/envoy#27624 and #27909,
2023): a host is ejected only if ``100 x (ejected + 1) / hosts`` is at most ``max_ejection_percent`` (default
10 %), so with fewer than 10 hosts the default ejects none; since 1.31 ``always_eject_one_host``
(envoyproxy/envoy#34796) also ejects one while none is out. capsim turns that option on by default
(``OutlierSettings.always_eject_one_host``): a crashed pod of a small fleet is ejected, as every Envoy before
1.27 did (it ejected while ``100 x ejected / hosts`` was under the percentage, so always one unless 0 %). Envoy's
own default is off, and Istio's ``DestinationRule`` cannot turn it on (``capsim.export.routing`` says so where
the plan depends on it); ``always_eject_one_host: false`` plans with what such a mesh does.

What fails: every 5xx the proxy sees, answered by the pod or made by the proxy for a refused connection, a
reset or a timeout (``consecutive_5xx`` counts both kinds unless ``split_external_local_origin_errors``); any other
answer ends the run. With ``count_answered_5xx`` off only the proxy's own failures count (Istio's
``splitExternalLocalOriginErrors: true``, ``consecutiveLocalOriginFailures`` and ``consecutive5xxErrors: 0``).

With ``interval_s`` set (Envoy's ``interval``, 10 s by default in Envoy) the detector is Envoy's
``outlier_detection_impl.cc`` for ``consecutive_5xx`` (``onIntervalTimer``, ``checkHostForUneject``, ``ejectHost``,
``onConsecutiveErrorWorker``): an ejected host returns at the first analysis sweep (every ``interval_s`` from the
cluster's start, ``origin``) at least its ejection time after it went out, so it is out between that time and that
plus one interval; each ejection raises the host's backoff by one while ``backoff x base`` is under
``max + base``, and each sweep that finds the host in the set at least one interval after its return lowers it by
one (a success does not); and a host whose failures reach the threshold while there is no room restarts its count
(Envoy resets the counter after the overflow). The sweeps are counted, not run: the times follow from the origin
and the interval, so nothing here needs a timer.

With ``interval_s`` unset (``None``, the default, which every study shipped up to stop 68 used) the detector is
capsim's older simplification: a host returns at its ejection time exactly, a success after its return resets the
backoff, and a host that reaches the threshold while there is no room keeps counting and is ejected at its next
failure once there is room. docs/studies.md, "Envoy's sweeps", measures the difference.

``max_ejection_time_jitter_s`` is Envoy's ``max_ejection_time_jitter`` (default 0): ``ejectHost`` draws
``random() % (jitter_ms + 1)`` whole milliseconds for each ejection and the host stays out that much longer (with
sweeps: it returns at the first sweep after its ejection time plus its jitter), so hosts ejected together do not
all return on the same sweep. The draws are passed in (``OutlierDetector.draw``, uniform on [0, 1)), so the
simulator takes them from a seeded stream of their own; without a jitter nothing is drawn.

Pure: times and draws are passed in, nothing here reads a clock. The simulated router (``capsim.sim.router``) and
the real one (``capsim.core.router``) both decide with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

PANIC_THRESHOLD = 0.5  # Envoy's healthy_panic_threshold default (50 %)
_EPS = 1e-9  # times a float's rounding from a sweep are that sweep's


def fewest_ejecting(percent: float) -> int | None:
    """The fewest endpoints of which Envoy's own rule (``always_eject_one_host`` off) ejects one at ``percent``:
    ``100 x 1 / n`` at most the percentage; ``None`` at 0 (it never ejects)."""
    return None if percent <= 0 else math.ceil(100 / Fraction(percent))


def ejects_one_of(percent: float, endpoints: int) -> bool:
    """Whether Envoy's own rule (``always_eject_one_host`` off) at ``percent`` ejects one of ``endpoints``: the
    decision the export's README and ``capsim check`` both make about a plan's floor."""
    least = fewest_ejecting(percent)
    return least is not None and endpoints >= least


def fewest_percent(endpoints: int) -> int:
    """The smallest whole ``max_ejection_percent`` (Istio's is an int32) at which Envoy ejects one of
    ``endpoints``."""
    return min(100, math.ceil(Fraction(100, max(endpoints, 1))))


@dataclass(frozen=True)
class OutlierSettings:
    """Envoy's defaults but ``always_eject_one_host``; ``consecutive_failures`` is its ``consecutive_5xx``."""

    consecutive_failures: int = 5
    base_ejection_s: float = 30.0
    max_ejection_s: float = 300.0
    max_ejection_percent: float = 10.0
    #: count the pods' own 5xx answers (Envoy's default); False: only what the proxy itself saw fail (a refused
    #: connection, a reset, a timeout), as ``split_external_local_origin_errors`` with ``consecutive_5xx`` off
    count_answered_5xx: bool = True
    #: Envoy's ``always_eject_one_host`` (1.31+): eject one host while none is out, whatever the percentage.
    #: On here (capsim's default, Envoy before 1.27 did so); Envoy's default is off
    always_eject_one_host: bool = True
    #: Envoy's ``interval``: sweeps this far apart return ejected hosts and lower their backoff, as Envoy's;
    #: None: capsim's older simplification (the module's docstring)
    interval_s: float | None = None
    #: Envoy's ``max_ejection_time_jitter``: each ejection lasts a further whole number of milliseconds drawn
    #: uniformly from 0 to this (0: none, Envoy's default)
    max_ejection_time_jitter_s: float = 0.0

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ValueError(f"consecutive_failures must be at least 1, got {self.consecutive_failures}")
        if self.base_ejection_s < 0 or self.max_ejection_s < 0:
            raise ValueError("ejection times must not be negative")
        if self.max_ejection_time_jitter_s < 0:
            raise ValueError(f"max_ejection_time_jitter_s must not be negative, got {self.max_ejection_time_jitter_s}")
        if not 0 <= self.max_ejection_percent <= 100:
            raise ValueError(f"max_ejection_percent must be in [0, 100], got {self.max_ejection_percent}")
        if self.interval_s is not None and not self.interval_s > 0:
            raise ValueError(f"interval_s must be above 0, got {self.interval_s}")


@dataclass
class OutlierDetector:
    """Per endpoint id: failures in a row, when its ejection ends, and its backoff (how many times it was ejected,
    less the sweeps since). ``origin``: when the cluster started, from which the sweeps are counted (``interval_s``).
    ``draw``: uniform draws on [0, 1), one per ejection, for ``max_ejection_time_jitter_s`` (needed only with it)."""

    settings: OutlierSettings = field(default_factory=OutlierSettings)
    origin: float = 0.0
    draw: Callable[[], float] | None = None
    failures: dict[int, int] = field(default_factory=dict)  # endpoints with failures in a run: how many
    _until: dict[int, float] = field(default_factory=dict)  # ejected endpoints only
    _times: dict[int, int] = field(default_factory=dict)  # the backoff (Envoy's ejectTimeBackoff)
    _back: dict[int, float] = field(default_factory=dict)  # with sweeps: when a returned endpoint returned
    ejections: int = 0  # ejections so far (Envoy's ejections_enforced_total)

    def __post_init__(self) -> None:
        if self.settings.max_ejection_time_jitter_s > 0 and self.draw is None:
            raise ValueError("max_ejection_time_jitter_s needs a draw: OutlierDetector(settings, draw=...)")

    @property
    def ejected_ids(self) -> dict[int, float]:
        """The endpoints ejected now (call ``expire`` first), with when each returns."""
        return self._until

    def room(self, ejected: int, n_endpoints: int) -> bool:
        """Whether one more of ``n_endpoints`` may be ejected while ``ejected`` are out (Envoy's ``ejectHost``):
        ``100 x (ejected + 1) / n_endpoints`` at most ``max_ejection_percent``, or none out with
        ``always_eject_one_host``."""
        st = self.settings
        if st.always_eject_one_host and ejected == 0:
            return True
        # in exact arithmetic (Envoy's percentage is a whole number, for which its double division is exact)
        return n_endpoints > 0 and 100 * (ejected + 1) <= Fraction(st.max_ejection_percent) * n_endpoints

    def failed(self, endpoint: int, now: float, n_endpoints: int) -> bool:
        """A request to ``endpoint`` failed at ``now`` (refused, 5xx). True when this ejects it. Call ``expire(now)``
        first: a host still listed as ejected ignores the failure (Envoy counts none on an ejected host), and each
        listed host takes room."""
        if endpoint in self._until:
            return False
        k = self.failures.get(endpoint, 0) + 1
        self.failures[endpoint] = k
        st = self.settings
        if k < st.consecutive_failures:
            return False
        if not self.room(len(self._until), n_endpoints):
            if st.interval_s is not None:  # Envoy resets the counter after the overflow too
                del self.failures[endpoint]
            return False  # without sweeps this keeps counting and ejects once there is room
        base, most = st.base_ejection_s, st.max_ejection_s
        if st.interval_s is None:
            times = self._times.get(endpoint, 0) + 1
            self._times[endpoint] = times
            self._until[endpoint] = now + min(base * times, most) + self._jitter()
            self.failures[endpoint] = 0  # kept, so that the first success after its return resets the backoff
        else:
            times = self._backoff(endpoint, now, st.interval_s)
            if times * base < most + base:  # ejectHost's cap on ejectTimeBackoff
                times += 1
            self._times[endpoint] = times
            self._until[endpoint] = self.sweep_at(now, now + min(base * times, most) + self._jitter())
            del self.failures[endpoint]
        self.ejections += 1
        return True

    def _jitter(self) -> float:
        """One ejection's jitter in seconds: ``random() % (jitter_ms + 1)`` milliseconds, as Envoy's ``ejectHost``
        draws it; 0, drawing nothing, without a jitter."""
        most = round(self.settings.max_ejection_time_jitter_s * 1000)
        if not most:
            return 0.0
        assert self.draw is not None
        return math.floor(self.draw() * (most + 1)) / 1000

    def sweep_at(self, now: float, t: float) -> float:
        """The first analysis sweep after ``now`` and at or after ``t`` (sweeps every ``interval_s`` from
        ``origin``, the first one interval after it; one at ``now`` itself has run): when Envoy's
        ``checkHostForUneject`` returns a host ejected at ``now`` whose ejection ends at ``t``."""
        step = self.settings.interval_s
        assert step is not None
        after = math.floor((now - self.origin) / step + _EPS) + 1  # the next sweep; 1 at the origin
        k = max(after, math.ceil((t - self.origin) / step - _EPS))
        return self.origin + k * step

    def _backoff(self, endpoint: int, now: float, step: float) -> int:
        """``endpoint``'s backoff at ``now``: less one for each sweep since its return that found it in the set at
        least one interval after it (Envoy's ``onIntervalTimer``; it returned at a sweep, so every later one)."""
        times = self._times.get(endpoint, 0)
        back = self._back.pop(endpoint, None)
        if back is None or not times:
            return times
        return max(0, times - math.floor((now - back) / step + _EPS))

    def succeeded(self, endpoint: int) -> None:
        """A request to ``endpoint`` got through: the run of failures restarts (without sweeps, the backoff too)."""
        if endpoint in self.failures:
            del self.failures[endpoint]
            if self.settings.interval_s is None:
                self._times.pop(endpoint, None)

    def forget(self, endpoint: int) -> None:
        """``endpoint`` left the cluster: Envoy drops what it knew of the host (a returning one starts afresh)."""
        self.failures.pop(endpoint, None)
        self._until.pop(endpoint, None)
        self._times.pop(endpoint, None)
        self._back.pop(endpoint, None)

    def expire(self, now: float) -> list[int]:
        """Return the endpoints whose ejection is over by ``now`` to the set, and list them."""
        back = [e for e, t in self._until.items() if t <= now]
        sweeps = self.settings.interval_s is not None
        for e in back:
            t = self._until.pop(e)
            if sweeps:
                self._back[e] = t  # the sweep it returned at, from which its backoff comes down
        return back

    def panic(self, ejected_endpoints: int, n_endpoints: int) -> bool:
        """Envoy's panic mode: with fewer than half the endpoints left it balances over all of them."""
        return n_endpoints > 0 and (n_endpoints - ejected_endpoints) < PANIC_THRESHOLD * n_endpoints
