"""A recipe run with several seeds (`job.seeds`): where each seed works, and its figures pooled.

Seed i uses train.seed + i and data.seed + i: the training order, the validation hold-out and the
training-pair sample change (and so SentenceBERT's fine-tune, which reads the same pairs and train.seed);
the test notes and pairs do not, so every seed answers the same queries. Seed 0 is today's single run in
<work_dir> itself (a finished one-seed run is seed 0 of a multi-seed one); seed i > 0 works in
<work_dir>/seeds/<i>/ with its own prepared data, its frozen-feature cache a link to seed 0's (a
sequence's frozen features depend on its tokens and the frozen weights alone). Baselines that no seed
changes (all but `SEEDED_BASELINES`) run once, in <work_dir>. Each seed's stages skip what exists, so a
stopped run resumes where it stopped.

Pooling (retrieval.py's module docstring): per model and site group, each seed's R@k, their mean and
standard deviation (ddof 1), and the reference model (the first trained variant) minus every other one
with a paired interval that resamples queries, each carrying all its seeds.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from notellm_jax.config import Config, override
from notellm_jax.errors import InputFormatError, MissingInputError
from notellm_jax.eval.baselines import SEEDED_BASELINES
from notellm_jax.eval.retrieval import group_masks, paired_difference


def seed_configs(config: Config) -> list[Config]:
    """One config per seed: `config` itself first, then seed i's in <work_dir>/seeds/<i>."""
    configs = [config]
    for i in range(1, config.job.seeds):
        work = config.work_dir / "seeds" / str(i)
        configs.append(override(config, {
            "name": f"{config.name}-seed{i}", "paths.work_dir": str(work), "paths.data_dir": str(work / "data"),
            "train.seed": config.train.seed + i, "data.seed": config.data.seed + i,
            "job.baselines": tuple(b for b in config.job.baselines if b in SEEDED_BASELINES)}))
    return configs


def share_feature_cache(first: Config, other: Config) -> None:
    """Make `other`'s frozen-feature cache folder a link to `first`'s (created if missing)."""
    target, link = (first.data_dir / "feature_cache").absolute(), other.data_dir / "feature_cache"
    if link.is_symlink() or link.exists():
        return
    target.mkdir(parents=True, exist_ok=True)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=True)


def recall_path(configs: list[Config], index: int, model: str) -> Path:
    """Where seed `index` keeps `model`'s recall result (a model no seed changes: seed 0's work dir)."""
    seeded = model in configs[0].job.train_variants or model in SEEDED_BASELINES
    return (configs[index] if seeded else configs[0]).work_dir / "eval" / f"{model}.recall.json"


def seed_ranks(configs: list[Config], model: str) -> tuple[np.ndarray, list[str | None] | None]:
    """([S, Q] per-query ranks of `model`, one row per seed, and the queries' sites) from its recall results."""
    rows, digests, sites = [], set(), None
    for index in range(len(configs)):
        path = recall_path(configs, index, model)
        if not path.is_file():
            raise MissingInputError(f"{path}: no recall result of {model} for seed {index}: run its job stages")
        co = json.loads(path.read_text())["cooccurrence"]
        if co.get("ranks") is None:
            raise InputFormatError(f"{path}: no per-query ranks (rerun its recall stage)")
        rows.append(co["ranks"])
        digests.add(co.get("queries_digest"))
        sites = sites or co.get("query_sites")
    if len(digests) != 1:
        raise InputFormatError(f"the seeds of {model} were scored on different query lists ({sorted(map(str, digests))})")
    return np.asarray(rows, np.int64), sites


def _per_seed(ranks: np.ndarray, ks: list[int]) -> dict[str, Any]:
    per_seed = (ranks[:, :, None] < np.asarray(ks)).mean(axis=1)  # [S, K]
    spread = per_seed.std(axis=0, ddof=1) if len(per_seed) > 1 else np.zeros(len(ks))
    return {"per_seed": per_seed.tolist(), "mean": per_seed.mean(axis=0).tolist(), "sd": spread.tolist()}


def seed_summary(config: Config, configs: list[Config], models: list[str], ks: list[int]) -> dict[str, Any]:
    """{"seeds": [train seeds], "ks", "reference", "groups": {group: {"queries", "models": {model: per-seed R@k,
    mean, sd}, "differences": {model: reference minus model, paired over queries pooled across seeds}}}}."""
    ranks, sites = {}, None
    for model in models:
        ranks[model], model_sites = seed_ranks(configs, model)
        sites = sites or model_sites
    reference = models[0]
    ev = config.retrieval
    masks = group_masks(sites or [], ev.site_groups) or {"all": np.ones(ranks[reference].shape[1], bool)}
    groups = {}
    for name, mask in masks.items():
        groups[name] = {
            "queries": int(mask.sum()),
            "models": {m: _per_seed(ranks[m][:, mask], ks) for m in models},
            "differences": {m: paired_difference(ranks[reference][:, mask], ranks[m][:, mask], ks,
                                                 ev.bootstrap_samples, ev.bootstrap_seed) for m in models[1:]}}
    return {"seeds": [c.train.seed for c in configs], "ks": ks, "reference": reference, "groups": groups}
