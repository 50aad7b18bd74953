"""The agent pod: an ASGI app (FastAPI) that serves session turns through the batcher and the store.

``POST /v1/sessions/{session_id}/turns`` loads the session, runs the turn through the dynamic batcher
on the reference engine, appends the turn to the session (compare-and-set) and only then answers.
``GET /metrics`` is Prometheus text, ``/healthz`` liveness, ``/readyz`` readiness (after warm-up, while
the store answers, and not while draining). Configuration comes from ``PodConfig``: flags or the
``CAPSIM_*`` environment variables the exporter writes into the Deployment.

Failure answers are JSON ``{"detail": ...}``, and every 503 carries ``Retry-After``. A turn with an
``Idempotency-Key`` header is stored once however often it is retried; a retry gets the first answer.
On SIGTERM every turn in flight is bounded by ``drain_timeout_s``: it finishes, or answers 503.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from capsim.core.batcher import BatcherClosedError, DynamicBatcher, QueueFullError
from capsim.core.continuous import ContinuousBatcher, RequestTooLargeError
from capsim.core.engine import PRESETS, GenerationRequest, GenerationResult, ReferenceEngine, synthetic_prompt
from capsim.core.metrics import InferenceMetrics
from capsim.core.state import (
    ConflictError,
    SessionState,
    SessionStore,
    StateStoreError,
    StoreUnavailableError,
    StoreURLError,
    check_store_url,
    open_store,
)
from capsim.core.state_model import InvalidSessionIdError, StateTooLargeError, validate_session_id
from capsim.model.settings import BatchSettings, FrozenModel
from capsim.policy.scheduling import SchedulerLimits

_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
RETRY_AFTER = {"Retry-After": "1"}  # on every 503: the pod or its store should be back, or another pod up
_IDEMPOTENCY_KEY_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))


class PodConfig(FrozenModel):
    """Everything a pod is configured with; each field also reads from ``CAPSIM_<FIELD>``."""

    _error_prefix: ClassVar[str] = "pod"

    model: str = Field("tiny", description="reference model preset")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    max_batch_size: int = Field(32, ge=1)
    max_wait_ms: float = Field(10.0, ge=0)
    queue_capacity: int = Field(1024, ge=1)
    overflow: Literal["reject", "wait"] = "reject"
    max_concurrent_batches: int = Field(1, ge=1)
    redis_url: str = Field("memory://", description="session store: redis://, rediss://, unix://, memory://")
    max_prompt_tokens: int = Field(2048, ge=1, description="longer prompts get 413")
    max_new_tokens: int = Field(512, ge=1, description="larger max_new_tokens get 413")
    drain_timeout_s: float = Field(25.0, ge=0, description="SIGTERM grace for in-flight work")
    warmup: bool = True
    pod_name: str = Field(default_factory=lambda: os.environ.get("HOSTNAME", "capsim-pod"))
    seed: int = 0
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (None: one per core)")
    # continuous batching (docs/continuous.md): CAPSIM_BATCH_MODE=continuous and vLLM's engine limits
    batch_mode: Literal["static", "continuous"] = Field("static", description="static batches or per-step")
    max_num_seqs: int = Field(256, ge=1, description="continuous: requests running at once")
    max_num_batched_tokens: int = Field(2048, ge=1, description="continuous: tokens one step computes")
    block_size: int = Field(16, ge=1, description="continuous: tokens per KV-cache block")
    num_blocks: int = Field(4096, ge=1, description="continuous: KV-cache blocks")
    max_model_len: int = Field(4096, ge=2, description="continuous: longest prompt + output")
    long_prefill_token_threshold: int = Field(0, ge=0, description="continuous: largest prefill chunk (0: off)")

    ENV_PREFIX: ClassVar[str] = "CAPSIM_"

    # Checked here, so `capsim serve` refuses a bad value before it loads a model or opens a port.
    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"must be one of {', '.join(sorted(PRESETS))}, got {v!r}")
        return v

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        if not _DEVICE_RE.fullmatch(v):
            raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps, got {v!r}")
        return v

    @field_validator("redis_url")
    @classmethod
    def _store_url(cls, v: str) -> str:
        try:
            check_store_url(v)
        except StoreURLError as exc:
            raise ValueError(str(exc)) from None
        return v

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> PodConfig:
        """Read ``CAPSIM_*`` variables (e.g. ``CAPSIM_MAX_BATCH_SIZE``), then apply ``overrides``."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            key = cls.ENV_PREFIX + name.upper()
            if key in env:
                values[name] = env[key]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def batch_settings(self) -> BatchSettings:
        return BatchSettings(
            max_batch_size=self.max_batch_size,
            max_wait_ms=self.max_wait_ms,
            queue_capacity=self.queue_capacity,
            overflow=self.overflow,
            max_concurrent_batches=self.max_concurrent_batches,
        )

    def scheduler_limits(self) -> SchedulerLimits:
        """The continuous-batching engine's limits."""
        return SchedulerLimits(self.max_num_seqs, self.max_num_batched_tokens, self.block_size, self.num_blocks,
                               self.max_model_len, self.long_prefill_token_threshold)

    def env(self) -> dict[str, str]:
        """The ``CAPSIM_*`` variables that reproduce this configuration."""
        return {self.ENV_PREFIX + k.upper(): str(v).lower() if isinstance(v, bool) else str(v)
                for k, v in self.model_dump().items() if v is not None}


