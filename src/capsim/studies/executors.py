"""Where a study's runs execute: in this process, a local process pool, or a Dask cluster.

Every study takes ``executor=``: ``None`` (a process pool on every core), ``"serial"``, any
``concurrent.futures.Executor``, a ``distributed.Client`` (its ``get_executor()``), or a spec string:
``"processes"``/``"processes:N"``, ``"local:N"`` (a Dask ``LocalCluster`` of N single-threaded worker
processes) or a scheduler address such as ``"tcp://scheduler:8786"`` (an existing Dask cluster).
``open_executor`` turns any of these into an executor for the duration of a ``with`` block and closes
only what it opened itself.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any

from capsim.model.settings import SettingsError

ExecutorSpec = Executor | str | Any | None


class SerialExecutor(Executor):
    """Runs each task at submit time in this process (the reference the parallel runs must equal)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # the caller sees it through the future, as with a pool
            fut.set_exception(exc)
        return fut


def workers_of(executor: Executor) -> int:
    """How many tasks the executor runs at once (1 when it cannot tell)."""
    n = getattr(executor, "_max_workers", None)
    if isinstance(n, int):
        return n
    client = getattr(executor, "_client", None)
    if client is not None:
        try:
            info = client.scheduler_info()
            return max(1, sum(int(w.get("nthreads", 1)) for w in info["workers"].values()))
        except Exception:
            return 1
    return 1


@contextlib.contextmanager
def open_executor(spec: ExecutorSpec, tasks: int | None = None) -> Iterator[Executor]:
    """An executor for ``spec`` (see the module docstring); ``tasks`` caps a new pool's size."""
    if isinstance(spec, Executor):
        yield spec
        return
    if spec is not None and not isinstance(spec, str) and hasattr(spec, "get_executor"):
        yield spec.get_executor()  # a distributed.Client
        return
    if spec == "serial" or tasks == 1:
        yield SerialExecutor()
        return
    if spec is None or (isinstance(spec, str) and spec.startswith("processes")):
        n = _count(spec.partition(":")[2], "processes") if isinstance(spec, str) and ":" in spec else None
        workers = n or os.cpu_count() or 1
        if tasks is not None:
            workers = max(1, min(workers, tasks))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            yield pool
        return
    if not isinstance(spec, str):
        raise TypeError(f"executor must be None, 'serial', a spec string, an Executor or a dask Client, "
                        f"got {type(spec).__name__}")
    from distributed import Client, LocalCluster  # untyped: called through Any below

    client_cls: Any = Client
    cluster_cls: Any = LocalCluster
    if spec.startswith("local"):
        n = _count(spec.partition(":")[2], "local") if ":" in spec else (os.cpu_count() or 1)
        with (cluster_cls(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
              client_cls(cluster) as client):
            yield client.get_executor(pure=False)
        return
    if "://" in spec:
        with client_cls(spec) as client:
            yield client.get_executor(pure=False)
        return
    raise SettingsError(f"executor spec must be 'serial', 'processes[:N]', 'local:N' or a scheduler address "
                     f"like tcp://host:8786, got {spec!r}")


def _count(text: str, what: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise SettingsError(f"{what}:N takes a number of workers, got {text!r}") from None
    if n < 1:
        raise SettingsError(f"{what}:N needs at least 1 worker, got {n}")
    return n
