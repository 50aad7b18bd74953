"""One session turn over HTTP, the pod's hot path: parse the body, load the session, run, store, answer.

Lean on purpose (issue 11): the body is decoded and checked by msgspec in one pass (strict: ``"16"``,
``true`` and ``16.0`` are not token counts; a 422 names the field), answers are encoded by orjson, and
the route is a plain Starlette route that skips FastAPI's dependency solving. See ``docs/pod.md``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any

import msgspec
import orjson
from starlette.responses import Response, StreamingResponse

from capsim.core import session_history  # the engine prefills the stored history + the new message
from capsim.core.batcher import BatcherClosedError, QueueFullError
from capsim.core.continuous import RequestTooLargeError
from capsim.core.engine import GenerationRequest, GenerationResult, synthetic_prompt
from capsim.core.service_pod import RETRY_AFTER, HTTPError, PodState
from capsim.core.state import (
    ConflictError,
    SessionState,
    StateStoreError,
    StoreUnavailableError,
)
from capsim.core.state_model import InvalidSessionIdError, StateTooLargeError, validate_session_id

_IDEMPOTENCY_KEY_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))


class TurnRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The body of a turn: a prompt (a token count for a synthetic prompt, or token ids).

    Strict: ``"16"``, ``true`` and ``16.0`` are not token counts, and ``"yes"`` is not a boolean.
    """

    prompt_tokens: Annotated[int | list[int], msgspec.Meta(description="a token count, or the prompt's token ids")]
    max_new_tokens: Annotated[int, msgspec.Meta(ge=1)] = 16
    stream: Annotated[bool, msgspec.Meta(description="answer with server-sent events, one per token")] = False


_DECODE_TURN = msgspec.json.Decoder(TurnRequest)
TURN_SCHEMA: dict[str, Any] = msgspec.json.schema(TurnRequest)  # for the OpenAPI document


def parse_turn(raw: bytes) -> TurnRequest:
    """Decode and check a turn's body in one pass; a :class:`HTTPError` 422 names the field."""
    try:
        return _DECODE_TURN.decode(raw)
    except msgspec.ValidationError as exc:
        # msgspec says "Expected `int`, got `str` - at `$.max_new_tokens`": lead with the field
        msg, _, where = str(exc).partition(" - at `$")
        field = where.rstrip("`").lstrip(".")
        raise HTTPError(422, f"{field or 'body'}: {msg}") from None
    except msgspec.DecodeError as exc:
        raise HTTPError(422, f"request body is not valid JSON ({exc})") from None


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """A JSON answer encoded by orjson (several times faster than the standard library's encoder)."""
    return Response(orjson.dumps(data), status, headers, media_type="application/json")


