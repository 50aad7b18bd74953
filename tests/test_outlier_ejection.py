"""Outlier ejection (Envoy's passive outlier detection): a pod refusing requests in a row is ejected for a
while, so least outstanding stops sending a crashed pod, still in the endpoints, most of the traffic; and a pod
answering 503 in a Redis outage is ejected too, unless only the proxy's own failures count."""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capsim.model.scenario import Scenario
from capsim.model.settings import SettingsError
from capsim.policy.outlier import (
    OutlierDetector,
    OutlierSettings,
    ejects_one_of,
    fewest_ejecting,
    fewest_percent,
)
from capsim.sim import Simulation, simulate
from capsim.sim.pod import Pod, PodState
from capsim.sim.router import Router as SimRouter
from capsim.sim.streams import BufferedDraws
from capsim.studies.checks import run_checks


def test_ejects_after_the_consecutive_failures_and_a_success_restarts_the_count() -> None:
    d = OutlierDetector(OutlierSettings(consecutive_failures=3, base_ejection_s=30.0))
    assert not d.failed(7, 0.0, 10) and not d.failed(7, 0.1, 10)
    d.succeeded(7)
    assert not d.failed(7, 0.2, 10) and not d.failed(7, 0.3, 10)
    assert d.failed(7, 0.4, 10)
    assert d.ejected_ids == {7: pytest.approx(30.4)} and d.ejections == 1
    assert not d.failed(7, 1.0, 10)  # already out
    assert d.expire(30.3) == [] and d.expire(30.4) == [7] and not d.ejected_ids


def test_the_ejection_grows_with_each_ejection_up_to_the_cap() -> None:
    d = OutlierDetector(OutlierSettings(consecutive_failures=1, base_ejection_s=30.0, max_ejection_s=70.0))
    outs = []
    now = 0.0
    for _ in range(3):
        assert d.failed(1, now, 10)
        outs.append(d.ejected_ids[1] - now)
        now = d.ejected_ids[1]
        d.expire(now)
    assert outs == [30.0, 60.0, 70.0]
    d.succeeded(1)  # healthy again: the multiplier starts over
    assert d.failed(1, now, 10) and d.ejected_ids[1] - now == 30.0


def test_at_most_the_percentage_and_one_while_none_is_out() -> None:
    d = OutlierDetector(OutlierSettings(consecutive_failures=1, max_ejection_percent=10.0))
    assert d.room(0, 4) and not d.room(1, 4)  # one of 4 while none is out (always_eject_one_host), not two
    assert d.room(1, 20) and not d.room(2, 20)  # 2 of 20 is 10 %
    assert d.failed(0, 0.0, 4)
    assert not d.failed(1, 0.0, 4)  # no room: 2 of 4 would be 50 %
    assert d.panic(1, 1) and not d.panic(1, 2) and d.panic(2, 3)
    with pytest.raises(ValueError):
        OutlierSettings(consecutive_failures=0)


def test_envoys_own_default_ejects_no_host_of_fewer_than_ten_at_ten_percent() -> None:
    """Envoy's ``ejectHost`` since 1.27 (envoyproxy/envoy#27909): ``100 x (ejected + 1) / hosts`` at most the
    percentage, with no host always allowed. The cases of its issues: 3 hosts at 50 % eject one, not two
    (#26877); one host at under 100 % none; 2 to 9 hosts at the default 10 % none (envoyproxy/gateway#8140)."""
    def envoy(percent: float) -> OutlierDetector:
        return OutlierDetector(OutlierSettings(consecutive_failures=1, max_ejection_percent=percent,
                                               always_eject_one_host=False))
    assert envoy(50).room(0, 3) and not envoy(50).room(1, 3)
    assert not envoy(99).room(0, 1) and envoy(100).room(0, 1)
    assert not any(envoy(10).room(0, n) for n in range(1, 10)) and envoy(10).room(0, 10)
    assert not envoy(0).room(0, 100)
    d = envoy(10)
    assert not d.failed(0, 0.0, 4) and not d.failed(0, 1.0, 4) and not d.ejected_ids and d.ejections == 0
    assert OutlierDetector(OutlierSettings(max_ejection_percent=0.0)).room(0, 100)  # capsim's default: one


