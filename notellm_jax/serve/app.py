"""The HTTP service: embed new notes, find their nearest stored notes, add and remove notes live.

FastAPI on uvicorn: the standard ASGI stack on PyPI, with typed request validation by pydantic (a malformed
body or a wrongly typed field is a 422 naming the field, never a crash) and an async event loop, so
concurrent requests can wait together for one batched model call (`batching.Batcher`).

    POST   /embed        {"notes": [{title, content, topics, category}]} -> unit vectors
    POST   /similar      {"note_id": ...} or {"note": {...}}, "k" -> k nearest (id, score, title, category)
    POST   /generate     {"note": {...}, "tasks": [...]} -> generated category and hashtags (with --generate)
    POST   /index/rebuild  (admin) {k, min_recall, sample}, all optional -> the gated rebuild's report: its
                         recall@k against exact search on a sample, and whether it was promoted (else the
                         old index stays)
    PUT    /notes/{id}   a note -> embedded and upserted; acknowledged only once its log record is fsynced
    GET    /notes/{id}   its title and category (404 if unknown)
    DELETE /notes/{id}   removed (durable once acknowledged); an id may hold any character, `/` included
    POST   /v1/embeddings, GET /v1/models   OpenAI-compatible embeddings (`openai_api`)
    GET    /healthz (liveness: never touches the model or the queue), GET /readyz (200 once warmed up, else 503
                         with the reason), GET /metrics (Prometheus text format), GET / (the page); /healthz and
                         /metrics report the live index's repairs on open (`index_repairs`: torn log tails cut
                         off into side files; `notellm_index_log_repairs`, `notellm_index_skipped_deletes`)
A plain string where a note is expected is the note's content (`schemas.text_note`). Keys and allowed hosts:
`access`. Every validation error is a 422 JSON body naming the field, without the input (`validation_error`).
Body size, field caps, admission (429) and the per-request deadline (503): `limits`. Notes are tokenised on a
worker thread, so the event loop (and /healthz) keeps answering while a large request is tokenised.
A note over its token budgets is cut exactly as in training (`prompts.build_example`) and the response says
so (`truncated`).
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Path as PathParam, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import Field, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from notellm_jax.config import ServeConfig
from notellm_jax.data.prompts import TASKS
from notellm_jax.data.prompts import PromptTooLongError
from notellm_jax.errors import StoreFormatError
from notellm_jax.serve.access import Access, Guard
from notellm_jax.serve.batching import Batcher, BatchStats
from notellm_jax.serve.index import LiveIndex, UnknownNoteError
from notellm_jax.serve.limits import BodyLimit, Gate, check_notes
from notellm_jax.serve.openai_api import add_openai_routes, openai_error
from notellm_jax.serve.schemas import Body, NoteIn, Text, text_note

PAGE = Path(__file__).with_name("page.html")


class EmbedRequest(Body):
    notes: list[NoteIn] = Field(min_length=1)  # a plain string is a note too (`schemas.text_note`)

    @field_validator("notes", mode="before")
    @classmethod
    def _strings_are_notes(cls, notes):
        return [text_note(n) if isinstance(n, str) else n for n in notes] if isinstance(notes, list) else notes


class SimilarRequest(Body):
    note_id: Text | None = None
    note: NoteIn | None = None
    k: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _one_query(self):
        if (self.note_id is None) == (self.note is None):
            raise ValueError("give exactly one of note_id (a stored note) or note (a new one)")
        return self


class GenerateRequest(Body):
    note: NoteIn
    tasks: list[Literal[TASKS]] = Field(list(TASKS), min_length=1, max_length=len(TASKS))


class RebuildRequest(Body):
    """Omitted fields take serve.rebuild_min_recall / serve.rebuild_sample."""
    k: int = Field(10, ge=1)
    min_recall: float | None = Field(None, ge=0, le=1)
    sample: int | None = Field(None, ge=1)


NoteId = PathParam(min_length=1, max_length=512, pattern=r"^[^\x00-\x1f\x7f]+$")


SECONDS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (several apps may live in one process). Where
    text-embeddings-inference has a metric of the same meaning, it has its name (`te_*`): tokenisation per request,
    queue and inference per note, notes and real tokens per embedder call, notes waiting."""

    def __init__(self, index: LiveIndex):
        self.registry = CollectorRegistry()
        self._add_batch_metrics()
        self.requests = Counter("notellm_requests", "HTTP requests", ("endpoint", "method", "status"),
                                registry=self.registry)
        self.latency = Histogram("notellm_request_latency_seconds", "Request latency", ("endpoint",),
                                 buckets=(.002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
                                 registry=self.registry)
        self.truncated = Counter("notellm_truncated_notes", "Notes cut to their token budgets", registry=self.registry)
        self.index_size = Gauge("notellm_index_size", "Notes in the live index", registry=self.registry)
        self.index_size.set_function(lambda: len(index))
        self.index_repairs = Gauge("notellm_index_log_repairs", "Torn log tails cut off (into side files) when the "
                                   "live index was opened", registry=self.registry)
        self.index_repairs.set_function(lambda: len(index.repairs))
        self.skipped_deletes = Gauge("notellm_index_skipped_deletes", "Logged deletes of unknown ids skipped when the "
                                     "live index was opened", registry=self.registry)
        self.skipped_deletes.set_function(lambda: len(index.skipped_deletes))

    def _add_batch_metrics(self) -> None:
        def histogram(name, text, buckets=SECONDS):
            return Histogram(name, text, buckets=buckets, registry=self.registry)
        self.tokenization = histogram("te_embed_tokenization_duration", "Seconds to tokenise a request's notes")
        self.queue = histogram("te_embed_queue_duration", "Seconds a note waited for its embedder call")
        self.inference = histogram("te_embed_inference_duration", "Seconds of the embedder call, per note it embedded")
        self.batch_size = histogram("te_batch_next_size", "Notes per embedder call", tuple(2 ** i for i in range(9)))
        self.batch_tokens = histogram("te_batch_next_tokens", "Real (unpadded) tokens per embedder call",
                                      tuple(2 ** i for i in range(4, 17)))
        self.batch_fill = histogram("notellm_batch_fill", "Real tokens over the token positions an embedder call "
                                    "computes (rows x bucket)", tuple(i / 10 for i in range(1, 11)))
        self.queue_size = Gauge("te_queue_size", "Notes waiting for an embedder call", registry=self.registry)
        self.in_flight = Gauge("notellm_requests_in_flight", "Requests admitted to the model (running or queued)",
                               registry=self.registry)

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        self.batch_tokens.observe(stats.tokens)
        self.batch_fill.observe(stats.fill)
        for waited in stats.queue_seconds:
            self.queue.observe(waited)
            self.inference.observe(stats.inference_seconds)


class Service:
    """The model (a `NoteEncoder`), the live index and the batcher behind the app."""

    def __init__(self, encoder, index: LiveIndex, cfg: ServeConfig, generator=None):
        """`generator`: a `generation.NoteGenerator` (or None: /generate answers 404)."""
        if encoder.export.emb_dim != index.dim:
            raise StoreFormatError(f"the export embeds in {encoder.export.emb_dim} dimensions, the index holds "
                             f"{index.dim}: the index was built from another model's embeddings")
        self.encoder, self.index, self.cfg, self.generator = encoder, index, cfg, generator
        self.metrics = Metrics(index)
        self.gate = Gate(cfg)
        self.ready = False  # set once every shape is compiled (/readyz)
        self.batcher = Batcher(encoder.embedder, encoder.embedder.bucket, cfg.max_batch_size, cfg.max_wait_ms / 1000,
                               on_batch=self.metrics.observe_batch, rows=encoder.embedder.row_buckets)
        self.metrics.queue_size.set_function(lambda: self.batcher.waiting)
        self.metrics.in_flight.set_function(lambda: self.gate.in_flight)
        self._tokeniser: ThreadPoolExecutor | None = None
        Gauge("notellm_feature_cache_bytes", "Frozen-bottom feature cache held (serve.feature_cache_max_mb)",
              registry=self.metrics.registry).set_function(lambda: encoder.cache.size_bytes if encoder.cache else 0)

    def start(self) -> None:
        self._tokeniser = ThreadPoolExecutor(1, thread_name_prefix="tokenise")
        self.batcher.start()
        if self.generator is not None:
            self.generator.start()

    async def stop(self) -> None:
        self.ready = False
        await self.batcher.stop()
        if self._tokeniser is not None:
            self._tokeniser.shutdown(wait=False, cancel_futures=True)
        if self.generator is not None:
            await self.generator.stop()

    def warm_up(self) -> dict[Any, float]:
        """Compile every (length, rows) bucket (and each generation task) before the first request; seconds
        each."""
        seconds: dict[Any, float] = {}
        embedder = self.encoder.embedder
        for bucket in embedder.buckets:
            for rows in embedder.row_buckets:
                start = time.perf_counter()
                self.batcher.embed_now([[self.encoder.tokenizer.pad_id] * bucket] * rows)
                seconds[f"{bucket}x{rows}"] = round(time.perf_counter() - start, 3)
        if self.generator is not None:
            seconds.update(self.generator.warm_up())
        return seconds

    async def embed(self, notes: list[NoteIn], locs: Sequence[Sequence] | None = None) -> tuple[np.ndarray, list[bool]]:
        """[n, d] unit vectors of `notes` and whether each was cut to its token budgets. `locs`: where each
        note is in the request, for the 422 of a field over its cap (default `body.notes.<i>`)."""
        vectors, cuts, _ = await self.embed_counted(notes, locs)
        return vectors, cuts

    async def embed_counted(self, notes: list[NoteIn], locs: Sequence[Sequence] | None = None,
                            content_locs: Sequence[Sequence] | None = None) -> tuple[np.ndarray, list[bool], int]:
        """`embed`'s answer and the prompt tokens the model ran for the notes (cached prefix included);
        `content_locs`: where each note's content is, when the request gave it as a plain string."""
        check_notes(notes, self.cfg, locs or [("body", "notes", i) for i in range(len(notes))], content_locs)
        return await self.gate.run(lambda: self._embed_counted(notes))

    def _encode(self, notes: list[NoteIn]) -> list[tuple[list[int], bool]]:
        encoded = []
        for number, note in enumerate(notes):
            try:
                encoded.append(self.encoder.encode(note.to_note(), report_cuts=True))
            except PromptTooLongError as e:
                raise HTTPException(422, f"note {number}: {e}") from None
        return encoded

    async def _embed_counted(self, notes: list[NoteIn]) -> tuple[np.ndarray, list[bool], int]:
        start = time.perf_counter()  # on the tokeniser thread: the event loop keeps answering meanwhile
        encoded = await asyncio.get_running_loop().run_in_executor(self._tokeniser, self._encode, notes)
        self.metrics.tokenization.observe(time.perf_counter() - start)
        cuts = [cut for _, cut in encoded]
        self.metrics.truncated.inc(sum(cuts))
        token_lists = [tokens for tokens, _ in encoded]
        count = sum(len(tokens) + len(self.encoder.prefix) for tokens in token_lists)
        return await self.batcher.embed(token_lists), cuts, count

    def check_k(self, k: int, excluding: bool) -> None:
        available = len(self.index) - (1 if excluding else 0)
        if k > self.cfg.max_k:
            raise HTTPException(422, f"k={k} exceeds serve.max_k={self.cfg.max_k}")
        if k > available:
            raise HTTPException(422, f"k={k} exceeds the {available} notes that can be returned")


def _hits(hits) -> list[dict[str, Any]]:
    return [{"id": h.note_id, "score": h.score, "title": h.title, "category": h.category} for h in hits]


def _json_safe(text: Any) -> str:
    """`text` as a string any JSON encoder can write (a lone surrogate becomes its escape)."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Every validation error as a 422 that can always be written: where (`loc`), what (`msg`, `type`) and one
    `message` line; never the input itself (it may be text no encoder can write, or NaN)."""
    errors = [{"loc": [p if isinstance(p, int) else _json_safe(p) for p in e.get("loc", ())],
               "msg": _json_safe(e.get("msg", "")), "type": _json_safe(e.get("type", ""))} for e in exc.errors()]
    message = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
    body = {"detail": errors, "message": message}
    if request.url.path.startswith("/v1/"):
        param = errors[0]["loc"][1] if errors and len(errors[0]["loc"]) > 1 else None
        body["error"] = openai_error(422, message, param)
    return JSONResponse(body, 422)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's `{"detail": ...}`, with OpenAI's `error` object beside it on the /v1 routes."""
    body: dict[str, Any] = {"detail": exc.detail}
    if request.url.path.startswith("/v1/"):
        body["error"] = openai_error(exc.status_code, str(exc.detail))
    return JSONResponse(body, exc.status_code, headers=getattr(exc, "headers", None))


def create_app(service: Service, access: Access | None = None, docs: bool = False) -> FastAPI:
    """The app. `access`: API keys and allowed hosts, checked before any route (None: open to any host).
    `docs`: serve Swagger (/docs, /redoc, /openapi.json), off by default: its forms can write."""
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        service.start()
        seconds = await asyncio.to_thread(service.warm_up)
        print(f"[serve] warm-up (seconds per compiled shape): {seconds}", flush=True)
        service.ready = True
        yield
        await service.stop()

    app = FastAPI(title="NoteLLM cold-start service", lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    if access is not None:
        app.add_middleware(Guard, access=access)
    app.add_middleware(BodyLimit, max_bytes=service.cfg.max_body_bytes)  # outside the guard: before any reading
    metrics = service.metrics

    @app.middleware("http")  # outside the guard: refused requests are counted too
    async def observe(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        metrics.requests.labels(endpoint, request.method, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        return response

    _add_query_routes(app, service)
    _add_note_routes(app, service.index, service)
    _add_generation_and_admin_routes(app, service)
    add_openai_routes(app, service)
    return app


def _add_query_routes(app: FastAPI, service: Service) -> None:
    index, cfg = service.index, service.cfg

    @app.post("/embed")
    async def embed(request: EmbedRequest):
        if len(request.notes) > cfg.max_notes_per_request:
            raise HTTPException(422, f"{len(request.notes)} notes in one request; at most "
                                     f"serve.max_notes_per_request={cfg.max_notes_per_request}")
        vectors, cuts = await service.embed(request.notes)
        return {"dim": int(vectors.shape[1]), "embeddings": vectors.tolist(), "truncated": cuts}

    @app.post("/similar")
    async def similar(request: SimilarRequest):
        service.check_k(request.k, excluding=request.note_id is not None)
        truncated = False
        if request.note_id is not None:
            try:
                query = index.vector(request.note_id)
            except UnknownNoteError:
                raise HTTPException(404, f"unknown note id {request.note_id!r}") from None
        else:
            vectors, cuts = await service.embed([request.note], [("body", "note")])
            query, truncated = vectors[0], cuts[0]
        hits = (await asyncio.to_thread(index.search, query[None], request.k, [request.note_id]))[0]
        return {"k": request.k, "results": _hits(hits), "truncated": truncated}

    @app.get("/healthz")
    async def healthz():  # liveness: attributes only, never the model, the queue or a lock
        export = service.encoder.export
        generator = service.generator
        return {"status": "ok", "ready": service.ready, "index_size": len(index), "dim": index.dim, "run": export.meta.get("run"),
                "buckets": service.encoder.embedder.buckets, "row_buckets": service.encoder.embedder.row_buckets,
                "max_batch_size": cfg.max_batch_size, "index_repairs": index.repairs,
                "index_skipped_deletes": len(index.skipped_deletes),
                "generation": None if generator is None else {"constrained_categories": generator.constrained}}

    @app.get("/readyz")
    async def readyz():
        if not service.ready:
            return JSONResponse({"ready": False, "detail": "warming up: compiling the model's shapes"}, 503)
        return {"ready": True, "index_size": len(index)}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text()


def _add_note_routes(app: FastAPI, index: LiveIndex, service: Service) -> None:
    @app.put("/notes/{note_id:path}")
    async def put_note(note: NoteIn, note_id: str = NoteId):
        vectors, cuts = await service.embed([note], [("body",)])
        created = note_id not in index
        await asyncio.to_thread(index.upsert, note_id, vectors[0], note.title, note.category)
        return {"id": note_id, "acknowledged": True, "created": created, "truncated": cuts[0],
                "index_size": len(index)}

    @app.get("/notes/{note_id:path}")
    async def get_note(note_id: str = NoteId):
        if note_id not in index:
            raise HTTPException(404, f"unknown note id {note_id!r}")
        return {"id": note_id, **index.note(note_id)}

    @app.delete("/notes/{note_id:path}")
    async def delete_note(note_id: str = NoteId):
        try:
            await asyncio.to_thread(index.delete, note_id)
        except UnknownNoteError:
            raise HTTPException(404, f"unknown note id {note_id!r}") from None
        return {"id": note_id, "deleted": True, "index_size": len(index)}


def _add_generation_and_admin_routes(app: FastAPI, service: Service) -> None:
    @app.post("/generate")
    async def generate(request: GenerateRequest):
        check_notes([request.note], service.cfg, [("body", "note")])
        if service.generator is None:
            raise HTTPException(404, "no generation model is loaded: start the service with --generate")
        note, tasks = request.note.to_note(), list(dict.fromkeys(request.tasks))
        try:
            return await service.gate.run(lambda: service.generator.generate(note, tasks))
        except PromptTooLongError as e:
            raise HTTPException(422, str(e)) from None

    @app.post("/index/rebuild")
    async def rebuild(request: RebuildRequest | None = None):
        request = request or RebuildRequest()
        service.check_k(request.k, excluding=False)
        min_recall = service.cfg.rebuild_min_recall if request.min_recall is None else request.min_recall
        sample = service.cfg.rebuild_sample if request.sample is None else request.sample
        return await asyncio.to_thread(service.index.rebuild, request.k, min_recall, sample)
