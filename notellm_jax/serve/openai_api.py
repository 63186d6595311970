"""OpenAI-compatible embeddings: `POST /v1/embeddings` and `GET /v1/models`, the endpoint client libraries,
vector-database connectors and gateways speak.

Each input string is a note by `schemas.text_note` (its content) and goes through the same encoder and
batcher as `/embed`, so the vectors are `/embed`'s. Token-id inputs are refused (422): a NoteLLM vector is
read from the note prompt (instruction, title, topics, content) built around the note's text, and ids given
without that prompt would give a vector no stored note is comparable with. `encoding_format: base64` is
the little-endian float32 bytes of each vector, as OpenAI's SDK decodes them; `dimensions` must equal the
model's (no shortening); `user` is accepted and ignored.
"""
from __future__ import annotations

import base64
from typing import Annotated, Literal

import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import Field, field_validator

from notellm_jax.serve.schemas import MAX_TEXT_CHARS, Body, NoteIn, Text, text_note

InputText = Annotated[Text, Field(max_length=MAX_TEXT_CHARS)]


class EmbeddingsRequest(Body):
    input: InputText | list[InputText] | list[int] | list[list[int]]
    model: Text
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: Text | None = None

    @field_validator("input")
    @classmethod
    def _texts(cls, value):
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise ValueError("input is empty: give a string or a list of strings")
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("token-id input is not accepted: a NoteLLM vector is read from the note prompt built "
                             "around the note's text, so give the text")
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise ValueError(f"input {empty[0]} is empty: every input must hold text")
        return texts


def openai_error(status: int, message: str, param: str | None = None) -> dict:
    """OpenAI's error object (its SDK shows `message` in the exception it raises)."""
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}.get(status,
                                                                                            "invalid_request_error")
    return {"message": message, "type": kind, "param": param, "code": None}


def model_id(service) -> str:
    """The one model served: the export's run name."""
    return f"notellm-{service.encoder.export.meta.get('run') or 'export'}"


def encode_vector(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode("ascii")
    return np.asarray(vector, np.float32).tolist()


def add_openai_routes(app: FastAPI, service) -> None:
    @app.post("/v1/embeddings")
    async def embeddings(request: EmbeddingsRequest):
        served, dim, limit = model_id(service), service.index.dim, service.cfg.max_notes_per_request
        if request.model != served:
            raise HTTPException(404, f"model {request.model!r} is not served here: this service serves {served!r}")
        if request.dimensions is not None and request.dimensions != dim:
            raise HTTPException(422, f"dimensions={request.dimensions}: this model embeds in {dim} dimensions "
                                     "only (no shortened vectors)")
        if len(request.input) > limit:
            raise HTTPException(422, f"{len(request.input)} inputs in one request; at most "
                                     f"serve.max_notes_per_request={limit}")
        notes = [NoteIn(**text_note(text)) for text in request.input]
        where = [("body", "input", i) for i in range(len(notes))]
        vectors, _, tokens = await service.embed_counted(notes, where, content_locs=where)
        data = [{"object": "embedding", "index": i, "embedding": encode_vector(v, request.encoding_format)}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": served,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id(service), "object": "model", "created": 0,
                                            "owned_by": "notellm_jax"}]}
