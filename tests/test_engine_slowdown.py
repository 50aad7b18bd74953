"""A slowed real engine (``CAPSIM_SLOWDOWN``, the simulator's ``faults.slow_pods``): each step holds the model
``slowdown - 1`` times its own time longer, the output unchanged; a least-outstanding router sends a slowed
real pod less than its share."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from capsim.core.continuous import ContinuousEngine
from capsim.core.engine import ReferenceEngine
from capsim.core.router import RouterConfig, create_router_app
from capsim.core.service_config import PodConfig
from capsim.model.settings import SettingsError
from capsim.policy.scheduling import SchedulerLimits
from podproc import PodProcess, Served


class SleepSpy:
    """``time.sleep`` that records each hold asked and sleeps it."""

    def __init__(self) -> None:
        self.asked: list[float] = []
        self._sleep = time.sleep

    def __call__(self, s: float) -> None:
        self.asked.append(s)
        self._sleep(s)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> SleepSpy:
    s = SleepSpy()
    monkeypatch.setattr("capsim.core.engine.time.sleep", s)
    return s


def test_a_slowed_static_batch_holds_each_step_and_makes_the_same_tokens(spy: SleepSpy) -> None:
    full = ReferenceEngine("tiny", device="cpu", seed=3, threads=1)
    slow = ReferenceEngine("tiny", device="cpu", seed=3, threads=1, slowdown=3.0)
    reqs = [full.request(20, 6, salt=1), full.request(9, 4, salt=2)]
    expected = full.generate(reqs)
    assert spy.asked == []  # full speed: no hold
    got = slow.generate(reqs)
    assert [r.tokens for r in got] == [r.tokens for r in expected]
    assert len(spy.asked) == 6 and all(s > 0 for s in spy.asked)  # the prefill and 5 decode steps
    # each step took its compute and the hold asked, twice that compute: at least 1.5 times the hold
    times = got[0].token_times_s
    steps = [times[0]] + [b - a for a, b in itertools.pairwise(times)]
    assert all(step >= 1.5 * hold for step, hold in zip(steps, spy.asked, strict=True))
    assert got[0].first_token_s == times[0] and got[0].total_s == times[-1]


def test_a_slowed_continuous_engine_holds_each_step_and_makes_the_same_tokens(spy: SleepSpy) -> None:
    limits = SchedulerLimits(max_num_seqs=4, max_num_batched_tokens=32, block_size=4, num_blocks=256,
                             max_model_len=256)
    full = ReferenceEngine("tiny", device="cpu", seed=3, threads=1)
    reqs = [full.request(p, o, salt=k) for k, (p, o) in enumerate([(37, 5), (5, 8), (12, 3)])]
    expected = ContinuousEngine(full, limits).generate(reqs)
    assert spy.asked == []
    ce = ContinuousEngine(ReferenceEngine("tiny", device="cpu", seed=3, threads=1, slowdown=2.0), limits)
    for k, r in enumerate(reqs):
        assert ce.add(k, r) is None
    seconds = []
    while ce.has_work:
        seconds.append(ce.step().seconds)
    assert [ce.results[k] for k in range(len(reqs))] == expected
    assert len(spy.asked) == len(seconds) and all(h > 0 for h in spy.asked)
    assert all(s >= 2.0 * h for s, h in zip(seconds, spy.asked, strict=True))  # the step's own time, then as much


def test_a_slowdown_is_checked_where_it_is_set() -> None:
    with pytest.raises(ValueError, match="slowdown must be between 1 and 100, got 0.5"):
        ReferenceEngine("tiny", device="cpu", slowdown=0.5)
    with pytest.raises(SettingsError, match="slowdown"):
        PodConfig.from_env({"CAPSIM_SLOWDOWN": "0.5"})
    assert PodConfig.from_env({"CAPSIM_SLOWDOWN": "2.5"}).slowdown == 2.5


@pytest.fixture(scope="module")
def two_pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[PodProcess]]:
    """Two real pods on loopback, the second slowed five times (``CAPSIM_SLOWDOWN=5``)."""
    log = tmp_path_factory.mktemp("pods")
    pods = [PodProcess(log, "full", torch_threads=1, max_wait_ms=0, warmup="false"),
            PodProcess(log, "slow", torch_threads=1, max_wait_ms=0, warmup="false", slowdown=5)]
    try:
        for p in pods:
            p.start(wait_ready=False)
        for p in pods:
            p.wait_ready(timeout_s=150)  # two model loads at once on a busy 2-core machine
        yield pods
    finally:
        for p in pods:
            p.kill()


def send_all(url: str, n: int, clients: int) -> Counter[str]:
    """``n`` turns of fresh sessions from ``clients`` closed-loop clients; which pod answered each."""
    served: Counter[str] = Counter()
    lock = threading.Lock()
    left = iter(range(n))

    def client() -> None:
        with httpx.Client(timeout=60) as c:
            for k in left:
                resp = c.post(f"{url}/v1/sessions/slow-{k}/turns", json={"prompt_tokens": 16, "max_new_tokens": 48})
                assert resp.status_code == 200, resp.text
                with lock:
                    served[resp.headers["X-Capsim-Pod"]] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return served


@pytest.mark.slow
def test_least_outstanding_sends_a_slowed_real_pod_less_than_round_robin_does(two_pods: list[PodProcess]) -> None:
    urls = [p.url for p in two_pods]
    shares: dict[str, float] = {}
    for policy in ("round_robin", "least_outstanding"):
        with Served(create_router_app(RouterConfig(pods=tuple(urls), policy=policy, timeout_s=30))) as r:
            served = send_all(r.url, 60, clients=6)
        assert sum(served.values()) == 60
        shares[policy] = served[urls[1]] / 60
    assert shares["round_robin"] == pytest.approx(0.5, abs=0.05)  # its turn, whatever its queue
    assert shares["least_outstanding"] < 0.4, shares  # its requests stay outstanding longer: it is picked less
