"""Host cache of the frozen bottom's hidden states, shared by training and embedding.

With `model.train_top_layers = k` the embedding table and the lower layers never change, and they see
only token ids: a sequence's features after the frozen layers are a pure function of its tokens. So
each distinct token sequence runs through the bottom once; every later batch (the next epoch, the
ablation runs, embedding the test notes for every fine-tuned variant) reads it back.

Keys are a hash of the real (unpadded) token ids; values are the features of the real positions only,
so a sequence cached under right padding is reused under left padding or another bucket length (a
token's features depend on the tokens before it, never on padding: positions come from the mask).
Padded positions of a returned batch hold zeros; they are masked out as attention keys and never read.
The cache can persist to one .npz file, named by a fingerprint of the frozen parameters.
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import jax
import numpy as np

from notellm_jax import sharding as shd

logger = logging.getLogger(__name__)


def fingerprint(tree) -> str:
    """Digest of every array in a parameter tree (path, shape, dtype and bytes)."""
    digest = hashlib.blake2b(digest_size=12)
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(tree), key=lambda kv: jax.tree_util.keystr(kv[0])):
        array = np.asarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}{array.shape}{array.dtype}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


class FeatureCache:
    """`cache(frozen_params, batch)` swaps `input_ids` for `hidden_in` = features after the frozen layers."""

    def __init__(self, model, mesh, frozen_layers: int, chunk: int = 8, path: Path | None = None):
        self.chunk = chunk  # missing rows run through the bottom in fixed-size chunks (one compilation per length)
        self.path = path
        self.store: dict[bytes, np.ndarray] = {}
        self.hits = 0
        self.misses = 0
        self._loaded = 0

        def bottom(frozen, ids, mask):
            with shd.axis_rules(mesh):
                return model.apply({"params": frozen}, ids, mask, frozen_layers, method=type(model).bottom)
        self._bottom = jax.jit(bottom)
        if path is not None and path.is_file():
            self._load(path)

    @staticmethod
    def key(ids: np.ndarray, mask: np.ndarray) -> bytes:
        return hashlib.blake2b(np.ascontiguousarray(ids[mask > 0], np.int32).tobytes(), digest_size=16).digest()

    def features(self, frozen: dict, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """[N, T, H] features after the frozen layers (zeros at padded positions)."""
        keys = [self.key(i, m) for i, m in zip(input_ids, attention_mask)]
        missing = list({k: row for row, k in reversed(list(enumerate(keys))) if k not in self.store}.values())
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        for start in range(0, len(missing), self.chunk):
            rows = missing[start:start + self.chunk]
            padded = rows + [rows[-1]] * (self.chunk - len(rows))
            out = np.asarray(self._bottom(frozen, input_ids[padded], attention_mask[padded]))
            for i, row in enumerate(rows):
                self.store[keys[row]] = out[i][attention_mask[row] > 0]
        hidden = self.store[keys[0]].shape[-1]
        result = np.zeros(input_ids.shape + (hidden,), np.float32)
        for row, k in enumerate(keys):
            result[row][attention_mask[row] > 0] = self.store[k]
        return result

    def __call__(self, frozen: dict, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v for k, v in batch.items() if k != "input_ids"}
        out["hidden_in"] = self.features(frozen, batch["input_ids"], batch["attention_mask"])
        return out

    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)

    def save(self) -> None:
        """Write the cache to `path` (atomically) if it grew since it was loaded."""
        if self.path is None or len(self.store) == self._loaded:
            return
        start = time.time()
        keys = list(self.store)
        lengths = np.array([len(self.store[k]) for k in keys], np.int64)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp.npz")
        np.savez(tmp, keys=np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), 16), lengths=lengths,
                 features=np.concatenate([self.store[k] for k in keys]))
        tmp.replace(self.path)
        self._loaded = len(self.store)
        logger.info("feature cache: %d sequences written to %s in %.1fs", len(keys), self.path, time.time() - start)

    def _load(self, path: Path) -> None:
        with np.load(path) as data:
            keys, lengths, features = data["keys"], data["lengths"], data["features"]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        for i, raw in enumerate(keys):
            self.store[raw.tobytes()] = features[offsets[i]:offsets[i + 1]]
        self._loaded = len(self.store)
        logger.info("feature cache: %d sequences loaded from %s", len(self.store), path)


def cache_path(data_dir: Path, checkpoint: str, frozen_layers: int, frozen_params) -> Path:
    """Where the cache of one frozen bottom lives: beside the prepared data, named by its weights."""
    name = Path(checkpoint).name.replace(":", "_")
    return data_dir / "feature_cache" / f"{name}-bottom{frozen_layers}-{fingerprint(frozen_params)}.npz"
