"""The agent pod: an ASGI app (FastAPI) that serves session turns through the batcher and the store.

``POST /v1/sessions/{session_id}/turns`` loads the session, runs the turn through the dynamic batcher
on the reference engine, appends the turn to the session (compare-and-set) and only then answers.
``GET /metrics`` is Prometheus text, ``/healthz`` liveness, ``/readyz`` readiness (after warm-up, while
the store answers or the pod serves its local copies (``CAPSIM_ON_UNAVAILABLE=serve_local``), and not
while draining). Configuration comes from ``PodConfig``: flags or the
``CAPSIM_*`` environment variables the exporter writes into the Deployment.

Failure answers are JSON ``{"detail": ...}``, and every 503 carries ``Retry-After``. A turn with an
``Idempotency-Key`` header is stored once however often it is retried; a retry gets the first answer.
On SIGTERM every turn in flight is bounded by ``drain_timeout_s``: it finishes, or answers 503. A forward pass
or step that raises fails the turns it held (500) and kills the pod, as vLLM's server dies with its engine:
``/healthz`` and ``/readyz`` answer 503, new turns 503, and ``serve`` exits ``ENGINE_DIED_EXIT`` (1) for the
kubelet to restart the container; ``CAPSIM_KEEP_ALIVE_ON_ENGINE_DEATH=true`` serves on instead.

This module builds the app and runs it; the parts live in ``service_config`` (``PodConfig``),
``service_pod`` (``PodState``, the drain) and ``service_turns`` (the turn route, the hot path).
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from capsim.core import session_history
from capsim.core.batcher import TRACE_BATCHES, DynamicBatcher
from capsim.core.continuous_batcher import TRACE_STEPS, ContinuousBatcher
from capsim.core.engine import GenerationRequest, GenerationResult, ReferenceEngine
from capsim.core.http_pools import SERVER_KEEP_ALIVE_S
from capsim.core.metrics import TURN_HANDLER, InferenceMetrics
from capsim.core.service_config import PodConfig
from capsim.core.service_pod import RETRY_AFTER, HTTPError, PodState
from capsim.core.service_turns import TURN_SCHEMA, TurnRequest, handle_turn
from capsim.core.state import SessionStore, StateStoreError, open_store

__all__ = ["DRAIN_MARGIN_S", "ENGINE_DIED_EXIT", "RETRY_AFTER", "PodConfig", "PodState", "TurnRequest", "create_app", "make_server", "serve"]

TURN_PATH = TURN_HANDLER


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
        if cfg.slowdown != 1.0:  # the drill is the pod's setting, an injected engine's too
            eng.slowdown = cfg.slowdown
        metrics = InferenceMetrics()
        st = store or open_store(cfg.redis_url, metrics=metrics, sliding_ttl_s=cfg.session_ttl_s)
        batcher: DynamicBatcher[GenerationRequest, GenerationResult] | ContinuousBatcher
        if cfg.batch_mode == "continuous":
            batcher = ContinuousBatcher(eng, cfg.scheduler_limits(), queue_capacity=cfg.queue_capacity,
                                        metrics=metrics, trace_steps=cfg.trace_steps or TRACE_STEPS)
        else:
            batcher = DynamicBatcher(eng.runner(), cfg.batch_settings(), metrics, close_timeout_s=cfg.drain_timeout_s,
                                     trace_batches=cfg.trace_steps or TRACE_BATCHES)
        pod = PodState(cfg, eng, st, batcher, metrics, loop=asyncio.get_running_loop())
        app.state.pod = pod
        if not cfg.keep_alive_on_engine_death:
            def engine_died(exc: Exception) -> None:  # as vLLM's server: its engine is dead, so is the pod
                pod.engine_died(exc)
                stop = getattr(app.state, "stop_server", None)  # the server running the app (make_server)
                if stop is not None:
                    stop()
            batcher.on_failure = engine_died
        async with batcher:
            if cfg.warmup:
                await asyncio.to_thread(eng.generate, [eng.request(8, 2)])
            if cfg.gc_freeze:
                # CPython's full collections walk every tracked object: about 230,000 here once torch, the
                # model and the app are loaded, 160 ms a pass on this machine, stalling the engine's step in
                # progress. The start-up heap is never garbage, so it leaves the collector's view
                # (vllm-project/vllm#14902, #24008; sgl-project/sglang#34999)
                gc.collect()
                gc.freeze()
            pod.ready = True
            try:
                yield
            finally:
                pod.ready = False
                pod.draining = True
                # the turns are answered by now (finished or 503); what is left of the budget goes to
                # queued work that no one waits for any more
                await batcher.aclose(timeout_s=pod.drain_left_s())
                if cfg.gc_freeze:
                    gc.unfreeze()  # a process that builds more apps (tests, notebooks) gets them back
        if store is None:
            await st.aclose()

    app = FastAPI(title="capsim agent pod", version="1", lifespan=lifespan)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError) -> JSONResponse:
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
    async def healthz(request: Request) -> JSONResponse:
        pod: PodState | None = getattr(request.app.state, "pod", None)
        if pod is not None and pod.dead is not None:  # the liveness probe fails while the server shuts down
            return JSONResponse({"status": "dead", "reason": f"engine died: {pod.dead}"}, 503)
        return JSONResponse({"status": "alive"})

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        pod: PodState = request.app.state.pod
        if not pod.ready or pod.draining:
            reason = "warming up" if not pod.draining else "draining" if pod.dead is None else f"engine died: {pod.dead}"
            return JSONResponse({"ready": False, "reason": reason}, 503)
        now = time.monotonic()
        if now >= pod.store_ok_until:
            try:
                await asyncio.wait_for(_ping(pod.store), 2.0)
            except (TimeoutError, StateStoreError) as exc:
                if _serves_locally(pod):  # it still serves the sessions it holds (and new ones): stay in
                    return JSONResponse({"ready": True, "store": f"unavailable, serving local copies: {exc}"})
                return JSONResponse({"ready": False, "reason": f"session store unavailable: {exc}"}, 503)
            pod.store_ok_until = now + 1.0  # at most one ping a second, however often probes come
        return JSONResponse({"ready": True})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        pod: PodState = request.app.state.pod
        return PlainTextResponse(pod.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/debug/batches")
    async def debug_batches(request: Request, since: float | None = None) -> JSONResponse:
        """The batcher's last batches (``BatchRecord``), or in continuous mode its last engine steps
        (``StepRecord``), monotonic clock, with the records' field names; ``capsim validate`` reads them.
        ``since``: only the records that ended after it. ``dropped``: the records that fell off the trace's
        end (the pod ran more than it keeps: ``CAPSIM_TRACE_STEPS``), ``oldest_start``: the start of the oldest
        record it still holds; a reader whose window begins before it lacks that window's start."""
        pod: PodState = request.app.state.pod
        trace = list(getattr(pod.batcher, "trace", ()))
        fields = list(getattr(trace[0], "_fields", ())) if trace else []
        dropped = getattr(pod.batcher, "trace_total", len(trace)) - len(trace)
        oldest = trace[0][0] if trace else None
        rows = [list(r) for r in trace if since is None or r[1] > since]
        return JSONResponse({"clock": "monotonic", "fields": fields, "batches": rows, "dropped": dropped,
                             "oldest_start": oldest})

    async def turn(request: Request) -> Response:
        # a plain Starlette route: the body is parsed by msgspec in handle_turn, not by FastAPI's
        # dependency solving and pydantic (the per-request CPU of the pod's hot path, issue 11)
        pod: PodState = request.app.state.pod
        try:
            response = await handle_turn(
                pod, request.path_params["session_id"], await request.body(), request.headers.get("idempotency-key"),
            )
        except HTTPError as exc:  # every answer of the route counts by its status class (http_requests_total)
            pod.metrics.observe_turn(exc.status)
            raise
        except Exception:  # the handler above answers 500
            pod.metrics.observe_turn(500)
            raise
        pod.metrics.observe_turn(response.status_code)  # a stream's: its first line's
        return response

    app.router.add_route(TURN_PATH, turn, methods=["POST"], include_in_schema=False)
    _document_turn_route(app)
    return app