@settings(max_examples=400, deadline=None)
@given(n=st.integers(1, 300), ejected=st.integers(0, 300), percent=st.one_of(
    st.integers(0, 100).map(float), st.fractions(0, 100).map(float)), always=st.booleans())
def test_room_is_envoys_rule_in_exact_arithmetic(n: int, ejected: int, percent: float, always: bool) -> None:
    """``room`` against Envoy's ``ejectHost`` worked in exact fractions; with ``always_eject_one_host`` it is
    also the rule capsim had before (``floor(hosts x percent / 100)`` out at most, at least one)."""
    ejected = min(ejected, n)
    d = OutlierDetector(OutlierSettings(max_ejection_percent=percent, always_eject_one_host=always))
    exact = Fraction(100 * (ejected + 1), n) <= Fraction(percent) or (always and ejected == 0)
    assert d.room(ejected, n) == exact
    if always:
        assert d.room(ejected, n) == (ejected < max(1, math.floor(Fraction(n) * Fraction(percent) / 100)))


def sweeping(**kw: Any) -> OutlierDetector:
    """A detector with Envoy's sweeps every 10 s from 0 (``interval_s``)."""
    return OutlierDetector(OutlierSettings(**{"consecutive_failures": 1, "interval_s": 10.0, **kw}))


def test_with_sweeps_a_pod_returns_at_the_first_sweep_after_its_ejection_time() -> None:
    """Envoy's ``checkHostForUneject`` runs at each sweep: a host ejected at 12.3 s for 30 s is out until the
    sweep at 50 s, not 42.3 s; one ejected on a sweep's own time returns at a later sweep."""
    d = sweeping()
    assert d.failed(1, 12.3, 10) and d.ejected_ids == {1: 50.0}
    assert d.expire(49.9) == [] and d.expire(50.0) == [1]
    e = sweeping(base_ejection_s=0.0)
    assert e.failed(2, 20.0, 10) and e.ejected_ids == {2: 30.0}  # the sweep at 20 s has run
    later = OutlierDetector(OutlierSettings(consecutive_failures=1, interval_s=10.0), origin=1000.0)
    assert later.failed(3, 1012.3, 10) and later.ejected_ids == {3: 1050.0}  # sweeps from the cluster's start


def test_with_sweeps_the_backoff_comes_down_one_per_sweep_after_the_return_and_not_with_a_success() -> None:
    """Envoy's ``onIntervalTimer`` lowers ``ejectTimeBackoff`` by one at each sweep at least one interval after
    the host's return; a success does not touch it (without sweeps, a success resets it)."""
    def second_ejection(at: float, success: bool) -> float:
        d = sweeping()
        assert d.failed(1, 12.3, 10) and d.expire(50.0) == [1]  # back at the sweep at 50 s, backoff 1
        if success:
            d.succeeded(1)
        assert d.failed(1, at, 10)
        return d.ejected_ids[1] - at
    assert second_ejection(55.0, success=True) == 65.0  # backoff 2: 60 s from 55, to the sweep at 120
    assert second_ejection(59.9, success=False) == pytest.approx(60.1)  # 60 s, to 120
    assert second_ejection(60.0, success=False) == 30.0  # the sweep at 60 brought it to 0: 30 s, to 90
    d = sweeping(max_ejection_s=90.0)  # backoff goes up while backoff x 30 < 90 + 30: to 4, not on
    now = 0.0
    outs = []
    for _ in range(6):
        d.failed(1, now, 10)
        until = d.ejected_ids[1]
        outs.append(until - now)
        d.expire(until)
        now = until
    assert outs == [30.0, 60.0, 90.0, 90.0, 90.0, 90.0]
    # the backoff stopped at 4: three sweeps after its return bring it to 1 (then 2: 60 s), four to 0 (30 s)
    three, four = copy.deepcopy(d), copy.deepcopy(d)
    three.failed(1, now + 39.0, 10)
    four.failed(1, now + 40.0, 10)
    assert three.ejected_ids[1] - now == 100.0 and four.ejected_ids[1] - now == 70.0


