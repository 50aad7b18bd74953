"""A simulated pod in continuous-batching mode: one event per engine step, the shared scheduler deciding.

The pod hands arrivals to ``capsim.policy.scheduling.Scheduler`` -- the scheduler the real engine uses --
and runs its steps back to back while there is work: each step is one event (on ``Records.ending``, see
:class:`capsim.sim.pod._Wake`) whose length the step-time model gives from the step's composition
(``capsim.sim.step_time``), for all its running requests at once, not one event per token per request.
A request's stay on the pod is a :class:`Run`, a one-request ``Batch``, so the client, the records,
timeouts and crashes treat it as they treat a static batch: it starts when the scheduler first admits it, its first token is the end of the step that
completes its prompt, and it ends at the end of the step that emits its last token.

An arrival costs the engine ``service.arrival_overhead_ms`` of its core (HTTP parsing, as the static pod
charges it): the step in progress ends that much later (a run of decode steps is first cut at its step in
progress), and an arrival at an idle pod lengthens the step it starts. With 0 (the default) nothing changes.

``queue`` holds the requests that arrived and were never admitted, oldest first (what the client's
queue-capacity check and its timeout watcher look at); its first ``fed`` entries are already queued in
the scheduler, behind any preempted requests. A request that can never fit the engine (longer than
``max_model_len``, more KV blocks than the cache) is rejected as unservable when it is handed over,
without retry: it would fail on every pod.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from functools import partial
from typing import TYPE_CHECKING, cast

import numpy as np

from capsim.policy.scheduling import Scheduler, Step

# the results half lives in continuous_results; simulate.py imports these names from here
from capsim.sim.continuous_results import (  # noqa: F401
    CONTINUOUS_COLUMNS,
    ContinuousStats,
    continuous_results,
    continuous_row,
)
from capsim.sim.pod import Batch, Pod, PodState
from capsim.sim.recorder import REJECTED
from capsim.sim.step_time import step_ends

if TYPE_CHECKING:
    from capsim.policy.sched_types import SchedulerLimits
    from capsim.sim.simulate import Simulation

_NO_REQUESTS = np.empty(0, dtype=np.int64)


class Run(Batch):
    """One request's stay on a continuous pod, as a one-request batch (``size`` = requests running when
    it was admitted, which is what the ``batch_size`` column reports in this mode)."""

    __slots__ = ()

    @property
    def live_size(self) -> int:
        return 0 if self.cancelled else 1


class ContinuousPod(Pod):
    """A pod whose engine schedules per step; ``Cluster`` moves it through its life as any pod."""

    def __init__(self, sim: Simulation, pod_id: int, created_s: float) -> None:
        super().__init__(sim, pod_id, created_s)
        stats = sim.continuous
        assert stats is not None
        self.stats = stats
        self.sched = Scheduler(stats.limits, detail=False)
        self.max_running = 1 << 30  # the client pumps on a first arrival; the step loop takes the rest
        self.fed = 0
        self.runs: dict[int, Run] = {}
        self.stepping = False
        # a model that walks measured factors walks them per pod (NoisyStepTime.for_pod)
        step_time = stats.step_time.for_pod() if hasattr(stats.step_time, "for_pod") else stats.step_time
        self._step_s = step_time.step_s
        self._run_s = step_time.decode_run_s
        # a run's step ends, kept while the run lasts (``_ends``): a model whose step times are not drawn
        # adds its steps' times one by one (``decode_step_ends``), as one event per step would; one that
        # draws them gives the ends it drew (``decode_run_ends``); any other times the run as a whole
        self._step_ends = getattr(step_time, "decode_step_ends", None)
        dstep = getattr(step_time, "decode_step_s", None)
        if self._step_ends is None and dstep is not None:
            self._step_ends = partial(step_ends, dstep)
        self._run_ends = getattr(step_time, "decode_run_ends", None)
        # the step model's functions at full speed, and a slowdown to take at the next step (``set_slow``)
        self._full_speed = (self._step_s, self._run_s, self._step_ends, self._run_ends)
        self._slow_next: float | None = None
        self._ends: list[float] | None = None
        self._run: tuple[float, int, int, int, float] | None = None  # (start, decodes, context, steps, end)
        self._run_token = 0
        self._step_token = 0  # a step's event is stale once an arrival lengthened the step (a new event)
        self._step_end = 0.0  # when the single step in flight ends
        self._cur_step: Step | None = None  # that step
        # pod CPU per arriving request on the model's core (not scaled by time_scale, as in the static pod)
        self._arrival_s = sim.scenario.service.arrival_overhead_ms / 1000.0
        self._debt = 0.0  # arrivals' cost owed by the step about to start
        # service.ingress_ms: every request reaches the scheduler this long after it arrives (the pod reads
        # the session's history from the store first), whether or not a step runs meanwhile
        self._ingress_s = sim.scenario.service.ingress_ms / 1000.0
        # service.ingress_noise: each request's own ingress (ingress_ms x a factor), so requests reach the
        # scheduler in the order their ingress ends; ``_reach`` holds when each queued, unfed request does
        self._ingress_walk = stats.ingress if self._ingress_s else None
        self._reach: dict[int, float] = {}
        # service.cached_token_us: a step admitting prefix hits copies their cached KV (the real engine's cost)
        self._cached_s = sim.scenario.service.cached_token_us / 1e6
        # from the last token to the answer at the client (service.answer_ms): the engine does not wait,
        # but the pod holds the turn until its answer is out (``Pod.answering``: a crash meanwhile fails it)
        self._answer_s = stats.answer_s
        # the blocks' hashes _feed hands the scheduler: growing sessions hand over plain lists (no array per
        # request), other sources their arrays
        prefix = stats.prefix
        self._hash_of = None if prefix is None else getattr(prefix, "block_hash_list", prefix.block_hashes)
        # vLLM-style counters for the /metrics a scrape reads (``scrape_counters``), counted as vLLM counts them:
        # a token when the step that emits it ends (a run of decode steps: each of its steps), an inter-token gap
        # with the token that closes it
        self.prompt_tokens = 0  # vllm:prompt_tokens_total: a request's prompt, counted at its first token
        self._gen_done = 0  # tokens emitted by the steps that ended (vllm:generation_tokens_total)
        self._gen_seen = 0  # the scheduler's ``emitted`` count, as of the last step that ended
        self._firsts = 0  # first tokens among them: every other token closes a gap (the ITL histogram's count)
        self._tok_s = 0.0  # when the last step (or run of decode steps) ended: its tokens' time
        self.itl_sum_s = 0.0  # the gaps of requests no longer emitting (ended, aborted, preempted, killed)
        # requests emitting, by id: when their gaps began (their first token; after a preemption, the last token
        # before it). Each has emitted at every step that ended since, so its gaps sum to ``_tok_s`` less that.
        self._live: dict[int, float] = {}
        # preempted requests that had emitted, by id: their last token's time and their tokens then; one rejoins
        # ``_live`` from that time when a step emits its next token (its gap spans the preemption)
        self._paused: dict[int, tuple[float, int]] = {}
        # requests whose client left while the single step in progress ran, and whose token in it vLLM drops
        # (its output processor ignores an aborted request's output): not counted when the step ends
        self._voided: set[int] = set()

    def use_limits(self, limits: SchedulerLimits) -> None:
        """Schedule with ``limits`` (its template's engine flags, ``pods.rollouts[].batching``), before it serves."""
        assert not self.sched.requests and not self.queue, "a pod's limits are set before it serves"
        self.sched = Scheduler(limits, detail=False)

    def __repr__(self) -> str:
        return (f"ContinuousPod({self.id}, {self.state.name}, queued={len(self.queue)}, "
                f"running={len(self.sched.running)}, waiting={len(self.sched.waiting)})")

    # ---- gauges ------------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        """Requests waiting for the engine: never admitted, or preempted (vllm:num_requests_waiting)."""
        return len(self.queue) - self.fed + len(self.sched.waiting)

    @property
    def num_running(self) -> int:
        """Requests in the engine's running set (vllm:num_requests_running)."""
        return len(self.sched.running)

    @property
    def kv_cache_usage(self) -> float:
        """One minus free over total KV blocks (vllm:kv_cache_usage_perc, 0-1)."""
        return self.sched.kv_cache_usage

    def scrape_counters(self, now: float) -> tuple[float, ...]:
        """Its counters at ``now`` as vLLM's /metrics shows them: every step that ended by then counted (in a
        run of decode steps, each of its steps that ended), the step in progress not yet."""
        steps, t = self._out_by(now)
        gen = self._gen_done + steps * len(self.sched.running)
        itl = self.itl_sum_s
        for base in self._live.values():
            itl += t - base
        return (self.ttft_sum_s, self.ttft_count, itl, gen - self._firsts, self.sched.num_preemptions,
                self.prompt_tokens, gen)

    def _out_by(self, now: float) -> tuple[int, float]:
        """The steps of a run of decode steps in progress that ended by ``now`` (0 with no run), and when the last
        tokens out by then came (the last of those steps', else ``_tok_s``)."""
        if self._run is None:
            return 0, self._tok_s
        steps, t, _ = self._run_progress(now)
        return (steps, t) if steps else (0, self._tok_s)

    def _run_progress(self, now: float) -> tuple[int, float, float]:
        """For the run of decode steps in progress: how many of its steps have ended by ``now`` (``j``), when the
        last of them did (``T(j)``; the run's start for none) and when the step in progress ends (``T(j + 1)``;
        the run's end if it is due). ``T(k)`` is the run's end."""
        assert self._run is not None
        start, d, c, k, end = self._run
        if end <= now:
            return k, end, end
        ends = self._ends
        if ends is not None:  # the steps' ends
            j = bisect_right(ends, now, 0, k)
            return j, ends[j - 1] if j else start, ends[j] if j + 1 < k else end
        run_s = self._run_s

        def at(i: int) -> float:
            return start if i == 0 else end if i >= k else start + run_s(d, c, i)

        # the steps of a run take about as long each: guess, then walk to T(j) <= now < T(j + 1)
        j = min(max(int((now - start) / (end - start) * k), 0), k - 1)
        lo, hi = at(j), at(j + 1)
        while lo > now:  # only while j > 0: T(0) is the start
            j -= 1
            lo, hi = at(j), lo
        while hi <= now:  # only while j + 1 < k: T(k) = end > now
            j += 1
            lo, hi = hi, at(j + 1)
        return j, lo, hi

    def busy_total_s(self, now: float) -> float:
        return self.busy_s + (now - self._busy_since if self.stepping else 0.0)

    def busy_counted_s(self, now: float) -> float:
        # its steps are milliseconds long: its busy time so far is what it has counted
        return self.busy_total_s(now)

    # ---- traffic -------------------------------------------------------------------------------------
    def enqueue(self, i: int, now: float) -> None:
        """An arrival: its HTTP parsing (``service.arrival_overhead_ms``) lengthens the step in progress, or
        is owed by the step it starts; the scheduler sees it at once, or ``service.ingress_ms`` later (``_feed``
        holds it back until then)."""
        walk = self._ingress_walk
        if walk is None:
            self.queue.append(i)
            reach = now + self._ingress_s
        else:
            # the unfed part of the queue stays in reach order: the scheduler takes it from the front
            reach = now + self._ingress_s * walk.next()
            self._reach[i] = reach
            at = self._reach_index(reach)
            self.queue.insert(at, i)
        self.outstanding += 1
        lengthened = False
        if self._arrival_s:
            if self.stepping:
                self.pump(now)  # a run ends at its step in progress
                self._lengthen(now, self._arrival_s)
                lengthened = True  # the step in progress picks it up when it ends
            else:
                self._debt += self._arrival_s  # the step it starts pays it
        if self._ingress_s:
            self._wake_at(reach, self._on_ingress, self.incarnation)
        elif not lengthened:
            self.pump(now)

    def _reach_index(self, reach: float) -> int:
        """Where a request reaching the scheduler at ``reach`` goes in the queue: after the fed requests and
        every unfed one reaching it by then (ties keep their arrival order)."""
        q = self.queue
        r = self._reach
        lo, hi = self.fed, len(q)
        while lo < hi:
            mid = (lo + hi) // 2
            if r[q[mid]] <= reach:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def _on_ingress(self, incarnation: int) -> None:
        """A request reached the scheduler: start the step loop, or cut a run so the next step admits it."""
        if incarnation == self.incarnation:  # not a pod that crashed meanwhile (its queue is gone)
            self.pump(self._env._now)

    def _lengthen(self, now: float, extra: float) -> None:
        """The step in progress at ``now`` (the single step, or a run's last) ends ``extra`` s later."""
        stats = self.stats
        stats.busy_s += extra if self._run is None else 0.0  # a run's time is counted when it ends
        stats.kv_area += self.sched.kv_cache_usage * extra if self._run is None else 0.0
        if self._run is not None:
            start, d, c, k, end = self._run
            self._run = (start, d, c, k, end + extra)
            if self._ends is not None:
                self._ends[k - 1] += extra
            self._schedule_run(end + extra)
            return
        self._step_end += extra
        self._step_token += 1
        self._wake_at(self._step_end, self._on_step, (self._cur_step, self._step_end, self.incarnation,
                                                      self._step_token))

    def pump(self, now: float) -> None:
        """A request arrived at ``now``: start the step loop, or end a run of decode steps at the step
        in progress so the next step can admit it (a step already running picks up new arrivals)."""
        if not self.stepping:
            self._busy_since = now
            self.stepping = True
            self._step(now)
        elif self._run is not None:
            self._cut_run(now)

    def _feed(self, now: float) -> None:
        """Hand the arrivals the scheduler has not seen to it, rejecting the unservable ones."""
        q = self.queue
        rec = self._rec
        add = self.sched.add
        hash_of = self._hash_of
        bs = self.stats.limits.block_size
        hold = self._ingress_s > 0  # service.ingress_ms: only requests sent by ``ready`` have reached it
        ready = now - self._ingress_s + 1e-12
        send = rec.send
        reach = self._reach if self._ingress_walk is not None else None
        prompt, output = rec.prompt, rec.output  # sessions set a turn's prompt as it is sent: read them now
        while self.fed < len(q):
            i = q[self.fed]
            if reach is not None:
                if reach[i] > now + 1e-12:
                    break  # still on its way in: the unfed requests are in reach order
                del reach[i]
            elif hold and send[i] > ready:
                break  # still on its way in: arrivals are in send order, so the rest are too
            hashes = hash_of(i, bs) if hash_of is not None else ()
            if add(i, int(prompt[i]), int(output[i]), hashes) is None:
                self.fed += 1
                continue
            del q[self.fed]
            self.outstanding -= 1
            self.sim.router.touch(self)
            self.stats.unservable[i] = True
            # the engine's API server checks the length as the request arrives: the answer is at once
            self.errors += 1  # vLLM's 400: longer than max_model_len, or more blocks than the cache holds
            self.sim.client._finish(i, float(rec.send[i]), REJECTED, self.id)

    def set_slow(self, factor: float, now: float) -> None:
        """Its steps from the next on take ``factor`` times as long (``faults.slow_pods``): the step in
        progress keeps its end, and a run of decode steps ends at the step in progress."""
        self.slow = factor
        self._slow_next = factor
        if self._run is not None:
            self._cut_run(now)

    def _take_slow(self, factor: float) -> None:
        """Bind the step model's functions at ``factor`` times their full-speed times (between steps)."""
        self._slow_next = None
        step_s, run_s, step_ends_, run_ends = self._full_speed
        self._cached_s = self.sim.scenario.service.cached_token_us / 1e6 * factor
        if factor == 1.0:
            self._step_s, self._run_s, self._step_ends, self._run_ends = self._full_speed
            return
        self._step_s = lambda step: step_s(step) * factor
        self._run_s = lambda d, c, k: run_s(d, c, k) * factor
        self._step_ends = (None if step_ends_ is None else
                           lambda t, d, c, k: [t + (e - t) * factor for e in step_ends_(t, d, c, k)])
        self._run_ends = None if run_ends is None else (lambda d, c, k: run_ends(d, c, k) * factor)

    def _step(self, now: float) -> None:
        if self._slow_next is not None:
            self._take_slow(self._slow_next)
        if len(self.queue) > self.fed:
            self._feed(now)
        sched = self.sched
        stats = self.stats
        stats.events += 1
        if stats.max_run_steps > 1:
            k = sched.decode_run_length(stats.max_run_steps)
            if k > 1:
                self._start_run(now, k)
                return
        step = sched.step()
        if step.empty:
            self.stepping = False
            self._debt = 0.0  # the arrivals were rejected as unservable: no step to lengthen
            self.busy_s += now - self._busy_since
            if self.state == PodState.TERMINATING and self.outstanding == 0:
                self.sim.cluster.pod_drained(self, now)
            return
        dt = self._step_s(step)
        if self._cached_s and step.cached:
            dt += self._cached_s * sum(step.cached.values())
        if self._debt:
            dt += self._debt
            self._debt = 0.0
        end = now + dt
        if step.started:
            self._admit(step, now)
        if step.preempted:
            live = self._live
            requests = sched.requests
            for i in step.preempted:
                stats.preemptions[i] += 1
                base = live.pop(i, None)
                if base is not None:  # its last token came at ``now`` (the step that ended): its gaps so far end there
                    self.itl_sum_s += now - base
                    self._paused[i] = (now, requests[i].generated)
            stats.n_preemptions += len(step.preempted)
        stats.steps += 1
        stats.busy_s += dt
        use = sched.kv_cache_usage
        stats.kv_area += use * dt
        if use > stats.kv_peak:
            stats.kv_peak = use
        self._cur_step = step
        self._step_end = end
        self._wake_at(end, self._on_step, (step, end, self.incarnation, self._step_token))

    # ---- runs of plain decode steps, one event each ------------------------------------------------------
    def _start_run(self, now: float, steps: int) -> None:
        sched = self.sched
        d, c = len(sched.running), sched.decode_context
        if self._step_ends is not None:
            ends = self._ends = self._step_ends(now, d, c, steps)
            end = ends[-1]
        elif self._run_ends is not None:
            ends = self._ends = (now + self._run_ends(d, c, steps)).tolist()
            end = ends[-1]
        else:
            end = now + self._run_s(d, c, steps)
        self._run = (now, d, c, steps, end)
        self._schedule_run(end)

    def _schedule_run(self, end: float) -> None:
        self._run_token += 1
        self._wake_at(end, self._on_run, (self._run_token, end, self.incarnation))

    def _cut_run(self, now: float) -> None:
        """End the run at the end of the step in progress at ``now`` (the first to end after it)."""
        assert self._run is not None
        start, d, c, k, _ = self._run
        j, _, t = self._run_progress(now)
        if j + 1 < k:  # else the run ends with that step anyway (or its end event is due now, not yet processed)
            self._run = (start, d, c, j + 1, t)
            self._schedule_run(t)

    def _on_run(self, value: tuple[int, float, int]) -> None:
        token, now, incarnation = value
        if incarnation != self.incarnation or token != self._run_token or self._run is None:
            return  # superseded by a shorter run, or the pod died under it
        start, _, _, k, _ = self._run
        self._run = None
        self._ends = None
        sched = self.sched
        stats = self.stats
        finished = sched.advance_decodes(k)
        self._tokens_out(now)
        stats.steps += k
        stats.busy_s += now - start
        use = sched.kv_cache_usage  # the run's last (highest) use: KV use is sampled per event
        stats.kv_area += use * (now - start)
        if use > stats.kv_peak:
            stats.kv_peak = use
        if finished:
            self._finish(finished, now)
        self._step(now)

    def _admit(self, step: Step, now: float) -> None:
        q = self.queue
        rec = self._rec
        runs = self.runs
        size = len(self.sched.running)
        timeout = self.sim.timeout_s
        watch = self.sim.client.watch_request
        send = rec.send
        cached = step.cached
        if cached:
            hits = self.stats.cached
            for i, c in cached.items():
                hits[i] = c
        ids = self.stats.ids
        add_batch = rec.add_batch
        running = self.running
        for i in step.started:
            head = q.popleft()
            assert head == i, f"pod {self.id}: scheduler admitted {i} ahead of {head}"
            self.fed -= 1
            run = Run(ids[i:i + 1], now, math.nan, math.inf, self, size)
            add_batch(run, i)
            runs[i] = run
            running.append(run)
            watch(run, i, float(send[i]) + timeout)

    def _on_step(self, value: tuple[Step, float, int, int]) -> None:
        step, now, incarnation, token = value
        if incarnation != self.incarnation or token != self._step_token:
            return  # the pod crashed or was killed under this step, or an arrival lengthened it
        runs = self.runs
        sim = self.sim
        self._tokens_out(now)
        voided = self._voided
        if step.first_token:
            send = self._rec.send
            prompt = self._rec.prompt
            live = self._live
            for i in step.first_token:
                if voided and i in voided:
                    continue  # its client left as the step ran: no first token, gap or prompt counted
                self._firsts += 1
                live[i] = now
                self.prompt_tokens += int(prompt[i])
                run = runs.get(i)
                if run is not None:
                    run.first = now
                    if sim.track_ttft:
                        self.observe_ttft(now - float(send[i]))
        if voided:
            voided.clear()
        if self._paused:
            self._resume(now)
        if step.finished:
            self._finish(step.finished, now)
        self._step(now)

    def _tokens_out(self, now: float) -> None:
        """A step (or a run of decode steps) ended at ``now``: its tokens are out."""
        emitted = self.sched.emitted
        self._gen_done += emitted - self._gen_seen - len(self._voided)
        self._gen_seen = emitted
        self._tok_s = now

    def _resume(self, now: float) -> None:
        """Preempted requests whose next token the step ending at ``now`` emitted: their gap spans the preemption."""
        requests = self.sched.requests
        paused = self._paused
        for i, (last, generated) in list(paused.items()):
            r = requests.get(i)
            if r is None or r.generated > generated:  # gone from the scheduler here: it finished in this step
                del paused[i]
                self._live[i] = last

    def _finish(self, finished: list[int], now: float) -> None:
        """Requests ``finished`` emitted their last token at ``now``: answer their clients."""
        runs = self.runs
        sim = self.sim
        client = sim.client
        answered = now + self._answer_s
        # a client whose timeout comes before the answer reaches it (the way out) has given up
        late = answered - sim.timeout_s if answered > now else -math.inf
        send = self._rec.send
        ended = []
        live = self._live
        for i in finished:
            base = live.pop(i, None)
            if base is not None:  # its gaps end with its last token
                self.itl_sum_s += now - base
            run = runs.pop(i, None)
            if run is None:  # its client gave up while the step ran
                continue
            ended.append(run)
            run.end = answered
            run.done = True
            self.outstanding -= run.live_size
            if send[i] < late:
                client.time_out_late(run, now, answered)
            if answered > now:  # on its way out: answered then, unless the pod dies first
                self.answering[run] = None
                self._wake_at(answered, self._on_answer, (run, i, self.incarnation))
            else:
                client.on_request_done(run, i, answered)
                run.idx = _NO_REQUESTS
        running = self.running
        for run in ended:  # one or two a step: cheaper than rebuilding the list
            running.remove(run)
        sim.router.touch(self)

    def _on_answer(self, value: tuple[Run, int, int]) -> None:
        """Request ``i``'s answer reached its client (``service.answer_ms`` after its last token)."""
        run, i, incarnation = value
        if incarnation != self.incarnation:
            return  # the pod crashed or was killed on the way out: the turn failed then
        del self.answering[run]
        self.sim.client.on_request_done(run, i, self._env._now)
        run.idx = _NO_REQUESTS

    # ---- failures and timeouts ------------------------------------------------------------------------
    def drop_head(self) -> int:
        i = super().drop_head()
        if self.fed:
            self.sched.remove(i)  # never admitted: nothing emitted
            self.fed -= 1
        else:
            self._reach.pop(i, None)
        return i

    def cancel(self, batch: Batch, i: int) -> None:
        """The client of request ``i`` gave up while it was admitted: the engine aborts it."""
        if self.runs.pop(i, None) is not None:
            now = self._env.now
            steps, t = self._out_by(now)
            single = self._run is None and self.stepping  # a single step in progress: its tokens are not out
            if self._run is not None:
                self._cut_run(now)  # the run's request count changes after the step in progress
            sched = self.sched
            r = sched.requests.get(i)
            if r is not None:
                sched.remove(i)
                self._gen_done += steps  # what it emitted in the run's steps that ended (they count it no more)
                if single and r.emitted_step == sched.steps:
                    self._voided.add(i)  # the step in progress emits a token for it, which vLLM drops
            elif single:  # its last token is in the step in progress: the engine lets it end, and vLLM drops it
                self._voided.add(i)
            base = self._live.pop(i, None)  # its gaps end with the last token out before it left
            if base is not None:
                self.itl_sum_s += t - base
            self._paused.pop(i, None)
            self.running.remove(cast(Run, batch))

    def kill(self, now: float) -> list[int]:
        held = list(self.queue)
        for run in self.running:
            run.dead = True
            if not run.cancelled:
                held.extend(run.idx.tolist())
            run.idx = _NO_REQUESTS
        self.lose_answers(held)
        if self.stepping:
            self.busy_s += now - self._busy_since
        # what the engine made before it died stays made; the step in progress emits nothing
        counters = self.scrape_counters(now)
        self.itl_sum_s = counters[2]
        self._gen_done = int(counters[6])
        self._gen_seen = self.sched.emitted
        self._live.clear()
        self._paused.clear()
        self._voided.clear()
        self.sched.clear()
        self.queue.clear()
        self._reach.clear()
        self.fed = 0
        self.runs.clear()
        self.running.clear()
        self.outstanding = 0
        self.stepping = False
        self._run = None
        self._ends = None
        self._debt = 0.0
        self.incarnation += 1
        return held
