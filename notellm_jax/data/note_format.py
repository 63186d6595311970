"""The text of a Note Compression Prompt, with the standard library alone (no JAX, numpy or tokenizer).

`prompts.build_example` builds every prompt from these strings; a converted export
(`notellm convert EXPORT DST --to hf|sentence-transformers`) is fed `format_note(...)`, the text of the
embedding prompt up to the read position, so `SentenceTransformer(DST).encode(format_note(...))` gives the
project's vectors. Layouts (METHOD.md 1), shown for the category task:

    paper:     <Instruction> {'title': ..., 'topic': ..., 'content': ...} The compression word is:"
    reference: {'title': ..., 'content': ...} The compression word is:"

The project reads a note's vector at the last token of that text (the token before `[EMB]`).
Not done here, because it needs the tokenizer: cutting title and content to the export's token budgets
(`title_max_tokens`, `content_max_tokens`); a note within its budgets gives the same text either way.
"""
from __future__ import annotations

from collections.abc import Sequence

LAYOUTS = ("paper", "reference")
INSTRUCTION_HEAD = "Extract the note information in json format, compress it into one word for recommendation, and "
COMPRESSION_TAIL = ' The compression word is:"'


def task_texts(task: str, output_topics: int = 0) -> tuple[str, str]:
    """(task clause of the instruction, output guidance) for "category", or "hashtag" with that many topics."""
    if task == "category":
        return "generate the category of the note.", "The category is:"
    return f"generate {output_topics} topics of the note.", f"The {output_topics} topics are:"


def note_json(title: str, content: str, topics: Sequence[str] | None) -> str:
    """The note as the prompt shows it; `topics` None leaves the topic field out."""
    topic = "" if topics is None else f"'topic': '{', '.join(topics)}', "
    return f"{{'title': '{title}', {topic}'content': '{content}'}}"


def prompt_texts(title: str, content: str, topics: Sequence[str], layout: str, task: str = "category",
                 output_topics: int = 0) -> tuple[str, str]:
    """(text before [EMB], text after [EMB] through the output guidance). The paper layout shows the
    note's topics in the category prompt only (the hashtag task must not copy them); the reference
    layout never shows them."""
    clause, guidance = task_texts(task, output_topics)
    if layout == "paper":
        before = INSTRUCTION_HEAD + clause + " " + note_json(title, content, topics if task == "category" else None)
        return before + COMPRESSION_TAIL, '". ' + guidance
    if layout == "reference":
        before = note_json(title, content, None)
        return before + COMPRESSION_TAIL, '". ' + clause[0].upper() + clause[1:] + " " + guidance
    raise ValueError(f"prompt.layout must be one of {LAYOUTS}, got {layout!r}")


def format_note(title: str, content: str = "", topics: Sequence[str] = (), layout: str = "paper") -> str:
    """The text a converted NoteLLM embeds for a note: its embedding prompt up to the read position (the
    tokenizer adds BOS where the model's does). Cut title and content to the export's token budgets first
    when they may exceed them (the model card of a converted export names them)."""
    return prompt_texts(title, content, list(topics), layout, "category")[0]
