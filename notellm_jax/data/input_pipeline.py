"""The training input: batches of pairs read from the tokenised shards (written by data/shards.py).

`make_train_dataset` streams one host's pairs: whole files per host when the file count divides by the
host count, else `ds.shard(process_count, process_index)` over records. Each epoch is a seeded full
shuffle (seed = (train.seed, epoch)) cut to `steps_per_epoch` local batches, the same number on every
host, so a host never waits for another; pairs beyond steps * global batch sit out that epoch (a
different set each epoch). Resuming at step s replays epoch s // steps from batch s % steps, which
yields exactly the batches of an uninterrupted run. `make_numpy_train_dataset` reads the same tokens
from tokens.npz with numpy alone (one process). TensorFlow is imported inside functions only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import jax
import numpy as np

from notellm_jax.config import Config
from notellm_jax.data import store
from notellm_jax.data.prompts import Example, example_from_tokens, pad_batch
from notellm_jax.data.self_positives import SelfPositives
from notellm_jax.data.shards import (SIDES, TOKEN_ARRAYS, VARIANTS, parse_spec, read_shards_meta, shard_file,
                                     shards_dir)
from notellm_jax.errors import ConfigError, DataQualityError, StoreFormatError
from notellm_jax.model.batch import BatchDims, batch_shapes
from notellm_jax.model.families import LlamaConfig


def _tf():
    import tensorflow as tf  # lazy: model and train code must import without TensorFlow

    return tf


def _token_batch(tokens: dict, pairs: np.ndarray) -> dict:
    """Rows of `tokens.npz` for [b, 2] pairs in the layout `_assemble` reads (that of the parsed shards)."""
    out = {}
    for column, side in enumerate(SIDES):
        index = pairs[:, column]
        out[f"{side}note_index"] = index
        for short in VARIANTS:
            offsets, ids = tokens[f"{short}_offsets"], tokens[f"{short}_ids"]
            out[f"{side}{short}_ids"] = [ids[offsets[i]:offsets[i + 1]].astype(np.int64) for i in index]
            out[f"{side}{short}_emb"] = tokens[f"{short}_emb"][index].astype(np.int64)
            out[f"{side}{short}_prefix"] = tokens[f"{short}_prefix"][index].astype(np.int64)
    return out


def make_numpy_train_dataset(config: Config, data_dir: Path, split: str = "train",
                             start_step: int = 0) -> Iterator[dict]:
    """`make_train_dataset` for one process without TensorFlow: each epoch a seeded permutation of the
    split's pairs (from `tokens.npz`) cut into `steps_per_epoch` batches; resumable from any step."""
    meta = read_shards_meta(config, data_dir)
    path = shards_dir(data_dir) / TOKEN_ARRAYS
    with np.load(path) as data:
        tokens = {k: data[k] for k in data.files if k != "note_id"}
        note_ids = data["note_id"]
    if f"{split}_pairs" not in tokens:
        raise ValueError(f"{path}: no {split} pairs (pairs_{split}.parquet was absent at prepare time)")
    pairs, b = tokens[f"{split}_pairs"], _local_batch_pairs(config, 1)
    steps = len(pairs) // b
    if steps == 0:
        raise DataQualityError(f"{path}: {split}: {len(pairs)} pairs give no full batch of {b} pairs")
    # Validation batches stay uniform and unchanged: their loss compares settings.
    training = split == "train"
    categories = _pair_categories(data_dir, note_ids, pairs) if training and config.train.batch_by_category else None
    views = SelfPositives(config, data_dir, note_ids) if training and config.train.self_positive_weight > 0 else None
    step = start_step
    while True:
        epoch, index = divmod(step, steps)
        rng = np.random.default_rng([config.train.seed, epoch])
        order = rng.permutation(len(pairs)) if categories is None else category_order(categories, b, rng)
        batch = _token_batch(tokens, pairs[order[index * b:(index + 1) * b]])
        if views is not None:
            views.substitute(batch, step)
        yield _assemble(batch, config, meta, step, 0, b)
        step += 1


