"""The reference a cached decoder is checked against: greedy decoding by full recomputation."""
from __future__ import annotations

import numpy as np


def greedy_by_recomputation(lm, prompt: list[int], n_new: int, width: int) -> list[int]:
    """Greedy decoding without a cache: `lm.logits` over the full right-padded, fixed-width sequence
    every step (one compiled shape)."""
    tokens = list(prompt)
    for _ in range(n_new):
        ids = np.zeros((1, width), np.int32)
        ids[0, :len(tokens)] = tokens
        mask = (np.arange(width) < len(tokens)).astype(np.int32)[None]
        tokens.append(int(lm.logits(ids, mask)[0, len(tokens) - 1].argmax()))
    return tokens[len(prompt):]


def padded_batch(prompts: list[list[int]], length: int, side: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention mask) [len(prompts), length], each prompt left- or right-padded with 0."""
    ids = np.zeros((len(prompts), length), np.int32)
    mask = np.zeros_like(ids)
    for row, p in enumerate(prompts):
        keep = slice(length - len(p), length) if side == "left" else slice(0, len(p))
        ids[row, keep], mask[row, keep] = p, 1
    return ids, mask
