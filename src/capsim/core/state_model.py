"""The session state an agent keeps between turns, its typed errors, and its JSON wire format.

The wire format is plain JSON produced by pydantic from :class:`SessionState`. Its first three keys are
always ``session_id``, ``version`` and ``created_at_s`` in that order (the declaration order), so the
store's Lua script can read the version and creation time from the head of the value without decoding
the rest. Decoding never reconstructs arbitrary objects: bytes are validated into the model or rejected
with :class:`CorruptStateError`.
"""

from __future__ import annotations

import re
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from capsim.errors import CapsimError

SESSION_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
_SESSION_ID_RE = re.compile(SESSION_ID_PATTERN)

# The head every encoded state starts with; mirrored by the Lua pattern in state_redis.py.
HEAD_RE = re.compile(rb'^\{"session_id":"[^"]*","version":(\d+),"created_at_s":([-0-9.eE+]+),')

Role = Literal["system", "user", "assistant", "tool"]


class StateStoreError(CapsimError):
    """Base of every error the session-state store raises."""


class StoreUnavailableError(StateStoreError):
    """The server is down, refused the connection, or did not answer within the deadline.

    The outcome of a write that raised this is unknown: it may or may not have been applied.
    """


class ConflictError(StateStoreError):
    """A compare-and-set lost: the stored version is not the one the write was based on."""


class CorruptStateError(StateStoreError):
    """The stored value is not a valid session state (bad JSON, pickle, foreign data, or wrong session)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"corrupt session state at key {key!r}: {reason}")
        self.key = key
        self.reason = reason


class StateTooLargeError(StateStoreError):
    """The encoded state is larger than the store's cap (checked before any network call)."""

    def __init__(self, session_id: str, size_bytes: int, max_bytes: int) -> None:
        super().__init__(
            f"session {session_id!r} encodes to {size_bytes} bytes, over the cap of {max_bytes} bytes; "
            "trim old messages or tool outputs, or raise max_state_bytes"
        )
        self.session_id = session_id
        self.size_bytes = size_bytes
        self.max_bytes = max_bytes


class StoreReplyError(StateStoreError):
    """The server refused a command for a reason that retrying will not fix (WRONGTYPE, a refused script).

    ``key`` names the session key (or the store's URL where no key was involved); ``reply`` is the
    server's error text.
    """

    def __init__(self, key: str, reply: str) -> None:
        super().__init__(f"the session store refused a command on {key!r}: {reply}")
        self.key = key
        self.reply = reply


class StoreURLError(StateStoreError, ValueError):
    """A store URL that cannot be right: an unknown scheme, or a database that is not a number."""


class InvalidSessionIdError(StateStoreError, ValueError):
    """A session id is not 1 to 128 characters of letters, digits and ``._:-``."""


def validate_session_id(session_id: object) -> str:
    """Return the id unchanged if it is valid, else raise :class:`InvalidSessionIdError`."""
    if not isinstance(session_id, str) or not _SESSION_ID_RE.fullmatch(session_id):
        raise InvalidSessionIdError(
            f"session id must be 1 to 128 characters of letters, digits and '._:-', got {session_id!r}"
        )
    return session_id


class Message(BaseModel):
    """One turn of the conversation: who spoke, what, and how many tokens it holds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    content: str
    tokens: int = Field(
        default=0, ge=0, description="tokens in content, as the model's tokenizer counts them"
    )


class ToolOutput(BaseModel):
    """The result of one tool call made during the session."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    call_id: str = Field(min_length=1, max_length=256)
    tool: str = Field(min_length=1, max_length=256)
    output: JsonValue = None
    is_error: bool = False


MAX_WRITE_RECORDS = 32  # idempotency keys remembered per session (the most recent writes)