class TurnRequest(BaseModel):
    """The body of a turn: a prompt (a token count for a synthetic prompt, or token ids).

    Strict: ``"16"``, ``true`` and ``16.0`` are not token counts, and ``"yes"`` is not a boolean.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt_tokens: int | list[int] = Field(..., description="a token count, or the prompt's token ids")
    max_new_tokens: int = Field(16, ge=1)
    stream: bool = Field(False, description="answer with server-sent events, one per token")


@dataclass
class PodState:
    """The pod's live parts, created by the app's lifespan."""

    config: PodConfig
    engine: ReferenceEngine
    store: SessionStore
    batcher: DynamicBatcher[GenerationRequest, GenerationResult] | ContinuousBatcher
    metrics: InferenceMetrics
    ready: bool = False
    draining: bool = False
    store_ok_until: float = 0.0
    started: float = field(default_factory=time.monotonic)
    loop: asyncio.AbstractEventLoop | None = None
    drain_deadline: float | None = None  # loop time at which turns still running answer 503
    bounds: set[asyncio.Timeout] = field(default_factory=set)  # one per turn in flight

    def begin_drain(self) -> None:
        """Go unready and refuse new turns at once; bound every turn in flight by ``drain_timeout_s``.

        Safe to call from a signal handler: it only sets flags and hands the rest to the event loop.
        """
        self.ready = False
        self.draining = True
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._bound_in_flight)

    def _bound_in_flight(self) -> None:
        if self.drain_deadline is None:
            self.drain_deadline = asyncio.get_running_loop().time() + self.config.drain_timeout_s
        for bound in list(self.bounds):
            bound.reschedule(self.drain_deadline)

    def drain_left_s(self) -> float:
        """Seconds left of the drain budget (the whole budget before a drain began)."""
        if self.drain_deadline is None or self.loop is None:
            return self.config.drain_timeout_s
        return max(0.0, self.drain_deadline - self.loop.time())

    @asynccontextmanager
    async def drain_bound(self) -> AsyncIterator[None]:
        """Run a turn; if the pod drains and the budget runs out first, raise the documented 503."""
        bound: asyncio.Timeout | None = None
        try:
            async with asyncio.timeout(self.drain_deadline) as bound:
                self.bounds.add(bound)
                yield
        except TimeoutError:
            if bound is None or not bound.expired():
                raise
            raise _HTTPError(
                503,
                f"pod drained (drain_timeout_s={self.config.drain_timeout_s:g}) before this turn finished; "
                "retry on another pod (with the same Idempotency-Key, a turn that was stored is not stored twice)",
                RETRY_AFTER,
            ) from None
        finally:
            if bound is not None:
                self.bounds.discard(bound)


class _HTTPError(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


def create_app(
    config: PodConfig | None = None,
    *,
    engine: ReferenceEngine | None = None,
    store: SessionStore | None = None,
) -> FastAPI:
    """Build the pod's app. ``engine`` and ``store`` may be injected (tests, notebooks); otherwise the
    lifespan builds them from ``config`` and closes what it opened."""
    cfg = config or PodConfig.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        eng = engine or ReferenceEngine(
            cfg.model, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed, threads=cfg.torch_threads
        )
        metrics = InferenceMetrics()
        st = store or open_store(cfg.redis_url, metrics=metrics)
        batcher: DynamicBatcher[GenerationRequest, GenerationResult] | ContinuousBatcher
        if cfg.batch_mode == "continuous":
            batcher = ContinuousBatcher(eng, cfg.scheduler_limits(), queue_capacity=cfg.queue_capacity,
                                        metrics=metrics)
        else:
            batcher = DynamicBatcher(eng.runner(), cfg.batch_settings(), metrics, close_timeout_s=cfg.drain_timeout_s)
        pod = PodState(cfg, eng, st, batcher, metrics, loop=asyncio.get_running_loop())
        app.state.pod = pod
        async with batcher:
            if cfg.warmup:
                await asyncio.to_thread(eng.generate, [eng.request(8, 2)])
            pod.ready = True
            try:
                yield
            finally:
                pod.ready = False
                pod.draining = True
                # the turns are answered by now (finished or 503); what is left of the budget goes to
                # queued work that no one waits for any more
                await batcher.aclose(timeout_s=pod.drain_left_s())
        if store is None:
            await st.aclose()

    app = FastAPI(title="capsim agent pod", version="1", lifespan=lifespan)

    @app.exception_handler(_HTTPError)
    async def _http_error(request: Request, exc: _HTTPError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # a bug, not a client error: still JSON, and named, so a client can log something useful
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            if err["type"] == "json_invalid":
                problems.append(f"request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
                continue
            loc = ".".join(str(p) for p in err["loc"][1:] if not str(p).startswith(("int", "list[")))
            problems.append(f"{loc or 'body'}: {err['msg']}")
        return JSONResponse({"detail": "; ".join(problems) or "invalid request"}, status_code=422)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        pod: PodState = request.app.state.pod
        if not pod.ready or pod.draining:
            return JSONResponse({"ready": False, "reason": "draining" if pod.draining else "warming up"}, 503)
        now = time.monotonic()
        if now >= pod.store_ok_until:
            try:
                await asyncio.wait_for(_ping(pod.store), 2.0)
            except (TimeoutError, StateStoreError) as exc:
                return JSONResponse({"ready": False, "reason": f"session store unavailable: {exc}"}, 503)
            pod.store_ok_until = now + 1.0  # at most one ping a second, however often probes come
        return JSONResponse({"ready": True})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        pod: PodState = request.app.state.pod
        return PlainTextResponse(pod.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/debug/batches")
    async def debug_batches(request: Request) -> JSONResponse:
        """The batcher's last batches (``BatchRecord``, monotonic clock); ``capsim validate`` reads them."""
        pod: PodState = request.app.state.pod
        trace = getattr(pod.batcher, "trace", ())
        return JSONResponse({"clock": "monotonic", "batches": [list(r) for r in trace]})

    @app.post("/v1/sessions/{session_id}/turns", response_model=None)
    async def turn(
        session_id: str,
        body: TurnRequest,
        request: Request,
        idempotency_key: Annotated[str | None, Header(description="retries with this key are stored once")] = None,
    ) -> Response | dict[str, Any]:
        pod: PodState = request.app.state.pod
        if pod.draining:
            raise _HTTPError(503, "pod is draining; retry on another pod", RETRY_AFTER)
        try:
            validate_session_id(session_id)
        except InvalidSessionIdError as exc:
            raise _HTTPError(422, f"session_id: {exc}") from None
        if idempotency_key is not None and not (
            1 <= len(idempotency_key) <= 256 and set(idempotency_key) <= _IDEMPOTENCY_KEY_CHARS
        ):
            raise _HTTPError(422, "Idempotency-Key: must be 1 to 256 printable ASCII characters without spaces")
        prompt = _prompt(body, pod)
        if body.max_new_tokens > pod.config.max_new_tokens:
            raise _HTTPError(
                413, f"max_new_tokens {body.max_new_tokens} is over this pod's limit {pod.config.max_new_tokens}"
            )
        received = time.perf_counter()
        pod.metrics.request_started()
        streaming = False
        try:
            async with pod.drain_bound():
                response = await _serve_turn(pod, session_id, prompt, body, received, idempotency_key)
            streaming = isinstance(response, StreamingResponse)  # the stream ends the request itself
            return response
        finally:
            if not streaming:
                pod.metrics.request_finished()

    return app


