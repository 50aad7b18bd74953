"""One simulated agent pod: its lifecycle, its bounded queue, and the batches it runs with the shared rule.

A ready pod queues the requests the router sends it and asks ``capsim.policy.batching.decide`` -- the
rule the real asyncio batcher uses -- when to send the head of the queue to the model as one batch. The
batch's duration comes from the service model. The pod is driven by callbacks rather than a generator
per request: the batching rule's wake-up is a SimPy event, and a batch's completion is an entry on a heap
that ``Client.run`` merges with SimPy's queue in SimPy's own order (``Pod._end_at``), so a batch costs
no SimPy event at all. Methods take the simulated time ``now`` explicitly: the
client may hand a pod an arrival before the SimPy clock has reached it (see ``client.py``), and every
event a pod schedules is placed at an absolute time.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from enum import IntEnum
from functools import partial
from heapq import heappush
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from simpy.events import Timeout

from capsim.model.buckets import TTFT_BUCKETS_S
from capsim.policy.batching import decide

if TYPE_CHECKING:
    from capsim.sim.simulate import Simulation


_NO_REQUESTS = np.empty(0, dtype=np.int64)


class PodState(IntEnum):
    """Where a pod is in its life (the Kubernetes words)."""

    PENDING = 0  # waiting for a GPU on a node
    STARTING = 1  # cold start: image pull, model load, warm-up
    READY = 2  # receives traffic
    CRASHED = 3  # container died; the kubelet restarts it after the CrashLoopBackOff delay
    TERMINATING = 4  # removed from the endpoints; drains its queue within the grace period
    GONE = 5


#: the states in which a pod's server answers what it was sent before (its /metrics too): ready, or draining
SERVING = (PodState.READY, PodState.TERMINATING)


class Batch:
    """One batch on the model: its requests (in queue order) and its times (s)."""

    __slots__ = ("bid", "cancelled", "dead", "done", "due", "end", "first", "idx", "pod", "size", "start")

    def __init__(self, idx: np.ndarray, start: float, first: float, end: float, pod: Pod,
                 size: int | None = None) -> None:
        self.bid = -1  # set by Records.add_batch
        self.idx = idx  # released when the batch is over
        self.size = len(idx) if size is None else size  # a continuous pod's Run: the requests running
        self.start = start
        self.first = first
        self.end = end
        self.pod = pod
        self.cancelled: set[int] | None = None  # requests whose client gave up while the batch ran
        self.dead = False  # the pod crashed or was killed under it
        self.done = False  # finished normally
        self.due: float | None = None  # its end's time on the ending heap, once arrivals have lengthened it

    @property
    def live_size(self) -> int:
        """Requests of the batch whose client still waits for it."""
        return self.size - (len(self.cancelled) if self.cancelled else 0)


class _Wake(Batch):
    """A moment a pod waits for on ``Records.ending``, where a static batch's end waits: a static batch's
    answers reaching their clients (``service.answer_ms`` after it ends), a continuous pod's step or run
    ending. ``Client.run`` hands it to ``pod.complete`` at its time, in the order of the event id a SimPy
    ``Timeout`` would have taken, so every frame is as with a ``Timeout``, without the event object and its
    step. Only ``pod`` of ``Batch`` is set (``Client.run`` reads it)."""

    __slots__ = ("handler", "value")

    def __init__(self, pod: Pod, handler: Callable[[Any], None], value: Any) -> None:  # no Batch.__init__
        self.pod = pod
        self.handler = handler
        self.value = value


def _slowed_batch_time(base: Callable[[int, int, int], tuple[float, float]], factor: float, size: int,
                       prompt_tokens: int, output_tokens: int) -> tuple[float, float]:
    """``base``'s (first token, whole batch) times, ``factor`` times as long (a slow pod)."""
    prefill_s, total_s = base(size, prompt_tokens, output_tokens)
    return prefill_s * factor, total_s * factor


