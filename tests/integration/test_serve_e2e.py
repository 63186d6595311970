"""The service as a real process on loopback (tiny stories260K export, with --generate): embed, upsert a new
note, find it first by its own text, delete it; the served embedding equals the offline `embed` and the
generated category/hashtags equal the offline `generate` tool's; the page in headless Chromium; then kill -9 in
the middle of a stream of upserts: after a restart every acknowledged upsert is there, complete, and nothing
else is."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import json

import httpx
import numpy as np
import pytest

from notellm_jax.data import store
from notellm_jax.infer.embed import embed_notes
from notellm_jax.infer.embeddings import read_embeddings
from notellm_jax.eval.generation import generate_and_score
from notellm_jax.weights.export import save_notellm
from notellm_jax.sharding import make_mesh
from notellm_jax.weights.tokenizer import resolve_tokenizer
from notellm_jax.weights.loading import load_initial_params

from test_serve_api import TINY, make_notes, note_json, tiny_config  # noqa: E402  (same folder, on sys.path)

pytest.importorskip("scann")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ADMIN_KEY, READ_KEY = "admin-" + "e2e" * 6, "read-" + "e2e" * 6
AUTH = {"authorization": f"Bearer {ADMIN_KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m notellm_jax.serve` in a subprocess on 127.0.0.1, one fake-free CPU device."""

    def __init__(self, work: Path, export: Path, emb: Path):
        self.work, self.export, self.emb = work, export, emb
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 900) -> None:
        self.port = free_port()
        env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "notellm_jax.serve", "--config", TINY, "--set", f"paths.work_dir={self.work}",
               "--set", "serve.max_batch_size=4", "--set", "embed.length_buckets=2", "--export", str(self.export),
               "--index", str(self.work / "index"), "--embeddings", str(self.emb), "--port", str(self.port),
               "--generate", "--constrain-categories", "--api-key-file", str(self.work / "keys"),
               "--set", f"serve.compilation_cache_dir={self.work / 'jax_cache'}"]
        (self.work / "keys").write_text(f"admin {ADMIN_KEY}\nread {READ_KEY}\n")
        self.log = open(self.work / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60, headers=AUTH)
        self.loading_seen = False  # /healthz answered while /readyz said loading
        deadline = time.time() + timeout
        while time.time() < deadline:  # bounded: the server is up, or it died, or the deadline passed
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {(self.work / 'server.log').read_text()}")
            try:
                if self.client.get("/readyz").status_code == 200:  # /healthz answers from the bind on
                    return
                health = self.client.get("/healthz")
                self.loading_seen |= health.status_code == 200 and health.json()["ready"] is False
                time.sleep(0.2)
            except httpx.TransportError:
                time.sleep(0.5)
        self.kill9()  # never leave a server behind
        raise TimeoutError(f"server not ready after {timeout} s: {(self.work / 'server.log').read_text()}")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill9()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("serve_e2e")
    config = tiny_config(work)
    tokenizer = resolve_tokenizer(config)
    params, llama_cfg = load_initial_params(config, tokenizer.vocab_size)
    export = save_notellm(work / "export", params, llama_cfg, config)
    notes = make_notes(12)
    # The titles and categories the server shows come from the prepared notes file, as in a real run.
    store.write_notes([{**note_json(n), "note_id": n.note_id, "created_at": 0, "exposure": 0} for n in notes],
                      config.data_dir / "notes.parquet")
    # The closed category set of constrained generation: the training notes' categories (as `generate`).
    (config.data_dir / "split.json").write_text(json.dumps({"train_notes": [n.note_id for n in notes[:8]],
                                                            "test_notes": [n.note_id for n in notes[8:]]}))
    emb = embed_notes(config, export, notes, work / "emb", mesh=make_mesh(1, -1, 1))
    srv = Server(work, export, emb)
    srv.start()
    srv.config = config
    yield srv, notes
    srv.stop()


def test_embed_upsert_find_delete_on_loopback(server):
    srv, notes = server
    client = srv.client
    _, offline = read_embeddings(srv.emb)
    served = client.post("/embed", json={"notes": [note_json(n) for n in notes[:3]]}).json()["embeddings"]
    np.testing.assert_allclose(np.array(served), offline[:3], atol=2e-5)  # 1 device served vs 8 offline

    fresh = {"title": "Grinding beans for a French press", "content": "coarse grind, four minutes steep",
             "topics": ["press"], "category": "coffee"}
    assert client.put("/notes/fresh-1", json=fresh).json()["acknowledged"] is True
    top = client.post("/similar", json={"note": fresh, "k": 5}).json()["results"]
    assert top[0]["id"] == "fresh-1" and top[0]["title"] == fresh["title"] and top[0]["score"] > 0.9999
    assert client.delete("/notes/fresh-1").status_code == 200
    gone = client.post("/similar", json={"note": fresh, "k": 12}).json()["results"]
    assert "fresh-1" not in [r["id"] for r in gone]
    assert client.post("/similar", json={"note_id": "fresh-1", "k": 1}).status_code == 404
    assert client.get("/healthz").json()["index_size"] == 12