async def _serve_turn(
    pod: PodState,
    session_id: str,
    prompt: tuple[int, ...],
    body: TurnRequest,
    received: float,
    key: str | None = None,
) -> Response | dict[str, Any]:
    """Load the session, run the turn, store it, answer (or stream the answer).

    With an idempotency ``key`` that the session already remembers, answer what the first attempt
    answered, without running the model or writing."""
    from capsim.core import session_history  # the engine prefills the stored history + the new message

    history = session_history.for_pod(pod)  # from here on pod.store keeps a local copy (on_unavailable)
    found = await _store_call(history.load(session_id))  # 503 if the store is out (and no local copy serves)
    loaded = found.state
    done = loaded.write_for(key) if key is not None else None
    if done is not None:
        return JSONResponse(done.reply, headers={"Idempotent-Replayed": "true"})
    try:
        turn = history.turn(found, prompt, body.max_new_tokens)
    except session_history.HistoryTooLongError as exc:
        raise _HTTPError(413, str(exc)) from None
    if body.stream:
        stream = _TurnStream(pod, session_id, turn.prompt, body.max_new_tokens, received, loaded, key)
        stream.prompt = prompt  # the session stores the new message; its history is there already
        try:
            first = await stream.first()
        except BaseException:
            stream.task.cancel()
            raise
        return StreamingResponse(stream.events(first), media_type="text/event-stream")
    result = await _generate(pod, GenerationRequest(turn.prompt, body.max_new_tokens))
    answer = await _save_turn(pod, session_id, prompt, result, loaded, received, key)
    return JSONResponse({**answer, "history": history.report(turn, result)})




