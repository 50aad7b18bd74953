"""Pod processes for the integration tests: the package's own helper (one implementation); and an ASGI app
served by uvicorn in a thread of the test's own process (a router, or a stand-in pod)."""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn

from capsim.studies.pods import PodProcess, free_port

__all__ = ["PodProcess", "Served", "free_port"]


class Served:
    """An ASGI app on uvicorn in a thread, on a free loopback port."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