def test_with_sweeps_an_overflow_restarts_the_count() -> None:
    """Envoy resets a host's count after the threshold even where ``ejectHost`` had no room (an overflow): once
    there is room it takes the threshold again. Without sweeps capsim ejected at the next failure."""
    for interval, again in ((10.0, 3), (None, 1)):
        d = OutlierDetector(OutlierSettings(consecutive_failures=3, always_eject_one_host=False,
                                            max_ejection_percent=10.0, interval_s=interval))
        for t in (0.0, 0.1, 0.2):
            assert not d.failed(1, t, 9)  # one of 9 is over 10 %: no room
        n = 0
        while not d.failed(1, 1.0 + n, 10):  # a tenth pod: one of 10 is 10 %
            n += 1
        assert n + 1 == again


def test_jitter_adds_a_whole_millisecond_draw_to_each_ejection_as_envoys_eject_host() -> None:
    """Envoy's ``max_ejection_time_jitter``: ``ejectHost`` draws ``random() % (jitter_ms + 1)`` milliseconds for each
    ejection and the host stays out that much longer, from none to the whole jitter; without a jitter nothing is
    drawn. With sweeps the host returns at the first sweep after its ejection time plus its jitter."""
    us = iter([0.0, 0.5, 1 - 1e-12])
    d = OutlierDetector(OutlierSettings(consecutive_failures=1, max_ejection_percent=100.0,
                                        max_ejection_time_jitter_s=2.0), draw=lambda: next(us))
    for pod in (1, 2, 3):
        assert d.failed(pod, 0.0, 10)
    assert d.ejected_ids == {1: 30.0, 2: 31.0, 3: 32.0}  # 0, 1000 and 2000 of 2001 equally likely ms
    us = iter([0.0, 0.5])
    swept = OutlierDetector(OutlierSettings(consecutive_failures=1, max_ejection_percent=100.0, interval_s=10.0,
                                            max_ejection_time_jitter_s=5.0),
                            draw=lambda: next(us))
    assert swept.failed(1, 18.0, 10) and swept.failed(2, 18.0, 10)
    assert swept.ejected_ids == {1: 50.0, 2: 60.0}  # 48 s, and 50.5 s: one sweep later

    def never() -> float:
        raise AssertionError("no jitter, no draw")
    assert OutlierDetector(OutlierSettings(consecutive_failures=1), draw=never).failed(1, 0.0, 10)
    with pytest.raises(ValueError, match="max_ejection_time_jitter_s needs a draw"):
        OutlierDetector(OutlierSettings(max_ejection_time_jitter_s=1.0))
    with pytest.raises(ValueError, match="max_ejection_time_jitter_s must not be negative"):
        OutlierSettings(max_ejection_time_jitter_s=-1.0)


class EnvoyTimerLoop:
    """Envoy's outlier detector for ``consecutive_5xx`` as its code runs it, written here from
    ``outlier_detection_impl.cc``, in whole milliseconds as Envoy's: a sweep every interval from 0
    (``onIntervalTimer``: ``checkHostForUneject`` on every host, then the backoff of every host in the set one
    interval after its return comes down by one); ``putResult`` counts a 5xx, resets on another answer, and at
    the threshold ``onConsecutiveErrorWorker`` calls ``ejectHost`` (which draws the host's jitter) and resets the
    count whatever it did. ``draw``: uniform on [0, 1), one per ejection, as the detector's."""

    def __init__(self, s: OutlierSettings, draw: Callable[[], float] | None = None) -> None:
        assert s.interval_s is not None
        self.s, self.draw = s, draw
        self.interval = self.next_sweep = ms(s.interval_s)
        self.base, self.most, self.jitter_ms = ms(s.base_ejection_s), ms(s.max_ejection_s), ms(s.max_ejection_time_jitter_s)
        self.count: dict[int, int] = {}
        self.backoff: dict[int, int] = {}
        self.out: dict[int, int] = {}  # ejected: when
        self.jitter: dict[int, int] = {}  # the last ejection's
        self.returned: dict[int, int] = {}
        self.ejections = 0

    def advance(self, now: int) -> None:
        while self.next_sweep <= now:
            t = self.next_sweep
            for h, at in list(self.out.items()):
                if min(self.base * self.backoff[h], self.most) + self.jitter[h] <= t - at:
                    del self.out[h]
                    self.count[h] = 0
                    self.returned[h] = t
            for h, back in self.returned.items():
                if h not in self.out and t - back >= self.interval and self.backoff[h]:
                    self.backoff[h] -= 1
            self.next_sweep += self.interval

    def result(self, h: int, now_s: float, failed: bool, hosts: int) -> None:
        now = ms(now_s)
        self.advance(now)
        if h in self.out:
            return
        if not failed:
            self.count[h] = 0
            return
        self.count[h] = self.count.get(h, 0) + 1
        if self.count[h] == self.s.consecutive_failures:
            s = self.s
            room = 100.0 * (len(self.out) + 1) / hosts <= s.max_ejection_percent
            if room or (s.always_eject_one_host and not self.out):
                self.out[h] = now
                self.ejections += 1
                # random() % (jitter + 1), with a uniform draw in place of Envoy's 64-bit integer
                self.jitter[h] = math.floor(self.draw() * (self.jitter_ms + 1)) if self.draw else 0
                b = self.backoff.get(h, 0)
                if b * self.base < self.most + self.base:
                    self.backoff[h] = b + 1
            self.count[h] = 0