def _pair_categories(data_dir: Path, note_ids: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """[pairs] the category of each pair's first note (notes.parquet), as a string array."""
    table = store.read_columns(Path(data_dir) / "notes.parquet", ("note_id", "category")).to_pydict()
    category_of = dict(zip(table["note_id"], table["category"]))
    return np.asarray([str(category_of[str(note_ids[i])]) for i in pairs[:, 0]])


def category_order(categories: np.ndarray, b: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of the pairs whose consecutive blocks of `b` are the batches of `train.batch_by_category`
    (hard negatives): each category's pairs, shuffled, cut into whole batches of that category; the pairs
    left over (fewer than b per category) are pooled, shuffled, into mixed batches at the end of the
    permutation, then the order of all whole batches is shuffled. Every pair is used once, and the number
    of whole batches is the same as a plain permutation's (floor(pairs / b))."""
    whole, rest = [], []
    for category in np.unique(categories):
        members = rng.permutation(np.flatnonzero(categories == category))
        cut = len(members) - len(members) % b
        whole.extend(members[:cut].reshape(-1, b))
        rest.extend(members[cut:])
    rest = rng.permutation(np.asarray(rest, np.int64))
    cut = len(rest) - len(rest) % b
    blocks = whole + list(rest[:cut].reshape(-1, b))
    blocks = [blocks[i] for i in rng.permutation(len(blocks))]
    return np.concatenate([*blocks, rest[cut:]]).astype(np.int64) if blocks else rest


def _shard_paths(data_dir: Path, stem: str, meta: dict) -> list[Path]:
    if stem not in meta["files"]:
        raise ValueError(f"no {stem} shards under {shards_dir(data_dir)} (pairs_{stem}.parquet was absent)")
    return [shard_file(data_dir, stem, i, meta["num_shards"]) for i in range(meta["num_shards"])]


def _host_split(meta: dict, split: str, process_index: int, process_count: int) -> tuple[list[int], bool, int]:
    """(file ids this host reads, whether to shard records, this host's record count)."""
    per_file = meta["files"][split]
    if len(per_file) % process_count == 0:
        mine = list(range(process_index, len(per_file), process_count))
        return mine, False, sum(per_file[i] for i in mine)
    total = sum(per_file)
    return list(range(len(per_file))), True, len(range(process_index, total, process_count))


def _local_batch_pairs(config: Config, process_count: int) -> int:
    b, rem = divmod(config.train.batch_pairs, process_count)
    if rem or b == 0:
        raise ValueError(f"train.batch_pairs={config.train.batch_pairs} must be a positive multiple of "
                         f"process_count={process_count}")
    return b


def steps_per_epoch(config: Config, data_dir: Path, split: str = "train", process_count: int = 1) -> int:
    """Global batches per epoch: the same on every host (the smallest host's share decides)."""
    meta = read_shards_meta(config, data_dir)
    _shard_paths(data_dir, split, meta)
    b = _local_batch_pairs(config, process_count)
    return min(_host_split(meta, split, h, process_count)[2] for h in range(process_count)) // b


def _to_numpy(parsed: dict) -> dict:
    """Ragged id lists become Python lists of arrays; everything else numpy."""
    out = {}
    for key, value in parsed.items():
        if hasattr(value, "row_lengths"):
            splits = np.cumsum(value.row_lengths().numpy())[:-1]
            out[key] = np.split(value.flat_values.numpy(), splits)
        else:
            out[key] = value.numpy()
    return out


def _variant_example(batch: dict, side: str, short: str, row: int, with_output: bool = True) -> Example | None:
    emb = int(batch[f"{side}{short}_emb"][row])
    if emb < 0:
        return None
    ids = batch[f"{side}{short}_ids"][row].tolist()
    prefix = int(batch[f"{side}{short}_prefix"][row])
    return example_from_tokens(ids if with_output else ids[:prefix], emb, prefix, VARIANTS[short])


def _hashtag_rows(config: Config, eligible: np.ndarray, step: int, process_index: int) -> np.ndarray:
    """round(r * 2b) rows (half up) for the hashtag task, drawn among notes that have a hashtag variant."""
    want = int(np.floor(config.prompt.hashtag_fraction * len(eligible) + 0.5))
    rng = np.random.default_rng([config.train.seed, step, process_index])
    candidates = np.flatnonzero(eligible)
    return rng.choice(candidates, size=min(want, len(candidates)), replace=False)


def _assemble(batch: dict, config: Config, meta: dict, step: int, process_index: int, b: int) -> dict:
    """Local batch [a_1..a_b, b_1..b_b] with the task of each note chosen per (seed, step, host)."""
    rows = [(side, i) for side in SIDES for i in range(b)]
    eligible = np.array([batch[f"{side}hash_emb"][i] >= 0 for side, i in rows])
    use_hashtag = np.zeros(2 * b, bool)
    use_hashtag[_hashtag_rows(config, eligible, step, process_index)] = True
    examples = [_variant_example(batch, side, "hash" if h else "cat", i) for (side, i), h in zip(rows, use_hashtag)]
    out = pad_batch(examples, config.prompt.max_length, config.prompt.padding_side, meta["pad_id"],
                    config.prompt.max_targets)
    note_index = np.array([batch[f"{side}note_index"][i] for side, i in rows], np.int64)
    out["pair_id"] = np.tile(np.arange(b, dtype=np.int32) + process_index * b, 2)
    out["note_index"] = note_index
    return out


def _host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    return process_index, process_count


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint32)[0])