def test_bound_before_loading_and_a_port_in_use_fails_at_once(server):
    srv, _ = server
    assert srv.loading_seen  # /healthz answered 200 ("ready": false) while /readyz said 503 during the load
    assert httpx.get(f"http://127.0.0.1:{srv.port}/embed").status_code == 401  # keys: no key, no answer
    taken = subprocess.run([sys.executable, "-m", "notellm_jax.serve", "--config", TINY, "--set",
                            f"paths.work_dir={srv.work}", "--export", str(srv.export), "--index",
                            str(srv.work / "index"), "--port", str(srv.port)], cwd=REPO, capture_output=True,
                           text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert taken.returncode != 0 and f"cannot bind 127.0.0.1:{srv.port}" in taken.stderr
    assert "loading the export" not in taken.stdout  # refused before anything was loaded
    assert list((srv.work / "jax_cache").iterdir())  # the compiled shapes went to the persistent cache


def test_generation_equals_the_offline_generate_tool(server):
    """Same export, notes and generation settings (constrained categories, greedy, max_new_tokens) as
    `notellm generate --constrain-categories --split test`; the server pads and batches differently."""
    srv, notes = server
    offline = generate_and_score(srv.config, srv.export, srv.work / "generation", constrain=True, split="test")
    assert offline["constrained"] and offline["notes"] == 4
    records = [json.loads(line) for line in (srv.work / "generation" / "generations.jsonl").read_text().splitlines()]
    expected = {(r["note_id"], r["task"]): {"text": r["text"], "finished": r["finished"]} for r in records}
    assert len(expected) == 8 and len({v["text"] for k, v in expected.items() if k[1] == "hashtag"}) > 1
    assert srv.client.get("/healthz").json()["generation"] == {"constrained_categories": True}
    for note in notes[8:]:
        got = srv.client.post("/generate", json={"note": note_json(note)})
        assert got.status_code == 200, got.text
        body = got.json()
        assert body["category"] == expected[(note.note_id, "category")]
        assert body["hashtag"] == expected[(note.note_id, "hashtag")] and body["skipped"] == {}
    no_topics = {**note_json(notes[9]), "topics": []}
    body = srv.client.post("/generate", json={"note": no_topics, "tasks": ["hashtag", "category"]}).json()
    assert body["hashtag"] is None and "no topics" in body["skipped"]["hashtag"]
    assert body["category"]["text"] in {n.category for n in notes[:8]}  # constrained to the training set
    for bad, message in (({"note": {"title": ""}}, "the note is empty"), ({"note": no_topics, "tasks": ["tags"]},
                         "'category' or 'hashtag'"), ({"note": no_topics, "tasks": []}, "at least 1 item"),
                         ({"notes": [no_topics]}, "Field required")):
        response = srv.client.post("/generate", json=bad)
        assert response.status_code == 422 and message in response.text, response.text


def chromium_driver(user_data_dir: Path):
    """Debian's headless Chromium through its chromedriver (launch/setup.sh installs both)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    for binary in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        if not Path(binary).is_file():
            pytest.fail(f"{binary} missing: run launch/setup.sh (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1100,1250",
                 f"--user-data-dir={user_data_dir}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=DriverService(executable_path="/usr/bin/chromedriver"))


def test_page_in_headless_chromium(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    srv, notes = server
    driver = chromium_driver(tmp_path / "profile")
    try:
        driver.get(f"http://127.0.0.1:{srv.port}/")  # the page itself is open; its requests carry the key
        assert not driver.find_element(By.ID, "admin").is_displayed()
        driver.find_element(By.ID, "api_key").send_keys(ADMIN_KEY)
        driver.find_element(By.ID, "title").send_keys(notes[4].title)
        driver.find_element(By.ID, "content").send_keys(notes[4].content)
        driver.find_element(By.ID, "topics").send_keys(", ".join(notes[4].topics))
        driver.find_element(By.ID, "k").clear()
        driver.find_element(By.ID, "k").send_keys("5")
        driver.find_element(By.ID, "search").click()
        wait = WebDriverWait(driver, 60)
        wait.until(ec.visibility_of_element_located((By.ID, "results")))
        rows = driver.find_elements(By.CSS_SELECTOR, "#results tbody tr")
        cells = [[td.text for td in row.find_elements(By.TAG_NAME, "td")] for row in rows]
        assert len(cells) == 5 and cells[0][1] == notes[4].title and cells[0][2] == notes[4].category
        assert float(cells[0][3]) == pytest.approx(1.0, abs=1e-3) and cells[0][4] == notes[4].note_id
        assert "5 nearest notes" in driver.find_element(By.ID, "status").text
        wait.until(ec.visibility_of_element_located((By.ID, "generated")))
        wait.until(lambda d: d.find_element(By.ID, "gen-hashtags").text)
        served = srv.client.post("/generate", json={"note": {**note_json(notes[4]), "category": ""}}).json()
        assert driver.find_element(By.ID, "gen-category").text == served["category"]["text"]
        hashtags = served["hashtag"]["text"] + ("" if served["hashtag"]["finished"] else
                                                " (not finished within the token budget)")
        assert driver.find_element(By.ID, "gen-hashtags").text == " ".join(hashtags.split())
        driver.save_screenshot(os.environ.get("NOTELLM_SCREENSHOT", str(tmp_path / "page.png")))
        driver.find_element(By.ID, "k").clear()
        driver.find_element(By.ID, "k").send_keys("500")  # beyond serve.max_k: the page shows the 422
        driver.find_element(By.ID, "search").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "error 422"))
        assert "exceeds serve.max_k=100" in driver.find_element(By.ID, "status").text
        add_and_delete_on_the_page(driver, srv)
    finally:
        driver.quit()


def add_and_delete_on_the_page(driver, srv) -> None:
    """With the admin key entered: add a note with a category, delete it after a dismissed and an accepted
    confirmation, then a title over its cap shows the 422 naming the field."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 60)
    wait.until(ec.visibility_of_element_located((By.ID, "admin")))
    for field, value in (("note_id", "page/added-1"), ("title", "Descaling a kettle with citric acid"),
                         ("content", "two spoons in water, boil, rinse"), ("topics", "kettle"),
                         ("category", "appliances")):
        driver.find_element(By.ID, field).clear()
        driver.find_element(By.ID, field).send_keys(value)
    driver.find_element(By.ID, "add").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "added note page/added-1"))
    assert srv.client.get("/notes/page/added-1").json() == {
        "id": "page/added-1", "title": "Descaling a kettle with citric acid", "category": "appliances"}
    driver.find_element(By.ID, "delete").click()
    wait.until(ec.alert_is_present())
    assert "page/added-1" in driver.switch_to.alert.text
    driver.switch_to.alert.dismiss()
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "not deleted"))
    assert srv.client.get("/notes/page/added-1").status_code == 200
    driver.find_element(By.ID, "delete").click()
    wait.until(ec.alert_is_present())
    driver.switch_to.alert.accept()
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "deleted note page/added-1"))
    assert srv.client.get("/notes/page/added-1").status_code == 404
    driver.find_element(By.ID, "note_id").clear()
    driver.find_element(By.ID, "k").clear()
    driver.find_element(By.ID, "k").send_keys("3")  # k itself in range: the title is what is refused
    limit = srv.config.serve.max_title_chars
    driver.execute_script(f"document.getElementById('title').value = 'x'.repeat({limit + 1})")
    driver.find_element(By.ID, "search").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "error 422: body.note.title"))
    assert f"serve.max_title_chars={limit}" in driver.find_element(By.ID, "status").text


