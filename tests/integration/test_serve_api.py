"""The service in-process (FastAPI TestClient, tiny stories260K export): served embeddings equal the offline
`embed_notes` ones, a new note upserted is found first by its own text, deletes take effect, bad input is a
clear 4xx and the server keeps serving, concurrent requests are batched, /metrics speaks Prometheus."""
from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import json
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn

import notellm_jax  # noqa: F401
from notellm_jax.config import RetrievalConfig, load_config
from notellm_jax.data.prompts import Note
from notellm_jax.infer.embed import embed_notes
from notellm_jax.infer.encoder import note_encoder
from notellm_jax.infer import ann
from notellm_jax.infer.embeddings import read_embeddings
from notellm_jax.weights.export import save_notellm
from notellm_jax.serve.access import Access
from notellm_jax.serve.app import Service, create_app
from notellm_jax.serve.batching import row_buckets
from notellm_jax.serve.index import LiveIndex, index_from_embeddings
from notellm_jax.serve.index_files import CURRENT
from notellm_jax.sharding import make_mesh
from notellm_jax.weights.tokenizer import resolve_tokenizer
from notellm_jax.weights.loading import load_initial_params

pytest.importorskip("scann")
pytestmark = pytest.mark.slow  # an export, offline embeddings and the warm-up compiles: minutes on 2 cores
from fastapi.testclient import TestClient  # noqa: E402

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.py")
WORDS = "the coffee bean was ground fine and brewed slowly with hot water for a rich dark cup".split()


def tiny_config(work_dir: Path, *extra: str):
    return load_config(TINY, [f"paths.work_dir={work_dir}", "embed.batch_size=8", "embed.length_buckets=2",
                              "serve.max_batch_size=8", "serve.max_wait_ms=20", *extra], environ=os.environ)


def make_notes(n: int, prefix: str = "site") -> list[Note]:
    return [Note(note_id=f"{prefix}/{i}", title=f"Question {i} about {WORDS[i % len(WORDS)]}?",
                 content=" ".join(WORDS[(i % 5):(i % 5) + 4 + i % 7]), topics=["brewing"], category=f"cat{i % 3}")
            for i in range(n)]