def _prompt(body: TurnRequest, pod: PodState) -> tuple[int, ...]:
    limit = pod.config.max_prompt_tokens
    vocab = pod.engine.config.vocab_size
    if isinstance(body.prompt_tokens, int):
        if body.prompt_tokens < 1:
            raise _HTTPError(422, f"prompt_tokens: must be >= 1, got {body.prompt_tokens}")
        if body.prompt_tokens > limit:
            raise _HTTPError(413, f"prompt of {body.prompt_tokens} tokens is over this pod's limit {limit}")
        return synthetic_prompt(body.prompt_tokens, vocab)
    ids = body.prompt_tokens
    if not ids:
        raise _HTTPError(422, "prompt_tokens: the token list is empty")
    if len(ids) > limit:
        raise _HTTPError(413, f"prompt of {len(ids)} tokens is over this pod's limit {limit}")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise _HTTPError(422, f"prompt_tokens: token ids must be in [0, {vocab}), got {bad[0]}")
    return tuple(ids)


async def _ping(store: SessionStore) -> None:
    ping = getattr(store, "ping", None)
    if ping is not None:
        await ping()
    else:
        await store.get("capsim-readiness-probe")


async def _store_call(coro: Any) -> Any:
    try:
        return await coro
    except StoreUnavailableError as exc:
        raise _HTTPError(503, f"session store unavailable: {exc}", RETRY_AFTER) from None
    except StateTooLargeError as exc:
        raise _HTTPError(413, str(exc)) from None
    except StateStoreError as exc:
        raise _HTTPError(500, f"session store error: {exc}") from None


async def _generate(pod: PodState, req: GenerationRequest) -> GenerationResult:
    try:
        return await pod.batcher.submit(req)
    except QueueFullError as exc:
        retry = max(1, round(exc.retry_after_s))
        raise _HTTPError(429, str(exc), {"Retry-After": str(retry)}) from None
    except BatcherClosedError:
        raise _HTTPError(503, "pod is shutting down; retry on another pod", RETRY_AFTER) from None
    except RequestTooLargeError as exc:
        raise _HTTPError(413, str(exc)) from None


