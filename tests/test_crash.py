"""A pod is killed with SIGKILL mid-load: no acknowledged turn is lost, and retrying clients continue.

Two real pod processes on loopback share a real redis-server. Multi-turn sessions start half on each
pod and stay with the pod that answers; a failed attempt is retried on the other pod. Pod A is killed
while requests are in flight, then restarted and shown to resume a session. The same crash is then
simulated, and the failed-request counts compared.

The assertions are the system's promises, not the operating system's scheduling: no acknowledged turn
is lost, every failure is on the killed pod and at or after the kill, a session fails at most once and
then continues on the survivor. Which of the killed pod's requests were sent just before the kill and
which in the instant after it is the scheduler's business, and is not asserted (issue 12, section 6).
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field

import httpx
import pytest

from capsim.core.state import open_store
from podproc import PodProcess

pytestmark = pytest.mark.slow

SESSIONS = 16
TURNS = 40


@dataclass
class Attempt:
    session: int
    pod: int
    sent: float
    ended: float
    ok: bool
    turn: int | None = None
    tokens: list[int] = field(default_factory=list)


async def drive(pods: list[PodProcess], kill_after: int, restart_after_s: float) -> tuple[list[Attempt], float]:
    """Run the sessions; kill pod 0 once ``kill_after`` turns are acknowledged (mid-load on a machine of any
    speed: a fixed time, 1 s, was a third of the way through the load on 2026-12-06 and half of it on a machine
    twice as fast), and restart it ``restart_after_s`` later."""
    attempts: list[Attempt] = []
    t0 = time.perf_counter()
    killed_at = float("nan")

    async def chaos() -> None:
        nonlocal killed_at
        while sum(a.ok for a in attempts) < kill_after:
            await asyncio.sleep(0.005)
        pods[0].signal(signal.SIGKILL)
        killed_at = time.perf_counter() - t0
        await asyncio.sleep(restart_after_s)
        await asyncio.to_thread(pods[0].start)

    async def session(c: httpx.AsyncClient, s: int) -> None:
        choice = s % 2
        for _ in range(TURNS):
            for _retry in range(4):
                pod = pods[choice]
                sent = time.perf_counter() - t0
                try:
                    r = await c.post(f"{pod.url}/v1/sessions/crash-{s}/turns",
                                     json={"prompt_tokens": 32, "max_new_tokens": 48})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    r, ok = None, False
                a = Attempt(s, choice, sent, time.perf_counter() - t0, ok)
                attempts.append(a)
                if ok:
                    assert r is not None
                    body = r.json()
                    a.turn, a.tokens = body["turn"], body["tokens"]
                    break
                choice = 1 - choice  # retry on the other pod, and stay there
                await asyncio.sleep(0.05)

    async with httpx.AsyncClient(timeout=httpx.Timeout(20.0, connect=2.0)) as c:
        await asyncio.gather(chaos(), *[session(c, s) for s in range(SESSIONS)])
    return attempts, killed_at


def test_sigkill_mid_load_loses_no_acknowledged_turn(tmp_path, redis_server_factory):
    server = redis_server_factory(aof=True)
    # max_prompt_tokens bounds each turn's prefill (the pod prefills the session's history, oldest turns
    # dropped to fit): 40 turns of full history would make this a test of CPU speed, not of a crash
    pods = [PodProcess(tmp_path, name=f"pod{i}", redis_url=server.url, max_batch_size=8, max_wait_ms=5,
                       torch_threads=1, max_prompt_tokens=128).start()
            for i in range(2)]
    try:
        # a quarter of the turns acknowledged: each pod's sessions are all mid-load
        attempts, killed_at = asyncio.run(drive(pods, kill_after=SESSIONS * TURNS // 4, restart_after_s=0.5))
        # the restarted pod resumes a session that lived on it: the next turn number follows on
        resumed = httpx.post(f"{pods[0].url}/v1/sessions/crash-0/turns", json={"prompt_tokens": 4}, timeout=30)
    finally:
        for p in pods:
            p.stop()

    failed = [a for a in attempts if not a.ok]
    acked = [a for a in attempts if a.ok]
    # closed-loop sessions with no think time always have a request on each pod: the kill finds some
    assert failed, "the kill should have caught some requests in flight"
    # the failures are the requests on the killed pod when it died (in flight at the kill, or sent in
    # the instant after it, before the client saw it was gone): one per session living there, none
    # elsewhere, none before the kill (killed_at is read after the signal, in the clients' own loop)
    in_flight = [a for a in failed if a.sent <= killed_at]
    for a in failed:
        assert a.pod == 0, a
        assert a.ended >= killed_at, a
    assert len({a.session for a in failed}) == len(failed) <= SESSIONS // 2
    assert resumed.status_code == 200 and resumed.json()["turn"] >= TURNS + 1
    # each session finished all its turns despite the crash: its retries went to the other pod
    for s in range(SESSIONS):
        turns = sorted(a.turn for a in acked if a.session == s)
        assert len(turns) == TURNS
        assert turns == sorted(set(turns)), f"session {s} saw a turn number twice: {turns}"
        after_failure = [a for a in acked if a.session == s and any(
            f.session == s and f.ended <= a.sent for f in failed)]
        for a in after_failure[:1]:
            assert a.pod == 1  # the retry went to the survivor

    async def stored() -> dict[int, list[list[int]]]:
        async with open_store(server.url) as store:
            out = {}
            for s in range(SESSIONS):
                state = await store.get(f"crash-{s}")
                assert state is not None
                out[s] = [[int(t) for t in m.content.split()] for m in state.messages if m.role == "assistant"]
            return out

    sessions = asyncio.run(stored())
    for s, replies in sessions.items():
        # every acknowledged turn is stored, with the very tokens the client was given
        for a in (a for a in acked if a.session == s):
            assert a.turn is not None and a.turn <= len(replies)
            assert replies[a.turn - 1] == a.tokens
        # at most the turns in flight at the kill were stored without being acknowledged
        extra = 1 if s == 0 else 0  # the turn sent to the restarted pod
        assert len(replies) - TURNS - extra <= sum(1 for f in failed if f.session == s)

    # the same crash in the simulator: two pods, the same sessions, a crash of one pod at 1.0 s (mid-load)
    from capsim.model.scenario import Scenario
    from capsim.sim.simulate import simulate

    scenario = Scenario.model_validate({
        "horizon_s": 30,
        "workload": {
            # all sessions start in the first 0.1 s, as the test's clients do
            "arrivals": {"kind": "piecewise", "rate_per_s": [[0, SESSIONS / 0.1], [0.1, 0]]},
            "prompt_tokens": {"kind": "constant", "value": 32},
            "output_tokens": {"kind": "constant", "value": 48},
            "sessions": {"turns": TURNS, "think_time_s": 0},
        },
        "service": {"kind": "profile", "profile": "data/profiles/cpu-tiny-float32.csv"},
        "batching": {"max_batch_size": 8, "max_wait_ms": 5},
        # the test's clients know both pods directly: no Service endpoints to wait for after the kill
        "pods": {"replicas": 2, "startup_s": 1.5, "crash_detection_s": 0, "endpoints_propagation_s": 0},
        "router": {"kind": "session_affinity"},
        "faults": {"crashes": [{"at_s": 1.0, "pods": 1}]},
        "state": {"store": "redis"},
        "client": {"timeout_s": 20, "max_retries": 3, "backoff_s": 0.05},
    })
    sim = simulate(scenario, seed=0)
    sim_failed_attempts = int(sim.summary.retries)
    print(f"\nfailed requests at the crash: real {len(failed)} ({len(in_flight)} sent before the kill), "
          f"simulated {sim_failed_attempts} "
          f"(sessions {SESSIONS} x {TURNS} turns, 2 pods, one killed: real at {killed_at:.2f} s, simulated at 1.0 s)")
    assert sim.summary.crashes == 1
    done = sim.requests[sim.requests.outcome.notna()]
    assert (done.outcome == "ok").all()  # with retries and Redis state, nobody loses a turn
    assert sim.summary.lost_sessions == 0
    # the model and the real pods agree on the mechanism: a crash fails at most one request per
    # session living on the killed pod (closed-loop sessions have one request each in flight), and the
    # retries then succeed. How many of those sessions had a request out at the instant of the kill
    # differs run to run in both (the real one by scheduling), so the counts share a bound, not a value.
    living_on_killed_pod = SESSIONS // 2
    assert 0 < sim_failed_attempts <= living_on_killed_pod
    assert 0 < len(failed) <= living_on_killed_pod
    assert sim_failed_attempts == int((sim.requests.attempts - 1).sum())  # the frame agrees with the counter
