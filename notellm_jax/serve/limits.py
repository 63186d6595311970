"""Limits that keep the service answering whatever a client sends (`serve.*` settings, docs/serving.md "Limits").

- `BodyLimit`: a body over `serve.max_body_bytes` is a 413 before it is read (by its Content-Length; a chunked
  body is cut off as soon as it passes the cap), so a 10 MB post costs the server nothing.
- `check_note`: a title, content, category, topic or topic count over its cap is a 422 naming the field, in the
  same body as every other validation error (`app.validation_error`).
- `Gate`: at most `serve.max_concurrent_requests` requests run the model at once (queued ones included); one
  more is a 429 with `Retry-After`; each waits at most `serve.request_timeout_s` (tokenisation, queue and
  inference together), else 503. Requests that do not run the model (`/healthz`, `/readyz`, `/metrics`, reads
  of stored notes) never pass the gate.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from starlette.responses import JSONResponse

from notellm_jax.config import ServeConfig

T = TypeVar("T")


class _Over(Exception):
    """A chunked body passed the cap while the app read it."""


class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, answered before the body is read."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _refusal(self, length: int | str) -> JSONResponse:
        return JSONResponse({"detail": f"the request body ({length} bytes) exceeds serve.max_body_bytes="
                                       f"{self.max_bytes}"}, 413, headers={"Connection": "close"})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refusal(declared.decode("latin-1"))(scope, receive, send)
        received, started = 0, False

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise _Over
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _Over:
            if started:  # the app answered before reading on: nothing more to say
                return
            await self._refusal(f"over {received - 1}")(scope, receive, send)


def _too_long(loc: Sequence, what: str, cap: int, setting: str) -> dict:
    return {"loc": tuple(loc), "msg": f"{what} exceeds serve.{setting}={cap}", "type": "too_long"}


def note_errors(note, cfg: ServeConfig, loc: Sequence, content_loc: Sequence | None = None) -> list[dict]:
    """The caps `note` (a `schemas.NoteIn`) breaks, as validation errors located under `loc` (`content_loc`: where
    the content is, when the request gave it as a plain string)."""
    errors = []
    for field, cap, setting in (("title", cfg.max_title_chars, "max_title_chars"),
                                ("content", cfg.max_content_chars, "max_content_chars"),
                                ("category", cfg.max_category_chars, "max_category_chars")):
        text = getattr(note, field)
        if len(text) > cap:
            where = content_loc if field == "content" and content_loc is not None else (*loc, field)
            errors.append(_too_long(where, f"{len(text)} characters", cap, setting))
    if len(note.topics) > cfg.max_topics:
        errors.append(_too_long((*loc, "topics"), f"{len(note.topics)} topics", cfg.max_topics, "max_topics"))
    errors += [_too_long((*loc, "topics", i), f"{len(t)} characters", cfg.max_topic_chars, "max_topic_chars")
               for i, t in enumerate(note.topics) if len(t) > cfg.max_topic_chars]
    return errors


def check_notes(notes, cfg: ServeConfig, locs: Sequence[Sequence], content_locs: Sequence | None = None) -> None:
    """422 (through the app's validation handler) naming every field of `notes` over its cap."""
    errors = [e for i, (note, loc) in enumerate(zip(notes, locs))
              for e in note_errors(note, cfg, loc, None if content_locs is None else content_locs[i])]
    if errors:
        raise RequestValidationError(errors)


class Gate:
    """Admission (429 past `max_concurrent_requests`) and the per-request deadline (503)."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.in_flight = 0  # only touched on the event loop: no lock needed

    @contextlib.asynccontextmanager
    async def admitted(self):
        if self.in_flight >= self.cfg.max_concurrent_requests:
            raise HTTPException(429, f"{self.in_flight} requests are running or queued, serve.max_concurrent_requests"
                                     f"={self.cfg.max_concurrent_requests}: retry later",
                                headers={"Retry-After": str(self.cfg.retry_after_s)})
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def run(self, work: Callable[[], Awaitable[T]]) -> T:
        """`work()` admitted and within the deadline (a callable: a refused request never starts it)."""
        async with self.admitted():
            try:
                return await asyncio.wait_for(work(), self.cfg.request_timeout_s)
            except asyncio.TimeoutError:
                raise HTTPException(503, f"not answered within serve.request_timeout_s={self.cfg.request_timeout_s} "
                                         "s: the service is overloaded, retry later",
                                    headers={"Retry-After": str(self.cfg.retry_after_s)}) from None