def ms(seconds: float) -> int:
    return round(seconds * 1000)


@settings(max_examples=1000, deadline=None)
@given(events=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 2), st.booleans()), min_size=10,
                                  max_size=120),
       failures=st.integers(1, 3), base=st.sampled_from([5.0, 10.0, 30.0]), most=st.sampled_from([20.0, 300.0]),
       percent=st.sampled_from([10.0, 30.0, 50.0]), always=st.booleans(),
       jitter=st.sampled_from([0.0, 0.001, 2.5, 7.777, 15.0]), seed=st.integers(0, 2**32))
def test_the_detector_with_sweeps_is_envoys_timer_loop(events: list[tuple[int, int, bool]], failures: int,
                                                        base: float, most: float, percent: float,
                                                        always: bool, jitter: float, seed: int) -> None:
    """The lazily counted sweeps give what Envoy's timer loop gives, event by event: the same hosts out, the same
    ejections, with or without jitter (both take the same draws). Times in quarter seconds, some on a sweep's own
    time, and with jitter some a millisecond either side of one."""
    s = OutlierSettings(consecutive_failures=failures, base_ejection_s=base, max_ejection_s=max(most, base),
                        max_ejection_percent=percent, always_eject_one_host=always, interval_s=10.0,
                        max_ejection_time_jitter_s=jitter)
    d = OutlierDetector(s, draw=random.Random(seed).random)
    envoy = EnvoyTimerLoop(s, random.Random(seed).random)
    now = 0.0
    for step, host, failed in events:
        now += step * 2.5
        d.expire(now)
        if failed:
            d.failed(host, now, 4)
        else:
            d.succeeded(host)
        envoy.result(host, now, failed, 4)
        assert set(d.ejected_ids) == set(envoy.out), now
    assert d.ejections == envoy.ejections


def four_pods(ejection: dict[str, Any] | None, kind: str, horizon_s: float, faults: dict[str, Any],
              pods: dict[str, Any] | None = None) -> Scenario:
    """4 pods at 40 requests/s of 50 ms (light load), the client retrying twice, with ``faults``."""
    return Scenario.model_validate({
        "horizon_s": horizon_s, "warmup_s": 0,
        "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 40}},
        "service": {"kind": "exponential", "mean_s": 0.05},
        "batching": {"max_batch_size": 4, "max_wait_ms": 0},
        "pods": {"replicas": 4, **(pods or {})},
        "router": {"kind": kind, "outlier_ejection": ejection},
        "client": {"timeout_s": 30, "max_retries": 2, "backoff_s": 0.5},
        "faults": faults,
    })


#: pod 0 crashes at 20 s and stays in the endpoints for 6 s (1 s until the kubelet sees it, 5 s until the endpoints do)
CRASH = {"faults": {"crashes": [{"at_s": 20.0, "pod": 0}]}, "pods": {"endpoints_propagation_s": 5.0, "startup_s": 30}}


def crash_run(ejection: dict[str, Any] | None, kind: str = "least_outstanding") -> Any:
    # with 0 requests outstanding, least outstanding favours the crashed pod
    return simulate(four_pods(ejection, kind, 60, **CRASH), seed=0)


