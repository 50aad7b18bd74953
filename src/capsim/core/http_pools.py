"""Connection pools for capsim's HTTP clients (the load generator, the calibration loops, the router).

httpcore 1.0.9 (the newest release) walks every connection of a pool on each request's enqueue and release,
so one big pool's CPU per request grows with the connections it holds; several small pools keep each walk
short (``ConnectionPools``, ``benchmarks/bench_loadgen.py``).

A client drops an idle connection after ``KEEPALIVE_EXPIRY_S``, a second before capsim's servers (the pod, the
router) close one (``SERVER_KEEP_ALIVE_S``, uvicorn's default and vLLM's ``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``). With
both at 5 s (httpx's and uvicorn's defaults, until stop 70) a request could go out on a connection the server was
closing at that instant: the client read ``RemoteProtocolError`` ("Server disconnected without sending a
response"), the router answered 502, and a validation lost a turn (a CI run at stop 70). Istio's "503 UC" between
Envoy and an application is the same race; its remedy is the same, the client's idle timeout under the server's.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from capsim.errors import CapsimError

__all__ = ["KEEPALIVE_EXPIRY_S", "ONE_POOL", "SERVER_KEEP_ALIVE_S", "ConnectionPools", "HttpPoolsError",
           "http_clients"]

#: how long capsim's servers (the pod, the router) keep an idle connection open (uvicorn's timeout_keep_alive)
SERVER_KEEP_ALIVE_S = 5
#: how long capsim's clients keep an idle connection for reuse (httpx's keepalive_expiry): under the servers'
KEEPALIVE_EXPIRY_S = 4.0


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
    limits = httpx.Limits(max_connections=layout.connections, max_keepalive_connections=layout.keepalive,
                          keepalive_expiry=KEEPALIVE_EXPIRY_S)
    verify = httpx.create_ssl_context()
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(httpx.AsyncClient(limits=limits, timeout=timeout, verify=verify))
               for _ in range(layout.shards)]