class Pod:
    """A pod's state, queue and counters; ``Cluster`` moves it through its lifecycle."""

    def __init__(self, sim: Simulation, pod_id: int, created_s: float) -> None:
        self.sim = sim
        self.id = pod_id
        self.state = PodState.PENDING
        self.created_s = created_s
        self.incarnation = 0  # bumped by each crash, so stale timers of a former life are ignored
        self.revision = 0  # the Deployment's pod template it runs (pods.rollouts: a rolling update's new one)
        # (time, busy seconds) when its container last started: its /metrics counters start there
        self.counters_from = (created_s, 0.0)
        # its counters (``scrape_counters``) when its container last started: /metrics shows them less these, so
        # a restarted container's counters start from 0, as a new process's do (Prometheus's rate() sees a reset)
        self.counters_base: tuple[float, ...] = (0.0,) * 7
        self.buckets_base: tuple[int, ...] | None = None
        # readiness (cluster.py): in the Service's endpoints (the router sees it); failing its readiness probe
        # (Ready condition false while READY); when it last became ready (the ReplicaSet's ranking)
        self.routable = False
        self.server_up = False  # its container's server is up: from the model loaded (before ready) to its exit
        self.node_lost = False  # its node died (faults.node_failures): what it is sent gets no answer
        # a crashed container being torn down (pods.crash_teardown_s): until then what it is sent is accepted and
        # lost with what it held, all failing when the teardown ends (``Cluster.crash``)
        self.teardown_until = -math.inf
        self.dying: list[int] = []
        # its node died while it was ready, and the node lifecycle controller has not marked it NotReady yet:
        # the API server still shows it Ready (see ``ready_condition``)
        self.lost_ready = False
        self.probe_failing = False
        self.ready_s: float | None = None
        self.first_ready_s: float | None = None  # its first container's first ready (ready_s: the latest)
        self.queue: deque[int] = deque()
        self.outstanding = 0  # queued + in running batches, clients still waiting: the router's number
        self.running: list[Batch] = []
        # batches (a continuous pod's runs) over whose answers are on their way out (service.answer_ms): the
        # pod holds them until then, so a crash meanwhile fails them; at the run's end they are in flight.
        # A dict as an ordered set: a crash fails them in the order they ended, the same on every run
        self.answering: dict[Batch, None] = {}
        self.max_running = sim.batching.max_concurrent_batches
        self._max_batch = sim.batching.max_batch_size
        self._batching = sim.batching
        self._env = sim.env
        self._rec = sim.records
        self._batch_time = sim.service.batch_time
        self.slow = 1.0  # faults.slow_pods: its batches take this many times as long (``set_slow``)
        # pod CPU per request that lands on the batch running when the request arrives (HTTP parsing on
        # the model's core): it lengthens that batch, so a batch grows with the arrivals during it
        self._arrival_s = sim.scenario.service.arrival_overhead_ms / 1000.0
        # a request that arrives while the model runs reaches the batcher's queue this much later (its HTTP
        # parsing waits for the core): a batch that starts sooner leaves it for the next one
        self._ingress_s = sim.scenario.service.ingress_ms / 1000.0
        self._idle_since = 0.0  # when the last batch ended with none left running
        self._ending = sim.records.ending
        # SimPy's event counter: a batch's end takes the id its Timeout event would have taken, so that
        # Client.run completes it in exactly the order SimPy would have (see ``_end_at``)
        self._eid = sim.env._eid
        self._timer_at: float | None = None
        # counters the pod's /metrics endpoint exports (scraped by the HPA pipeline)
        self.busy_s = 0.0  # closed busy intervals: time with at least one batch on the model
        self._busy_since = 0.0
        self.batch_s = 0.0  # service seconds of finished batches (the real pod's busy counter)
        # the TTFT histogram, observed when the pod answers (the real batcher's moment): sum, count and,
        # when a query takes its quantile, the observations per bucket of TTFT_BUCKETS_S (the last +Inf)
        self.ttft_sum_s = 0.0
        self.ttft_count = 0
        self.ttft_buckets: list[int] | None = [0] * (len(TTFT_BUCKETS_S) + 1) if sim.track_ttft_buckets else None
        # what the pod answered (a gateway's 2xx) and the attempts it ended with an error: a full queue's 429, an
        # unservable request's 400, a refusal while not ready or draining, a crash's reset, a store write's 503
        # (a client's timeout is the client's, not counted): a canary's error rate (undo_if_error_rate_over; the
        # answers are counted only when one is checked, ``Client.count_answers``)
        self.answered = 0
        self.errors = 0
        # of those errors, the ones the pod's own server never counted: a refusal while not ready or draining (its
        # server takes no more requests) and a crash's or a kill's reset (its process is gone): the error rate of
        # ``Rollout.error_rate_source: pod`` leaves them out
        self.refused = 0
        # what its own server had counted when its container started (answered, errors less refused): its
        # http_requests_total counts from there (``capsim.sim.analysis``)
        self.http_base = (0, 0)
        # GPU holding time, for cost
        self.gpu_since: float | None = None
        self.gpu_s = 0.0
        self.samples: deque[tuple[Any, ...]] = deque()  # scraped by hpa.py

    @property
    def ready_condition(self) -> bool:
        """The pod's Ready condition as the API server holds it, which the PodDisruptionBudget, the
        ReplicaSet's ranking, the HPA's ready count and ``kubectl get deploy`` read: ready and passing its
        probes, or lost with a dead node its kubelet can no longer report (``lost_ready``)."""
        return (self.state == PodState.READY and not self.probe_failing) or self.lost_ready

    @property
    def metrics_up(self) -> bool:
        """Its ``/metrics`` answers a scrape: serving or draining, or started with its server up and its readiness
        not passed yet (Prometheus scrapes every Running pod of its targets, ready or not)."""
        return self.state in SERVING or (self.state == PodState.STARTING and self.server_up)

    def __repr__(self) -> str:
        return f"Pod({self.id}, {self.state.name}, queued={len(self.queue)}, running={len(self.running)})"

    def set_slow(self, factor: float, now: float) -> None:
        """Its batches started from ``now`` on take ``factor`` times as long (``faults.slow_pods``); those
        running keep their end."""
        self.slow = factor
        base = self.sim.service.batch_time
        self._batch_time = base if factor == 1.0 else partial(_slowed_batch_time, base, factor)

    # ---- traffic ---------------------------------------------------------------------------------
    def enqueue(self, i: int, now: float) -> None:
        """Queue request ``i`` at ``now``; the caller has checked capacity and readiness."""
        q = self.queue
        q.append(i)
        self.outstanding += 1
        if self._arrival_s and self.running:
            self._grow(now)
        if len(self.running) < self.max_running:
            n = len(q)
            # only these two changes can alter the rule's answer: a first request starts the wait,
            # a full batch ends it
            if n == 1 or n >= self._max_batch:
                self.pump(now)

    def pump(self, now: float) -> None:
        """Ask the batching rule what to do at ``now`` and do it: start batches, or set the wake-up."""
        if self._ingress_s:
            self._pump_parsed(now)
            return
        q = self.queue
        send = self._rec.send
        running = self.running
        max_batch = self._max_batch
        while q:
            # decide's first answers, without its call and its Dispatch: a pod with no free slot waits for
            # a completion; a full batch leaves now (the hot path at max_batch_size 1, where every
            # request is a full batch)
            if len(running) >= self.max_running:
                return
            if len(q) >= max_batch:
                self._start_batch(now, max_batch)
                continue
            d = decide(now, len(q), float(send[q[0]]), self._batching, len(running))
            if d.size:
                self._start_batch(now, d.size)
                continue
            if d.wake_at is not None and (self._timer_at is None or d.wake_at < self._timer_at):
                self._timer_at = d.wake_at
                ev = Timeout(self._env, max(d.wake_at - self._env.now, 0.0), d.wake_at)
                ev.callbacks.append(self._on_timer)
            return

    def _pump_parsed(self, now: float) -> None:
        """``pump`` where the batcher sees only the requests parsed by ``now``: those sent ``_ingress_s``
        ago, and those sent while the model was idle (parsed at once); the queue stays in send order."""
        q = self.queue
        send = self._rec.send
        running = self.running
        max_batch = self._max_batch
        lag = self._ingress_s
        while q:
            if len(running) >= self.max_running:
                return
            seen = 0
            for j in q:
                s = send[j]
                # ``s + lag``, as the wake-up below is computed: ``s <= now - lag`` can round the other way at
                # the wake-up's own time, find the request unparsed, set the same wake-up again and loop at it
                if s + lag <= now or (not running and s >= self._idle_since):
                    seen += 1
                    if seen >= max_batch:
                        break
                else:
                    break
            if seen >= max_batch:
                self._start_batch(now, max_batch)
                continue
            wake = float(send[q[seen]]) + lag if seen < len(q) else None  # the next one is parsed then
            if seen:
                d = decide(now, seen, float(send[q[0]]), self._batching, len(running))
                if d.size:
                    self._start_batch(now, d.size)
                    continue
                if d.wake_at is not None and (wake is None or d.wake_at < wake):
                    wake = d.wake_at
            if wake is not None and (self._timer_at is None or wake < self._timer_at):
                self._timer_at = wake
                ev = Timeout(self._env, max(wake - self._env.now, 0.0), wake)
                ev.callbacks.append(self._on_timer)
            return

    def _on_timer(self, ev: Timeout) -> None:
        if ev.value != self._timer_at:  # superseded by an earlier wake-up, or the pod was killed
            return
        now = cast(float, ev.value)
        self._timer_at = None
        self.pump(now)

    def _start_batch(self, now: float, size: int) -> None:
        if size == 1:
            self._start_one(now)
            return
        sim = self.sim
        q = self.queue
        if size == len(q):
            idx = np.array(q, dtype=np.int64)
            q.clear()
        else:
            idx = np.array([q.popleft() for _ in range(size)], dtype=np.int64)
        rec = self._rec
        if sim.constant_lengths:
            p, o = sim.constant_lengths
        else:
            p, o = int(rec.prompt[idx].max()), int(rec.output[idx].max())
        prefill_s, total_s = self._batch_time(size, p, o)
        end = now + total_s
        if not self.running:
            self._busy_since = now
        batch = Batch(idx, now, now + prefill_s, end, self)
        rec.add_batch(batch)
        self.running.append(batch)
        self._end_at(end, batch)
        if rec.send[idx[0]] + sim.timeout_s < end:  # FIFO: the head was sent first
            sim.client.watch_batch(batch, rec.send[idx])

    def _start_one(self, now: float) -> None:
        """``_start_batch`` for a batch of one request, with scalars instead of arrays: at light load and
        with ``max_batch_size: 1`` nearly every batch is one request, and numpy calls on one-element
        arrays cost more than the rest of the batch. Same draws, same records, same events."""
        sim = self.sim
        i = self.queue.popleft()
        rec = self._rec
        if sim.constant_lengths:
            p, o = sim.constant_lengths
        else:
            p, o = int(rec.prompt[i]), int(rec.output[i])
        prefill_s, total_s = self._batch_time(1, p, o)
        end = now + total_s
        if not self.running:
            self._busy_since = now
        batch = Batch(np.array((i,), dtype=np.int64), now, now + prefill_s, end, self)
        batch.bid = bid = len(rec.batches)  # Records.add_batch, for one request
        rec.batches.append(batch)
        rec.bid[i] = bid
        self.running.append(batch)
        t = self._env._now  # self._end_at(end, batch), inlined; max(d, 0.0) spelled out
        d = end - t
        heappush(self._ending, (t + (0.0 if d < 0.0 else d), next(self._eid), batch))
        sent = float(rec.send[i])
        if sent + sim.timeout_s < end:
            sim.client.watch_batch(batch, rec.send[batch.idx])

    def _grow(self, now: float) -> None:
        """An arrival at ``now`` costs the running batches ``_arrival_s`` of the core: each ends that much
        later (and its first token too, if still to come). The old entry on the ending heap stays and is
        skipped by ``complete`` (``Batch.due`` names the live one). A client timeout is watched from the
        batch's end as it was when the batch started."""
        cost = self._arrival_s
        for b in self.running:
            if now < b.first:
                b.first += cost
            b.end += cost
            t = self._env._now
            b.due = t + max(b.end - t, 0.0)
            heappush(self._ending, (b.due, next(self._eid), b))

    def _end_at(self, end: float, batch: Batch) -> None:
        """Schedule ``batch``'s completion at ``end``, outside SimPy's event queue: on ``Records.ending``, a
        heap that ``Client.run`` merges with SimPy's queue. The entry holds what a ``Timeout`` would
        have held in that queue -- the time SimPy would compute (``now + max(end - now, 0)``, rounding
        included) and the next event id (priority is always NORMAL) -- so the order of events, and with
        it every frame, is the same as with a SimPy event; what is saved is the event object, its
        scheduling and its step."""
        now = self._env._now
        heappush(self._ending, (now + max(end - now, 0.0), next(self._eid), batch))

    def complete(self, batch: Batch) -> None:
        """``batch`` ends now (``Client.run`` has set the clock to its end): answer its requests."""
        if batch.__class__ is _Wake:
            batch.handler(batch.value)
            return
        if batch.dead or (batch.due is not None and self._env._now != batch.due):
            return  # killed, or an end that arrivals have since pushed later (``_grow``)
        sim = self.sim
        now = batch.end
        running = self.running
        running.remove(batch)
        if not running:
            self.busy_s += now - self._busy_since
            self._idle_since = now
        self.outstanding -= batch.live_size
        sim.router.touch(self)
        batch.done = True
        self.batch_s += now - batch.start
        if sim.track_ttft:  # only an HPA on TTFT reads it: skip the histogram otherwise
            self._observe_ttft(batch)
        # the answers reach their clients after the way out (service.answer_ms, answer_per_request_ms)
        answered = now + self._rec.way_out(batch.size)
        if answered > now and self._rec.send[batch.idx[0]] + sim.timeout_s < answered:  # FIFO: the head first
            sim.client.time_out_late(batch, now, answered)
        if answered > now:  # on their way out: answered then, unless the pod dies first
            self.answering[batch] = None
            heappush(self._ending, (answered, next(self._eid), _Wake(self, self._answered, (batch, self.incarnation))))
        else:
            self._deliver(batch, answered)
        if self.queue:
            self.pump(now)
        elif self.outstanding == 0 and not running and self.state == PodState.TERMINATING:
            sim.cluster.pod_drained(self, now)

    def lose_answers(self, held: list[int]) -> None:
        """The pod dies: the batches over whose answers are not out yet fail with it (added to ``held``)."""
        for b in self.answering:
            b.dead = True
            b.done = False
            held.extend(i for i in b.idx.tolist() if not b.cancelled or i not in b.cancelled)
            b.idx = _NO_REQUESTS
        self.answering.clear()

    def _wake_at(self, end: float, handler: Callable[[Any], None], value: Any) -> None:
        """Call ``handler(value)`` at ``end`` (see :class:`_Wake`); the time as SimPy would round it."""
        t = self._env._now
        d = end - t
        heappush(self._ending, (t + (d if d > 0.0 else 0.0), next(self._eid), _Wake(self, handler, value)))

    def _answered(self, out: tuple[Batch, int]) -> None:
        """A batch's answers reached their clients (the way out over)."""
        batch, incarnation = out
        if incarnation == self.incarnation:  # else the pod died on the way out: they failed then
            del self.answering[batch]
            self._deliver(batch, self._env._now)

    def _deliver(self, batch: Batch, answered: float) -> None:
        if batch.size == 1:
            self.sim.client.on_request_done(batch, int(batch.idx[0]), answered)
        else:
            self.sim.client.on_batch_done(batch, answered)
        batch.idx = _NO_REQUESTS  # the records keep the batch: let its index array go

    # ---- metrics and failures ------------------------------------------------------------------------
    def _observe_ttft(self, batch: Batch) -> None:
        """The batch's answered requests (not those whose client gave up) enter the TTFT histogram now,
        when the pod answers them, as the real batcher observes them when the batch returns."""
        sent = self._rec.send[batch.idx]
        if batch.cancelled:
            keep = [k for k, i in enumerate(batch.idx.tolist()) if i not in batch.cancelled]
            sent = sent[keep]
        if self.ttft_buckets is None:
            self.ttft_sum_s += batch.first * len(sent) - float(sent.sum())
            self.ttft_count += len(sent)
            return
        for v in (batch.first - sent).tolist():
            self.observe_ttft(v)

    def observe_ttft(self, ttft_s: float) -> None:
        """One TTFT observation (seconds) into the pod's histogram."""
        self.ttft_sum_s += ttft_s
        self.ttft_count += 1
        if self.ttft_buckets is not None:
            self.ttft_buckets[bisect_left(TTFT_BUCKETS_S, ttft_s)] += 1

    def busy_observed_s(self, now: float) -> float:
        """The busy seconds the pod's /metrics counts at ``now``: service time of the batches finished so
        far (``InferenceMetrics.observe_batch``); a batch still running counts when it ends."""
        return self.batch_s

    def busy_counted_s(self, now: float) -> float:
        """The busy seconds ``capsim_gpu_busy_ratio`` is computed from at a scrape at ``now``."""
        return self.busy_observed_s(now)

    def container_started(self, now: float) -> None:
        """Its container starts (a first start or a restart): the /metrics counters start afresh."""
        self.counters_from = (now, self.busy_counted_s(now))
        self.counters_base = self.scrape_counters(now)
        self.buckets_base = tuple(self.ttft_buckets) if self.ttft_buckets is not None else None
        self.http_base = (self.answered, self.errors - self.refused)

    def scrape_counters(self, now: float) -> tuple[float, ...]:
        """Its counters since it was created, as a scrape at ``now`` reads them: TTFT sum (s) and count, then
        vLLM's ITL sum (s) and count, preemptions, prompt and generation tokens (none for a static pod)."""
        return (self.ttft_sum_s, self.ttft_count, 0.0, 0, 0, 0, 0)

    def busy_total_s(self, now: float) -> float:
        """Busy seconds up to ``now`` (the counter a scrape reads)."""
        return self.busy_s + (now - self._busy_since if self.running else 0.0)

    def drop_head(self) -> int:
        """Remove and return the head of the queue (its client gave up)."""
        self.outstanding -= 1
        self.sim.router.touch(self)
        return self.queue.popleft()

    def cancel(self, batch: Batch, i: int) -> None:
        """The client of request ``i`` in ``batch`` gave up: a static batch runs on to its end regardless."""

    def kill(self, now: float) -> list[int]:
        """Stop everything at ``now`` (crash or kill after the grace period); return the requests it held."""
        held = list(self.queue)
        for b in self.running:
            b.dead = True
            held.extend(i for i in b.idx.tolist() if not b.cancelled or i not in b.cancelled)
            b.idx = _NO_REQUESTS
        self.lose_answers(held)
        if self.running:
            self.busy_s += now - self._busy_since
        self.queue.clear()
        self.running.clear()
        self.outstanding = 0
        self._timer_at = None
        self.incarnation += 1
        return held
