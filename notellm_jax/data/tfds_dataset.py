"""The prepared data as a TensorFlow Datasets dataset, `notellm_prepared`, built on Apache Beam.

Two builder configs, read from a prepared data folder (passed as TFDS's manual_dir):
- `notellm_prepared/pairs`: splits train, val, test (those with pairs), from shards/ (written by
  `shards.write_shards`); one example per related pair, in the shard files' order (the seeded
  order write_shards chose; disable_shuffling keeps it). Features: the shards' own (`shards.pair_fields`),
  int64, for side s in a_, b_ and task variant v in cat (category), hash (hashtag): `<s>note_index`
  (row of the note in notes.parquet); `<s><v>_ids` (token ids, variable length: prompt + output + EOS);
  `<s><v>_emb` (the [EMB] read position stored in the shards; -1 = the note has no such variant);
  `<s><v>_prefix` (prompt length: the tokens before the output).
- `notellm_prepared/notes`: split "notes", from notes.parquet in its row order (= note_index): the
  store's fields note_id, title, content (text), topics (list of text), category (text),
  created_at (int64 unix seconds), exposure (int64 view count, -1 unknown).
The shards' meta.json (counts, special token ids, prompt hash) is stored in the dataset's metadata,
so a reader checks it against its config as it does for shards.

Building: `prepare --stages tfds` (or `build(config)`), or the TFDS CLI, e.g.
    tfds build notellm_jax/data/tfds_dataset.py --config pairs --manual_dir <data_dir> \
        --data_dir <data_dir>/tfds --beam_pipeline_options="direct_num_workers=2,direct_running_mode=multi_processing"
The Beam work is reading shard files in parallel (one element per file) and TFDS's own writing
(disable_shuffling: examples in key order); Dataflow/Flink/Spark run it by pipeline options alone (docs/data.md).
The tokenisation itself is write_shards' (one process).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from notellm_jax.data import store
from notellm_jax.data.shards import META, SPLITS, pair_fields, parse_spec, shard_file, shards_dir
from notellm_jax.errors import MissingInputError

NAME = "notellm_prepared"


def _pair_features() -> tfds.features.FeaturesDict:
    spec: dict[str, Any] = {name: tfds.features.Tensor(shape=(None,), dtype=np.int64) if ragged
                            else tfds.features.Scalar(np.int64) for name, ragged in pair_fields().items()}
    return tfds.features.FeaturesDict(spec)


def _note_features() -> tfds.features.FeaturesDict:
    text = tfds.features.Text()
    return tfds.features.FeaturesDict({
        "note_id": text, "title": text, "content": text, "topics": tfds.features.Sequence(text),
        "category": text, "created_at": tfds.features.Scalar(np.int64), "exposure": tfds.features.Scalar(np.int64)})


def _read_pair_file(element: tuple[str, int]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(global record index, example) for every record of one pair shard file."""
    path, first = element
    spec = parse_spec(tf)
    for i, record in enumerate(tf.data.TFRecordDataset(path)):
        parsed = tf.io.parse_single_example(record, spec)
        yield first + i, {k: v.numpy() for k, v in parsed.items()}


def _read_notes(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row, note) for every row of notes.parquet."""
    for i, row in enumerate(store.read_note_table(path).to_pylist()):
        yield i, {**row, "topics": row["topics"] or [], "title": row["title"] or "",
                  "content": row["content"] or "", "category": row["category"] or ""}


class NotellmPrepared(tfds.core.GeneratorBasedBuilder):
    """Tokenised NoteLLM pairs and notes (module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Pairs (train/val/test) and notes from notellm_jax's prepared shards."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="pairs", description="related-note pairs per split"),
                       tfds.core.BuilderConfig(name="notes", description="every note, note_index order")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "manual_dir = a prepared data folder with shards/ (notellm_jax.data.prepare)"

    def _info(self) -> tfds.core.DatasetInfo:
        notes = self.builder_config.name == "notes"
        return tfds.core.DatasetInfo(builder=self, description=__doc__.split("\n\n")[0],
                                     features=_note_features() if notes else _pair_features(),
                                     disable_shuffling=True, metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        beam = tfds.core.lazy_imports.apache_beam
        data_dir = Path(dl_manager.manual_dir)
        if self.builder_config.name == "notes":
            return {"notes": beam.Create([str(data_dir / "notes.parquet")]) | beam.FlatMap(_read_notes)}
        meta = json.loads((shards_dir(data_dir) / META).read_text())
        self.info.metadata["shards_meta"] = meta
        n = meta["num_shards"]
        generators = {}
        for split in (s for s in SPLITS if sum(meta["files"].get(s, [])) > 0):
            starts = np.concatenate([[0], np.cumsum(meta["files"][split])[:-1]]).tolist()
            files = [(str(shard_file(data_dir, split, i, n)), int(starts[i])) for i in range(n)]
            generators[split] = beam.Create(files) | beam.FlatMap(_read_pair_file)
        return generators

    def _generate_examples(self):  # every split above is a Beam transform
        raise NotImplementedError


def tfds_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "tfds"


def build(data_dir: Path, beam_runner: str, beam_options: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Build both configs from data_dir's shards into data_dir/tfds; example counts per split."""
    from apache_beam.options.pipeline_options import PipelineOptions  # Apache Beam: only for the TFDS build

    counts: dict[str, Any] = {}
    for name in ("pairs", "notes"):
        builder = NotellmPrepared(config=name, data_dir=str(tfds_dir(data_dir)))
        download = tfds.download.DownloadConfig(manual_dir=str(data_dir), beam_runner=beam_runner,
                                                beam_options=PipelineOptions(flags=list(beam_options)))
        builder.download_and_prepare(download_config=download)
        counts[name] = {split: info.num_examples for split, info in builder.info.splits.items()}
    return counts


def load_builder(data_dir: Path, name: str = "pairs") -> tfds.core.DatasetBuilder:
    """The built dataset under data_dir/tfds (FileNotFoundError if the tfds stage has not run)."""
    builder = tfds.builder(f"{NAME}/{name}", data_dir=str(tfds_dir(data_dir)))
    if not builder.is_prepared():
        raise MissingInputError(f"{tfds_dir(data_dir)}: no {NAME}/{name}; run prepare --stages tfds")
    return builder
