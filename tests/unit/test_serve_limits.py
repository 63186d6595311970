"""The service's limits and start-up without a model (serve/limits.py, serve/startup.py, serve/batching.py's
plan): the cheapest cut of a gathered batch against every possible cut, 413 before the body is read, field caps
as 422s naming the field, 429 with Retry-After past the admission limit, 503 past the deadline, liveness and
readiness while loading, a port in use refused at once."""
from __future__ import annotations

import asyncio
import itertools
import socket
import threading

import pytest
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient

from notellm_jax.config import ServeConfig
from notellm_jax.errors import ConfigError
from notellm_jax.serve.app import validation_error
from notellm_jax.serve.batching import plan_calls, row_buckets
from notellm_jax.serve.limits import BodyLimit, Gate, check_notes
from notellm_jax.serve.schemas import NoteIn
from notellm_jax.serve.startup import Starting, bind


def brute_force_cost(buckets, counts, rows_of) -> int:
    """The cheapest cost over every way to cut the groups into consecutive runs (2^(n-1) cuts)."""
    best = None
    for cuts in itertools.product((False, True), repeat=len(buckets) - 1):
        bounds = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [len(buckets)]
        cost = sum(rows_of(sum(counts[a:b])) * buckets[b - 1] for a, b in zip(bounds, bounds[1:]))
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(30))
def test_plan_calls_is_the_cheapest_cut(seed):
    import random  # a stdlib sampler of cases: the plan must equal the exhaustive minimum on each
    rng = random.Random(seed)
    buckets = sorted(rng.sample([16, 32, 48, 64, 96, 128, 160], rng.randint(1, 5)))
    counts = [rng.randint(1, 4) for _ in buckets]
    rows = row_buckets(32)
    rows_of = lambda n: next(r for r in rows if r >= n)  # noqa: E731
    runs = plan_calls(buckets, counts, rows_of)
    assert [g for run in runs for g in run] == list(range(len(buckets)))  # every group once, in order
    cost = sum(rows_of(sum(counts[g] for g in run)) * buckets[run[-1]] for run in runs)
    assert cost == brute_force_cost(buckets, counts, rows_of)


def test_plan_calls_merges_when_cheaper_and_splits_when_not():
    rows_of = lambda n: next(r for r in row_buckets(8) if r >= n)  # noqa: E731  (rows 1, 2, 4, 8)
    # 3 short notes pad to 4 rows anyway: the long one rides along (4 x 40 = 160 < 4 x 32 + 1 x 40 = 168)
    assert plan_calls([32, 40], [3, 1], rows_of) == [range(0, 2)]
    # a lone long note would pad three short ones to its length (4 x 64 = 256 > 4 x 32 + 1 x 64 = 192)
    assert plan_calls([32, 64], [3, 1], rows_of) == [range(0, 1), range(1, 2)]
    # two short and two medium: one call (4 x 40 = 160) costs more than two (2 x 32 + 2 x 40 = 144)
    assert plan_calls([32, 40], [2, 2], rows_of) == [range(0, 1), range(1, 2)]
    # the medium and long ones together (4 x 128 = 512), the short one alone (16): 528 < 8 x 128, 16 + 4 x 120 + 128
    assert plan_calls([16, 120, 128], [1, 3, 1], rows_of) == [range(0, 1), range(1, 3)]


def limited_app(max_bytes: int) -> FastAPI:
    app = FastAPI()
    app.add_middleware(BodyLimit, max_bytes=max_bytes)
    read = []

    @app.post("/echo")
    async def echo(request: Request):
        body = await request.body()
        read.append(len(body))
        return {"bytes": len(body)}
    app.state.read = read
    return app


def test_a_body_over_the_cap_is_a_413_before_it_is_read():
    app = limited_app(1000)
    client = TestClient(app)
    assert client.post("/echo", content=b"x" * 1000).json() == {"bytes": 1000}
    response = client.post("/echo", content=b"x" * 10_000_000)
    assert response.status_code == 413 and "serve.max_body_bytes=1000" in response.json()["detail"]
    chunked = client.post("/echo", content=iter([b"x" * 600, b"x" * 600]))  # no Content-Length: counted as read
    assert chunked.status_code == 413
    assert app.state.read == [1000]  # neither over-size body reached the route