class WriteRecord(BaseModel):
    """An idempotent write: its key, the version it produced, and the answer its writer gave."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str = Field(min_length=1, max_length=256)
    version: int = Field(ge=1)
    reply: JsonValue = None


class SessionState(BaseModel):
    """Everything a pod needs to resume a conversation; immutable, so an update returns a new state.

    ``version`` counts committed writes (0: never stored). Timestamps are wall-clock Unix seconds,
    because they are compared across processes and machines.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The first three fields form the wire head (see module docstring): do not reorder them.
    session_id: str = Field(pattern=SESSION_ID_PATTERN)
    version: int = Field(default=0, ge=0)
    created_at_s: float
    updated_at_s: float
    messages: tuple[Message, ...] = ()
    tool_outputs: tuple[ToolOutput, ...] = ()
    # The id of the write that produced this version: unique per write attempt, so two writers never
    # store byte-identical values and the compare-and-set can tell "my write landed" from "another did".
    write_id: str = Field(default="", max_length=64)
    writes: tuple[WriteRecord, ...] = Field(default=(), description="the most recent idempotent writes")

    @classmethod
    def new(cls, session_id: str, now_s: float | None = None) -> SessionState:
        """An empty, never-stored state (version 0) created at ``now_s`` (default: now)."""
        now = time.time() if now_s is None else now_s
        return cls(session_id=validate_session_id(session_id), created_at_s=now, updated_at_s=now)

    def with_message(self, role: Role, content: str, tokens: int = 0) -> SessionState:
        """A copy with one more message appended."""
        msg = Message(role=role, content=content, tokens=tokens)
        return self.model_copy(update={"messages": (*self.messages, msg)})

    def with_tool_output(
        self, call_id: str, tool: str, output: JsonValue, is_error: bool = False
    ) -> SessionState:
        """A copy with one more tool output appended."""
        out = ToolOutput(call_id=call_id, tool=tool, output=output, is_error=is_error)
        return self.model_copy(update={"tool_outputs": (*self.tool_outputs, out)})

    def with_write(self, key: str, reply: JsonValue = None) -> SessionState:
        """A copy that remembers an idempotent write with ``key`` (the one that will store this copy,
        at ``version + 1``) and the answer its writer gave; only the last 32 keys are kept."""
        rec = WriteRecord(key=key, version=self.version + 1, reply=reply)
        return self.model_copy(update={"writes": (*self.writes, rec)[-MAX_WRITE_RECORDS:]})

    def write_for(self, key: str) -> WriteRecord | None:
        """The remembered write with ``key``, or None."""
        return next((w for w in reversed(self.writes) if w.key == key), None)

    @property
    def total_tokens(self) -> int:
        """Tokens across all messages."""
        return sum(m.tokens for m in self.messages)


def encode_state(state: SessionState, max_bytes: int) -> bytes:
    """Encode to JSON bytes, raising :class:`StateTooLargeError` above ``max_bytes``."""
    raw = state.__pydantic_serializer__.to_json(state)
    if len(raw) > max_bytes:
        raise StateTooLargeError(state.session_id, len(raw), max_bytes)
    return raw


def decode_state(key: str, raw: bytes, session_id: str) -> SessionState:
    """Validate stored bytes into a state of ``session_id``, or raise :class:`CorruptStateError`."""
    if not raw.startswith(b"{"):
        # Pickles start with 0x80, other serializers with other bytes: reject without interpreting.
        raise CorruptStateError(key, f"not a JSON object (starts with {raw[:8]!r})")
    try:
        state = SessionState.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "value"
        raise CorruptStateError(key, f"{where}: {first['msg']} ({exc.error_count()} problem(s))") from None
    if state.session_id != session_id:
        raise CorruptStateError(key, f"holds session {state.session_id!r}, not {session_id!r}")
    return state


def head_version(raw: bytes) -> int | None:
    """The version in an encoded state's head, or None if the head is not ours."""
    m = HEAD_RE.match(raw)
    return int(m.group(1)) if m else None


def head_created_at_s(raw: bytes) -> float | None:
    """The creation time in an encoded state's head, or None if the head is not ours."""
    m = HEAD_RE.match(raw)
    return float(m.group(2)) if m else None
