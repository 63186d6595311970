"""ScaNN cosine index: tree partitioning + asymmetric hashing + exact float reordering.

Also the two vector helpers every index user shares: `l2_normalise` (cosine = dot) and
`neighbour_overlap` (ANN recall against exact search).

`scann` is imported inside the functions that need it: the model and training path, and GPU
machines without ScaNN, import this package without it. Parameters come from config.retrieval.scann_*;
0 means "chosen from the index size" (`choose_params`), following ScaNN's own guidance: about
sqrt(N) leaves, search ~10% of them, score with 2-dimension AH blocks, reorder a few hundred
candidates exactly. Tiny pools (< TREE_MIN_POINTS) get exact brute-force scoring: a tree there
costs more than it saves and only loses recall.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path

import numpy as np

from notellm_jax.config import RetrievalConfig
from notellm_jax.errors import MissingInputError, StoreFormatError

TREE_MIN_POINTS = 10_000


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Unit rows (cosine = dot). Embeddings should already be unit length; a zero row is an error."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a [notes, dim] matrix, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    bad = np.flatnonzero(~(norms[:, 0] > 0) | ~np.isfinite(norms[:, 0]))
    if bad.size:
        rows = ", ".join(map(repr, bad[:5].tolist())) + (f" (and {bad.size - 5} more)" if bad.size > 5 else "")
        raise ValueError(f"{bad.size} embedding rows are zero or not finite (rows {rows})")
    return x / norms


def neighbour_overlap(approx: np.ndarray, exact: np.ndarray) -> float:
    """ANN recall relative to exact search: share of the exact top-k that the ANN list also returns."""
    approx, exact = np.asarray(approx), np.asarray(exact)
    if approx.shape[0] != exact.shape[0]:
        raise ValueError(f"{approx.shape[0]} ANN lists vs {exact.shape[0]} exact lists")
    hits = sum(len(np.intersect1d(a, e)) for a, e in zip(approx, exact))
    return hits / exact.size


@dataclasses.dataclass(frozen=True)
class ScannParams:
    num_leaves: int          # 0 = no tree: exact brute-force scoring
    leaves_to_search: int
    reorder: int             # candidates re-scored exactly after AH scoring
    dims_per_block: int = 2  # AH block size (ScaNN's recommendation for dot product)
    anisotropic_threshold: float = 0.2  # AH noise shaping for maximum inner product (ScaNN's example)

    @property
    def brute_force(self) -> bool:
        return self.num_leaves == 0


def choose_params(num_points: int, k: int, cfg: RetrievalConfig) -> ScannParams:
    """Index parameters for `num_points` vectors and k neighbours: config values, 0 = by size."""
    if num_points < 1:
        raise ValueError("cannot build a ScaNN index over zero vectors")
    if not 1 <= k <= num_points:
        raise ValueError(f"k={k} is outside 1..{num_points}, the number of indexed vectors")
    num_leaves = cfg.scann_num_leaves or (0 if num_points < TREE_MIN_POINTS else round(math.sqrt(num_points)))
    if num_leaves > num_points:
        raise ValueError(f"retrieval.scann_num_leaves={num_leaves} exceeds the {num_points} indexed vectors")
    leaves_to_search = cfg.scann_leaves_to_search or max(1, math.ceil(num_leaves / 10))
    if num_leaves and leaves_to_search > num_leaves:
        raise ValueError(f"retrieval.scann_leaves_to_search={leaves_to_search} exceeds num_leaves={num_leaves}")
    reorder = cfg.scann_reorder or min(num_points, max(250, 10 * k))
    if reorder < k:
        raise ValueError(f"retrieval.scann_reorder={reorder} is smaller than k={k}")
    return ScannParams(num_leaves, leaves_to_search if num_leaves else 0, reorder)


def scann_pybind():
    """ScaNN's numpy API (`scann_ops_pybind`), imported without TensorFlow. `import scann` also imports
    TensorFlow whenever it is installed (about 6 s on the project's CPU machines), only for ScaNN's TF ops,
    which nothing here uses; unless TensorFlow is loaded already it is hidden for that one import (its
    ModuleNotFoundError is what scann's __init__ expects when TF is absent) and visible again at once."""
    if "scann" not in sys.modules and "tensorflow" not in sys.modules:
        sys.modules["tensorflow"] = None  # `import tensorflow` now raises ModuleNotFoundError
        try:
            import scann  # noqa: F401  (ScaNN: lazy, absent on GPU machines)
        finally:
            del sys.modules["tensorflow"]
    from scann import scann_ops_pybind  # ScaNN: lazy, absent on GPU machines
    return scann_ops_pybind


def build_index(database: np.ndarray, k: int, params: ScannParams, threads: int | None = None):
    """A ScaNN searcher over the unit-normalised rows of `database` (dot product = cosine)."""
    scann_ops_pybind = scann_pybind()  # lazy: absent on GPU machines

    database = l2_normalise(database)
    builder = scann_ops_pybind.builder(database, k, "dot_product")
    if params.brute_force:
        builder = builder.score_brute_force()
    else:
        builder = builder.tree(num_leaves=params.num_leaves, num_leaves_to_search=params.leaves_to_search,
                               training_sample_size=len(database))
        builder = builder.score_ah(params.dims_per_block,
                                   anisotropic_quantization_threshold=params.anisotropic_threshold)
        builder = builder.reorder(params.reorder)
    return builder.set_n_training_threads(threads or os.cpu_count() or 1).build()


def search(searcher, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (indices [Q, k] int64, cosine scores [Q, k]) for unit-normalised queries, multi-threaded."""
    if len(queries) == 0:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    indices, scores = searcher.search_batched_parallel(l2_normalise(queries), final_num_neighbors=k)
    indices = np.asarray(indices, np.int64)
    if indices.shape != (len(queries), k):
        raise ValueError(f"ScaNN returned neighbour lists of shape {indices.shape}, expected {(len(queries), k)} "
                         "(is k larger than the index?)")
    return indices, np.asarray(scores, np.float32)


def refuse_pickles(directory: str | os.PathLike) -> None:
    """Index folders never hold pickles: loading one would run whatever code it names. ScaNN's own
    `load_searcher` unpickles `scann_docids.pkl`, so the project keeps ids itself and refuses the folder."""
    found = sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*.pkl"))
    if found:
        raise StoreFormatError(f"{directory}: refusing to load an index folder holding pickle files ({found[:5]}); "
                               "indexes written by notellm_jax keep ids in plain files, never pickles")


def save_index(searcher, directory: str | os.PathLike) -> Path:
    """Serialise the searcher (ScaNN's own asset files, no pickle) into `directory`, created if needed."""
    if getattr(searcher, "docids", None) is not None:
        raise ValueError("a searcher built with docids would be saved with a pickle (scann_docids.pkl): "
                         "keep ids outside ScaNN")
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    # Asset paths relative to the folder: it reloads from wherever it is moved (or was named relatively).
    searcher.serialize(str(directory), relative_path=True)
    return directory


def load_index(directory: str | os.PathLike):
    """Reload a searcher written by `save_index`. A folder without ScaNN assets is an error, and one holding
    any pickle is refused; ScaNN's `load_searcher` is bypassed because it unpickles docids."""
    scann_ops_pybind = scann_pybind()

    directory = Path(directory).absolute()
    assets = directory / "scann_assets.pbtxt"
    if not assets.is_file():
        raise MissingInputError(f"{directory} holds no ScaNN index (scann_assets.pbtxt missing)")
    refuse_pickles(directory)
    raw = scann_ops_pybind.scann_pybind.ScannNumpy(str(directory), assets.read_text())
    return scann_ops_pybind.ScannSearcher(raw)


def clustered_vectors(num: int, dim: int, num_clusters: int, seed: int, noise: float = 0.15) -> np.ndarray:
    """Unit vectors scattered around random unit centres: benchmark/test data with real neighbourhoods.

    noise is the per-dimension std; at d=128 and 0.15 the offset from the centre (norm ~1.7) is larger
    than the centre itself, so clusters overlap and ANN search is not trivially easy.
    """
    rng = np.random.default_rng(seed)
    centres = l2_normalise(rng.normal(size=(num_clusters, dim)))
    points = centres[rng.integers(0, num_clusters, num)] + rng.normal(scale=noise, size=(num, dim))
    return l2_normalise(points)