async def handle_turn(pod: PodState, session_id: str, raw: bytes, idempotency_key: str | None) -> Response:
    """``POST /v1/sessions/{session_id}/turns``: checks in the documented order, then the turn."""
    body = parse_turn(raw)
    if pod.draining:
        raise HTTPError(503, "pod is draining; retry on another pod" if pod.dead is None else
                        f"the pod's engine died ({pod.dead}); retry on another pod", RETRY_AFTER)
    try:
        validate_session_id(session_id)
    except InvalidSessionIdError as exc:
        raise HTTPError(422, f"session_id: {exc}") from None
    if idempotency_key is not None and not (
        1 <= len(idempotency_key) <= 256 and set(idempotency_key) <= _IDEMPOTENCY_KEY_CHARS
    ):
        raise HTTPError(422, "Idempotency-Key: must be 1 to 256 printable ASCII characters without spaces")
    prompt = _prompt(body, pod)
    if body.max_new_tokens > pod.config.max_new_tokens:
        raise HTTPError(
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


async def _serve_turn(
    pod: PodState,
    session_id: str,
    prompt: tuple[int, ...],
    body: TurnRequest,
    received: float,
    key: str | None = None,
) -> Response:
    """Load the session, run the turn, store it, answer (or stream the answer).

    With an idempotency ``key`` that the session already remembers, answer what the first attempt
    answered, without running the model or writing."""
    history = session_history.for_pod(pod)  # from here on pod.store keeps a local copy (on_unavailable)
    found = await _store_call(history.load(session_id))  # 503 if the store is out (and no local copy serves)
    loaded = found.state
    done = loaded.write_for(key) if key is not None else None
    if done is not None:
        return json_response(done.reply, headers={"Idempotent-Replayed": "true"})
    try:
        turn = history.turn(found, prompt, body.max_new_tokens)
    except session_history.HistoryTooLongError as exc:
        raise HTTPError(413, str(exc)) from None
    if body.stream:
        stream = _TurnStream(pod, session_id, turn.prompt, body.max_new_tokens, received, loaded, key)
        stream.prompt = prompt  # the session stores the new message; its history is there already
        try:
            first = await stream.first()
        except BaseException:
            stream.task.cancel()
            raise
        return StreamingResponse(stream.events(first), media_type="text/event-stream")
    load_s = time.perf_counter() - received  # reading the history from the store, before the engine sees it
    result = await _generate(pod, GenerationRequest(turn.prompt, body.max_new_tokens))
    answer = await _save_turn(pod, session_id, prompt, result, loaded, received, key)
    return json_response({**answer, "history": {**history.report(turn, result), "load_s": load_s}})


def _prompt(body: TurnRequest, pod: PodState) -> tuple[int, ...]:
    limit = pod.config.max_prompt_tokens
    vocab = pod.engine.config.vocab_size
    if isinstance(body.prompt_tokens, int):
        if body.prompt_tokens < 1:
            raise HTTPError(422, f"prompt_tokens: must be >= 1, got {body.prompt_tokens}")
        if body.prompt_tokens > limit:
            raise HTTPError(413, f"prompt of {body.prompt_tokens} tokens is over this pod's limit {limit}")
        return synthetic_prompt(body.prompt_tokens, vocab)
    ids = body.prompt_tokens
    if not ids:
        raise HTTPError(422, "prompt_tokens: the token list is empty")
    if len(ids) > limit:
        raise HTTPError(413, f"prompt of {len(ids)} tokens is over this pod's limit {limit}")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise HTTPError(422, f"prompt_tokens: token ids must be in [0, {vocab}), got {bad[0]}")
    return tuple(ids)


async def _store_call(coro: Any) -> Any:
    try:
        return await coro
    except StoreUnavailableError as exc:
        raise HTTPError(503, f"session store unavailable: {exc}", RETRY_AFTER) from None
    except StateTooLargeError as exc:
        raise HTTPError(413, str(exc)) from None
    except StateStoreError as exc:
        raise HTTPError(500, f"session store error: {exc}") from None


async def _generate(pod: PodState, req: GenerationRequest) -> GenerationResult:
    try:
        return await pod.batcher.submit(req)
    except QueueFullError as exc:
        retry = max(1, round(exc.retry_after_s))
        raise HTTPError(429, str(exc), {"Retry-After": str(retry)}) from None
    except BatcherClosedError:
        raise HTTPError(503, "pod is shutting down; retry on another pod", RETRY_AFTER) from None
    except RequestTooLargeError as exc:
        raise HTTPError(413, str(exc)) from None


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
    """The turn's answer; timings are seconds from when the pod received the request, and ``received_at``
    is that moment on the pod's ``perf_counter`` (the host's monotonic clock on Linux, so a load generator on
    the same host can place the pod's times on its own clock: ``run_load(pod_clock=True)``)."""
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
            "received_at": received,
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
            await self.task  # raises the HTTPError that ended it
            raise HTTPError(500, "generation ended without a token")
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
        except HTTPError as exc:
            yield _sse("error", {"status": exc.status, "detail": exc.detail})
        finally:
            self.pod.metrics.request_finished()
            if not self.task.done():
                self.task.cancel()


def _sse(event: str, data: Mapping[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
