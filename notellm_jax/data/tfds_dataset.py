"""The prepared data as a TensorFlow Datasets dataset, `notellm_prepared`, built on Apache Beam.

Two builder configs, read from a prepared data folder (passed as TFDS's manual_dir) whose shards/ were
written by `input pipeline.write_shards`:
- `notellm_prepared/pairs`: splits train, val, test (those with pairs); one example per related pair,
  in the shard files' order (the seeded order write_shards chose; disable_shuffling keeps it).
- `notellm_prepared/notes`: split "notes"; one example per note in note_index order.
Features (int64 unless said; <v> is `cat` = category task, `hash` = hashtag task):
- pairs: for side s in a_, b_: `<s>note_index`; `<s><v>_ids` (token ids, variable length: prompt +
  output + EOS), `<s><v>_emb` (position of the [EMB] token; -1 = the note has no such variant),
  `<s><v>_prefix` (prompt length: the tokens before the output).
- notes: the same without the side prefix, plus `note_id` (string).
The shards' meta.json (counts, special token ids, prompt hash) is stored in the dataset's metadata,
so a reader checks it against its config as it does for shards.

Building: `prepare --stages tfds` (or `build(config)`), or the TFDS CLI, e.g.
    tfds build notellm_jax/data/tfds_dataset.py --config pairs --manual_dir <data_dir> \
        --data_dir <data_dir>/tfds --beam_pipeline_options="direct_num_workers=2,direct_running_mode=multi_processing"
The Beam work is reading shard files in parallel (one element per file) and TFDS's own shuffle-free
writing; Dataflow/Flink/Spark run it by pipeline options alone (README, Data). The tokenisation itself
is write_shards' (one process).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from notellm_jax.data.pipeline import SPLITS, VARIANTS, _parse_spec

NAME = "notellm_prepared"


def _features(sides: tuple[str, ...], with_id: bool) -> tfds.features.FeaturesDict:
    spec: dict[str, Any] = {}
    for side in sides:
        spec[f"{side}note_index"] = tfds.features.Scalar(np.int64)
        for short in VARIANTS:
            spec[f"{side}{short}_ids"] = tfds.features.Tensor(shape=(None,), dtype=np.int64)
            spec[f"{side}{short}_emb"] = tfds.features.Scalar(np.int64)
            spec[f"{side}{short}_prefix"] = tfds.features.Scalar(np.int64)
    if with_id:
        spec["note_id"] = tfds.features.Text()
    return tfds.features.FeaturesDict(spec)


def _read_file(element: tuple[str, int, bool]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(global record index, example) for every record of one shard file."""
    path, first, with_id = element
    sides = ("",) if with_id else ("a_", "b_")
    spec = _parse_spec(tf, sides)
    if with_id:
        spec["note_id"] = tf.io.FixedLenFeature([], tf.string)
    for i, record in enumerate(tf.data.TFRecordDataset(path)):
        parsed = tf.io.parse_single_example(record, spec)
        yield first + i, {k: v.numpy() for k, v in parsed.items()}


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
                                     features=_features(("",) if notes else ("a_", "b_"), notes),
                                     disable_shuffling=True, metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        shards = Path(dl_manager.manual_dir) / "shards"
        meta = json.loads((shards / "meta.json").read_text())
        self.info.metadata["shards_meta"] = meta
        notes = self.builder_config.name == "notes"
        stems = ("notes",) if notes else tuple(s for s in SPLITS if sum(meta["files"].get(s, [])) > 0)
        n = meta["num_shards"]
        generators = {}
        for stem in stems:
            starts = np.concatenate([[0], np.cumsum(meta["files"][stem])[:-1]]).tolist()
            files = [(str(shards / f"{stem}-{i:05d}-of-{n:05d}.tfrecord"), int(starts[i]), notes) for i in range(n)]
            generators[stem] = self._generate_examples(files)
        return generators

    def _generate_examples(self, files):
        beam = tfds.core.lazy_imports.apache_beam
        return beam.Create(files) | beam.FlatMap(_read_file)


def tfds_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "tfds"


def build(data_dir: Path, beam_runner: str, beam_options: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Build both configs from data_dir's shards into data_dir/tfds; example counts per split."""
    from apache_beam.options.pipeline_options import PipelineOptions

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
        raise FileNotFoundError(f"{tfds_dir(data_dir)}: no {NAME}/{name}; run prepare --stages tfds")
    return builder
