"""A 50 MB note costs no more to prompt than a normal one: only a bounded head of each field is ever
tokenised, and the prompt equals the one built from the field already cut to its token budget."""
from __future__ import annotations

import logging
import time

import pytest

from notellm_jax.config import PromptConfig
from notellm_jax.data.prompts import CHARS_PER_TOKEN, CUT_SLACK_TOKENS, Note, build_example, cut_to_tokens
from notellm_jax.weights.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)
SENTENCE = "Lily saw a big red ball in the park and she wanted to play with it. "


class RecordingTokenizer:
    """The real tokenizer, recording the length of every string it is asked to encode."""

    def __init__(self, tokenizer):
        self._tokenizer, self.encoded_lengths = tokenizer, []

    def encode(self, text, split_special_tokens=False):
        self.encoded_lengths.append(len(text))
        return self._tokenizer.encode(text, split_special_tokens=split_special_tokens)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.fixture(scope="module")
def tok(stories_dir):
    return load_tokenizer(stories_dir / "tok512.model")


def _timed_example(note: Note, tokenizer, cfg: PromptConfig):
    start = time.perf_counter()
    example = build_example(note, tokenizer, cfg, "category")
    return example, time.perf_counter() - start


def test_50mb_note_costs_what_a_normal_note_costs(tok):
    cfg = PromptConfig(max_length=256, title_max_tokens=20, content_max_tokens=80)
    huge_text = SENTENCE * (50_000_000 // len(SENTENCE))
    huge = Note("big", huge_text[:1_000_000], huge_text, ["ball", "park"], "stories")
    # A normal note that also fills both budgets (so both take the same shrink steps).
    normal = Note("small", SENTENCE * 2, SENTENCE * 20, ["ball", "park"], "stories")

    recorder = RecordingTokenizer(tok)
    normal_example, normal_s = _timed_example(normal, recorder, cfg)
    normal_longest = max(recorder.encoded_lengths)
    recorder.encoded_lengths.clear()
    huge_example, huge_s = _timed_example(huge, recorder, cfg)
    logger.warning("prompt of a %d-character note: %.4f s; of a %d-character note: %.4f s",
                   len(normal.content), normal_s, len(huge.content), huge_s)
    print(f"prompt build: normal note {normal_s:.4f} s, 50 MB note {huge_s:.4f} s")

    # The cost (timed above, not asserted: the machine is shared) is bounded because the tokenizer never saw
    # more than the bounded heads plus the template text around them.
    bound = (cfg.content_max_tokens + CUT_SLACK_TOKENS) * CHARS_PER_TOKEN
    assert max(recorder.encoded_lengths) <= bound + 2 * (normal_longest + cfg.title_max_tokens * CHARS_PER_TOKEN)
    assert max(recorder.encoded_lengths) < 20_000 < len(huge.content) // 1000

    # Same prompt as from the fields cut to their budgets by the tokenizer itself (on a 200k-character head,
    # far beyond any token's reach).
    title_ids = tok.encode(huge.title[:200_000], split_special_tokens=True)[:cfg.title_max_tokens]
    content_ids = tok.encode(huge.content[:200_000], split_special_tokens=True)[:cfg.content_max_tokens]
    reference = Note("big", tok.decode(title_ids), tok.decode(content_ids), huge.topics, huge.category)
    assert huge_example.input_ids == build_example(reference, tok, cfg, "category").input_ids
    assert len(huge_example.input_ids) <= cfg.max_length
    assert len(tok.encode(cut_to_tokens(tok, huge.content, 80), split_special_tokens=True)) == 80