def _document_turn_route(app: FastAPI) -> None:
    """Put the turn route, which FastAPI does not see, into the app's OpenAPI document."""
    plain_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = plain_openapi()
            body = dict(TURN_SCHEMA)
            defs = body.pop("$defs", {})
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs)
            schema["paths"][TURN_PATH] = {"post": {
                "summary": "Run one turn of a session",
                "parameters": [
                    {"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "idempotency-key", "in": "header", "required": False, "schema": {"type": "string"},
                     "description": "retries with this key are stored once"},
                ],
                "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
                "responses": {"200": {"description": "the turn's answer (or server-sent events with stream)"}},
            }}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _serves_locally(pod: PodState) -> bool:
    """``CAPSIM_ON_UNAVAILABLE=serve_local``: the pod answers turns from its local copies while the store is
    out, so taking it out of the Service's endpoints would only turn a degraded pod into no pod."""
    history = getattr(pod, "session_history", None)
    settings = history.settings if history is not None else session_history.HistorySettings.from_env(os.environ)
    return settings.on_unavailable == "serve_local"


async def _ping(store: SessionStore) -> None:
    ping = getattr(store, "ping", None)
    if ping is not None:
        await ping()
    else:
        await store.get("capsim-readiness-probe")



DRAIN_MARGIN_S = 3.0  # SIGTERM to exit takes at most drain_timeout_s plus this (uvicorn's steps, close)
ENGINE_DIED_EXIT = 1  # serve's exit status once a step or forward pass raised (PodConfig.keep_alive_on_engine_death)


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

    server = PodServer(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            lifespan="on",
            timeout_graceful_shutdown=math.ceil(config.drain_timeout_s) + 1,
            timeout_keep_alive=SERVER_KEEP_ALIVE_S,  # over the clients' keepalive_expiry (http_pools)
            access_log=False,
        )
    )
    app.state.stop_server = lambda: setattr(server, "should_exit", True)  # the engine died (PodState.dead)
    return server


def serve(config: PodConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the pod on uvicorn until SIGTERM/SIGINT: readiness goes false at once, intake stops, turns in
    flight finish or answer 503 within ``config.drain_timeout_s``, and the process exits 0 within
    ``drain_timeout_s + DRAIN_MARGIN_S``. Or until its engine dies (``PodState.engine_died``): then it shuts
    down the same way and exits ``ENGINE_DIED_EXIT``."""
    import signal

    server = make_server(config, host, port, log_level)
    # uvicorn re-raises a caught SIGTERM once it has shut down gracefully; by then every turn has been
    # answered and the store closed, so the handler it restores and re-triggers is this one: exit 0, as
    # Kubernetes expects of a drain, without waiting for the model's worker thread to finish a batch
    # whose callers have all been answered.
    signal.signal(signal.SIGTERM, lambda *_: _exit_now(0))
    server.run()
    pod: PodState | None = getattr(server.config.app.state, "pod", None)
    if pod is not None and pod.dead is not None:  # as vLLM's server once its engine died: out, to be restarted
        print(f"capsim pod: the engine died ({pod.dead}); exiting {ENGINE_DIED_EXIT} for the kubelet to restart "
              "the container", file=sys.stderr)
        _exit_now(ENGINE_DIED_EXIT)


def _exit_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
