"""The generator: greedy category and hashtag generation with the decoder of a NoteLLM export (METHOD.md 5).

The generation prompt of a note is `build_example(..., with_output=False)` with the prompt settings the
model was trained with (the export's); hashtag prompts ask for j = min(prompt.max_topics, #tags) topics and
notes without tags get none. Prompts are left-padded to one length (a multiple of PAD_MULTIPLE, so the decode
program compiles once per length) and decoded greedily with the KV cache (`model.decode.greedy_decode`).
The closed category set is the training notes' categories; constrained decoding walks a token trie over
them (`category_trie`), whose depth is then the decode budget. Used by `eval.generation` (generate and
score a split) and the service (`serve.generation`).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from notellm_jax import sharding as shd
from notellm_jax.config import Config, PromptConfig
from notellm_jax.data import store
from notellm_jax.data.prompts import Example, Note, build_example, pad_batch
from notellm_jax.model.decode import TokenTrie, greedy_decode
from notellm_jax.model.llama import Llama
from notellm_jax.weights.export import load_notellm
from notellm_jax.weights.tokenizer import NoteTokenizer, resolve_tokenizer

PAD_MULTIPLE = 8  # prompts are left-padded to the task's longest prompt rounded up to this


class Generator:
    """The decoder of a NoteLLM export with its tokenizer and the prompt settings it was trained with."""

    def __init__(self, config: Config, export_dir: str | Path, mesh=None):
        """The weights are restored onto `mesh` (default: the config's) in their logical shardings, as the
        embedder's are; the decode program then runs over the whole mesh."""
        export = load_notellm(export_dir, mesh or shd.mesh_from_config(config.mesh))
        self.tokenizer: NoteTokenizer = resolve_tokenizer(config, export.tokenizer, export.prompt.emb_token)
        if self.tokenizer.vocab_size > export.llama.vocab_size:  # equal, or a padded table (Qwen)
            raise ValueError(f"{export_dir}: the model has a {export.llama.vocab_size}-token vocabulary but its "
                             f"tokenizer {export.tokenizer} has {self.tokenizer.vocab_size} (with "
                             f"{export.prompt.emb_token}): they do not belong together")
        self.prompt: PromptConfig = export.prompt
        self.model = Llama(export.llama)
        self.params = export.params["decoder"]
        # model.prefix_bidirectional: the prompt up to [EMB]'s read position is decoded as it was trained
        self.prefix_from = export.meta.get("levers", {}).get("bidirectional_from", -1)

    def decode(self, examples: Sequence[Example], length: int, max_new_tokens: int, repetition_penalty: float,
               trie: TokenTrie | None) -> list[list[int]]:
        """Generated tokens of one batch of prompts left-padded to `length`, cut after the first EOS."""
        batch = pad_batch(list(examples), length, "left", self.tokenizer.pad_id, max_targets=1)
        prefix_end = batch["embed_read_pos"] + 1 if self.prefix_from >= 0 else None
        new = greedy_decode(self.model, self.params, batch["input_ids"], batch["attention_mask"], max_new_tokens,
                            self.tokenizer.eos_id, repetition_penalty, trie, prefix_end, max(self.prefix_from, 0))
        eos = self.tokenizer.eos_id
        return [row[:row.index(eos) + 1] if eos in row else row for row in new.tolist()]

    def output(self, tokens: list[int]) -> dict[str, Any]:
        """{text, finished} of one row of `decode` (finished: it ended with EOS within the budget)."""
        finished = bool(tokens) and tokens[-1] == self.tokenizer.eos_id
        return {"text": self.tokenizer.decode(tokens).strip(), "finished": finished}


def closed_categories(config: Config, all_notes: Sequence[Note] | None = None) -> list[str]:
    """The closed category set: the training notes' categories, sorted (`all_notes`: notes.parquet loaded)."""
    return sorted({note.category for note in store.notes_of(config.data_dir, "train", notes=all_notes)})


def generation_prompt(note: Note, task: str, tokenizer: NoteTokenizer, prompt: PromptConfig) -> Example | None:
    """The note's generation prefix for `task`; None for the hashtag task of a note without tags."""
    if task == "hashtag":
        if not note.topics:
            return None
        return build_example(note, tokenizer, prompt, task, with_output=False,
                             topics=note.topics[:min(prompt.max_topics, len(note.topics))])
    return build_example(note, tokenizer, prompt, task, with_output=False)


def category_trie(categories: Sequence[str], tokenizer: NoteTokenizer, prompt: PromptConfig) -> TokenTrie:
    """Trie over each category's training-output tokens + EOS; each must decode back to its category."""
    sequences = []
    for category in categories:
        blank = Note(note_id=f"category {category!r}", title="", content="", topics=[], category=category)
        tokens = build_example(blank, tokenizer, prompt, "category").target_ids  # output + EOS
        decoded = tokenizer.decode(tokens[:-1])
        if decoded.lower().split() != category.lower().split():  # as the metrics compare (eval's `tokenize`)
            raise ValueError(f"category {category!r} decodes back as {decoded!r} under {tokenizer.source}: "
                             "constrained decoding could never produce it")
        sequences.append(tokens)
    return TokenTrie.build(sequences, tokenizer.eos_id)


def decode_budget(config: Config, trie: TokenTrie | None) -> int:
    """New tokens per prompt: the trie's depth when constrained (every category fits), else the config's."""
    return trie.depth if trie is not None else config.generation.max_new_tokens
