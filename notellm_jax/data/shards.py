"""The tokenised shards of a prepared data folder: their schema, their writer and their meta.

`write_shards` encodes every note once in both task variants (category; hashtag with j topics drawn
once per note from a generator seeded by (data.seed, note_index)) and writes under <data_dir>/shards/
    <split>-XXXXX-of-NNNNN.tfrecord   the split's pairs (seeded random order), each record carrying both
                                      notes' variants (the features of `pair_fields`)
    tokens.npz                        the same tokens as numpy arrays (TOKEN_ARRAYS: hosts without TensorFlow)
    meta.json                         counts, shapes, special ids, a hash of what shaped the tokens
`read_shards_meta` reads meta.json and refuses shards written with other prompt or tokenizer settings.
The readers (data/input_pipeline.py: tf.data and numpy; data/tfds_dataset.py: the TFDS builder) take
the file names, the record features and the parse spec from here. TensorFlow is imported inside
functions only (`parse_spec` takes the module as its argument).
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np

from notellm_jax.config import Config
from notellm_jax.data import store
from notellm_jax.data.prompts import Example, Note, PromptTooLongError, build_example, draw_topics
from notellm_jax.errors import MissingInputError
from notellm_jax.weights.tokenizer import resolve_tokenizer, tokenizer_source

PAIR_COLUMNS = ("note_a", "note_b")
SPLITS = ("train", "val", "test")
VARIANTS = {"cat": "category", "hash": "hashtag"}
SIDES = ("a_", "b_")  # the two notes of a pair record
META = "meta.json"
# The same tokens as the TFRecord shards, readable with numpy alone (hosts without TensorFlow).
TOKEN_ARRAYS = "tokens.npz"


def shards_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "shards"


def shard_file(data_dir: Path, stem: str, index: int, num_shards: int) -> Path:
    """File `index` of the `num_shards` TFRecord files of split `stem`."""
    return shards_dir(data_dir) / f"{stem}-{index:05d}-of-{num_shards:05d}.tfrecord"


def pair_fields(sides: tuple[str, ...] = SIDES) -> dict[str, bool]:
    """Every int64 feature of a pair record, name -> True for a variable-length list, False for a scalar.
    Per side s and variant v: <s>note_index (row of the note in notes.parquet), <s><v>_ids (token ids:
    prompt + output + EOS), <s><v>_emb (the [EMB] read position; -1 = the note has no such variant),
    <s><v>_prefix (prompt length: the tokens before the output)."""
    fields = {}
    for side in sides:
        fields[f"{side}note_index"] = False
        for short in VARIANTS:
            fields.update({f"{side}{short}_ids": True, f"{side}{short}_emb": False, f"{side}{short}_prefix": False})
    return fields


def parse_spec(tf, sides: tuple[str, ...] = SIDES) -> dict:
    """tf.io parse spec of a pair record (`tf` is the tensorflow module)."""
    return {name: tf.io.RaggedFeature(tf.int64) if ragged else tf.io.FixedLenFeature([], tf.int64)
            for name, ragged in pair_fields(sides).items()}


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


def _write_files(tf, data_dir: Path, stem: str, records: list[bytes], num_shards: int) -> list[int]:
    """Contiguous chunks into `num_shards` files; returns the record count per file."""
    counts = []
    for shard, chunk in enumerate(np.array_split(np.arange(len(records)), num_shards)):
        with tf.io.TFRecordWriter(str(shard_file(data_dir, stem, shard, num_shards))) as writer:
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
    a_side, b_side = SIDES
    return [_example_bytes(tf, {**_note_features(tf, a_side, a, encoded[a]),
                                **_note_features(tf, b_side, b, encoded[b])}) for a, b in pairs.tolist()]


def write_shards(config: Config, data_dir: Path) -> dict:
    """Tokenise notes.parquet and pairs_<split>.parquet under `data_dir` into `data_dir/shards`."""
    import tensorflow as tf  # TensorFlow: only when shards are written

    data_dir = Path(data_dir)
    tokenizer_path = tokenizer_source(config)
    tokenizer = resolve_tokenizer(config)
    notes = store.load_notes(data_dir / "notes.parquet")
    counts: Counter = Counter(notes=len(notes))
    encoded = [_encode_note(note, i, tokenizer, config, counts) for i, note in enumerate(notes)]
    out_dir = shards_dir(data_dir)
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
            files[split] = _write_files(tf, data_dir, split, records, num_shards)
            counts[f"{split}_pairs_written"] = len(records)
    write_token_arrays(out_dir / TOKEN_ARRAYS, notes, encoded, pair_arrays)
    meta = {"counts": dict(counts), "files": files, "num_shards": num_shards,
            "max_length": config.prompt.max_length, "max_targets": config.prompt.max_targets,
            "tokenizer": tokenizer_path, "base_vocab_size": tokenizer.base_vocab_size,
            "vocab_size": tokenizer.vocab_size, "emb_id": tokenizer.emb_id, "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
            "prompt_hash": prompt_hash(config, tokenizer_path)}
    (out_dir / META).write_text(json.dumps(meta, indent=2))
    return dict(counts)


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


def read_shards_meta(config: Config, data_dir: Path) -> dict:
    """meta.json, checked against the config so stale shards are never read silently."""
    path = shards_dir(data_dir) / META
    if not path.is_file():
        raise MissingInputError(f"{path} not found: run `notellm prepare` (its shards stage) first")
    meta = json.loads(path.read_text())
    if meta["prompt_hash"] != prompt_hash(config, meta["tokenizer"]):
        raise ValueError(f"{path}: shards were written with other prompt/tokenizer settings; rerun write_shards")
    return meta
