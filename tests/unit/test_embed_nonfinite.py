"""Embeddings are never written non-finite: the writer refuses the batch, names the notes, and removes
the shards it had already written (the folder holds no embeddings and no embeddings.json)."""
from collections import Counter

import numpy as np
import pytest

from notellm_jax.data.prompts import Note
from notellm_jax.infer.embeddings import write_embeddings


def _notes(n: int) -> list[Note]:
    return [Note(f"s/{i}", f"title {i}", "text", ["t"], "c") for i in range(n)]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_embeddings_are_refused_and_nothing_is_left(tmp_path, bad):
    def embed_chunk(notes):
        vectors = np.ones((len(notes), 4), np.float32) / 2
        if notes[0].note_id == "s/6":  # the third chunk, after two shards were written
            vectors[1, 2] = bad
        return [n.note_id for n in notes], vectors, Counter()

    out = tmp_path / "emb"
    with pytest.raises(ValueError, match=rf"1 of 3 embeddings are not finite \(notes \['s/7'\]\).*nothing is "
                                         rf"written to {out}"):
        write_embeddings(_notes(9), embed_chunk, out, shard_size=3, chunk_size=3, meta={"model": "m"})
    assert sorted(p.name for p in out.iterdir()) == []


def test_finite_embeddings_are_written(tmp_path):
    def embed_chunk(notes):
        return [n.note_id for n in notes], np.full((len(notes), 4), 0.5, np.float32), Counter()

    out = write_embeddings(_notes(5), embed_chunk, tmp_path / "emb", shard_size=3, chunk_size=3, meta={})
    assert sorted(p.name for p in out.iterdir()) == ["embeddings-00000.npy", "embeddings-00001.npy",
                                                     "embeddings.json", "ids-00000.txt", "ids-00001.txt"]
