"""Tokenised TFRecord shards and the tf.data pair pipeline.

`write_shards` encodes every note once in both task variants (category; hashtag with j topics drawn
once per note from a generator seeded by (data.seed, note_index)) and writes
    shards/notes-XXXXX-of-NNNNN.tfrecord   every note, in note_index order
    shards/<split>-XXXXX-of-NNNNN.tfrecord pairs (seeded random order) carrying both notes' variants
    shards/meta.json                       counts, shapes, special ids, a hash of what shaped the tokens
`make_train_dataset` streams one host's pairs: whole files per host when the file count divides by the
host count, else `ds.shard(process_count, process_index)` over records. Each epoch is a seeded full
shuffle (seed = (train.seed, epoch)) cut to `steps_per_epoch` local batches, the same number on every
host, so a host never waits for another; pairs beyond steps * global batch sit out that epoch (a
different set each epoch). Resuming at step s replays epoch s // steps from batch s % steps, which
yields exactly the batches of an uninterrupted run. TensorFlow is imported inside functions only.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Iterator

import jax
import numpy as np

from notellm_jax.config import Config
from notellm_jax.errors import ConfigError, MissingInputError, StoreFormatError
from notellm_jax.data import store
from notellm_jax.model.batch import BatchDims, batch_shapes
from notellm_jax.model.families import LlamaConfig
from notellm_jax.data.prompts import (Example, Note, PromptTooLongError, build_example, draw_topics,
                                      example_from_tokens, pad_batch)

PAIR_COLUMNS = ("note_a", "note_b")
SPLITS = ("train", "val", "test")
VARIANTS = {"cat": "category", "hash": "hashtag"}


def _tf():
    import tensorflow as tf  # lazy: model and train code must import without TensorFlow

    return tf


def prompt_hash(config: Config, tokenizer_path: str) -> str:
    """What fixes the stored tokens; read-time choices (padding side, hashtag fraction) are left out."""
    p = config.prompt
    key = dict(layout=p.layout, title=p.title_max_tokens, content=p.content_max_tokens, topics=p.max_topics,
               max_length=p.max_length, max_targets=p.max_targets, emb=p.emb_token, seed=config.data.seed,
               tokenizer=tokenizer_path)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _encode_note(note: Note, index: int, tokenizer, config: Config, counts: Counter) -> dict[str, Example | None]:
    """Both task variants of one note; a variant that cannot be built is None and counted by reason."""
    variants: dict[str, Example | None] = {}
    for short, task in VARIANTS.items():
        try:
            topics = None
            if task == "hashtag":
                topics = draw_topics(note, config.prompt.max_topics, np.random.default_rng([config.data.seed, index]))
            ex = build_example(note, tokenizer, config.prompt, task, topics=topics)
        except PromptTooLongError:
            counts[f"{task}_rejected_too_long"] += 1
            ex = None
        except ValueError:  # raised by draw_topics only: the note has no topics
            counts[f"{task}_rejected_no_topics"] += 1
            ex = None
        if ex is not None and len(ex.target_ids) > config.prompt.max_targets:
            counts[f"{task}_rejected_output_over_max_targets"] += 1
            ex = None
        if ex is not None and ex.shrunk:
            counts[f"{task}_shrunk_to_fit"] += 1
        variants[short] = ex
    return variants


def _variant_features(tf, name: str, ex: Example | None) -> dict:
    ints = lambda values: tf.train.Feature(int64_list=tf.train.Int64List(value=values))  # noqa: E731
    if ex is None:
        return {f"{name}_ids": ints([]), f"{name}_emb": ints([-1]), f"{name}_prefix": ints([0])}
    return {f"{name}_ids": ints(ex.input_ids), f"{name}_emb": ints([ex.embed_read_pos]),
            f"{name}_prefix": ints([ex.prefix_length])}


def _note_features(tf, side: str, index: int, variants: dict[str, Example | None]) -> dict:
    features = {f"{side}note_index": tf.train.Feature(int64_list=tf.train.Int64List(value=[index]))}
    for short, ex in variants.items():
        features.update(_variant_features(tf, f"{side}{short}", ex))
    return features


def _write_files(tf, out_dir: Path, stem: str, records: list[bytes], num_shards: int) -> list[int]:
    """Contiguous chunks into `num_shards` files; returns the record count per file."""
    counts = []
    for shard, chunk in enumerate(np.array_split(np.arange(len(records)), num_shards)):
        with tf.io.TFRecordWriter(str(out_dir / f"{stem}-{shard:05d}-of-{num_shards:05d}.tfrecord")) as writer:
            for i in chunk:
                writer.write(records[i])
        counts.append(len(chunk))
    return counts


def _example_bytes(tf, features: dict) -> bytes:
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def _pair_indices(path: Path, index_of: dict[str, int], encoded: list[dict], seed: int,
                  counts: Counter, split: str) -> np.ndarray:
    """[P, 2] note indices of the usable pairs in a seeded random order (so contiguous files are random
    samples); drops are counted."""
    pairs = []
    for row in store.read_columns(path, PAIR_COLUMNS).to_pylist():
        a, b = index_of.get(str(row["note_a"])), index_of.get(str(row["note_b"]))
        if a is None or b is None:
            counts[f"{split}_pairs_dropped_unknown_note"] += 1
        elif encoded[a]["cat"] is None or encoded[b]["cat"] is None:
            counts[f"{split}_pairs_dropped_note_not_encodable"] += 1
        else:
            pairs.append((a, b))
    order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(len(pairs))
    return np.asarray(pairs, np.int64).reshape(-1, 2)[order]


def _pair_records(tf, pairs: np.ndarray, encoded: list[dict]) -> list[bytes]:
    return [_example_bytes(tf, {**_note_features(tf, "a_", a, encoded[a]), **_note_features(tf, "b_", b, encoded[b])})
            for a, b in pairs.tolist()]


def write_shards(config: Config, data_dir: Path) -> dict:
    """Tokenise notes.parquet and pairs_<split>.parquet under `data_dir` into `data_dir/shards`."""
    from notellm_jax.weights.tokenizer import resolve_tokenizer, tokenizer_source

    tf = _tf()
    data_dir = Path(data_dir)
    tokenizer_path = tokenizer_source(config)
    tokenizer = resolve_tokenizer(config)
    notes = store.load_notes(data_dir / "notes.parquet")
    counts: Counter = Counter(notes=len(notes))
    encoded = [_encode_note(note, i, tokenizer, config, counts) for i, note in enumerate(notes)]
    out_dir = data_dir / "shards"
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.tfrecord"):
        stale.unlink()
    num_shards = config.data.num_shards
    files = {}
    index_of = {note.note_id: i for i, note in enumerate(notes)}
    pair_arrays = {}
    for split in SPLITS:
        path = data_dir / f"pairs_{split}.parquet"
        if path.is_file():
            pair_arrays[split] = _pair_indices(path, index_of, encoded, config.data.seed, counts, split)
            records = _pair_records(tf, pair_arrays[split], encoded)
            files[split] = _write_files(tf, out_dir, split, records, num_shards)
            counts[f"{split}_pairs_written"] = len(records)
    write_token_arrays(out_dir / TOKEN_ARRAYS, notes, encoded, pair_arrays)
    meta = {"counts": dict(counts), "files": files, "num_shards": num_shards,
            "max_length": config.prompt.max_length, "max_targets": config.prompt.max_targets,
            "tokenizer": tokenizer_path, "base_vocab_size": tokenizer.base_vocab_size,
            "vocab_size": tokenizer.vocab_size, "emb_id": tokenizer.emb_id, "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
            "prompt_hash": prompt_hash(config, tokenizer_path)}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    return dict(counts)


# The same tokens as the TFRecord shards, readable with numpy alone (hosts without TensorFlow).
TOKEN_ARRAYS = "tokens.npz"


def write_token_arrays(path: Path, notes: list[Note], encoded: list[dict], pairs: dict[str, np.ndarray]) -> None:
    """Per variant: flat ids + offsets, [EMB] index (-1 = no such variant) and prefix length of every note;
    per split: the [P, 2] note indices in the shards' order; the note ids."""
    arrays: dict[str, np.ndarray] = {"note_id": np.asarray([n.note_id for n in notes], dtype=np.str_)}
    for short in VARIANTS:
        examples = [variants[short] for variants in encoded]
        lengths = [0 if ex is None else len(ex.input_ids) for ex in examples]
        arrays[f"{short}_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        arrays[f"{short}_ids"] = np.asarray([t for ex in examples if ex is not None for t in ex.input_ids], np.int32)
        arrays[f"{short}_emb"] = np.asarray([-1 if ex is None else ex.embed_read_pos for ex in examples], np.int32)
        arrays[f"{short}_prefix"] = np.asarray([0 if ex is None else ex.prefix_length for ex in examples], np.int32)
    arrays.update({f"{split}_pairs": value for split, value in pairs.items()})
    np.savez(path, **arrays)


def _token_batch(tokens: dict, pairs: np.ndarray) -> dict:
    """Rows of `tokens.npz` for [b, 2] pairs in the layout `_assemble` reads (that of the parsed shards)."""
    out = {}
    for side, column in (("a_", 0), ("b_", 1)):
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
    meta = read_meta(config, data_dir)
    path = Path(data_dir) / "shards" / TOKEN_ARRAYS
    with np.load(path) as data:
        tokens = {k: data[k] for k in data.files if k != "note_id"}
    if f"{split}_pairs" not in tokens:
        raise ValueError(f"{path}: no {split} pairs (pairs_{split}.parquet was absent at prepare time)")
    pairs, b = tokens[f"{split}_pairs"], _local_batch_pairs(config, 1)
    steps = len(pairs) // b
    if steps == 0:
        raise ValueError(f"{split}: {len(pairs)} pairs give no full batch of {b} pairs")
    step = start_step
    while True:
        epoch, index = divmod(step, steps)
        order = np.random.default_rng([config.train.seed, epoch]).permutation(len(pairs))
        yield _assemble(_token_batch(tokens, pairs[order[index * b:(index + 1) * b]]), config, meta, step, 0, b)
        step += 1


def read_meta(config: Config, data_dir: Path) -> dict:
    """meta.json, checked against the config so stale shards are never read silently."""
    path = Path(data_dir) / "shards" / "meta.json"
    if not path.is_file():
        raise MissingInputError(f"{path} not found: run notellm_jax.data.prepare (write_shards) first")
    meta = json.loads(path.read_text())
    if meta["prompt_hash"] != prompt_hash(config, meta["tokenizer"]):
        raise ValueError(f"{path}: shards were written with other prompt/tokenizer settings; rerun write_shards")
    return meta


def _shard_paths(data_dir: Path, stem: str, meta: dict) -> list[Path]:
    if stem not in meta["files"]:
        raise ValueError(f"no {stem} shards under {Path(data_dir) / 'shards'} (pairs_{stem}.parquet was absent)")
    n = meta["num_shards"]
    return [Path(data_dir) / "shards" / f"{stem}-{i:05d}-of-{n:05d}.tfrecord" for i in range(n)]


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
    meta = read_meta(config, data_dir)
    _shard_paths(data_dir, split, meta)
    b = _local_batch_pairs(config, process_count)
    return min(_host_split(meta, split, h, process_count)[2] for h in range(process_count)) // b


def _parse_spec(tf, sides: tuple[str, ...]) -> dict:
    spec = {}
    for side in sides:
        spec[f"{side}note_index"] = tf.io.FixedLenFeature([], tf.int64)
        for short in VARIANTS:
            spec[f"{side}{short}_ids"] = tf.io.RaggedFeature(tf.int64)
            spec[f"{side}{short}_emb"] = tf.io.FixedLenFeature([], tf.int64)
            spec[f"{side}{short}_prefix"] = tf.io.FixedLenFeature([], tf.int64)
    return spec


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
    rows = [("a_", i) for i in range(b)] + [("b_", i) for i in range(b)]
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
        import jax

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
        spec = _parse_spec(tf, ("a_", "b_"))
        return (lambda: tf.data.TFRecordDataset([str(paths[i]) for i in file_ids]),
                lambda ds, b: ds.batch(b, drop_remainder=True).map(lambda x: tf.io.parse_example(x, spec)))
    if config.data.train_input != "tfds":
        raise ConfigError(f"data.train_input={config.data.train_input!r}: expected 'shards' or 'tfds'")
    import tensorflow_datasets as tfds

    from notellm_jax.data.tfds_dataset import load_builder

    builder = load_builder(data_dir, "pairs")
    if builder.info.metadata["shards_meta"]["prompt_hash"] != meta["prompt_hash"]:
        raise StoreFormatError(f"{builder.data_dir}: built from other shards than {Path(data_dir) / 'shards'}; "
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
    meta = read_meta(config, data_dir)
    paths = _shard_paths(data_dir, split, meta)
    b = _local_batch_pairs(config, process_count)
    file_ids, shard_records, host_records = _host_split(meta, split, process_index, process_count)
    steps = steps_per_epoch(config, data_dir, split, process_count)
    if steps == 0:
        raise ValueError(f"{split}: {sum(meta['files'][split])} pairs give no full batch of "
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


def total_train_steps(config: Config) -> int:
    if config.train.max_steps > 0:
        return config.train.max_steps
    if config.train.synthetic_data:
        raise ValueError("train.synthetic_data needs train.max_steps > 0")
    per_epoch = steps_per_epoch(config, config.data_dir, process_count=jax.process_count())
    steps = int(np.ceil(config.train.epochs * per_epoch))
    if steps <= 0:
        raise ValueError(f"no training steps: check the training pairs under {config.data_dir}")
    return steps