@pytest.fixture
def ejections(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, float, float]]:
    """Every ejection of the runs in the test, as (pod, when, until)."""
    out: list[tuple[int, float, float]] = []
    failed = OutlierDetector.failed

    def recording_failed(self: OutlierDetector, endpoint: int, now: float, n: int) -> bool:
        ejected = failed(self, endpoint, now, n)
        if ejected:
            out.append((endpoint, now, self.ejected_ids[endpoint]))
        return ejected

    monkeypatch.setattr(OutlierDetector, "failed", recording_failed)
    return out


def test_a_crashed_pod_in_the_endpoints_is_ejected_after_five_refusals() -> None:
    window = slice(20.0, 26.0)
    runs = {"none": crash_run(None), "envoy": crash_run({})}
    refused = {}
    for name, r in runs.items():
        df = r.requests
        w = df[(df.arrival_s >= window.start) & (df.arrival_s < window.stop)]
        refused[name] = int((w.attempts > 1).sum()) / len(w)
    # without ejection the dead pod takes its share of every tie and each retry: many requests refused,
    # some three times (failed); with Envoy's defaults it is out after 5 refusals, each retried elsewhere
    assert refused["none"] > 0.3 and runs["none"].summary.failed > 0
    assert runs["envoy"].summary.retries == 5 and runs["envoy"].summary.failed == 0
    assert (runs["none"].summary.ejections, runs["envoy"].summary.ejections) == (0, 1)  # the summary counts them
    assert refused["envoy"] < 0.05


def test_with_jitter_the_crashed_pod_stays_out_up_to_the_jitter_longer_drawn_from_a_stream_of_its_own(
        ejections: list[tuple[int, float, float]]) -> None:
    """``max_ejection_time_jitter_s``: the ejection that ends at 30 s without it ends up to 5 s later with it,
    at a whole millisecond; the draw comes from the ``ejection_jitter`` stream, so the arrivals, and every pick
    up to the ejection, are those of the run without jitter, and a seed gives the same run again."""
    plain = crash_run({})
    ((pod, went, back),) = ejections
    assert back == went + 30.0
    ejections.clear()
    jittered = crash_run({"max_ejection_time_jitter_s": 5.0})
    ((pod2, went2, back2),) = ejections
    assert (pod2, went2) == (pod, went) and went + 30.0 < back2 <= went + 35.0
    assert (back2 - went - 30.0) * 1000 == pytest.approx(round((back2 - went - 30.0) * 1000))
    assert plain.requests.arrival_s.tolist() == jittered.requests.arrival_s.tolist()
    before = plain.requests.start_s < went
    assert plain.requests.pod[before].tolist() == jittered.requests.pod[before].tolist()
    ejections.clear()
    again = crash_run({"max_ejection_time_jitter_s": 5.0})
    assert ejections == [(pod2, went2, back2)] and again.summary == jittered.summary


def test_prefix_aware_ejects_the_crashed_pod_too() -> None:
    # no session history here: the queue scorer favours the empty (dead) pod as least outstanding does
    off, on = crash_run(None, "prefix_aware").summary, crash_run({}, "prefix_aware").summary
    assert off.retries > 100 and off.failed > 0
    assert on.retries == 5 and on.failed == 0


def test_the_setting_validates_and_can_be_switched_off() -> None:
    base = {"horizon_s": 10, "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 1}},
            "service": {"kind": "deterministic", "mean_s": 0.1}}
    sc = Scenario.model_validate(base)
    assert sc.router.outlier_ejection is not None
    assert (sc.router.outlier_ejection.consecutive_failures, sc.router.outlier_ejection.base_ejection_s) == (5, 30.0)
    off = sc.override({"router.outlier_ejection": None})
    assert off.router.outlier_ejection is None
    with pytest.raises(SettingsError, match="consecutive_failures"):
        sc.override({"router.outlier_ejection.consecutive_failures": 0})
    with pytest.raises(SettingsError, match="max_ejection_time_jitter_s"):
        sc.override({"router.outlier_ejection.max_ejection_time_jitter_s": -0.5})
    assert sc.router.outlier_ejection.settings().max_ejection_time_jitter_s == 0.0  # Envoy's default: none