@pytest.mark.parametrize("note, loc, field", [
    ({"title": "t" * 21}, ("body", "notes", 0), "body.notes.0.title"),
    ({"content": "c" * 31}, ("body", "note"), "body.note.content"),
    ({"content": "c", "category": "k" * 11}, ("body",), "body.category"),
    ({"content": "c", "topics": ["a"] * 4}, ("body", "notes", 2), "body.notes.2.topics"),
    ({"content": "c", "topics": ["a", "b" * 6]}, ("body", "note"), "body.note.topics.1"),
])
def test_field_caps_are_a_422_naming_the_field(note, loc, field):
    cfg = ServeConfig(max_title_chars=20, max_content_chars=30, max_category_chars=10, max_topics=3,
                      max_topic_chars=5)
    check_notes([NoteIn(title="t" * 20, content="c" * 30, category="k" * 10, topics=["abcde"] * 3)], cfg,
                [loc])  # at every cap: accepted
    with pytest.raises(RequestValidationError) as caught:
        check_notes([NoteIn(**note)], cfg, [loc])
    response = asyncio.run(validation_error(Request({"type": "http", "path": "/embed", "headers": []}),
                                            caught.value))
    assert response.status_code == 422
    assert response.body.decode().count(field) >= 1 and '"message":"' + field in response.body.decode()


def test_plain_string_content_is_named_by_its_own_place():
    cfg = ServeConfig(max_content_chars=3)
    with pytest.raises(RequestValidationError) as caught:
        check_notes([NoteIn(content="ok"), NoteIn(content="long")], cfg, [("body", "input", 0), ("body", "input", 1)],
                    content_locs=[("body", "input", 0), ("body", "input", 1)])
    assert [e["loc"] for e in caught.value.errors()] == [("body", "input", 1)]


def test_gate_answers_429_past_the_limit_and_503_past_the_deadline():
    async def scenario():
        gate = Gate(ServeConfig(max_concurrent_requests=2, request_timeout_s=0.05, retry_after_s=7))
        release = asyncio.Event()

        async def held():
            await release.wait()
            return "done"
        running = [asyncio.create_task(gate.run(held)) for _ in range(2)]
        await asyncio.sleep(0)  # both admitted
        assert gate.in_flight == 2
        with pytest.raises(HTTPException) as refused:
            await gate.run(held)
        assert refused.value.status_code == 429 and refused.value.headers == {"Retry-After": "7"}
        with pytest.raises(HTTPException) as late:  # the two held ones run past the deadline
            await asyncio.gather(*running)
        assert late.value.status_code == 503 and gate.in_flight == 0
        release.set()
        assert await gate.run(held) == "done"
    asyncio.run(scenario())


def test_liveness_during_loading_then_the_loaded_app():
    loaded, go_on = threading.Event(), threading.Event()
    app = FastAPI()

    @app.get("/readyz")
    async def readyz():
        return {"ready": True}

    def load(report):
        report("loading the export")
        loaded.set()
        assert go_on.wait(30)
        return app

    starting = Starting(load)
    with TestClient(starting) as client:
        assert loaded.wait(30)
        assert client.get("/healthz").json() == {"status": "ok", "ready": False, "stage": "loading the export"}
        waiting = client.get("/readyz")
        assert waiting.status_code == 503 and "loading the export" in waiting.json()["detail"]
        assert client.post("/embed", json={}).status_code == 503
        go_on.set()
        for _ in range(3000):  # bounded: the hand-over happens on the server's loop
            if starting.app is not None:
                break
            threading.Event().wait(0.01)
        assert client.get("/readyz").json() == {"ready": True}


def test_a_failed_load_stops_the_server_with_its_error():
    stopped = threading.Event()

    def load(report):
        raise ConfigError("no export here")

    starting = Starting(load, on_failure=stopped.set)
    with TestClient(starting):
        assert stopped.wait(30)
    assert isinstance(starting.failure, ConfigError)


def test_a_port_in_use_is_refused_at_once():
    taken = bind("127.0.0.1", 0)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(ConfigError, match=f"cannot bind 127.0.0.1:{port}"):
            bind("127.0.0.1", port)
    finally:
        taken.close()
    with socket.socket() as probe:  # released: the port can be bound again
        probe.bind(("127.0.0.1", port))


@pytest.mark.parametrize("field, value", [("max_body_bytes", 0), ("max_topics", 0), ("max_concurrent_requests", 0),
                                          ("request_timeout_s", 0.0), ("retry_after_s", -1)])
def test_bad_limits_are_a_config_error_naming_the_setting(field, value):
    from notellm_jax.config import Config  # the whole config: its validate() holds the serve rules
    Config().validate(1)
    with pytest.raises(ConfigError, match=f"serve.{field}"):
        Config(serve=ServeConfig(**{field: value})).validate(1)