def _pair_source(tf, config: Config, data_dir: Path, split: str, paths: list[Path], file_ids: list[int],
                 meta: dict):
    """(records(): this host's records in file order, parse(ds, b): batches of parsed features).

    data.train_input "tfds" reads the same records from the notellm_prepared/pairs dataset: the host's
    files become TFDS index ranges (file i = records [start_i, start_i + count_i)), read in order."""
    if config.data.train_input == "shards":
        spec = parse_spec(tf, SIDES)
        return (lambda: tf.data.TFRecordDataset([str(paths[i]) for i in file_ids]),
                lambda ds, b: ds.batch(b, drop_remainder=True).map(lambda x: tf.io.parse_example(x, spec)))
    if config.data.train_input != "tfds":
        raise ConfigError(f"data.train_input={config.data.train_input!r}: expected 'shards' or 'tfds'")
    import tensorflow_datasets as tfds  # TensorFlow Datasets: only for data.train_input="tfds"

    from notellm_jax.data.tfds_dataset import load_builder  # TensorFlow Datasets, as above

    builder = load_builder(data_dir, "pairs")
    if builder.info.metadata["shards_meta"]["prompt_hash"] != meta["prompt_hash"]:
        raise StoreFormatError(f"{builder.data_dir}: built from other shards than {shards_dir(data_dir)}; "
                               "rerun prepare --stages tfds --force")
    starts = np.concatenate([[0], np.cumsum(meta["files"][split])]).tolist()
    ranges = "+".join(f"{split}[{starts[i]}:{starts[i + 1]}]" for i in file_ids if starts[i + 1] > starts[i])
    read = tfds.ReadConfig(interleave_cycle_length=1, shuffle_seed=None)
    return (lambda: builder.as_dataset(split=ranges, shuffle_files=False, read_config=read),
            lambda ds, b: ds.ragged_batch(b, drop_remainder=True))


def make_train_dataset(config: Config, data_dir: Path, split: str = "train", process_index: int | None = None,
                       process_count: int | None = None, start_step: int = 0) -> Iterator[dict]:
    """Endless iterator of this host's numpy batches from global step `start_step` on (epochs repeat)."""
    tf = _tf()
    process_index, process_count = _host(process_index, process_count)
    meta = read_shards_meta(config, data_dir)
    paths = _shard_paths(data_dir, split, meta)
    b = _local_batch_pairs(config, process_count)
    file_ids, shard_records, host_records = _host_split(meta, split, process_index, process_count)
    steps = steps_per_epoch(config, data_dir, split, process_count)
    if steps == 0:
        raise DataQualityError(f"{data_dir}: {split}: {sum(meta['files'][split])} pairs give no full batch of "
                         f"{config.train.batch_pairs} pairs over {process_count} host(s)")
    records, parse = _pair_source(tf, config, data_dir, split, paths, file_ids, meta)
    buffer = config.data.shuffle_buffer or host_records
    epoch, offset = divmod(start_step, steps)
    step = start_step
    while True:
        ds = records()
        if shard_records:
            ds = ds.shard(process_count, process_index)
        ds = parse(ds.shuffle(buffer, seed=_epoch_seed(config.train.seed, epoch), reshuffle_each_iteration=False)
                   .take(steps * b).skip(offset * b), b).prefetch(2)
        for parsed in ds:
            yield _assemble(_to_numpy(parsed), config, meta, step, process_index, b)
            step += 1
        epoch, offset = epoch + 1, 0


# ----------------------------------------------------------------------------------------------------
# What the trainer iterates: real or synthetic batches, and how many steps a run has