def outage_run(ejection: dict[str, Any] | None, kind: str = "least_outstanding") -> Any:
    # Redis is out from 20 to 30 s: every pod answers each turn 503 (it cannot read the session), as fast as it is
    # asked, and the client retries
    sim = Simulation(four_pods(ejection, kind, 90, {"redis_outages": [{"at_s": 20.0, "duration_s": 10.0}]}), seed=0)
    return sim, sim.run()


@pytest.mark.parametrize("kind", ["least_outstanding", "prefix_aware"])
def test_a_redis_outage_s_503s_eject_one_pod_which_stays_out_after_redis_is_back(kind: str) -> None:
    # Envoy's consecutive_5xx counts the pod's own 503s as it counts refusals: the first pod to answer five in
    # a row is ejected for 30 s, and the cap (10 % of 4 pods, at least one) keeps the others in. Ejection
    # cannot help here (every pod fails alike) and costs a quarter of the fleet for 20 s after the outage
    off_sim, off = outage_run(None, kind)
    on_sim, on = outage_run({}, kind)
    assert on_sim.router.outliers is not None and on_sim.router.outliers.ejections == 1
    errors = sorted(p.errors for p in on_sim.cluster.pods)
    assert errors[0] == 5 and errors[1] > 100  # the ejected pod failed five turns, then got none
    out = next(p.id for p in on_sim.cluster.pods if p.errors == 5)
    assert min(p.errors for p in off_sim.cluster.pods) > 100  # without ejection all four keep failing
    assert (on.summary.failed, on.summary.retries) == (off.summary.failed, off.summary.retries)

    def served(r: Any, pod: int, start: float, stop: float) -> int:
        df = r.requests
        return int(((df.pod == pod) & (df.start_s >= start) & (df.start_s < stop)).sum())

    assert served(on, out, 30.0, 45.0) == 0  # ejected after 20 s for 30 s: still out
    assert all(served(on, p, 30.0, 45.0) > 100 for p in range(4) if p != out)
    assert served(on, out, 60.0, 90.0) > 100  # back once the ejection is over
    assert served(off, out, 30.0, 45.0) > 100


def test_with_envoys_sweeps_the_outage_s_ejected_pod_comes_back_at_the_sweep_after_its_30_s(
        ejections: list[tuple[int, float, float]]) -> None:
    # the same outage with interval_s 10: the pod ejected a moment after 20 s is out until the sweep at 60 s, not
    # 30 s after it went out; it takes no turn before that sweep and many after it
    _, r = outage_run({"interval_s": 10.0})
    ((out, went, back),) = ejections
    assert 20.0 < went < 20.5 and back == 60.0
    df = r.requests
    mine = df[df.pod == out]
    assert not ((mine.start_s >= went + 0.01) & (mine.start_s < 60.0)).any()
    assert int(((mine.start_s >= 60.0) & (mine.start_s < 90.0)).sum()) > 100
    _, plain = outage_run({})  # without sweeps: back at its ejection's end, half a sweep or so earlier
    plain_mine = plain.requests[plain.requests.pod == out]
    assert int(((plain_mine.start_s >= went + 30.5) & (plain_mine.start_s < 60.0)).sum()) > 10


def test_counting_only_the_proxy_s_own_failures_ejects_no_pod_in_a_redis_outage_but_still_a_crashed_one() -> None:
    # Istio's splitExternalLocalOriginErrors with consecutive5xxErrors 0: the pods' 503s do not count,
    # refusals still do
    split = {"count_answered_5xx": False}
    sim, _ = outage_run(split)
    assert sim.router.outliers is not None and sim.router.outliers.ejections == 0
    assert min(p.errors for p in sim.cluster.pods) > 100
    crash = crash_run(split).summary
    assert crash.retries == 5 and crash.failed == 0