def note_json(note: Note) -> dict:
    return {"title": note.title, "content": note.content, "topics": note.topics, "category": note.category}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An export of the real stories260K weights (the trainer's own initial params: no training run), offline
    embeddings of 12 notes, and an index over them."""
    work = tmp_path_factory.mktemp("serve")
    config = tiny_config(work)
    tokenizer = resolve_tokenizer(config)
    params, llama_cfg = load_initial_params(config, tokenizer.vocab_size)
    export = save_notellm(work / "export", params, llama_cfg, config)
    notes = make_notes(12)
    mesh = make_mesh(1, -1, 1)
    emb = embed_notes(config, export, notes, work / "emb", mesh=mesh)
    index = index_from_embeddings(emb, work / "index", config.retrieval, config.serve.max_k, notes)
    service = Service(note_encoder(config, export, mesh, batch_size=8, row_buckets=row_buckets(8)), index, config.serve)
    with TestClient(create_app(service)) as client:
        yield client, config, export, emb, notes, service


def test_served_embeddings_equal_offline_and_live_updates(setup):
    client, config, export, emb, notes, service = setup
    ids, offline = read_embeddings(emb)
    got = client.post("/embed", json={"notes": [note_json(n) for n in notes[:5]]})
    assert got.status_code == 200, got.text
    body = got.json()
    np.testing.assert_allclose(np.array(body["embeddings"]), offline[:5], atol=2e-5)
    tok = service.encoder.tokenizer
    over = [len(tok.encode(n.title, split_special_tokens=True)) > config.prompt.title_max_tokens
            or len(tok.encode(n.content, split_special_tokens=True)) > config.prompt.content_max_tokens
            for n in notes[:5]]
    assert body["dim"] == 32 and body["truncated"] == over and any(over) and not all(over)

    fresh = Note("new/1", "Why does my espresso taste sour and thin?", "under extracted shots pulled too fast",
                 ["espresso"], "coffee")
    put = client.put("/notes/new-1", json=note_json(fresh))
    assert put.status_code == 200 and put.json()["created"] and put.json()["index_size"] == 13
    similar = client.post("/similar", json={"note": note_json(fresh), "k": 3}).json()
    assert similar["results"][0]["id"] == "new-1" and similar["results"][0]["score"] == pytest.approx(1, abs=1e-5)
    assert similar["results"][0]["title"] == fresh.title and similar["results"][0]["category"] == "coffee"
    by_id = client.post("/similar", json={"note_id": "new-1", "k": 12}).json()["results"]
    assert "new-1" not in [r["id"] for r in by_id] and len(by_id) == 12  # the query itself is excluded
    scores = np.array([r["score"] for r in by_id])
    assert np.all(np.diff(scores) <= 1e-6)
    expected = offline @ np.array(client.post("/embed", json={"notes": [note_json(fresh)]}).json()["embeddings"][0])
    np.testing.assert_allclose(sorted(scores, reverse=True), np.sort(expected)[::-1], atol=1e-5)

    assert client.delete("/notes/new-1").json() == {"id": "new-1", "deleted": True, "index_size": 12}
    after = client.post("/similar", json={"note": note_json(fresh), "k": 12}).json()["results"]
    assert "new-1" not in [r["id"] for r in after]
    assert client.delete("/notes/new-1").status_code == 404


@pytest.mark.parametrize("method, path, body, status, message", [
    ("post", "/embed", b"{not json", 422, "JSON decode error"),
    ("post", "/embed", {"notes": []}, 422, "at least 1 item"),
    ("post", "/embed", {"notes": [{"title": 3, "content": "x"}]}, 422, "valid string"),
    ("post", "/embed", {"notes": [{"title": "  ", "content": ""}]}, 422, "the note is empty"),
    ("post", "/embed", {"notes": [{"title": "a", "colour": "red"}]}, 422, "Extra inputs are not permitted"),
    ("post", "/embed", {"cards": []}, 422, "Field required"),
    ("post", "/similar", {"note_id": "site/1", "k": 0}, 422, "greater than or equal to 1"),
    ("post", "/similar", {"note_id": "site/1", "k": 12}, 422, "exceeds the 11 notes"),
    ("post", "/similar", {"note_id": "site/1", "k": 101}, 422, "exceeds serve.max_k=100"),
    ("post", "/similar", {"note_id": "nope", "k": 2}, 404, "unknown note id 'nope'"),
    ("post", "/similar", {"k": 2}, 422, "exactly one of note_id"),
    ("post", "/similar", {"note_id": "site/1", "note": {"title": "x"}}, 422, "exactly one of note_id"),
    ("post", "/similar", {"note_id": "site/1", "k": "many"}, 422, "valid integer"),
    ("delete", "/notes/unknown", None, 404, "unknown note id"),
    ("put", "/notes/x", {"content": 5}, 422, "valid string"),
    ("post", "/generate", {"note": {"title": "a question"}}, 404, "no generation model is loaded"),
    ("post", "/index/rebuild", {"min_recall": 1.5}, 422, "less than or equal to 1"),
    ("post", "/index/rebuild", {"k": 13}, 422, "exceeds the 12 notes"),
    ("post", "/index/rebuild", {"sample": 0}, 422, "greater than or equal to 1"),
    ("post", "/index/rebuild", {"recall": 0.9}, 422, "Extra inputs are not permitted"),
])
def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(setup, method, path, body, status, message):
    client = setup[0]
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body} if body is not None else {}
    response = client.request(method.upper(), path, **kwargs)
    assert response.status_code == status, response.text
    assert message in response.text
    assert client.get("/healthz").json()["status"] == "ok"


def test_long_text_is_cut_as_in_training_and_said_so(setup):
    client, config, export, *_ = setup
    long = {"title": "espresso " * 200, "content": "crema and bitterness " * 900, "topics": [], "category": "c"}
    body = client.post("/embed", json={"notes": [long]}).json()
    assert body["truncated"] == [True]
    encoder = setup[5].encoder
    tokens, cut = encoder.encode(Note("x", long["title"], long["content"], [], "c"), report_cuts=True)
    assert cut and len(tokens) <= encoder.prompt.max_length
    assert client.put("/notes/long", json=long).json()["truncated"] is True
    client.delete("/notes/long")


def test_concurrent_requests_are_batched_and_metrics_exported(setup):
    client, *_, notes, service = setup
    assert client.get("/readyz").json() == {"ready": True, "index_size": len(service.index)}
    before = service.metrics.batch_size.collect()[0]
    count_before = next(s.value for s in before.samples if s.name.endswith("_count"))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda n: client.post("/similar", json={"note": note_json(n), "k": 2}), notes[:8]))
    assert all(r.status_code == 200 for r in results)
    after = service.metrics.batch_size.collect()[0]
    calls = next(s.value for s in after.samples if s.name.endswith("_count")) - count_before
    assert 1 <= calls < 8  # 8 concurrent notes took fewer jitted calls than notes
    text = client.get("/metrics").text
    assert 'notellm_requests_total{endpoint="/similar",method="POST",status="200"}' in text
    assert "notellm_request_latency_seconds_bucket" in text and "notellm_index_size 12.0" in text
    for name in ("te_batch_next_size_bucket", "te_batch_next_tokens_bucket", "te_embed_queue_duration_bucket",
                 "te_embed_inference_duration_bucket", "te_embed_tokenization_duration_bucket", "notellm_batch_fill_bucket",
                 "te_queue_size", "notellm_requests_in_flight"):
        assert name in text, name


def numpy_recall(index: LiveIndex, vectors: np.ndarray, sample: int) -> float:
    """Recall@10 of the index's ScaNN searcher against numpy's exact top 10, the rebuild's sample as queries and
    its candidate budget (top 10, reordering max(10, scann_reorder)): the public `search` fetches one more
    neighbour (for the excluded query note), which reorders one more candidate and, on a poor tree, moves recall
    by about as much as the tolerance (0.488 against 0.508 in one run). Positions are v-numbers (no deletes)."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = np.random.default_rng(0).choice(len(unit), sample, replace=False)
    exact = np.argsort(-(unit[rows] @ unit.T), axis=1)[:, :10]
    pre = -1 if index.params.brute_force else max(10, index.params.reorder)
    found, scores = index._raw.search_batched(unit[rows].astype(np.float32), 10, pre, -1, False, 0)
    found = np.where(np.isfinite(scores), found, -1)
    return float(np.mean([len(set(e) & set(f)) / 10 for e, f in zip(exact, found)]))


def test_rebuild_endpoint_reports_recall_and_promotes_only_when_it_holds(setup, tmp_path):
    """A live tree searching 1 of 40 leaves with a tiny reorder, grown by 500 upserts, misses many exact
    neighbours: its rebuild is refused at serve.rebuild_min_recall (the old index and snapshot stay) and
    promoted when the bar is 0; the reported recalls are the live and the promoted index's."""
    service = setup[5]
    vectors = ann.clustered_vectors(1500, 32, 30, seed=5)
    poor = RetrievalConfig(scann_num_leaves=40, scann_leaves_to_search=1, scann_reorder=10)
    index = LiveIndex.create(tmp_path / "idx", [f"v{i}" for i in range(1000)], vectors[:1000], {}, poor, k=10)
    for i in range(1000, 1500):
        index.upsert(f"v{i}", vectors[i])
    live_recall = numpy_recall(index, vectors, 300)
    live = Service(service.encoder, index, service.cfg)
    with TestClient(create_app(live)) as client:
        before = (tmp_path / "idx" / CURRENT).read_text()
        refused = client.post("/index/rebuild", json={"k": 10, "sample": 300})
        assert refused.status_code == 200, refused.text
        refused = refused.json()
        assert refused["promoted"] is False and refused["min_recall"] == service.cfg.rebuild_min_recall
        assert 0 < refused["recall"] < service.cfg.rebuild_min_recall and "snapshot" not in refused
        assert refused["live_recall"] == pytest.approx(live_recall, abs=0.02)
        assert (tmp_path / "idx" / CURRENT).read_text() == before
        promoted = client.post("/index/rebuild", json={"k": 10, "sample": 300, "min_recall": 0.0}).json()
        assert promoted["promoted"] is True and promoted["size"] == 1500
        assert (tmp_path / "idx" / CURRENT).read_text() == promoted["snapshot"] != before
        assert numpy_recall(index, vectors, 300) == pytest.approx(promoted["recall"], abs=0.02)
    index.close()


def test_a_torn_log_tail_repaired_on_open_is_reported_by_healthz_and_metrics(setup, tmp_path):
    """The one automatic repair is never quiet: the service that opened a torn log says so."""
    service = setup[5]
    vectors = ann.clustered_vectors(20, 32, 4, seed=1)
    index = LiveIndex.create(tmp_path / "idx", [f"v{i}" for i in range(20)], vectors, {}, RetrievalConfig(), k=5)
    index.upsert("kept", vectors[0])
    index.close()
    log = tmp_path / "idx" / "snap-000001.log"
    size = log.stat().st_size
    with open(log, "ab") as f:
        f.write(b'0123abcd {"op":"delete","id":"v3"')  # a write cut by a crash
    reopened = LiveIndex.open(tmp_path / "idx", RetrievalConfig())
    with TestClient(create_app(Service(service.encoder, reopened, service.cfg))) as client:
        health = client.get("/healthz").json()
        assert [(r["file"], r["offset"], r["bytes"]) for r in health["index_repairs"]] == [(str(log), size, 33)]
        assert "delete of note 'v3'" in health["index_repairs"][0]["dropped"] and health["index_size"] == 21
        text = client.get("/metrics").text
        assert "notellm_index_log_repairs 1.0" in text and "notellm_index_skipped_deletes 0.0" in text
    reopened.close()


# --------------------------------------------------------------------------------------------------
# Behind a gateway: OpenAI-compatible embeddings, keys, hosts, /docs, errors that never echo, slash ids

READ_KEY, ADMIN_KEY = "read-key-" + "0" * 16, "admin-key-" + "1" * 16
TEXTS = ["How fine should I grind for espresso?", "cold brew", "Is a burr grinder worth it for a French press "
         "or does a blade grinder do the same job for coarse coffee?"]


@pytest.fixture(scope="module")
def gateway(setup, tmp_path_factory):
    """One real uvicorn server on 127.0.0.1 (a thread of this process, the module's encoder and index) with a
    read and an admin key and the default allowed hosts."""
    service = setup[5]
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text(f"read {READ_KEY}\nadmin {ADMIN_KEY}\n")
    access = Access.from_options(str(keys), None, "127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(Service(service.encoder, service.index, service.cfg), access)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 300
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the uvicorn server did not start"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(60)


def test_openai_client_round_trip_equals_embed(setup, gateway):
    openai = pytest.importorskip("openai")
    client = setup[0]
    api = openai.OpenAI(base_url=f"{gateway}/v1", api_key=READ_KEY, max_retries=0)
    model = api.models.list().data[0].id
    expected = np.array(client.post("/embed", json={"notes": [{"content": t} for t in TEXTS]}).json()["embeddings"])
    as_strings = np.array(client.post("/embed", json={"notes": TEXTS}).json()["embeddings"])
    np.testing.assert_array_equal(as_strings, expected)  # one rule: a string is the note's content
    default = api.embeddings.create(input=TEXTS, model=model)  # the SDK asks for base64 by default
    floats = api.embeddings.create(input=TEXTS, model=model, encoding_format="float", dimensions=32, user="u")
    for answer in (default, floats):
        assert [d.index for d in answer.data] == [0, 1, 2] and answer.model == model
        np.testing.assert_allclose(np.array([d.embedding for d in answer.data]), expected, atol=1e-6)
        assert answer.usage.prompt_tokens == answer.usage.total_tokens > 3 * len(setup[5].encoder.prefix)
    raw = httpx.post(f"{gateway}/v1/embeddings", json={"input": TEXTS[1], "model": model, "encoding_format": "base64"},
                     headers={"Authorization": f"Bearer {READ_KEY}"}).json()
    assert np.allclose(np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4"), expected[1], atol=1e-6)
    with pytest.raises(openai.UnprocessableEntityError, match="embeds in 32 dimensions only"):
        api.embeddings.create(input="x", model=model, dimensions=8)
    with pytest.raises(openai.UnprocessableEntityError, match="token-id input is not accepted"):
        api.embeddings.create(input=[[1, 2, 3]], model=model)
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        api.embeddings.create(input="x", model="text-embedding-3-small")
    with pytest.raises(openai.AuthenticationError, match="unknown API key"):
        openai.OpenAI(base_url=f"{gateway}/v1", api_key="x" * 20, max_retries=0).models.list()


def test_keys_hosts_and_slash_ids_over_http(gateway, monkeypatch):
    from notellm_jax.serve import access as access_mod  # noqa: PLC0415
    read, admin = ({"Authorization": f"Bearer {k}"} for k in (READ_KEY, ADMIN_KEY))
    note = {"title": "Descaling a kettle", "content": "citric acid and water, boil, rinse", "category": "coffee"}
    with httpx.Client(base_url=gateway, timeout=60) as http:
        assert http.get("/healthz").status_code == 200  # open without a key
        missing = http.post("/embed", json={"notes": ["x"]})
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert "API key" in missing.json()["detail"]
        assert http.get("/notes/site/1", headers={"Authorization": "Bearer " + "9" * 20}).status_code == 401
        calls = []
        real = access_mod.hmac.compare_digest
        monkeypatch.setattr(access_mod.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
        assert http.get("/notes/site/1", headers=read).json()["title"].startswith("Question 1")
        assert len(calls) == 2  # both stored keys compared in constant time
        for method, path, body in [("PUT", "/notes/coffee.stackexchange.com/485", note),
                                   ("DELETE", "/notes/site/1", None), ("POST", "/index/rebuild", {})]:
            refused = http.request(method, path, json=body, headers=read)
            assert refused.status_code == 403 and "admin key" in refused.json()["detail"]
        attacker = http.put("/notes/evil", json=note, headers={**admin, "Host": "attacker.example"})
        assert attacker.status_code == 421 and "attacker.example" in attacker.json()["detail"]
        assert http.get("/healthz", headers={"Host": "attacker.example"}).status_code == 421
        assert http.get("/healthz", headers={"Host": "localhost:1"}).status_code == 200
        put = http.put("/notes/coffee.stackexchange.com/485", json=note, headers=admin).json()
        assert put["created"] and put["id"] == "coffee.stackexchange.com/485"
        again = http.put("/notes/coffee.stackexchange.com%2F485", json={**note, "title": "Descaling"}, headers=admin)
        assert again.json()["created"] is False
        assert http.get("/notes/coffee.stackexchange.com%2F485", headers=read).json()["title"] == "Descaling"
        assert http.delete("/notes/coffee.stackexchange.com/485", headers=admin).json()["deleted"] is True
        assert http.get("/notes/coffee.stackexchange.com/485", headers=read).status_code == 404
        assert http.get("/docs", headers=read).status_code == 404  # Swagger off without --docs


def test_docs_only_with_the_flag(setup):
    service = setup[5]
    closed, opened = (TestClient(create_app(service, docs=docs)) for docs in (False, True))  # no lifespan: no model
    assert [closed.get(p).status_code for p in ("/docs", "/openapi.json")] == [404, 404]
    assert [opened.get(p).status_code for p in ("/docs", "/openapi.json")] == [200, 200]
    assert "/v1/embeddings" in opened.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("path, body, field", [
    ("/embed", '{"notes": [{"title": "\\ud800"}]}', "body.notes.0.title"),
    ("/embed", '{"notes": [{"title": "a", "topics": ["ok", "\\udfff"]}]}', "body.notes.0.topics.1"),
    ("/embed", '{"notes": ["lone \\ud83d"]}', "body.notes.0.content"),
    ("/similar", '{"note_id": "\\ud800", "k": 2}', "body.note_id"),
    ("/similar", '{"note": {"content": "x", "category": "\\ud800"}}', "body.note.category"),
    ("/similar", '{"note_id": "site/1", "k": NaN}', "body.k"),
    ("/similar", '{"note_id": "site/1", "k": Infinity}', "body.k"),
    ("/index/rebuild", '{"min_recall": NaN}', "body.min_recall"),
    ("/index/rebuild", '{"min_recall": -Infinity}', "body.min_recall"),
    ("/generate", '{"note": {"content": "\\ud800"}}', "body.note.content"),
    ("/v1/embeddings", '{"input": ["ok", "\\ud800"], "model": "m"}', "body.input"),
    ("/v1/embeddings", '{"input": "x", "model": "m", "dimensions": NaN}', "body.dimensions"),
    ("/embed", '{"notes": [{"title": "a", "\\ud800": 1}]}', "body.notes.0"),  # a key no model field can have
])
def test_unencodable_or_non_finite_input_is_a_422_naming_the_field(setup, path, body, field):
    response = setup[0].post(path, content=body.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    answer = response.json()
    assert answer["message"].startswith(field) or f"; {field}" in answer["message"], answer
    assert all("input" not in error for error in answer["detail"])


def test_slash_ids_in_process_and_put_of_a_plain_string_note(setup):
    client = setup[0]
    assert client.get("/notes/site/3").json() == {"id": "site/3", "title": "Question 3 about was?",
                                                  "category": "cat0"}
    assert client.get("/notes/site%2F3").json()["id"] == "site/3"
    assert client.put("/notes/a/b/c", json={"content": "grinder burrs"}).json()["created"]
    assert client.delete("/notes/a%2Fb%2Fc").json()["deleted"] and client.get("/notes/a/b/c").status_code == 404


class HeldEncoder:
    """The module's real encoder, except that each `encode` call first signals `entered` and waits for `release`:
    the tests order events by these, never by timing."""

    def __init__(self, encoder):
        self._encoder, self.entered, self.release = encoder, threading.Semaphore(0), threading.Event()

    def __getattr__(self, name):
        return getattr(self._encoder, name)

    def encode(self, note, report_cuts=False):
        self.entered.release()
        assert self.release.wait(120), "the test never released the encoder"
        return self._encoder.encode(note, report_cuts=report_cuts)


def test_a_burst_beyond_the_limit_gets_429s_and_every_200_is_right(setup):
    _, config, _, emb, notes, service = setup
    held = HeldEncoder(service.encoder)
    live = Service(held, service.index, dataclasses.replace(config.serve, max_concurrent_requests=3, retry_after_s=2))
    _, offline = read_embeddings(emb)
    with TestClient(create_app(live)) as client, concurrent.futures.ThreadPoolExecutor(3) as pool:
        admitted = [pool.submit(client.post, "/embed", json={"notes": [note_json(notes[i])]}) for i in range(3)]
        for _ in range(6000):  # bounded: all three are admitted (one tokenising, two queued for the tokeniser)
            if live.gate.in_flight == 3:
                break
            time.sleep(0.01)
        assert live.gate.in_flight == 3 and held.entered.acquire(timeout=60)
        refused = [client.post("/embed", json={"notes": [note_json(notes[5])]}) for _ in range(4)]
        assert [r.status_code for r in refused] == [429] * 4
        assert all(r.headers["retry-after"] == "2" and "max_concurrent_requests=3" in r.json()["detail"]
                   for r in refused)
        held.release.set()
        answers = [f.result(timeout=120) for f in admitted]
        assert [a.status_code for a in answers] == [200] * 3
        for i, answer in enumerate(answers):  # nothing lost or swapped: each is its own note's offline vector
            np.testing.assert_allclose(answer.json()["embeddings"][0], offline[i], atol=2e-5)
        assert client.post("/embed", json={"notes": [note_json(notes[5])]}).status_code == 200  # admitted again
        assert 'status="429"' in client.get("/metrics").text


def test_healthz_answers_while_a_maximum_size_request_is_tokenised(setup):
    _, config, _, _, _, service = setup
    cfg = config.serve
    held = HeldEncoder(service.encoder)
    live = Service(held, service.index, cfg)
    biggest = {"title": "t" * cfg.max_title_chars, "content": "brew " * (cfg.max_content_chars // 5),
               "category": "c" * cfg.max_category_chars, "topics": ["brewing", "espresso"]}
    body = {"notes": [biggest] * cfg.max_notes_per_request}  # topics short: all of them go into the prompt
    assert len(json.dumps(body)) <= cfg.max_body_bytes  # the largest request the limits let through
    with TestClient(create_app(live)) as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
        big = pool.submit(client.post, "/embed", json=body)
        while not held.entered.acquire(timeout=0.1):  # until the big request is on the tokeniser thread
            assert not big.done(), big.result().text
        health = client.get("/healthz")
        assert health.status_code == 200 and health.json()["ready"] and not big.done()
        assert client.get("/readyz").status_code == 200 and not big.done()
        held.release.set()
        answer = big.result(timeout=300)
        assert answer.status_code == 200 and all(answer.json()["truncated"])


@pytest.mark.parametrize("path, body, field", [
    ("/embed", {"notes": [{"title": "a"}, {"title": "t" * 2001}]}, "body.notes.1.title"),
    ("/similar", {"note": {"content": "c" * 20_001}, "k": 2}, "body.note.content"),
    ("/generate", {"note": {"content": "c", "topics": ["t"] * 17}}, "body.note.topics"),
    ("/v1/embeddings", {"input": ["ok", "c" * 20_001], "model": "m"}, "body.input.1"),
])
def test_field_caps_and_the_body_cap(setup, path, body, field):
    client = setup[0]
    if path == "/v1/embeddings":
        body["model"] = client.get("/v1/models").json()["data"][0]["id"]
    response = client.post(path, json=body)
    assert response.status_code == 422 and response.json()["message"].startswith(field), response.text
    huge = client.post(path, content=b"{" + b" " * 10_000_000 + b"}", headers={"content-type": "application/json"})
    assert huge.status_code == 413 and "serve.max_body_bytes=2097152" in huge.json()["detail"]
