"""Generated category and hashtags of a note in the service (`notellm serve --generate`).

The offline tool's decoder serves them: `notellm_jax.infer.generator.Generator` (greedy decoding with the KV
cache, `model.decode.greedy_decode`), with the tool's prompts (`generation_prompt`: a note without topics
gets no hashtag prompt), budgets (`decode_budget`) and, when constrained, its category trie over the
training notes' categories. Each task has its own `Batcher`, so concurrent requests share one decode call.
Shapes are fixed so that each task compiles once, at the warm-up: prompts are left-padded to
prompt.max_length rounded up to the tool's PAD_MULTIPLE, and a batch is filled to serve.max_batch_size with
copies of its last prompt (as the tool fills its last batch). Positions come from the attention mask, so the
pad length does not change what is generated: the text equals the tool's for the same note and settings
(tests/integration/test_serve_e2e.py).
"""
from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from notellm_jax.config import Config
from notellm_jax.data.prompts import TASKS, Note, example_from_tokens
from notellm_jax.infer.encoder import was_cut
from notellm_jax.infer.generator import PAD_MULTIPLE, Generator, category_trie, decode_budget, generation_prompt
from notellm_jax.serve.batching import Batcher

NO_TOPICS = ("the note has no topics: the hashtag prompt asks for min(prompt.max_topics, #topics) of them, "
             "as the offline generate tool does")


class NoteGenerator:
    """Batched, fixed-shape generation for the service; `categories` (the closed set) constrains the category."""

    def __init__(self, config: Config, export_dir: str | Path, categories: Sequence[str] | None = None):
        self.gen = Generator(config, export_dir)
        self.trie = category_trie(categories, self.gen.tokenizer, self.gen.prompt) if categories else None
        self.length = -(-self.gen.prompt.max_length // PAD_MULTIPLE) * PAD_MULTIPLE
        self.batch_size = config.serve.max_batch_size
        self.penalty = config.generation.repetition_penalty
        self.budget = {"category": decode_budget(config, self.trie), "hashtag": decode_budget(config, None)}
        self.batchers = {task: Batcher(functools.partial(self._decode, task), lambda _: self.length, self.batch_size,
                                       config.serve.max_wait_ms / 1000, rows=(self.batch_size,)) for task in TASKS}

    @property
    def constrained(self) -> bool:
        return self.trie is not None

    def _decode(self, task: str, token_lists: Sequence[list[int]]) -> list[list[int]]:
        """Generated tokens (cut after EOS) of up to batch_size generation prompts of `task`."""
        # A generation prompt (with_output=False) is all input: decoding reads only its input_ids.
        examples = [example_from_tokens(tokens, 0, len(tokens), task) for tokens in token_lists]
        examples += [examples[-1]] * (self.batch_size - len(examples))
        trie = self.trie if task == "category" else None
        return self.gen.decode(examples, self.length, self.budget[task], self.penalty, trie)[:len(token_lists)]

    def start(self) -> None:
        for batcher in self.batchers.values():
            batcher.start()

    async def stop(self) -> None:
        await asyncio.gather(*(batcher.stop() for batcher in self.batchers.values()))

    def warm_up(self) -> dict[str, float]:
        """Compile each task's decode program (one call each); seconds per task."""
        seconds = {}
        for task, batcher in self.batchers.items():
            start = time.perf_counter()
            batcher.embed_now([[self.gen.tokenizer.pad_id]])
            seconds[task] = round(time.perf_counter() - start, 3)
        return seconds

    async def generate(self, note: Note, tasks: Sequence[str]) -> dict[str, Any]:
        """{task: {text, finished} or None (no prompt: see `skipped`), truncated, skipped}; PromptTooLongError
        if a prompt cannot fit prompt.max_length."""
        prompts = await asyncio.to_thread(  # tokenising off the event loop: it keeps answering meanwhile
            lambda: {task: generation_prompt(note, task, self.gen.tokenizer, self.gen.prompt) for task in tasks})
        kept = {task: example for task, example in prompts.items() if example is not None}
        rows = await asyncio.gather(*(self.batchers[task].submit([ex.input_ids]) for task, ex in kept.items()))
        out: dict[str, Any] = {task: None for task in tasks}
        out.update({task: self.gen.output(generated[0]) for task, generated in zip(kept, rows)})
        out["truncated"] = any(was_cut(note, ex, self.gen.tokenizer, self.gen.prompt) for ex in kept.values())
        out["skipped"] = {task: NO_TOPICS for task in tasks if task not in kept}
        return out