async def _save_turn(
    pod: PodState,
    session_id: str,
    prompt: tuple[int, ...],
    result: GenerationResult,
    loaded: SessionState,
    received: float,
    key: str | None = None,
) -> dict[str, Any]:
    """Append the turn to the session and return its answer: one compare-and-set against the version
    read at the start of the turn; if another writer got there first (a client retried elsewhere), read
    again and reapply, unless that writer was an earlier attempt of this very turn (the same
    idempotency ``key``): then nothing is written and that attempt's answer is returned."""

    def append(state: SessionState) -> SessionState:
        new = state.with_message("user", _describe(prompt), tokens=len(prompt)).with_message(
            "assistant", " ".join(map(str, result.tokens)), tokens=len(result.tokens)
        )
        if key is None:
            return new
        turn, version = len(state.messages) // 2 + 1, state.version + 1
        return new.with_write(key, _answer(session_id, result, turn, version, received))

    async def put_or_update() -> SessionState:
        try:
            return await pod.store.put(append(loaded))
        except ConflictError:
            if key is None:
                return await pod.store.update(session_id, append)
            return await pod.store.update(session_id, append, idempotency_key=key)

    saved: SessionState = await _store_call(put_or_update())
    if key is None:
        return _answer(session_id, result, len(saved.messages) // 2, saved.version, received)
    done = saved.write_for(key)
    assert done is not None and isinstance(done.reply, dict)
    reply: dict[str, Any] = done.reply
    if done.version != saved.version:  # an earlier attempt's write, answered as it was then
        return reply
    return {**reply, "timings": {**reply["timings"], "total_s": time.perf_counter() - received}}


def _describe(prompt: tuple[int, ...]) -> str:
    return " ".join(map(str, prompt))


def _answer(
    session_id: str, result: GenerationResult, turn: int, version: int, received: float
) -> dict[str, Any]:
    """The turn's answer; timings are seconds from when the pod received the request."""
    queue_s = max(result.started_at - received, 0.0)
    return {
        "session_id": session_id,
        "turn": turn,
        "version": version,
        "tokens": result.tokens,
        "batch_size": result.batch_size,
        "timings": {
            "queue_s": queue_s,
            "ttft_s": queue_s + result.first_token_s,
            "model_s": result.total_s,
            "total_s": time.perf_counter() - received,
        },
    }


class _TurnStream:
    """A streaming turn: generation runs as a task, tokens arrive through a queue from the engine."""

    def __init__(
        self,
        pod: PodState,
        session_id: str,
        prompt: tuple[int, ...],
        max_new: int,
        received: float,
        loaded: SessionState,
        key: str | None = None,
    ) -> None:
        self.pod, self.session_id, self.prompt, self.max_new, self.received = pod, session_id, prompt, max_new, received
        self.loaded = loaded
        self.key = key
        loop = asyncio.get_running_loop()
        self.tokens: asyncio.Queue[tuple[int, int, float]] = asyncio.Queue()

        def on_token(index: int, token: int, t_s: float) -> None:
            loop.call_soon_threadsafe(self.tokens.put_nowait, (index, token, t_s))

        self.task = asyncio.create_task(_generate(pod, GenerationRequest(prompt, max_new, on_token=on_token)))

    async def next_token(self) -> tuple[int, int, float] | None:
        """The next token, or None once generation has ended (successfully or not) without one."""
        getter = asyncio.ensure_future(self.tokens.get())
        done, _ = await asyncio.wait({getter, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        if not self.tokens.empty():
            return self.tokens.get_nowait()
        return None

    async def first(self) -> tuple[int, int, float]:
        """Wait for the first token; a queue-full or closing error surfaces here, before any byte."""
        token = await self.next_token()
        if token is None:
            await self.task  # raises the _HTTPError that ended it
            raise _HTTPError(500, "generation ended without a token")
        return token

    async def events(self, first: tuple[int, int, float]) -> AsyncIterator[bytes]:
        try:
            async with self.pod.drain_bound():
                token: tuple[int, int, float] | None = first
                sent = 0
                while token is not None:
                    index, value, _ = token
                    yield _sse("token", {"index": index, "token": value, "t_s": time.perf_counter() - self.received})
                    sent += 1
                    if sent >= self.max_new:
                        break
                    token = await self.next_token()
                result = await self.task
                answer = await _save_turn(
                    self.pod, self.session_id, self.prompt, result, self.loaded, self.received, self.key
                )
            yield _sse("done", answer)
        except _HTTPError as exc:
            yield _sse("error", {"status": exc.status, "detail": exc.detail})
        finally:
            self.pod.metrics.request_finished()
            if not self.task.done():
                self.task.cancel()


def _sse(event: str, data: Mapping[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


DRAIN_MARGIN_S = 3.0  # SIGTERM to exit takes at most drain_timeout_s plus this (uvicorn's steps, close)


def make_server(config: PodConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> Any:
    """The pod's uvicorn server: SIGTERM/SIGINT start the drain (``PodState.begin_drain``) at once.

    uvicorn's own graceful-shutdown limit is a backstop a second past the drain budget: the pod's
    bounds answer every turn first, so uvicorn never has to cancel one (which would be a plain 500).
    """
    import uvicorn

    app = create_app(config)

    class PodServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            pod: PodState | None = getattr(app.state, "pod", None)
            if pod is not None:
                pod.begin_drain()
            super().handle_exit(sig, frame)

    return PodServer(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            lifespan="on",
            timeout_graceful_shutdown=math.ceil(config.drain_timeout_s) + 1,
            access_log=False,
        )
    )


def serve(config: PodConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the pod on uvicorn until SIGTERM/SIGINT: readiness goes false at once, intake stops, turns in
    flight finish or answer 503 within ``config.drain_timeout_s``, and the process exits 0 within
    ``drain_timeout_s + DRAIN_MARGIN_S``."""
    import signal

    server = make_server(config, host, port, log_level)
    # uvicorn re-raises a caught SIGTERM once it has shut down gracefully; by then every turn has been
    # answered and the store closed, so the handler it restores and re-triggers is this one: exit 0, as
    # Kubernetes expects of a drain, without waiting for the model's worker thread to finish a batch
    # whose callers have all been answered.
    signal.signal(signal.SIGTERM, lambda *_: _exit_now(0))
    server.run()


def _exit_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