def test_capsim_check_warns_of_ejection_counting_the_pods_503s_in_a_store_outage() -> None:
    sc = Scenario.model_validate({
        "horizon_s": 60, "workload": {"arrivals": {"kind": "poisson", "rate_per_s": 4}},
        "service": {"kind": "exponential", "mean_s": 0.05},
        "router": {"kind": "least_outstanding"},
        "faults": {"redis_outages": [{"at_s": 20.0, "duration_s": 2.0}]},
    })

    def fired(s: Scenario) -> list[Any]:
        return [f for f in run_checks(s) if f.check == "ejection-in-store-outage"]

    (f,) = fired(sc)
    assert f.level == "warn" and f.path == "router.outlier_ejection.count_answered_5xx"
    assert "from 20 s" in f.message and "30 s" in f.message and "10%" in f.message
    assert not fired(sc.override({"router.outlier_ejection.count_answered_5xx": False}))
    assert not fired(sc.override({"router.outlier_ejection": None}))
    assert not fired(sc.override({"router.kind": "round_robin"}))  # a plain Service ejects nothing
    assert not fired(sc.override({"state.store": "pod_local"}))  # no store to read
    assert not fired(sc.override({"faults.redis_outages": []}))


def test_an_ejected_pod_takes_no_turn_in_a_store_outage_even_one_whose_only_copy_it_holds(
        monkeypatch: pytest.MonkeyPatch, ejections: list[tuple[int, float, float]]) -> None:
    # serve_local: a pod serves a turn from its own copy of the session while Redis is out; the proxy still keeps an
    # ejected pod out of its set, so a turn whose copy is there fails over to another pod (503) instead
    sc = four_pods({}, "least_outstanding", 120, {"redis_outages": [{"at_s": 40.0, "duration_s": 10.0}]}).override({
        "workload.arrivals.rate_per_s": 4, "state.on_unavailable": "serve_local",
        "workload.sessions": {"turns": 6, "think_time_s": {"kind": "exponential", "mean_s": 2}}})
    sends: list[tuple[int, float]] = []
    enqueue = Pod.enqueue

    def recording_enqueue(self: Pod, i: int, now: float) -> None:
        sends.append((self.id, now))
        enqueue(self, i, now)

    monkeypatch.setattr(Pod, "enqueue", recording_enqueue)
    Simulation(sc, seed=0).run()
    assert ejections and all(40.0 <= t < 50.0 for _, t, _ in ejections)  # the outage's 503s eject
    for pod, start, end in ejections:
        assert not [t for p, t in sends if p == pod and start <= t < end]
        assert [t for p, t in sends if p == pod and t >= end]  # and it takes turns again once back


def test_a_pod_that_dies_holding_requests_is_ejected_at_once_by_their_resets(
        ejections: list[tuple[int, float, float]]) -> None:
    # Envoy counts an upstream reset as a failure (a local-origin one, in either counting mode): a pod that crashes
    # holding a batch of 32 two-second requests fails them all at the crash, and is ejected then, before a single
    # new request is refused by it (until stop 65 it took five refusals, 0.11 s later)
    sc = four_pods({"count_answered_5xx": False}, "least_outstanding", 40, **CRASH).override(
        {"service": {"kind": "deterministic", "mean_s": 2.0}, "batching.max_batch_size": 32})
    r = Simulation(sc, seed=0).run()
    assert [(pod, at) for pod, at, _ in ejections] == [(0, 20.0)]
    assert r.summary.failed == 0  # each reset retried elsewhere


def test_envoys_own_default_leaves_the_crashed_pod_of_four_in_the_endpoints() -> None:
    """Without ``always_eject_one_host`` (Envoy's default, all an Istio DestinationRule can say) 10 % of 4 pods is
    under one: the crashed pod is never ejected and the run is the run without ejection; at 25 % it is ejected
    after its five refusals, as with the option."""
    off = crash_run(None).summary
    envoy = crash_run({"always_eject_one_host": False}).summary
    quarter = crash_run({"always_eject_one_host": False, "max_ejection_percent": 25}).summary
    assert (envoy.retries, envoy.failed, envoy.completed) == (off.retries, off.failed, off.completed)
    assert off.retries > 100 and off.failed > 0
    assert quarter.retries == 5 and quarter.failed == 0
    assert (envoy.ejections, quarter.ejections) == (0, 1)


