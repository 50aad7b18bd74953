"""Read a Mooncake trace (JSON lines: ``timestamp`` ms, ``input_length``, ``output_length``, ``hash_ids``).

Mooncake's FAST'25 release describes each request by its arrival, its token counts and the ids of its
prompt's 512-token blocks; equal leading ids mark a shared prefix. The reader returns what the workload
needs: arrival times, token counts, and a :class:`~capsim.sim.prefix.TracePrefix` for the prefix cache.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from capsim.paths import open_input
from capsim.sim.prefix import TracePrefix

#: Tokens per ``hash_ids`` block in Mooncake's traces.
MOONCAKE_BLOCK = 512
_INT32_MAX = int(np.iinfo(np.int32).max)
_INT64_MAX = 2**63 - 1  # a block hash id as numpy's int64 holds it


@dataclass(frozen=True)
class MooncakeTrace:
    """A Mooncake trace read into arrays (times in seconds from the first request)."""

    times_s: np.ndarray  # float64, sorted
    prompt: np.ndarray  # int32
    output: np.ndarray  # int32
    hash_ids: list[np.ndarray]  # int64 each, one per request

    def prefix(self, keep: np.ndarray | slice | None = None) -> TracePrefix:
        """The requests' block hashes (of those ``keep`` selects, renumbered from 0)."""
        if keep is None:
            return TracePrefix(self.hash_ids, self.prompt, MOONCAKE_BLOCK)
        idx = np.arange(len(self.prompt))[keep]
        return TracePrefix([self.hash_ids[i] for i in idx], self.prompt[idx], MOONCAKE_BLOCK)


def read_mooncake(path: Path) -> MooncakeTrace:
    """Read ``path``; a missing file or a malformed line raises ``TraceError`` naming the file and line."""
    from capsim.sim.arrivals import TraceError  # arrivals imports this module lazily: no cycle

    f = open_input(path, "trace", "a JSON-lines file", TraceError)
    times: list[float] = []
    prompt: list[int] = []
    output: list[int] = []
    ids: list[np.ndarray] = []
    with f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue

            def bad(why: str, lineno: int = lineno) -> TraceError:
                return TraceError(f"{path}: line {lineno}: {why}")

            try:
                row = json.loads(raw)
            except UnicodeDecodeError:
                raise bad("not UTF-8 text; is it a Mooncake JSON-lines trace?") from None
            except json.JSONDecodeError as exc:
                raise bad(f"not a JSON object: {exc.msg} (column {exc.colno})") from None
            if not isinstance(row, dict):
                raise bad(f"expected a JSON object, got {type(row).__name__}")
            missing = [k for k in ("timestamp", "input_length", "output_length", "hash_ids") if k not in row]
            if missing:
                raise bad(f"missing field(s) {', '.join(missing)}")
            ts, p, o, h = row["timestamp"], row["input_length"], row["output_length"], row["hash_ids"]
            if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts) or ts < 0:
                raise bad(f"timestamp must be a number of milliseconds >= 0, got {ts!r}")
            for name, v in (("input_length", p), ("output_length", o)):
                if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= _INT32_MAX:
                    raise bad(f"{name} must be an integer in [1, {_INT32_MAX}], got {v!r}")
            if not isinstance(h, list) or any(isinstance(x, bool) or not isinstance(x, int) or not 0 <= x <= _INT64_MAX
                                              for x in h):
                raise bad(f"hash_ids must be a list of integers in [0, 2^63 - 1], got {str(h)[:60]}")
            blocks = -(-p // MOONCAKE_BLOCK)
            if len(h) != blocks:
                raise bad(f"hash_ids has {len(h)} ids for input_length {p} ({blocks} blocks of {MOONCAKE_BLOCK})")
            t = ts / 1000.0
            if times and t < times[-1]:
                raise bad(f"timestamp goes back in time ({ts!r} after {times[-1] * 1000:g})")
            times.append(t)
            prompt.append(p)
            output.append(o)
            ids.append(np.array(h, dtype=np.int64))
    if not times:
        raise TraceError(f"{path}: no requests")
    t0 = times[0]
    return MooncakeTrace(np.array(times) - t0, np.array(prompt, dtype=np.int32), np.array(output, dtype=np.int32),
                         ids)


def prefix_hit_bound(trace: MooncakeTrace) -> int:
    """Prompt tokens an unbounded cache could serve: each request's leading ids seen in earlier requests,
    times 512, capped at its input minus one (the issue's bound for a replay)."""
    seen: set[int] = set()
    total = 0
    for h, p in zip(trace.hash_ids, trace.prompt.tolist(), strict=True):
        hs = h.tolist()
        j = 0
        while j < len(hs) and hs[j] in seen:
            j += 1
        total += min(j * MOONCAKE_BLOCK, p - 1)
        seen.update(hs)
    return total