def synthetic_batches(config: Config, llama_cfg: LlamaConfig, start_step: int, *, process_index: int | None = None,
                      process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Random token batches with the pipeline's shapes and layout, for performance runs (no TF needed).

    A step's GLOBAL batch depends on (seed, step) alone; host h keeps pairs [h*b, (h+1)*b), laid out
    [a..., b...] like the pipeline, so any process count trains on the same global batch (up to row order).
    """
    host = jax.process_index() if process_index is None else process_index
    b = config.train.batch_pairs // (jax.process_count() if process_count is None else process_count)
    n, length, targets = 2 * b, config.prompt.max_length, config.prompt.max_targets
    spec = batch_shapes(BatchDims(n, length, targets))  # {key: (shape, dtype)} of the pipeline's keys
    step = start_step
    while True:
        rng = np.random.default_rng([config.train.seed, step])

        def draw(key: str) -> np.ndarray:
            """This host's rows of a global (side, pair, *shape) draw of random token ids."""
            shape, dtype = spec[key]
            full = rng.integers(0, llama_cfg.vocab_size - 1, (2, config.train.batch_pairs, *shape[1:]), dtype=dtype)
            return full[:, host * b:(host + 1) * b].reshape(shape)

        embed_read_pos = np.full((n,), length - targets - 2, np.int32)
        positions = (embed_read_pos[:, None] + 2 + np.arange(targets)[None, :]).astype(np.int32)
        pair = np.arange(b, dtype=np.int32) + host * b
        batch = {"input_ids": draw("input_ids"), "attention_mask": np.ones(*spec["attention_mask"]),
                 "embed_read_pos": embed_read_pos, "target_positions": np.minimum(positions, length - 1),
                 "target_ids": draw("target_ids"), "target_mask": np.ones(*spec["target_mask"]),
                 "pair_id": np.concatenate([pair, pair]), "note_index": np.concatenate([2 * pair, 2 * pair + 1])}
        yield {k: batch[k].astype(spec[k][1], copy=False) for k in spec}
        step += 1


def batches(config: Config, llama_cfg: LlamaConfig, split: str, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    if config.train.synthetic_data:
        return synthetic_batches(config, llama_cfg, start_step)
    if config.data.train_input == "numpy":  # one process (Config.validate)
        return make_numpy_train_dataset(config, config.data_dir, split=split, start_step=start_step)
    return iter(make_train_dataset(config, config.data_dir, split=split,
                                            process_index=jax.process_index(),
                                            process_count=jax.process_count(), start_step=start_step))


def check_one_batch(config: Config, process_count: int = 1) -> int:
    """Training batches per epoch of the prepared data; none is a DataQualityError naming the folder, the
    pairs per split and train.batch_pairs (instead of a run that dies later on an empty input). So is a
    validation split without one batch when the run validates (train.eval_batches > 0): checked before
    training, not found after it."""
    per_epoch = steps_per_epoch(config, config.data_dir, process_count=process_count)
    if per_epoch <= 0:
        counts = {split: sum(files) for split, files in read_shards_meta(config, config.data_dir)["files"].items()}
        raise DataQualityError(
            f"{config.data_dir}: the prepared data cannot give one training batch: pairs per split {counts} vs "
            f"train.batch_pairs={config.train.batch_pairs} over {process_count} process(es); lower "
            f"train.batch_pairs or prepare more data (stats.json there has each stage's counts)")
    if config.train.eval_batches > 0 and steps_per_epoch(config, config.data_dir, "val", process_count) <= 0:
        val = sum(read_shards_meta(config, config.data_dir)["files"]["val"])
        raise DataQualityError(
            f"{config.data_dir}: {val} validation pairs cannot give one batch of train.batch_pairs="
            f"{config.train.batch_pairs} over {process_count} process(es), and train.eval_batches="
            f"{config.train.eval_batches} asks for validation; raise data.val_fraction, lower train.batch_pairs "
            f"or set train.eval_batches=0")
    return per_epoch


def total_train_steps(config: Config) -> int:
    """train.max_steps if set, else train.epochs over the prepared training pairs; prepared data that cannot
    give one batch is refused either way (check_one_batch)."""
    if config.train.synthetic_data:
        if config.train.max_steps <= 0:
            raise ConfigError("train.synthetic_data needs train.max_steps > 0")
        return config.train.max_steps
    per_epoch = check_one_batch(config, jax.process_count())
    if config.train.max_steps > 0:
        return config.train.max_steps
    steps = int(np.ceil(config.train.epochs * per_epoch))
    if steps <= 0:
        raise ConfigError(f"train.epochs={config.train.epochs}: no training steps (set train.epochs > 0 or "
                          f"train.max_steps)")
    return steps