@settings(max_examples=200, deadline=None)
@given(percent=st.one_of(st.integers(0, 100).map(float), st.fractions(0, 100).map(float)), pods=st.integers(1, 500))
def test_the_fewest_pods_ejected_from_and_the_percentage_that_ejects_one_are_envoys_rule(percent: float,
                                                                                        pods: int) -> None:
    """``fewest_ejecting`` is where Envoy's own rule first has room for one pod, and ``fewest_percent`` the least
    whole percentage with room for one of ``pods`` (what the export's README and ``capsim check`` name)."""
    def room(p: float, n: int) -> bool:
        return OutlierDetector(OutlierSettings(max_ejection_percent=p, always_eject_one_host=False)).room(0, n)
    least = fewest_ejecting(percent)
    if least is None:
        assert percent == 0 and not room(percent, pods)
    else:
        assert room(percent, least) and (least == 1 or not room(percent, least - 1))
        assert room(percent, pods) == (pods >= least)
    assert ejects_one_of(percent, pods) == room(percent, pods)
    q = fewest_percent(pods)
    assert room(q, pods) and (q == 1 or not room(q - 1, pods))


def test_capsim_check_warns_when_envoys_own_rule_ejects_no_pod_at_the_floor() -> None:
    sc = four_pods({"always_eject_one_host": False}, "least_outstanding", 60, {})

    def fired(s: Scenario) -> list[Any]:
        return [f for f in run_checks(s) if f.check == "ejection-inert-at-floor"]

    (f,) = fired(sc)
    assert f.level == "warn" and f.path == "router.outlier_ejection.always_eject_one_host"
    assert "none of fewer than 10" in f.message and "4 pods at its floor" in f.message
    assert "max_ejection_percent to 25 (one of 4)" in f.message
    assert "never ejects a pod (0 %)" in fired(sc.override({"router.outlier_ejection.max_ejection_percent": 0}))[0].message
    assert not fired(sc.override({"router.outlier_ejection.max_ejection_percent": 25}))  # one of 4 is 25 %
    assert not fired(sc.override({"router.outlier_ejection.always_eject_one_host": True}))
    assert not fired(sc.override({"router.outlier_ejection": None}))
    assert not fired(sc.override({"router.kind": "round_robin"}))  # a plain Service ejects nothing
    assert not fired(four_pods({}, "least_outstanding", 60, {}))  # capsim's default ejects one


class _StubPod:
    """What the simulated router reads of a pod: a ready endpoint holding nothing."""

    def __init__(self, pod_id: int) -> None:
        self.id = pod_id
        self.state = PodState.READY
        self.routable = True
        self.node_lost = False
        self.outstanding = 0
        self.incarnation = 0


@pytest.mark.parametrize("kind", ["least_outstanding", "prefix_aware"])
@pytest.mark.parametrize("interval_s", [None, 10.0])
def test_a_failure_reported_after_a_pods_ejection_ended_counts_though_no_pick_came_between(
        kind: str, interval_s: float | None) -> None:
    # a failure the client reports (a reset, a timeout, a 503 after the pick) comes with no pick before it to return
    # pods whose ejection is over; the router returns them first, so the failure counts and the pod is ejected
    # again (until stop 69 it was dropped: the detector still held the pod as ejected)
    pods = [_StubPod(i) for i in range(4)]
    router = SimRouter(kind, list(pods), list(pods), BufferedDraws(np.random.default_rng(0)),
                       outlier=OutlierSettings(consecutive_failures=1, interval_s=interval_s))
    out = router.outliers
    assert out is not None
    router.lost(pods[0], 1.0)
    assert 0 in out.ejected_ids  # out until 31 (sweeps: the one at 40)
    back = 31.0 if interval_s is None else 40.0
    assert router.ejected(pods[0], back - 0.5)
    router.lost(pods[0], back)  # over now: it is back, and this failure ejects it again, for twice as long
    assert out.ejections == 2
    again = back + 60.0 if interval_s is None else 100.0
    assert out.ejected_ids[0] == pytest.approx(again)
    router.lost(pods[1], back)  # and a second pod's failure finds no stale ejection taking the room
    assert out.ejections == 2  # one of four out, 10 %: none more (always_eject_one_host ejects only the first)
    assert pods[0] not in [router.pick(back + 1.0) for _ in range(50)]
    assert pods[0] in [router.pick(again) for _ in range(50)]

