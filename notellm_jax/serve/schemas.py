"""The request bodies every route shares: the strict base model, text fields, a note, and the one rule that makes
a plain string a note (`/embed` and `/v1/embeddings` both use it).

Every text field refuses a lone UTF-16 surrogate (JSON can carry one as an escape, `"\\ud800"`, but it is no
Unicode text: the tokenizer and the JSON answer could not encode it) and every number refuses NaN and
infinities, so a bad value is a 422 naming the field, never a 500.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from notellm_jax.data.prompts import Note

MAX_TEXT_CHARS = 200_000  # longer text is refused outright (it would be cut to the token budget anyway)


def valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text holds a lone UTF-16 surrogate (not valid Unicode)") from None
    return text


Text = Annotated[str, AfterValidator(valid_unicode)]


class Body(BaseModel):
    """Unknown fields and non-finite numbers are refused in every request body."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class NoteIn(Body):
    title: Text = Field("", max_length=MAX_TEXT_CHARS)
    content: Text = Field("", max_length=MAX_TEXT_CHARS)
    topics: list[Annotated[Text, Field(max_length=MAX_TEXT_CHARS)]] = Field(default_factory=list, max_length=256)
    category: Text = Field("", max_length=1000)

    @model_validator(mode="after")
    def _not_empty(self):
        if not (self.title.strip() or self.content.strip()):
            raise ValueError("the note is empty: give a title or content")
        return self

    def to_note(self, note_id: str = "") -> Note:
        return Note(note_id=note_id, title=self.title, content=self.content, topics=list(self.topics),
                    category=self.category)


def text_note(text: str) -> dict[str, str]:
    """A plain string as a note: its content, with no title, topics or category. Content, not title, because
    content has the larger token budget (`prompt.content_max_tokens`) and a plain string is usually a body
    of text; the note is then embedded exactly as `{"content": text}` would be."""
    return {"content": text}