def stream_upserts(port: int, writer: int, acknowledged: list[str], stop: threading.Event, limit: int) -> None:
    """PUT notes one after another until the server dies, `stop` is set or `limit` notes were sent."""
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, headers=AUTH) as client:
        for i in range(limit):
            if stop.is_set():
                return
            note_id = f"w{writer}-{i}"
            try:
                response = client.put(f"/notes/{note_id}", json=durable_note(note_id))
            except httpx.TransportError:
                return
            if response.status_code == 200 and response.json()["acknowledged"]:
                acknowledged.append(note_id)


def durable_note(note_id: str) -> dict:
    return {"title": f"note {note_id} on brewing", "content": f"steps for {note_id}", "topics": [], "category": "t"}


def test_kill9_during_upserts_loses_no_acknowledged_write(server):
    srv, _ = server
    acknowledged: list[str] = []
    stop = threading.Event()
    writers = [threading.Thread(target=stream_upserts, args=(srv.port, w, acknowledged, stop, 400)) for w in range(3)]
    for t in writers:
        t.start()
    deadline = time.time() + 120
    while len(acknowledged) < 20 and time.time() < deadline:
        time.sleep(0.05)
    srv.kill9()  # in the middle of the stream: three writers have a request in flight
    stop.set()
    for t in writers:
        t.join(timeout=60)
    assert len(acknowledged) >= 20, (srv.work / "server.log").read_text()

    srv.start()
    client = srv.client
    size = client.get("/healthz").json()["index_size"]
    last = {w: max([int(i.split("-")[1]) for i in acknowledged if i.startswith(f"w{w}-")], default=-1)
            for w in range(3)}
    sent = [f"w{w}-{i}" for w in range(3) for i in range(last[w] + 3)]  # each writer's next one was in flight
    present = [i for i in sent if client.get(f"/notes/{i}").status_code == 200]
    assert set(acknowledged) <= set(present)
    assert size == 12 + len(present) and len(present) <= len(acknowledged) + 3  # at most the in-flight ones
    for note_id in acknowledged[:: max(1, len(acknowledged) // 8)]:  # complete records: found by their own text
        top = client.post("/similar", json={"note": durable_note(note_id), "k": 1}).json()["results"][0]
        assert top["id"] == note_id and top["score"] > 0.9999
