"""Note Compression Prompts (METHOD.md section 1): one builder for training, embedding and generation.

Paper layout (default):
    [BOS]<Instruction> {'title': ..., 'topic': ..., 'content': ...} The compression word is:"[EMB]". <Guidance> <Output>[EOS]
Reference layout: [BOS]{'title': ..., 'content': ...} The compression word is:"[EMB]". <Task> <Guidance> <Output>[EOS]
(the input note is the same for both tasks, so the embedding does not depend on the task; topics are
left out of it because the hashtag task must not be able to copy them).

Tokenisation: the text before `[EMB]` is encoded as one string (as the model saw text in
pre-training) with special-token parsing off, so note text cannot inject control tokens; the
`[EMB]` id is inserted directly; the text after it is encoded the way the tokenizer encodes text
following a special token; the output is the token continuation of the guidance text, checked to
leave the guidance tokens unchanged, so the generation prefix is an exact token prefix of the
training example. Hashtag outputs are the j drawn topics joined with ", ".
Budgets: title and content are cut to `title_max_tokens` / `content_max_tokens` tokens measured on
the field encoded alone (cut points never split a character); in context the count can differ by
a boundary merge. Only a field's head of (budget + 16) x 64 characters is ever tokenised, so the
cost of a prompt does not grow with the size of the note. If the whole example exceeds `max_length`, content is shrunk further, then title.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from notellm_jax.config import PromptConfig
from notellm_jax.data.note_format import prompt_texts
from notellm_jax.weights.tokenizer import NoteTokenizer

TASKS = ("category", "hashtag")
TASK_IDS = {name: i for i, name in enumerate(TASKS)}


@dataclasses.dataclass
class Note:
    note_id: str
    title: str
    content: str
    topics: list[str]
    category: str


@dataclasses.dataclass
class Example:
    input_ids: list[int]
    embed_read_pos: int                  # position of the token just before [EMB]
    target_positions: list[int]     # position t predicts target_ids[k] = input_ids[t + 1]
    target_ids: list[int]           # only output tokens + EOS are supervised
    task: str
    prefix_length: int              # tokens up to and including the output guidance (the generation prompt)
    shrunk: bool = False            # title/content were cut below their budgets to fit max_length


class PromptTooLongError(ValueError):
    """The example cannot fit `max_length` even with empty title and content."""


def example_from_tokens(input_ids: list[int], embed_read_pos: int, prefix_length: int, task: str,
                        shrunk: bool = False) -> Example:
    """Targets are every token after the prefix (output + EOS), each predicted from the position before it."""
    n = len(input_ids)
    return Example(input_ids=list(input_ids), embed_read_pos=embed_read_pos,
                   target_positions=list(range(prefix_length - 1, n - 1)),
                   target_ids=list(input_ids[prefix_length:n]), task=task,
                   prefix_length=prefix_length, shrunk=shrunk)


def draw_topics(note: Note, max_topics: int, rng: np.random.Generator) -> list[str]:
    """j ~ U{1..min(max_topics, #topics)} topics of the note, in random order, without repeats."""
    if not note.topics:
        raise ValueError(f"note {note.note_id}: no topics, so no hashtag-task example")
    j = int(rng.integers(1, min(max_topics, len(note.topics)) + 1))
    picked = rng.choice(len(note.topics), size=j, replace=False)
    return [note.topics[i] for i in picked]


# No token of the tokenizers we load spans more characters than this (sentencepiece pieces are at most
# 16 by default; the longest BPE pieces, runs of spaces or dashes, stay well below 64).
CHARS_PER_TOKEN = 64
# Tokens of slack past a budget, so a merge at the character cut cannot reach into the kept tokens.
CUT_SLACK_TOKENS = 16


def char_bound(text: str, budget: int) -> str:
    """The head of `text` that holds its first `budget` tokens (a generous multiple of the budget in
    characters): tokenising that instead of the whole field keeps a huge note as cheap as a normal one."""
    return text[:(budget + CUT_SLACK_TOKENS) * CHARS_PER_TOKEN]


def cut_to_tokens(tokenizer: NoteTokenizer, text: str, budget: int) -> str:
    """`text` cut to at most `budget` tokens without splitting a character."""
    text = char_bound(text, budget)
    ids = tokenizer.encode(text, split_special_tokens=True)
    if len(ids) <= budget:
        return text
    keep = budget
    while keep > 0 and tokenizer.decode(ids[:keep]).endswith("\ufffd"):
        keep -= 1
    return tokenizer.decode(ids[:keep])


def _texts(note: Note, tokenizer: NoteTokenizer, cfg: PromptConfig, task: str, topics, title_budget: int,
           content_budget: int) -> tuple[str, str]:
    """(text before [EMB], text after [EMB] up to the guidance) for the given budgets."""
    title = cut_to_tokens(tokenizer, note.title, title_budget)
    content = cut_to_tokens(tokenizer, note.content, content_budget)
    return prompt_texts(title, content, note.topics, cfg.layout, task, len(topics or ()))


def _output_ids(tokenizer: NoteTokenizer, guidance_text: str, output: str) -> list[int]:
    """Tokens of " <output>" as the continuation of the guidance text (never truncated)."""
    head = tokenizer.encode(guidance_text, split_special_tokens=True)
    full = tokenizer.encode(guidance_text + " " + output, split_special_tokens=True)
    if full[:len(head)] != head:
        raise ValueError(f"output {output!r} merges with the guidance {guidance_text!r} under this tokenizer")
    return full[len(head):]


def _encode(tokenizer: NoteTokenizer, before: str, after: str) -> tuple[list[int], int]:
    """(prefix ids through the guidance, emb position)."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    head = bos + tokenizer.encode(before, split_special_tokens=True)
    # The tokenizer's own encoding of text that follows a special token: encode after [EMB] and drop it.
    tail = tokenizer.encode(tokenizer.emb_token + after)
    if tail[:1] != [tokenizer.emb_id] or tokenizer.emb_id in tail[1:]:
        raise ValueError(f"template text after {tokenizer.emb_token} did not encode as expected")
    return head + tail, len(head)


def build_example(note: Note, tokenizer: NoteTokenizer, cfg: PromptConfig, task: str = "category",
                  rng: np.random.Generator | None = None, with_output: bool = True,
                  topics: list[str] | None = None) -> Example:
    """The tokenised prompt of `note` for `task`: the training example, or with `with_output=False` the
    generation/embedding prefix (same tokens, minus output and EOS).

    Hashtag topics are `topics` if given, else drawn with `rng` (required then).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "hashtag" and topics is None:
        if rng is None:
            raise ValueError("hashtag task needs rng (to draw topics) or explicit topics")
        topics = draw_topics(note, cfg.max_topics, rng)
    output = note.category if task == "category" else ", ".join(topics)
    # Budgets above a field's own length would make the shrink loop below step through no-ops.
    title_budget = min(cfg.title_max_tokens, len(tokenizer.encode(char_bound(note.title, cfg.title_max_tokens),
                                                                  split_special_tokens=True)))
    content_budget = min(cfg.content_max_tokens,
                         len(tokenizer.encode(char_bound(note.content, cfg.content_max_tokens),
                                              split_special_tokens=True)))
    initial_budgets = (title_budget, content_budget)
    while True:
        before, after = _texts(note, tokenizer, cfg, task, topics, title_budget, content_budget)
        prefix, emb_pos = _encode(tokenizer, before, after)
        tail = _output_ids(tokenizer, after, output) + [tokenizer.eos_id] if with_output else []
        excess = len(prefix) + len(tail) - cfg.max_length
        if excess <= 0:
            break
        if content_budget == 0 and title_budget == 0:
            raise PromptTooLongError(f"note {note.note_id}: {task} prompt needs {len(prefix) + len(tail)} tokens "
                                     f"with empty title and content; prompt.max_length is {cfg.max_length}")
        # Shrink content first, then title; the in-context count can differ, so re-encode and re-check.
        cut = min(excess, content_budget)
        content_budget -= cut
        title_budget = max(0, title_budget - (excess - cut))
    shrunk = (title_budget, content_budget) != initial_budgets
    return example_from_tokens(prefix + tail, emb_pos - 1, len(prefix), task, shrunk)


def pad_batch(examples: list[Example], length: int, padding_side: str, pad_id: int,
              max_targets: int) -> dict[str, np.ndarray]:
    """Fixed-shape arrays for a list of examples; left padding shifts every position by the pad count."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    n = len(examples)
    out = {"input_ids": np.full((n, length), pad_id, np.int32),
           "attention_mask": np.zeros((n, length), np.int32),
           "embed_read_pos": np.zeros((n,), np.int32),
           "target_positions": np.zeros((n, max_targets), np.int32),
           "target_ids": np.full((n, max_targets), pad_id, np.int32),
           "target_mask": np.zeros((n, max_targets), np.float32),
           "task": np.zeros((n,), np.int32)}
    for row, ex in enumerate(examples):
        size, m = len(ex.input_ids), len(ex.target_ids)
        if size > length or m > max_targets:
            raise ValueError(f"example {row}: {size} tokens / {m} targets exceed length {length} / "
                             f"max_targets {max_targets}")
        shift = length - size if padding_side == "left" else 0
        out["input_ids"][row, shift:shift + size] = ex.input_ids
        out["attention_mask"][row, shift:shift + size] = 1
        out["embed_read_pos"][row] = ex.embed_read_pos + shift
        out["target_positions"][row, :m] = np.asarray(ex.target_positions, np.int32) + shift
        out["target_ids"][row, :m] = ex.target_ids
        out["target_mask"][row, :m] = 1.0
        out["task"][row] = TASK_IDS[ex.task]
    return out
