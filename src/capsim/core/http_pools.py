"""Connection pools for capsim's HTTP clients (the load generator, the calibration loops, the router).

httpcore 1.0.9 (the newest release) walks every connection of a pool on each request's enqueue and release,
so one big pool's CPU per request grows with the connections it holds; several small pools keep each walk
short (``ConnectionPools``, ``benchmarks/bench_loadgen.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from capsim.errors import CapsimError

__all__ = ["ONE_POOL", "ConnectionPools", "HttpPoolsError", "http_clients"]


class HttpPoolsError(CapsimError, ValueError):
    """A connection layout that cannot hold a connection (a count below one); names the field."""


@dataclass(frozen=True)
class ConnectionPools:
    """How the load generator holds its connections: ``shards`` httpx clients (request ``r`` on client
    ``r % shards``), each with at most ``connections`` open and ``keepalive`` idle.

    httpcore (1.0.9, the newest release) walks every connection a pool holds, and polls each idle one, on
    every request's enqueue and release, so a pool's CPU per request grows with the connections it holds.
    With one pool of 2048 connections keeping 512 idle, a burst left hundreds open, every later request
    cost more of the generator's core, and past a tipping point (about 45 requests a second against the
    continuous pod, stop 31) the generator saturated its core and fell behind its schedule by seconds, a
    queue that looked like the pod's (``benchmarks/bench_loadgen.py``; encode/httpcore#1035, pydantic/httpx2#1169).
    Several small pools keep each walk short."""

    shards: int = 16
    connections: int = 128
    keepalive: int = 16

    def __post_init__(self) -> None:
        for name in ("shards", "connections", "keepalive"):
            if getattr(self, name) < 1:
                raise HttpPoolsError(f"ConnectionPools.{name} must be >= 1, got {getattr(self, name)}")


#: the layout before stop 31: one pool (kept for the benchmark's baseline)
ONE_POOL = ConnectionPools(shards=1, connections=2048, keepalive=512)


@contextlib.asynccontextmanager
async def http_clients(pools: ConnectionPools | None = None,
                       timeout: httpx.Timeout | float = 60.0) -> AsyncIterator[list[httpx.AsyncClient]]:
    """The httpx clients of a ``ConnectionPools`` layout (default: ``ConnectionPools()``), sharing one SSL
    context (each client would build its own, milliseconds apiece); put request ``k`` on
    ``clients[k % len(clients)]``. What every driver of load uses (``loadgen.run_load``, the validations'
    calibration loops) and the router's forwarding."""
    layout = pools or ConnectionPools()
    limits = httpx.Limits(max_connections=layout.connections, max_keepalive_connections=layout.keepalive)
    verify = httpx.create_ssl_context()
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(httpx.AsyncClient(limits=limits, timeout=timeout, verify=verify))
               for _ in range(layout.shards)]
