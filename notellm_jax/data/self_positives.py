"""Field self-positives, beyond the paper (`train.self_positive_weight` = beta; 0 = the paper).

A note's title and its own content are two views of one note, so they make a positive pair that needs no
co-occurrence signal. In each training batch of the numpy input, round(beta x b) of the b pairs, drawn per
(seed, step), are replaced by such a pair: the category-task prompt of the note with its content emptied, and
the same prompt with its title emptied (the one prompt builder, `prompts.build_example`), both rows carrying the
note's index so the duplicate mask treats them as that note. The in-batch contrastive loss averages over rows,
so beta is the weight of the self-positive term in it; the negatives are the whole batch either way. A drawn
pair whose first note lacks a title or a content stays as it was. Validation batches are never changed.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from notellm_jax.config import Config
from notellm_jax.data import store
from notellm_jax.data.prompts import Example, build_example
from notellm_jax.data.shards import SIDES
from notellm_jax.weights.tokenizer import resolve_tokenizer


class SelfPositives:
    """Replaces drawn pairs of a token batch (`input_pipeline._token_batch` layout) by title/content views."""

    def __init__(self, config: Config, data_dir: Path, note_ids: np.ndarray):
        self.config, self.note_ids = config, note_ids
        self.notes = {note.note_id: note for note in store.load_notes(Path(data_dir) / "notes.parquet")}
        self.tokenizer = resolve_tokenizer(config)

    def views(self, index: int) -> tuple[Example, Example] | None:
        """(title view, content view) of note `index` of tokens.npz; None without a title or a content."""
        note = self.notes[str(self.note_ids[index])]
        if not note.title.strip() or not note.content.strip():
            return None
        return tuple(build_example(view, self.tokenizer, self.config.prompt, "category")
                     for view in (dataclasses.replace(note, content=""), dataclasses.replace(note, title="")))

    def substitute(self, batch: dict, step: int) -> list[int]:
        """Replace round(beta x b) drawn pairs of `batch` in place; returns the rows replaced."""
        b = len(batch[f"{SIDES[0]}note_index"])
        rng = np.random.default_rng([self.config.train.seed, step, 0x5E1F])
        drawn = rng.choice(b, size=int(np.floor(self.config.train.self_positive_weight * b + 0.5)), replace=False)
        replaced = []
        for row in sorted(drawn.tolist()):
            index = int(batch[f"{SIDES[0]}note_index"][row])
            views = self.views(index)
            if views is None:
                continue
            for side, example in zip(SIDES, views):
                batch[f"{side}note_index"][row] = index
                batch[f"{side}cat_ids"][row] = np.asarray(example.input_ids, np.int64)
                batch[f"{side}cat_emb"][row] = example.embed_read_pos
                batch[f"{side}cat_prefix"][row] = example.prefix_length
                batch[f"{side}hash_emb"][row] = -1  # the views take the category task
            replaced.append(row)
        return replaced
