"""The pod's turn route without a model: the one-pass body decoding, its 422 wording, the OpenAPI entry."""

from __future__ import annotations

import json

import pytest

from capsim.core.service import PodConfig, create_app
from capsim.core.service_pod import HTTPError
from capsim.core.service_turns import TurnRequest, json_response, parse_turn


def test_a_valid_body_decodes_with_its_defaults() -> None:
    assert parse_turn(b'{"prompt_tokens": 4}') == TurnRequest(prompt_tokens=4, max_new_tokens=16, stream=False)
    body = parse_turn(b'{"prompt_tokens": [1, 2, 3], "max_new_tokens": 2, "stream": true}')
    assert body.prompt_tokens == [1, 2, 3] and body.max_new_tokens == 2 and body.stream is True


@pytest.mark.parametrize(
    ("body", "lead", "named"),
    [
        ({"prompt_tokens": "16"}, "prompt_tokens: ", "prompt_tokens"),
        ({"prompt_tokens": 16.0}, "prompt_tokens: ", "prompt_tokens"),
        ({"prompt_tokens": [1, True]}, "prompt_tokens[1]: ", "prompt_tokens"),
        ({"prompt_tokens": 4, "max_new_tokens": 0}, "max_new_tokens: ", "max_new_tokens"),
        ({"prompt_tokens": 4, "stream": "yes"}, "stream: ", "stream"),
        ({"prompt_tokens": 4, "temperature": 1}, "body: ", "temperature"),
        ({"max_new_tokens": 3}, "body: ", "prompt_tokens"),
    ],
    ids=repr,
)
def test_a_bad_field_is_422_led_by_its_name(body: dict[str, object], lead: str, named: str) -> None:
    with pytest.raises(HTTPError) as err:
        parse_turn(json.dumps(body).encode())
    assert err.value.status == 422 and err.value.detail.startswith(lead), err.value.detail
    assert named in err.value.detail


@pytest.mark.parametrize("raw", [b"", b"{bad", b"[1, 2]"], ids=repr)
def test_a_body_that_is_not_a_json_object_is_422(raw: bytes) -> None:
    with pytest.raises(HTTPError) as err:
        parse_turn(raw)
    assert err.value.status == 422


def test_answers_are_json_bytes() -> None:
    r = json_response({"tokens": [1, 2], "t": 0.5}, 201, {"X-A": "b"})
    assert r.status_code == 201 and r.media_type == "application/json" and r.headers["x-a"] == "b"
    assert json.loads(r.body) == {"tokens": [1, 2], "t": 0.5}


def test_the_turn_route_is_in_the_openapi_document() -> None:
    app = create_app(PodConfig(device="cpu", warmup=False))
    doc = app.openapi()
    op = doc["paths"]["/v1/sessions/{session_id}/turns"]["post"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    assert "$ref" in schema or "properties" in schema
    names = json.dumps(doc)
    assert "prompt_tokens" in names and "max_new_tokens" in names
    assert {p["name"] for p in op["parameters"]} == {"session_id", "idempotency-key"}
    assert "/healthz" in doc["paths"]  # the FastAPI routes are still there
