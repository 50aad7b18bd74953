"""The agents' side of a run: sends requests in time order, gives up after a timeout, retries with backoff.

The client drives the run (``Client.run``): it walks the arrivals -- the workload's session starts,
merged with a heap of follow-ups (retries and later turns of sessions) -- and steps the SimPy
environment in between, handing every arrival that comes before the next scheduled event to the router
at the arrival's own time. Nothing else can happen between two events, so this is exact, and a request
costs no SimPy event of its own: a batch of 32 costs two or three events, not a hundred. A static batch's
end is not a SimPy event either: it waits on ``Records.ending``, keyed by the time and event id its
``Timeout`` would have had, and the loop takes it when it is the earliest, in the order SimPy would.

Timeouts are watched lazily by a second process: a pod's queue is FIFO by send time and every attempt
has the same timeout, so only queue heads can be due (with ``service.ingress_noise`` a continuous pod's
unfed requests are in the order they reach its engine instead: one sent earlier than the head times out
when it is the head, at most the ingress' spread late); batches with a request that will be due before
they end are put on a heap when they start. Retries are follow-ups at ``t + backoff * multiplier**k``, less a random share ``backoff_jitter`` of it
(``capsim.policy.retry``, draws from the ``retries`` stream).

Sessions: with ``state: pod_local`` (and with session affinity) a session's turns go to its home pod,
the pod of its first turn. When that pod crashes or goes away, the sessions living on it (started, not
finished) are lost: their requests fail without retry and their later turns are never sent.

Redis outages: a request sent while Redis is out is routed as any, and the pod it reaches fails it when it reads
its session (503, counted by that pod: ``Pod.errors``), and an
answer that ends while Redis is out fails at the pod's final store write, after its batch used the GPU
(503); both are retried. With ``state.on_unavailable: serve_local`` a pod that served the session's last
turn (and has lived since) serves it from its own copy instead, and the session is marked at risk.

Growing sessions, TTL expiry, think-time distributions, open-loop turns and the counters of where turns
went (affinity misses, history re-prefilled after a pod lost its cache) are kept by a
``capsim.sim.sessions.SessionBook`` when sessions have several turns (docs/sessions.md). Pods also leave the endpoints while their readiness probe fails (``cluster.py``).
A crashed or deleted pod stays in the endpoints for a moment (``cluster.py``): a request sent to it then
is refused at once (503 from a draining pod, a refused connection from a dead container) and retried. A
pod on a dead node (``faults.node_failures``) refuses nothing: what it held and what it is sent time out
at the client's timeout (``blackhole``), open on the pod until then.

A timeout counts to the answer's arrival at the client: an answer made in time that reaches its client
after the timeout (``service.answer_ms``, the way out) is a timeout (``time_out_late``).

A client that times out on a queued request: with ``client.cancel_on_timeout: all`` (the default) the
request leaves the pod's queue. With ``none`` it stays queued and runs, as on the reference pod, whose
handler a disconnect does not cancel before the response starts (Starlette cancels only a streaming
response, after its first byte): its slot in the queue becomes an orphan (a spare request slot past the
workload's, with the same token counts and enqueue time, ``_orphan``), which the pod batches and runs like
any request, and whose answer nobody reads. A static batch runs to its end in either case.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from simpy.events import Timeout

from capsim.errors import SimulationBudgetError
from capsim.policy.retry import retry_delay_s
from capsim.sim.arrivals import Workload
from capsim.sim.pod import Batch, Pod, PodState
from capsim.sim.recorder import FAILED, REJECTED, TIMED_OUT
from capsim.sim.sessions import SessionBook, SessionPrefix, ThinkTimes
from capsim.sim.streams import BufferedDraws

if TYPE_CHECKING:
    from capsim.sim.simulate import Simulation

# session states (only tracked when sessions matter: pod-local state, affinity, or several turns)
_IDLE, _ACTIVE, _DONE, _LOST, _ABANDONED = 0, 1, 2, 3, 4
_READY = PodState.READY
_CHUNK = 8192  # session starts converted to Python floats this many at a time


class Client:
    """The clients of all sessions, and the counters the run's invariant is checked with."""

    def __init__(self, sim: Simulation, workload: Workload) -> None:
        self.sim = sim
        self.env = sim.env
        self.rec = sim.records
        sc = sim.scenario
        self.horizon = sc.horizon_s
        self.until = sc.horizon_s + sc.drain_s  # scenario.drain_s: nothing is sent after the horizon
        self.turns = workload.turns
        self.think_s = workload.think_time_s
        self._starts = workload.session_start_s
        cl = sc.client
        self.timeout_s = cl.timeout_s
        self.max_retries = cl.max_retries
        self.backoff_s = cl.backoff_s
        self.backoff_mult = cl.backoff_multiplier
        self.backoff_jitter = cl.backoff_jitter
        self._jitter = BufferedDraws(sim.streams["retries"]) if cl.backoff_jitter > 0 else None
        self._max_batch = sim.batching.max_batch_size
        n_real = workload.n_requests
        self._n_real = n_real  # request ids from here on are orphans (cancel_on_timeout: none)
        self._cancel_queued = cl.cancel_on_timeout == "all"
        self._free_orphans = [] if self._cancel_queued else list(range(sim.records.n - 1, n_real - 1, -1))
        self._pick = sim.router.pick
        self._cap = sim.batching.queue_capacity if sim.batching.overflow == "reject" else math.inf
        self.pod_local = sc.state.store == "pod_local"
        self.sticky = self.pod_local or sc.router.kind == "session_affinity"
        self._outages = sim.faults.has_redis_outages  # an answer in an outage fails at its store write
        n_sessions = workload.n_sessions
        self.track_sessions = self.sticky or self.turns > 1
        self.home = np.full(n_sessions if self.sticky else 0, -1, dtype=np.int32)
        self.session = np.zeros(n_sessions if self.track_sessions else 0, dtype=np.int8)
        # counters: arrived = ok + failed + timed_out + rejected + in flight, checked at the horizon
        self._main_sent = 0  # first turns sent (the arrival process updates it before it sleeps)
        self._later_sent = 0  # later turns sent
        self.n_ok = 0
        # each pod counts what it answered (``Pod.answered``) when a canary's error rate is checked: off the hot
        # path otherwise (a simulation may set it before it runs)
        self.count_answers = any(ro.error_checked for ro in sim.scenario.pods.rollouts)
        self.n_failed = 0
        self.n_timed_out = 0
        self.n_rejected = 0
        self.n_retries = 0
        self.n_retry_pending = 0
        self.n_lost_sessions = 0
        self.followups: list[tuple[float, int, bool]] = []  # (time, request, is_retry)
        # sessions of several turns: their history, think times, and where their turns went
        ss = sc.workload.sessions
        self.open_loop = ss.mode == "open" and self.turns > 1
        self.serve_local = sc.state.on_unavailable == "serve_local"
        self.scored = sc.router.kind == "prefix_aware"
        self.book: SessionBook | None = None
        self._think = ThinkTimes(ss, sim.streams["sessions"])
        if self.turns > 1:
            prefix = workload.prefix if isinstance(workload.prefix, SessionPrefix) else None
            self.book = SessionBook(self.turns, workload.message_tokens, sim.records.prompt, sim.records.output,
                                    sc.batching.max_model_len, ss.on_context_overflow, sc.state.ttl_s, prefix)
            if prefix is not None:
                prefix.bind(sim.records.prompt, sim.records.output)
        self._inflight_due: list[tuple[float, int, int, Batch]] = []  # (due, seq, request, batch)
        self._holes = 0  # requests sent to a pod on a dead node, their timeout still to come (blackhole)
        self.n_blackholed = 0  # attempts that went to a dead node's pod
        self._seq = 0
        # router.hold_when_no_pod_s: attempts the gateway holds while the Service has no endpoint, as
        # (request, time held) in that order, and whether its expiry timer is set
        self.hold_s = sc.router.hold_when_no_pod_s or 0.0
        self.held: deque[tuple[int, float]] = deque()
        self.n_held = 0  # attempts held at some time
        self._hold_armed = False
        self._watch_at = 0.0  # when the timeout watcher wakes next
        self._early_at = math.inf  # an extra wake-up of it set for a held request released (``_watch_by``)
        self.env.process(self._watch_timeouts())

    # ---- the arrival process ----------------------------------------------------------------------
    def run(self) -> None:
        """Run the simulation to the horizon (and ``scenario.drain_s`` past it, sending nothing new): arrivals
        interleaved with the SimPy events in time order.

        This replaces ``env.run(until=horizon)``: before each event is stepped, every arrival that comes
        earlier is handed to the router at its own time. Sending may schedule events earlier than the
        next one (a batch starting), so the next event time is read again after each send.
        """
        env = self.env
        step = env.step
        queue = env._queue  # SimPy's (time, priority, id, event) heap, merged with the batches' ends
        ending = self.rec.ending  # (end, id, batch): Pod._end_at
        heap = self.followups
        horizon = self.horizon
        until = self.until
        starts = self._starts
        turns = self.turns
        # without sticky sessions or Redis outages, a first send needs only the router and the queue
        plain = not self.sticky and not self.sim.faults.has_redis_outages and not self.scored
        plain = plain and not self.sim.scenario.service.arrival_overhead_ms  # Pod.enqueue charges arrivals
        # a continuous pod's enqueue holds each request back for service.ingress_ms
        plain = plain and not (self.sim.continuous is not None and self.sim.scenario.service.ingress_ms)
        send = self._send_plain if plain else self._send
        open_loop = self.open_loop
        session = self.session if self.track_sessions else None
        n = len(starts)
        pos = base = k = 0
        times: list[float] = []
        while True:
            if k >= len(times):
                self._main_sent = base + k
                if pos < n:
                    times = starts[pos : pos + _CHUNK].tolist()
                    base = pos
                    pos += len(times)
                    k = 0
            t = times[k] if k < len(times) else math.inf
            t_event = queue[0][0] if queue else math.inf  # env.peek(), inlined
            end_next = False  # whether the next event is a batch's end (priority NORMAL, its own id)
            if ending:
                e = ending[0]
                if e[0] < t_event or (e[0] == t_event and queue[0][1] and e[1] < queue[0][2]):
                    t_event = e[0]
                    end_next = True
            if heap and heap[0][0] < t:
                t, i, is_retry = heap[0]
                if t < t_event and t < horizon:
                    heapq.heappop(heap)
                    self._send_followup(i, t, is_retry)
                    continue
            elif t < t_event and t < horizon:
                # the hot path: a new session's first turn, before anything else happens
                i = (base + k) * turns
                k += 1
                if session is not None:
                    session[i // turns] = _ACTIVE
                send(i, t)
                if open_loop:  # the next turn follows on a schedule, answered or not
                    self._push(t + self._think.next(), i + 1, False)
                continue
            if t_event > until:  # events at the end itself still happen (the last sample)
                self._main_sent = base + k
                return
            self._main_sent = base + k  # the time-series sampler may read it in this step
            if end_next:  # what env.step does for the batch's Timeout, without the event
                heapq.heappop(ending)
                env._now = t_event
                batch = e[2]
                batch.pod.complete(batch)
            else:
                step()

    def _push(self, t: float, i: int, is_retry: bool) -> None:
        heapq.heappush(self.followups, (t, i, is_retry))

    def _send_followup(self, i: int, t: float, is_retry: bool) -> None:
        rec = self.rec
        s = i // self.turns
        if is_retry:
            self.n_retry_pending -= 1
            if self.track_sessions and self.session[s] == _LOST:
                self._finish(i, t, FAILED, -1)
                return
            rec.attempts[i] += 1
            self.n_retries += 1
        else:
            if self.session[s] != _ACTIVE:  # lost while thinking
                return
            book = self.book
            if book is not None and not book.begin_turn(
                    i, t, not (self.serve_local and self._outages and self.sim.faults.redis_down(t))):
                self.session[s] = _DONE  # its context would pass max_model_len: the session ends here
                return
            if self.open_loop and (i + 1) % self.turns:
                self._push(t + self._think.next(), i + 1, False)
            rec.arrival[i] = t
            self._later_sent += 1
        rec.send[i] = t
        self._send(i, t)

    @property
    def n_arrived(self) -> int:
        """Requests sent at least once so far."""
        return self._main_sent + self._later_sent

    # ---- one attempt ---------------------------------------------------------------------------------
    def _send(self, i: int, t: float) -> None:
        """Send attempt of request ``i`` at ``t``: route, admit or reject, enqueue."""
        sim = self.sim
        book = self.book
        unreadable = False  # Redis is out: the pod it reaches cannot read the session
        if sim.faults.has_redis_outages and sim.faults.redis_down(t):
            pod = self._local_copy(i) if self.serve_local else None
            if pod is None:
                unreadable = True
                pod = self._route(i, t, answers=False)
            elif pod.state is _READY:
                sim.router.served(pod, t)  # it answers from its copy: a success to the proxy's outlier detection
        else:
            pod = self._route(i, t)
        if pod is None:
            if not (self.pod_local and self.session[i // self.turns] == _LOST):  # else failed with its session
                self._no_pod(i, t)
            return
        if pod.state is not _READY:  # crashed, deleted or on a dead node, not out of the endpoints yet
            self._not_ready(i, t, pod)
            return
        if unreadable:  # its server answers 503 and counts it (core.service: the session's read failed)
            sim.router.touch(pod)
            self._attempt_failed(i, t, FAILED, pod.id)
            return
        if len(pod.queue) >= self._cap:
            sim.router.touch(pod)  # picked, but its count did not change
            self._attempt_failed(i, t, REJECTED, pod.id)  # 429
            return
        pod.enqueue(i, t)
        if self.sticky or self.scored:
            sim.router.touch(pod)  # a home pod was not picked by the router
        if book is not None and i % self.turns:
            book.placed(i, pod, sim.cluster.pods)

    def _route(self, i: int, t: float, answers: bool = True) -> Pod | None:
        """The pod attempt ``i`` sent at ``t`` reaches: its session's home, the scorer's pick or the router's
        (``answers`` false: a ready pod answers it 503, which the router's outlier detection counts)."""
        book = self.book
        if self.sticky:
            return self._home_pod(i)
        if self.scored and book is not None and i % self.turns:
            s = i // self.turns
            hit = book.history_tokens(i) / max(int(self.rec.prompt[i]), 1)
            return self.sim.router.pick_scored(int(book.last_pod[s]), int(book.last_life[s]), hit, t, answers)
        return self.sim.router.pick(t, answers)

    def _not_ready(self, i: int, t: float, pod: Pod) -> None:
        """Attempt ``i`` sent at ``t`` reached ``pod``, still in the endpoints but not ready: refused at once
        (a draining pod's 503, a dead container's refused connection), or, on a dead node, unanswered; a
        crashed container still being torn down (``pods.crash_teardown_s``) accepts it and fails it when its
        teardown ends."""
        if pod.node_lost:
            self.blackhole(i, t + self.timeout_s, pod)
            return
        self.sim.router.touch(pod)
        if t < pod.teardown_until:  # a crashed container still being torn down: accepted, lost when it ends
            pod.dying.append(i)
            return
        pod.refused += 1
        self._attempt_failed(i, t, FAILED, pod.id)

    def _local_copy(self, i: int) -> Pod | None:
        """``serve_local`` in a Redis outage: the pod that served the session's last turn, if it still holds
        the session (same life, in the endpoints, not ejected by the proxy's outlier detection); it serves the
        turn (its answer is kept there alone, and the session is at risk: ``SessionBook.answered``)."""
        book = self.book
        if book is None or not i % self.turns:
            return None
        s = i // self.turns
        p = int(book.last_pod[s])
        if p < 0:
            return None
        pod = self.sim.cluster.pods[p]
        if not (pod.routable and book.cached_on(s, pod)) or self.sim.router.ejected(pod, float(self.rec.send[i])):
            return None
        return pod

    def _send_plain(self, i: int, t: float) -> None:
        """``_send`` without sessions or outages, with ``Pod.enqueue`` inlined: the hot path."""
        pod = self._pick(t)
        if pod is None:
            self._no_pod(i, t)
            return
        if pod.state is not _READY:  # crashed, deleted or on a dead node, not out of the endpoints yet
            self._not_ready(i, t, pod)
            return
        q = pod.queue
        if len(q) >= self._cap:
            self.sim.router.touch(pod)
            self._attempt_failed(i, t, REJECTED, pod.id)  # 429
            return
        q.append(i)
        pod.outstanding += 1
        if len(pod.running) < pod.max_running:
            n = len(q)
            if n == 1 or n >= self._max_batch:
                pod.pump(t)

    def _home_pod(self, i: int) -> Pod | None:
        s = i // self.turns
        h = int(self.home[s])
        if h >= 0:
            pod = self.sim.cluster.pods[h]
            if pod.routable:  # in the Service's endpoints
                return pod
            if self.pod_local and pod.state == PodState.READY:  # ready, not in the endpoints yet: 503
                return None
            if self.pod_local:  # the session's state went with its pod
                self._lose_sessions(np.array([s]), self.rec.send[i])
                self._finish(i, float(self.rec.send[i]), FAILED, h)
                return None
        picked = self.sim.router.pick(float(self.rec.send[i]))
        if picked is not None and picked.state is _READY:  # a refusing pod does not become the home
            self.home[s] = picked.id
        return picked

    # ---- a gateway that holds requests while no pod is ready (router.hold_when_no_pod_s) ----------------
    def _no_pod(self, i: int, t: float) -> None:
        """The router found no pod for attempt ``i`` at ``t``: a 503, or, while the Service has no endpoint at
        all, a gateway that holds requests holds it until one joins, the hold's limit (a 503) or the client's
        timeout, whichever comes first (and then sends it, as if sent at ``t``)."""
        if not (self.hold_s and not self.sim.cluster.endpoints):
            self._attempt_failed(i, t, FAILED, -1)  # no endpoint: 503
            return
        self.held.append((i, t))
        self.n_held += 1
        if not self._hold_armed:
            self._set_hold_timer(t + min(self.hold_s, self.timeout_s))

    def _set_hold_timer(self, at: float) -> None:
        self._hold_armed = True
        Timeout(self.env, max(at - self.env.now, 0.0)).callbacks.append(self._hold_expired)

    def _hold_expired(self, _: Timeout) -> None:
        """The held attempts whose wait is over fail (the gateway's 503, or the client gave up) and retry;
        held in order, all with the same wait, so they are at the head."""
        self._hold_armed = False
        now = self.env.now
        wait = min(self.hold_s, self.timeout_s)
        outcome = TIMED_OUT if self.timeout_s <= self.hold_s else FAILED
        held = self.held
        while held and held[0][1] + wait <= now + 1e-9:
            i, t = held.popleft()
            self._attempt_failed(i, t + wait, outcome, -1)
        if held:
            self._set_hold_timer(held[0][1] + wait)

    def release_held(self, now: float) -> None:
        """A pod joined the Service's endpoints at ``now``: the gateway sends what it held, in order."""
        held = self.held
        first = None
        while held and self.sim.cluster.endpoints:
            i, _ = held.popleft()
            if first is None:
                first = i
            self._send(i, now)  # its send time stays the client's: the timeout counts from there
        if first is not None:  # held in send order: the first released is due first
            self._watch_by(float(self.rec.send[first]) + self.timeout_s)

    def _attempt_failed(self, i: int, t: float, outcome: int, pod_id: int) -> None:
        """An attempt ended badly at ``t``: retry after backoff, or give up. A pod that ended it with an error
        (``pod_id``; not a client's timeout) counts it (``Pod.errors``)."""
        if pod_id >= 0 and outcome != TIMED_OUT:
            self.sim.cluster.pods[pod_id].errors += 1
        k = int(self.rec.attempts[i])
        if k <= self.max_retries:
            self.rec.bid[i] = -1
            self.n_retry_pending += 1
            u = self._jitter.next() if self._jitter is not None else 0.0
            self._push(t + retry_delay_s(k, self.backoff_s, self.backoff_mult, self.backoff_jitter, u), i, True)
        else:
            self._finish(i, t, outcome, pod_id)

    def _finish(self, i: int, t: float, outcome: int, pod_id: int) -> None:
        self.rec.finish(i, t, outcome, pod_id)
        if outcome == FAILED:
            self.n_failed += 1
        elif outcome == TIMED_OUT:
            self.n_timed_out += 1
        else:
            self.n_rejected += 1
        if self.track_sessions:
            s = i // self.turns
            if self.session[s] == _ACTIVE:
                self.session[s] = _ABANDONED

    # ---- events from pods and the cluster -------------------------------------------------------------
    def on_batch_done(self, batch: Batch, now: float) -> None:
        """A batch finished at ``now``: its live requests are answered (or fail at their store write)."""
        if not self._cancel_queued:
            self._drop_orphans(batch)
        down = self._outages and self.sim.faults.redis_down(now)
        if down and not self.serve_local:
            self._store_write_failed(batch, batch.idx.tolist(), now)
            return
        self.n_ok += batch.live_size
        if self.count_answers:
            batch.pod.answered += batch.live_size
        if not self.track_sessions:
            return
        idx = batch.idx
        if batch.cancelled:
            idx = idx[~np.isin(idx, list(batch.cancelled))]
        turns = self.turns
        if turns == 1:
            self.session[idx] = _DONE
            return
        book = self.book
        if book is not None:  # in an outage with serve_local the answers are kept on the pod alone
            for i in idx.tolist():
                book.answered(i, now, batch.pod, not down)
        last = idx % turns == turns - 1
        self.session[idx[last] // turns] = _DONE
        if self.open_loop:
            return
        for i in idx[~last].tolist():
            if self.session[i // turns] == _ACTIVE:
                self._push(now + self._think.next(), i + 1, False)

    def on_request_done(self, batch: Batch, i: int, now: float) -> None:
        """``on_batch_done`` for a one-request batch (a continuous-batching pod's request), without arrays."""
        if batch.cancelled:
            return
        if i >= self._n_real:  # an orphan: nobody reads its answer
            self._free_orphans.append(i)
            return
        down = self._outages and self.sim.faults.redis_down(now)
        if down and not self.serve_local:
            self._store_write_failed(batch, [i], now)
            return
        self.n_ok += 1
        if self.count_answers:
            batch.pod.answered += 1
        if not self.track_sessions:
            return
        turns = self.turns
        if self.book is not None:  # in an outage with serve_local the answer is kept on the pod alone
            self.book.answered(i, now, batch.pod, not down)
        if turns == 1 or i % turns == turns - 1:
            self.session[i // turns] = _DONE
        elif self.session[i // turns] == _ACTIVE and not self.open_loop:
            self._push(now + self._think.next(), i + 1, False)


    def time_out_late(self, batch: Batch, now: float, answered: float) -> None:
        """``batch`` ended at ``now`` and its answers reach their clients at ``answered`` (the way out,
        ``service.answer_ms``): a client whose timeout falls in between gave up before its answer came, so
        its request times out then instead of being answered, as the load generator's ``wait_for`` does."""
        timeout = self.timeout_s
        send = self.rec.send
        idx = batch.idx
        n_real = self._n_real
        for j in np.flatnonzero(send[idx] + timeout < answered).tolist():
            i = int(idx[j])
            if i >= n_real or (batch.cancelled and i in batch.cancelled):
                continue  # an orphan (nobody waits for it), or a client that gave up earlier
            if batch.cancelled is None:
                batch.cancelled = set()
            batch.cancelled.add(i)
            self._attempt_failed(i, max(float(send[i]) + timeout, now), TIMED_OUT, batch.pod.id)

    def _store_write_failed(self, batch: Batch, idx: list[int], now: float) -> None:
        """The model answered at ``now`` while Redis is out: the pod's final store write fails, so each live
        request of ``batch`` gets a 503 after having used the GPU (``_save_turn`` in ``capsim.core.service``)."""
        for i in idx:
            if not batch.cancelled or i not in batch.cancelled:
                self.sim.router.failed(batch.pod, now)  # a 5xx to the proxy: outlier detection counts it
                self._attempt_failed(i, now, FAILED, batch.pod.id)

    def watch_request(self, batch: Batch, i: int, due: float) -> None:
        """Watch request ``i`` of a one-request batch whose end is not known yet: it times out at ``due``."""
        self._seq += 1
        heapq.heappush(self._inflight_due, (due, self._seq, i, batch))

    def watch_batch(self, batch: Batch, sends: np.ndarray) -> None:
        """A batch starts that will end after some of its clients time out: watch those."""
        due = sends + self.timeout_s
        for j in np.flatnonzero(due < batch.end).tolist():
            self._seq += 1
            heapq.heappush(self._inflight_due, (float(due[j]), self._seq, int(batch.idx[j]), batch))

    def pod_lost(self, pod: Pod, held: list[int], now: float, crashed: bool) -> None:
        """A pod crashed or was killed at ``now`` holding requests ``held``: they fail."""
        if self.pod_local:
            self._lose_sessions(np.flatnonzero((self.home == pod.id) & (self.session == _ACTIVE)), now)
        for i in held:
            if i >= self._n_real:  # an orphan: nobody waits for it
                self._free_orphans.append(i)
            elif self.pod_local and self.session[i // self.turns] == _LOST:
                pod.errors += 1
                pod.refused += 1
                self.sim.router.lost(pod, now)
                self._finish(i, now, FAILED, pod.id)
            else:
                pod.refused += 1  # a reset: the gateway's error, not the pod's own count
                self.sim.router.lost(pod, now)
                self._attempt_failed(i, now, FAILED, pod.id)

    def node_lost(self, pod: Pod, held: list[int], now: float) -> None:
        """``pod``'s node died at ``now`` while it held requests ``held``: nothing answers or refuses them, so
        each times out when its client's timeout comes (``blackhole``); with pod-local state its sessions
        are lost now."""
        if self.pod_local:
            self._lose_sessions(np.flatnonzero((self.home == pod.id) & (self.session == _ACTIVE)), now)
        send = self.rec.send
        for i in held:
            if i >= self._n_real:  # an orphan: nobody waits for it
                self._free_orphans.append(i)
            else:
                self.blackhole(i, max(float(send[i]) + self.timeout_s, now), pod)

    def blackhole(self, i: int, due: float, pod: Pod) -> None:
        """Request ``i`` went to ``pod`` on a dead node: no answer, no refusal. Its client times out at
        ``due``; until then the request counts as outstanding on the pod (a least-outstanding router, which
        counts its open requests, sends such a pod less), unless the pod is deleted first."""
        self.n_blackholed += 1
        pod.outstanding += 1
        self.sim.router.touch(pod)
        self._holes += 1
        ev = Timeout(self.env, due - self.env.now, (i, pod, pod.incarnation))
        ev.callbacks.append(self._hole_due)

    def _hole_due(self, ev: Timeout) -> None:
        i, pod, incarnation = cast(tuple[int, Pod, int], ev.value)
        now = self.env.now
        self._holes -= 1
        if pod.incarnation == incarnation:  # not deleted meanwhile (a deletion resets its count)
            pod.outstanding -= 1
            if pod.routable:
                self.sim.router.touch(pod)
        self.sim.router.lost(pod, now)
        if self.pod_local and self.session[i // self.turns] == _LOST:
            self._finish(i, now, TIMED_OUT, pod.id)
        else:
            self._attempt_failed(i, now, TIMED_OUT, pod.id)

    def pod_gone(self, pod: Pod, now: float) -> None:
        """A pod is gone for good (deleted): with pod-local state its sessions are lost."""
        if self.pod_local:
            self._lose_sessions(np.flatnonzero((self.home == pod.id) & (self.session == _ACTIVE)), now)

    def lost_sessions(self) -> tuple[np.ndarray, int]:
        """The ids of the sessions lost (pod-local state on a pod that crashed or went), and how many of their
        turns were never sent; call before the records' columns are built."""
        if not self.pod_local:
            return np.empty(0, dtype=np.int64), 0
        lost = np.flatnonzero(self.session == _LOST)
        turns = self.rec.arrival[: len(self.session) * self.turns].reshape(-1, self.turns)[lost]
        return lost, int(np.isnan(turns).sum())

    def _lose_sessions(self, sessions: np.ndarray, now: float) -> None:
        active = sessions[self.session[sessions] == _ACTIVE]
        self.session[active] = _LOST
        self.n_lost_sessions += len(active)

    # ---- timeouts ---------------------------------------------------------------------------------------
    def _watch_timeouts(self) -> Generator[Any, Any, None]:
        env = self.env
        while True:
            now = env.now
            nxt = self._timeouts_due(now)
            if nxt >= self.until:
                self._watch_at = self.until
                yield env.timeout(self.until - now)
                return
            self._watch_at = nxt
            yield env.timeout(nxt - now)

    def _watch_by(self, due: float) -> None:
        """Something is due at ``due``, maybe before the watcher wakes (it wakes when what it saw is due, or a
        timeout after, which covers whatever is sent later, but not a request the gateway held and sends
        now with its client's send time): wake it then too."""
        if due < self._watch_at and due < self._early_at:
            self._early_at = due
            Timeout(self.env, max(due - self.env.now, 0.0), due).callbacks.append(self._early_watch)

    def _early_watch(self, ev: Timeout) -> None:
        if ev.value != self._early_at:  # superseded by an earlier wake-up
            return
        self._early_at = math.inf
        nxt = self._timeouts_due(self.env.now)
        if nxt < self.until:
            self._watch_by(nxt)

    def _timeouts_due(self, now: float) -> float:
        """Fail the attempts whose client timed out by ``now``; return when the next one may be due."""
        rec = self.rec
        timeout = self.timeout_s
        due_heap = self._inflight_due
        while due_heap and due_heap[0][0] <= now:
            due, _, i, batch = heapq.heappop(due_heap)
            if batch.dead or batch.done or rec.bid[i] != batch.bid or i >= self._n_real:
                continue
            if batch.cancelled is None:
                batch.cancelled = set()
            batch.cancelled.add(i)
            batch.pod.outstanding -= 1
            batch.pod.cancel(batch, i)
            self.sim.router.touch(batch.pod)
            self._attempt_failed(i, due, TIMED_OUT, batch.pod.id)
        # entries of runs that ended (nearly all of a continuous pod's: each request is watched) are
        # dropped now, so the next wake-up is for one that may still be due, not one per request
        while due_heap:
            _, _, i, batch = due_heap[0]
            if not (batch.dead or batch.done or rec.bid[i] != batch.bid):
                break
            heapq.heappop(due_heap)
        nxt = now + timeout  # anything sent from now on is due later than this
        for pod in self.sim.cluster.live_pods:
            q = pod.queue
            if not self._cancel_queued:
                nxt = min(nxt, self._orphan_due(pod, now))
                continue
            while q and rec.send[q[0]] + timeout <= now:
                i = pod.drop_head()
                self._attempt_failed(i, float(rec.send[i]) + timeout, TIMED_OUT, pod.id)
                if pod.state == PodState.TERMINATING and pod.outstanding == 0 and not pod.running:
                    self.sim.cluster.pod_drained(pod, now)
            if q:
                nxt = min(nxt, float(rec.send[q[0]]) + timeout)
        if due_heap:
            nxt = min(nxt, due_heap[0][0])
        return nxt

    def _orphan_due(self, pod: Pod, now: float) -> float:
        """``cancel_on_timeout: none``: the queued requests of ``pod`` whose client gave up by ``now`` become
        orphans in place; return when the next one is due. The orphans are a prefix of the queue (it is
        FIFO by send time, and every attempt has the same timeout)."""
        q = pod.queue
        rec = self.rec
        n_real = self._n_real
        k = 0
        while k < len(q) and q[k] >= n_real:
            k += 1
        while k < len(q) and rec.send[q[k]] + self.timeout_s <= now:
            i = q[k]
            q[k] = self._orphan(i)
            self._attempt_failed(i, float(rec.send[i]) + self.timeout_s, TIMED_OUT, pod.id)
            k += 1
        return float(rec.send[q[k]]) + self.timeout_s if k < len(q) else math.inf

    def _orphan(self, i: int) -> int:
        """A spare request slot standing for request ``i``'s attempt after its client left."""
        if not self._free_orphans:
            raise SimulationBudgetError(
                f"client.cancel_on_timeout: none: more than {self.rec.n - self._n_real} requests whose client "
                "left are queued at once; the run is far past saturation"
            )
        g = self._free_orphans.pop()
        rec = self.rec
        rec.prompt[g], rec.output[g], rec.send[g] = rec.prompt[i], rec.output[i], rec.send[i]
        return g

    def _drop_orphans(self, batch: Batch) -> None:
        """A finished batch's orphans are cancelled: their answers are discarded, their slots reused."""
        orphans = batch.idx[batch.idx >= self._n_real].tolist()
        if orphans:
            if batch.cancelled is None:
                batch.cancelled = set()
            batch.cancelled.update(orphans)
            self._free_orphans.extend(orphans)

    # ---- the horizon ---------------------------------------------------------------------------------
    def in_flight(self) -> int:
        """Requests arrived and not finished: queued, in a running batch, or waiting to retry (orphans of
        requests whose client left are not requests)."""
        n = self.n_retry_pending + self._holes + len(self.held)
        n_real = self._n_real
        for pod in self.sim.cluster.pods:
            if self._cancel_queued:
                n += len(pod.queue) + sum(b.live_size for b in pod.running)
            else:
                n += sum(1 for i in pod.queue if i < n_real)
                n += sum(b.live_size - int((b.idx >= n_real).sum()) for b in pod.running)
            # answers still on their way out (service.answer_ms): not at their clients yet
            n += sum(b.live_size - int((b.idx >= n_real).sum()) for b in pod.answering)
        return n
