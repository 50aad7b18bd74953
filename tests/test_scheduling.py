"""The continuous-batching scheduler: worked examples of vLLM V1's rules, and Hypothesis properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capsim.model.settings import BatchSettings
from capsim.policy.scheduling import Rejection, Request, Scheduler, SchedulerError, SchedulerLimits


def lim(**kw: int) -> SchedulerLimits:
    base = dict(max_num_seqs=8, max_num_batched_tokens=64, block_size=4, num_blocks=64, max_model_len=1024)
    base.update(kw)
    return SchedulerLimits(**base)


# ---- worked examples ---------------------------------------------------------------------------------
def test_prefill_then_one_token_per_step_and_blocks_return_at_the_end() -> None:
    s = Scheduler(lim())
    assert s.add(1, 10, 3) is None
    st1 = s.step()
    assert (st1.request_ids, st1.num_tokens, st1.contexts) == ([1], [10], [0])
    assert st1.first_token == [1] and st1.started == [1] and st1.prefills == 1 and st1.decodes == 0
    assert s.used_blocks == 3  # ceil(10 / 4)
    st2 = s.step()
    assert (st2.num_tokens, st2.contexts, st2.decodes, st2.decode_context) == ([1], [10], 1, 10)
    assert s.used_blocks == 3  # 11 tokens still fit in 3 blocks
    st3 = s.step()
    assert st3.finished == [1] and st3.contexts == [11]
    assert s.used_blocks == 0 and not s.has_work and s.step().empty


def test_chunked_prefill_under_the_token_budget_and_the_long_prefill_threshold() -> None:
    s = Scheduler(lim(max_num_batched_tokens=16, long_prefill_token_threshold=6))
    s.add(1, 20, 2)
    s.add(2, 3, 2)
    a = s.step()
    # request 1 takes a chunk of 6 (threshold), request 2 is admitted in the same step with its 3
    assert (a.request_ids, a.num_tokens, a.contexts) == ([1, 2], [6, 3], [0, 0])
    assert a.first_token == [2] and a.prefill_tokens == 9 and a.prefill_max_tokens == 6
    b = s.step()
    assert (b.request_ids, b.num_tokens, b.contexts) == ([1, 2], [6, 1], [6, 3])
    assert b.finished == [2]


def test_token_budget_stops_admission_and_running_requests_come_first() -> None:
    s = Scheduler(lim(max_num_batched_tokens=8))
    s.add(1, 8, 4)
    s.add(2, 8, 4)
    assert s.step().request_ids == [1]  # the budget is spent on the first prompt
    st2 = s.step()
    assert (st2.request_ids, st2.num_tokens) == ([1, 2], [1, 7])  # the decode first, then a chunk


def test_max_num_seqs_caps_running_requests() -> None:
    s = Scheduler(lim(max_num_seqs=2))
    for i in range(4):
        s.add(i, 2, 5)
    assert s.step().request_ids == [0, 1]
    assert len(s.running) == 2 and [r.request_id for r in s.waiting] == [2, 3]


def test_the_last_running_request_is_preempted_by_recompute_and_goes_to_the_head_of_waiting() -> None:
    # 4 blocks of 4 tokens: two requests of 8-token prompts fill the cache; the first decode needs a 5th
    s = Scheduler(lim(num_blocks=4))
    s.add(1, 8, 4)
    s.add(2, 8, 4)
    s.add(3, 2, 2)
    first = s.step()
    assert first.request_ids == [1, 2] and s.free_blocks == 0
    second = s.step()
    assert second.preempted == [2] and second.request_ids == [1]
    assert [r.request_id for r in s.waiting] == [2, 3]  # the victim first, ahead of a newer request
    victim = s.requests[2]
    assert victim.computed == 0 and victim.blocks == 0 and victim.preemptions == 1
    assert s.num_preemptions == 1
    # the victim had emitted one token: it recomputes prompt + that token, then emits its second
    steps = [s.step() for _ in range(3)]
    assert steps[0].request_ids == [1] and steps[0].finished == [] and not steps[0].preempted
    redo = next(x for x in steps if 2 in x.request_ids)
    j = redo.request_ids.index(2)
    assert redo.contexts[j] == 0 and redo.num_tokens[j] == 9  # 8 prompt + 1 generated token


def test_preemption_stops_when_the_victim_is_the_request_itself() -> None:
    s = Scheduler(lim(num_blocks=4))
    assert s.add(1, 8, 8) is None  # 15 tokens of KV: the whole cache at most
    assert s.add(2, 4, 2) is None
    s.step()  # 2 + 1 blocks
    st2 = s.step()  # 1 takes the last free block for its 9th token; 2 needs one more and is the last
    assert st2.request_ids == [1] and st2.preempted == [2]
    assert [r.request_id for r in s.running] == [1] and s.free_blocks == 1


def test_unservable_requests_are_rejected_with_a_reason_and_never_queued() -> None:
    s = Scheduler(lim(max_model_len=32, num_blocks=4))
    assert s.add(1, 30, 3) is Rejection.TOO_LONG
    assert s.add(2, 14, 4) is Rejection.EXCEEDS_CACHE  # 17 tokens of KV need 5 blocks of 4
    assert s.add(3, 14, 3) is None  # 16 tokens of KV: exactly the 4 blocks
    assert list(s.requests) == [3]
    while s.has_work:
        s.step()


def test_remove_frees_blocks_and_misuse_is_named() -> None:
    s = Scheduler(lim())
    s.add(1, 10, 5)
    s.add(2, 10, 5)
    s.step()
    s.remove(1)
    assert s.used_blocks == 3 and [r.request_id for r in s.running] == [2]
    with pytest.raises(SchedulerError, match="request 1 is not queued"):
        s.remove(1)
    with pytest.raises(SchedulerError, match="request 2 is already"):
        s.add(2, 1, 1)
    with pytest.raises(SchedulerError, match="must be >= 1"):
        s.add(9, 0, 1)
    assert s.clear() == [2] and s.free_blocks == 64


def test_limits_from_settings_and_their_checks() -> None:
    b = BatchSettings(mode="continuous", num_blocks=100, max_num_seqs=4, block_size=8)
    lm = SchedulerLimits.from_settings(b)
    assert (lm.num_blocks, lm.max_num_seqs, lm.block_size, lm.max_num_batched_tokens) == (100, 4, 8, 2048)
    with pytest.raises(ValueError, match="block_size must be an integer >= 1, got 0"):
        SchedulerLimits(block_size=0)


# ---- properties --------------------------------------------------------------------------------------
limits_st = st.builds(
    SchedulerLimits,
    max_num_seqs=st.integers(1, 6),
    max_num_batched_tokens=st.integers(1, 40),
    block_size=st.integers(1, 8),
    num_blocks=st.integers(1, 24),
    max_model_len=st.integers(2, 80),
    long_prefill_token_threshold=st.integers(0, 12),
)
request_st = st.tuples(st.integers(1, 40), st.integers(1, 20))
# (step at which it arrives, prompt tokens, max tokens)
workload_st = st.lists(st.tuples(st.integers(0, 30), st.integers(1, 40), st.integers(1, 20)), max_size=25)


class Oracle:
    """Replays the steps against an independent model of each request: what it has computed and emitted."""

    def __init__(self) -> None:
        self.prompt: dict[int, int] = {}
        self.max_tokens: dict[int, int] = {}
        self.computed: dict[int, int] = {}
        self.emitted: dict[int, int] = {}
        self.finished: list[int] = []

    def add(self, i: int, prompt: int, max_tokens: int) -> None:
        self.prompt[i], self.max_tokens[i], self.computed[i], self.emitted[i] = prompt, max_tokens, 0, 0

    def apply(self, step: object) -> None:
        from capsim.policy.scheduling import Step

        assert isinstance(step, Step)
        for i in step.preempted:
            self.computed[i] = 0
        finished = []
        for i, n, c in zip(step.request_ids, step.num_tokens, step.contexts, strict=True):
            assert c == self.computed[i], f"request {i} resumed at {c}, had computed {self.computed[i]}"
            assert n >= 1
            self.computed[i] = c + n
            known = self.prompt[i] + self.emitted[i]
            assert self.computed[i] <= known, "computed past the known tokens"
            if self.computed[i] == known:
                self.emitted[i] += 1
                if self.emitted[i] == self.max_tokens[i]:
                    finished.append(i)
        assert sorted(step.finished) == sorted(finished)
        self.finished += finished


def run_property(limits: SchedulerLimits, workload: list[tuple[int, int, int]]) -> None:
    s = Scheduler(limits)
    lean = Scheduler(limits, detail=False)  # the simulator's: aggregates only, the same decisions
    oracle = Oracle()
    arrivals = sorted(enumerate(workload), key=lambda x: x[1][0])
    added: list[int] = []
    rejected: list[int] = []
    objs: dict[int, Request] = {}  # every request added, finished ones too
    started: list[int] = []
    last_arrival = max((a[1][0] for a in arrivals), default=0)
    # every request ends: a bound on the steps far above what any schedule needs
    bound = last_arrival + 1 + sum(p * 2 * (o + 1) + o for _, p, o in workload) * (1 + len(workload))
    k = 0
    for t in range(bound):
        while k < len(arrivals) and arrivals[k][1][0] <= t:
            i, (_, p, o) = arrivals[k]
            k += 1
            why = s.add(i, p, o)
            assert lean.add(i, p, o) == why
            expect_reject = p + o > limits.max_model_len or math.ceil((p + o - 1) / limits.block_size) > limits.num_blocks
            assert (why is not None) == expect_reject
            if why is None:
                added.append(i)
                objs[i] = s.requests[i]
                oracle.add(i, p, o)
            else:
                rejected.append(i)
        step = s.step()
        other = lean.step()
        assert not other.request_ids and (other.decodes, other.decode_context, other.prefills, other.prefill_tokens,
                                          other.prefill_context, other.first_token, other.finished, other.preempted,
                                          other.started) == (
            step.decodes, step.decode_context, step.prefills, step.prefill_tokens, step.prefill_context,
            step.first_token, step.finished, step.preempted, step.started)
        # never over the token budget, the sequence limit or the block count
        assert step.total_tokens == sum(step.num_tokens) <= limits.max_num_batched_tokens
        assert len(s.running) <= limits.max_num_seqs
        assert 0 <= s.used_blocks <= limits.num_blocks
        assert s.used_blocks == sum(r.blocks for r in s.requests.values())
        for r in s.running:
            assert r.blocks == -(-r.computed // limits.block_size)
        if step.preempted:
            assert not step.started  # admission only in a step without preemption
        before = dict(oracle.emitted)
        oracle.apply(step)
        # the tokens emitted, counted as each step is scheduled (vllm:generation_tokens_total)
        assert s.emitted == lean.emitted == sum(oracle.emitted.values())
        # and each request knows whether this step emitted its token (what an abort in the step drops)
        assert {i for i, r in objs.items() if r.emitted_step == s.steps} == {
            i for i, n in oracle.emitted.items() if n > before.get(i, 0)}
        started += step.started
        if s.has_work:
            assert not step.empty, "work queued but nothing scheduled"
        elif k == len(arrivals):
            break
    else:
        pytest.fail(f"not every request ended within {bound} steps: {s.requests}")
    # every request ends, finished or rejected, each exactly once
    assert sorted(oracle.finished + rejected) == sorted(range(len(workload)))
    assert len(set(oracle.finished)) == len(oracle.finished)
    # a request (preempted or not) ends with exactly its tokens
    for i in oracle.finished:
        assert oracle.emitted[i] == oracle.max_tokens[i]
    # first come, first served: requests start in the order they were added
    assert started == added
    assert s.free_blocks == limits.num_blocks


@settings(max_examples=300, deadline=None)
@given(limits_st, workload_st)
def test_properties_hold_for_any_limits_and_workload(limits: SchedulerLimits,
                                                     workload: list[tuple[int, int, int]]) -> None:
    run_property(limits, workload)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(4, 30), st.integers(4, 20)), min_size=4, max_size=20))
def test_properties_hold_under_heavy_preemption(workload: list[tuple[int, int, int]]) -> None:
    run_property(SchedulerLimits(max_num_seqs=8, max_num_batched_tokens=64, block_size=2, num_blocks=25,
                                 max_model_len=64), workload)


def test_a_small_cache_does_preempt() -> None:
    s = Scheduler(SchedulerLimits(max_num_seqs=8, max_num_batched_tokens=64, block_size=2, num_blocks=25,
                                  max_model_len=64))
    for i in range(6):
        s.add(i, 20, 20)
    while s.has_work:
        s.step()
    assert s.num_preemptions > 0


# ---- runs of decode steps ----------------------------------------------------------------------------
def state(s: Scheduler) -> tuple[object, ...]:
    reqs = tuple((r.request_id, r.computed, r.generated, r.num_tokens, r.blocks) for r in s.running)
    return reqs, tuple(r.request_id for r in s.waiting), s.free_blocks, s.steps


def run_length_from_scratch(s: Scheduler, max_steps: int) -> int:
    """What ``decode_run_length`` must say, by a pass over every running request (it keeps sums instead)."""
    if s.waiting or not s.running or len(s.running) > s.limits.max_num_batched_tokens:
        return 0
    if any(r.computed != r.num_tokens - 1 or not r.generated for r in s.running):
        return 0
    bs = s.limits.block_size
    k = min([max_steps] + [r.max_tokens - r.generated for r in s.running])
    while k > 0 and sum(-(-(r.computed + k) // bs) - r.blocks for r in s.running) > s.free_blocks:
        k -= 1
    return k


@settings(max_examples=200, deadline=None)
@given(limits_st, workload_st, st.integers(1, 50), st.lists(st.tuples(st.integers(0, 60), st.integers(0, 24)),
                                                           max_size=4))
def test_a_decode_run_equals_that_many_steps(limits: SchedulerLimits, workload: list[tuple[int, int, int]],
                                             cap: int, aborts: list[tuple[int, int]]) -> None:
    """Two schedulers fed alike: one takes every decode run in one go, the other step by step; ``aborts``
    (time, request) remove a request still queued or running at the first step from that time on."""
    fast, slow = Scheduler(limits), Scheduler(limits)
    arrivals = sorted(workload, key=lambda x: x[0])
    aborts = sorted(aborts)
    k = t = runs = 0
    finished_fast: list[int] = []
    finished_slow: list[int] = []
    while t < 10_000:
        while k < len(arrivals) and arrivals[k][0] <= t:
            _, p, o = arrivals[k]
            assert fast.add(k, p, o) == slow.add(k, p, o)
            k += 1
        while aborts and aborts[0][0] <= t:
            gone = aborts.pop(0)[1]
            if gone in fast.requests:
                fast.remove(gone)
                slow.remove(gone)
        n = fast.decode_run_length(cap)
        assert n == run_length_from_scratch(fast, cap)
        if n >= 1:
            runs += 1
            assert len(fast.running) <= limits.max_num_batched_tokens
            ctx = fast.decode_context
            assert ctx == sum(r.computed for r in fast.running)
            finished_fast += fast.advance_decodes(n)
            for j in range(n):
                step = slow.step()
                assert (step.decodes, step.prefills, step.decode_context) == (len(step.request_ids), 0,
                                                                              ctx + j * step.decodes)
                assert not step.preempted and not step.started
                finished_slow += step.finished
        else:
            finished_fast += fast.step().finished
            finished_slow += slow.step().finished
        assert state(fast) == state(slow)
        assert fast.emitted == slow.emitted  # a run counts its steps' tokens as the steps would
        assert finished_fast == finished_slow
        t += n if n else 1
        if k == len(arrivals) and not fast.has_work:
            break
    assert not fast.has_work


def test_a_decode_run_stops_where_blocks_run_out_and_at_the_first_finish() -> None:
    s = Scheduler(lim(num_blocks=6, block_size=4))
    s.add(1, 4, 20)
    s.add(2, 4, 5)
    s.step()  # both prefilled: 1 block each, 4 free; contexts 4 and 4
    assert s.decode_run_length(100) == 4  # request 2 finishes at its 4th further token
    s2 = Scheduler(lim(num_blocks=3, block_size=4))
    s2.add(1, 4, 20)
    s2.add(2, 4, 20)
    s2.step()  # 1 free block: the next step needs 2 (both cross into a new block)
    assert s2.decode_run_length(100) == 0
    s2.add(3, 1, 1)
    assert s2.decode_run_length(100) == 0  # something waits
