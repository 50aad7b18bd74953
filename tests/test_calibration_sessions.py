"""The static validation's calibration sends every request as a new session: the pod prefills a session's
stored history, so a session id used again would make a longer prompt than the calibration asks for."""

from __future__ import annotations

from collections import Counter
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from capsim.studies.validate_calibrate import calibration_order, drive_closed_loops
from podproc import Served


def test_every_run_of_every_round_sends_new_sessions_of_the_asked_prompt() -> None:
    seen: Counter[str] = Counter()
    bodies: list[dict[str, Any]] = []

    async def turn(request: Request) -> JSONResponse:
        seen[request.path_params["session"]] += 1
        bodies.append(await request.json())
        return JSONResponse({"text": "ok"})

    app = Starlette(routes=[Route("/v1/sessions/{session}/turns", turn, methods=["POST"])])
    order = calibration_order([2, 3], rounds=3, seed=1)  # each client count three times
    assert sorted(order) == [2, 2, 2, 3, 3, 3]
    with Served(app) as pod:
        drive_closed_loops(pod.url, order, seconds=5.0, answers=[4] * len(order), prompt_tokens=64,
                           output_tokens=8)
        drive_closed_loops(pod.url, order, seconds=5.0, answers=[4] * len(order), prompt_tokens=64,
                           output_tokens=8)  # a second calibration against the same pod
    # each run stops at its answers; clients already waiting finish theirs (fewer than one each more)
    assert 2 * 4 * len(order) <= sum(seen.values()) < 2 * sum(4 + n for n in order)
    again = [s for s, n in seen.items() if n > 1]
    assert not again, f"session ids sent more than once: {again[:5]}"
    assert all(b == {"prompt_tokens": 64, "max_new_tokens": 8} for b in bodies)
