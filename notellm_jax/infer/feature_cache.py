"""Host cache of the frozen bottom's hidden states, shared by training and embedding.

With `model.train_top_layers = k` the embedding table and the lower layers never change, and they see
only token ids: a sequence's features after the frozen layers are a pure function of its tokens. So
each distinct token sequence runs through the bottom once; every later batch (the next epoch, the
ablation runs, embedding the test notes for every fine-tuned variant) reads it back.

Keys are a hash of the real (unpadded) token ids; values are the features of the real positions only,
so a sequence cached under right padding is reused under left padding or another bucket length (a
token's features depend on the tokens before it, never on padding: positions come from the mask).
Padded positions of a returned batch hold zeros; they are masked out as attention keys and never read.

Features are kept in the model's compute dtype (bf16 halves the store) up to `max_bytes`. In training
(`lru=False`) sequences missing beyond that are computed every time they come, and counted: an epoch
cycling over more sequences than fit would evict each before its reuse. The service (`lru=True`, its own
small cap `serve.feature_cache_max_mb`) evicts the least recently used sequences to make room instead. All misses of a batch run through
the bottom in one call whose row count is a bucket: the smallest of `min_rows`, 2 `min_rows`, 4 `min_rows`...
(a multiple of the mesh's batch devices) that holds them, capped at the batch's rows. So the cost follows
the misses, not the batch (a 64-row batch with 3 new sequences runs 8 rows, not 64), with at most
log2(batch / min_rows) + 1 compilations per batch length. The cache can
follow the prompt prefix's key/value cache (`infer.prefix`: the embedder's notes then run only their own
tokens through the bottom; their keys name the prefix). The cache can
persist to a folder, named by a fingerprint of the frozen parameters, that grows by one .npz part per
`save()` holding only the sequences added since the last one (no rewrite, no whole-store copy).
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from notellm_jax import sharding as shd
from notellm_jax.infer.prefix import prefix_decode

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

    def __init__(self, model, mesh, frozen_layers: int, path: Path | None = None, max_bytes: float = float("inf"),
                 min_rows: int = 8, lru: bool = False, prefix: Sequence[int] = (), prefix_kv: dict | None = None):
        """With `prefix` and its keys and values `prefix_kv` (`infer.prefix`, the frozen layers' only), the
        sequences given are what follows that prefix: their features are computed on top of its cache, and
        stored under keys that name the prefix (a sequence's features then differ from its own, alone)."""
        if min_rows < 1:
            raise ValueError(f"min_rows must be >= 1, got {min_rows}")
        if not max_bytes > 0:
            raise ValueError(f"the feature cache's max_bytes must be > 0, got {max_bytes}")
        self.path = path
        self.batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
        self.min_rows = -(-min_rows // self.batch_devices) * self.batch_devices
        self.dtype = np.dtype(model.llama.dtype)
        self.max_bytes, self.lru = max_bytes, lru
        self.store: OrderedDict[bytes, np.ndarray] = OrderedDict()  # least recently used first (with `lru`)
        self.bytes = 0
        self.evicted = 0
        self.hits = 0
        self.misses = 0
        self.uncached = 0  # misses not stored because the store was full
        self._unsaved: list[bytes] = []
        if bool(prefix) != (prefix_kv is not None):
            raise ValueError("a feature cache after a prompt prefix needs both the prefix and its key/value cache")
        self._salt = b"prefix:" + np.asarray(prefix, np.int32).tobytes() + b"|" if prefix else b""
        self._prefix_kv = prefix_kv

        def bottom(frozen, ids, mask, kv):
            with shd.axis_rules(mesh):
                if kv is None:
                    out = model.apply({"params": frozen}, ids, mask, frozen_layers, method=type(model).bottom)
                else:
                    out = model.apply({"params": frozen}, method=lambda m: prefix_decode(
                        m.decoder, ids, mask, kv, last_layer=frozen_layers, final_norm=False))
            return out.astype(self.dtype)
        self._bottom = jax.jit(bottom)
        if path is not None and path.is_dir():
            self._load(path)

    @staticmethod
    def key(ids: np.ndarray, mask: np.ndarray, salt: bytes = b"") -> bytes:
        """The store's key of one sequence: a digest of its real tokens (after `salt`, the prefix if any)."""
        return hashlib.blake2b(salt + np.ascontiguousarray(ids[mask > 0], np.int32).tobytes(), digest_size=16).digest()

    @property
    def size_bytes(self) -> int:
        """Bytes of features held."""
        return self.bytes

    @property
    def entries(self) -> int:
        """Sequences held."""
        return len(self.store)

    def _add(self, key: bytes, value: np.ndarray) -> bool:
        """Store `value` if it fits (with `lru`, after evicting the least recently used); False if not."""
        if value.nbytes > self.max_bytes or (not self.lru and self.bytes + value.nbytes > self.max_bytes):
            return False
        while self.bytes + value.nbytes > self.max_bytes:
            _, old = self.store.popitem(last=False)
            self.bytes -= old.nbytes
            self.evicted += 1
        self.store[key] = value
        self.bytes += value.nbytes
        return True

    def _get(self, key: bytes) -> np.ndarray:
        if self.lru:
            self.store.move_to_end(key)
        return self.store[key]

    def features(self, frozen: dict, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """[N, T, H] features after the frozen layers in the compute dtype (zeros at padded positions)."""
        keys = [self.key(i, m, self._salt) for i, m in zip(input_ids, attention_mask)]
        # Hits are read (and, with `lru`, marked used) before any miss is stored: storing may evict.
        values = {k: self._get(k) for k in dict.fromkeys(keys) if k in self.store}
        first_rows: dict[bytes, int] = {}
        for row, k in enumerate(keys):
            first_rows.setdefault(k, row)
        missing = [row for k, row in first_rows.items() if k not in values]  # in batch order, each key once
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if missing:
            padded = missing + [missing[-1]] * (self.bucket(len(missing), len(keys)) - len(missing))
            out = np.asarray(self._bottom(frozen, input_ids[padded], attention_mask[padded], self._prefix_kv))
            for i, row in enumerate(missing):
                values[keys[row]] = out[i][attention_mask[row] > 0]
                if self._add(keys[row], values[keys[row]]):
                    self._unsaved.append(keys[row])
                else:
                    self.uncached += 1
                    if self.uncached == 1:
                        logger.warning("feature cache full (%.2f GB): further sequences are recomputed each "
                                       "time (raise model.feature_cache_max_gb)", self.bytes / 1e9)
        result = np.zeros(input_ids.shape + (values[keys[0]].shape[-1],), self.dtype)
        for row, k in enumerate(keys):
            result[row][attention_mask[row] > 0] = values[k]
        return result

    def bucket(self, missing: int, rows: int) -> int:
        """Rows of the bottom call for `missing` new sequences of a `rows`-row batch (see the module doc)."""
        size = self.min_rows
        while size < missing:
            size *= 2
        return min(size, rows)

    def __call__(self, frozen: dict, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v for k, v in batch.items() if k != "input_ids"}
        out["hidden_in"] = self.features(frozen, batch["input_ids"], batch["attention_mask"])
        return out

    def clear(self) -> None:
        """Forget every held sequence (not the saved parts); counters stay."""
        self.store.clear()
        self.bytes, self._unsaved = 0, []

    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)

    def save(self) -> None:
        """Append the sequences added since the last save to `path` as one new part (written atomically)."""
        if self.path is None or not self._unsaved:
            return
        start = time.time()
        keys, self._unsaved = [k for k in self._unsaved if k in self.store], []  # less any evicted since
        if not keys:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        part = self.path / f"part-{len(list(self.path.glob('part-*.npz'))):05d}.npz"
        tmp = part.with_name(part.name + ".tmp.npz")
        features = np.concatenate([self.store[k] for k in keys])
        np.savez(tmp, keys=np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), 16),
                 lengths=np.array([len(self.store[k]) for k in keys], np.int64),
                 features=features.view(np.uint16) if features.dtype.itemsize == 2 else features,
                 dtype=np.array(str(features.dtype)))
        tmp.replace(part)
        logger.info("feature cache: %d sequences written to %s in %.1fs", len(keys), part, time.time() - start)

    def _load(self, path: Path) -> None:
        for part in sorted(path.glob("part-*.npz")):
            with np.load(part) as data:
                keys, lengths = data["keys"], data["lengths"]
                features = data["features"].view(np.dtype(str(data["dtype"])))
            if features.dtype != self.dtype:
                features = features.astype(self.dtype)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            for i, raw in enumerate(keys):
                if not self._add(raw.tobytes(), features[offsets[i]:offsets[i + 1]]):
                    break
        logger.info("feature cache: %d sequences loaded from %s", len(self.store), path)


def cache_path(data_dir: Path, checkpoint: str, frozen_layers: int, frozen_params) -> Path:
    """Where the cache of one frozen bottom lives: beside the prepared data, named by its weights."""
    name = Path(checkpoint).name.replace(":", "_")
    return data_dir / "feature_cache" / f"{name}-bottom{frozen_layers}-{fingerprint(frozen_params)}"
