"""Which tokenization of a Gemma GGUF the model itself was trained on: the real model's next-token loss on real
notes tokenized by the project (the GGUF's sentencepiece BPE vocabulary, `weights/tokenizer.py`) and by
transformers 4.57's own GGUF conversion (a Unigram model over the same pieces).

    python bench/gemma_tokenizer_loss.py [--gguf ~/.cache/notellm_jax/gemma-3-270m-q4_k_m.gguf] [--notes 24]

Notes: title and body of the first `--notes` questions of the default recipe's sites (configs/gemma3_se.py),
cut to 400 characters, BOS first, at most 160 tokens, float32. Prints JSON: tokens, nats per token and total
nats under each tokenization (the right one reads the same text in fewer nats).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from notellm_jax.config import load_config
from notellm_jax.data import store
from notellm_jax.data.importers import stackexchange
from notellm_jax.data.importers.builder import StoreBuilder
from notellm_jax.runtime import cpu_model
from notellm_jax.weights.formats import load_causal_lm
from notellm_jax.weights.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
WIDTH = 160


def notes(count: int) -> list[str]:
    config = load_config(str(REPO / "configs" / "gemma3_se.py"))
    root = Path(config.resolve(config.data.input_path))
    with tempfile.TemporaryDirectory() as tmp:
        builder = StoreBuilder(Path(tmp))
        stackexchange.import_stackexchange(root, list(config.data.sites), builder)
        builder.finish(str(root))
        rows = store.read_note_table(Path(tmp) / "notes.parquet").to_pylist()[:count]
    return [f"{n['title']}\n{n['content']}"[:400] for n in rows]


def loss(lm, bos: int, sequences: list[list[int]]) -> dict:
    total, count = 0.0, 0
    for tokens in sequences:
        tokens = [bos, *tokens][:WIDTH]
        ids, mask = np.zeros((1, WIDTH), np.int32), np.zeros((1, WIDTH), np.int32)
        ids[0, :len(tokens)], mask[0, :len(tokens)] = tokens, 1
        logits = lm.logits(ids, mask)[0, :len(tokens) - 1].astype(np.float64)
        top = logits.max(-1)
        lse = np.log(np.exp(logits - top[:, None]).sum(-1)) + top
        total += float((lse - logits[np.arange(len(tokens) - 1), tokens[1:]]).sum())
        count += len(tokens) - 1
    return {"tokens": count, "nats_per_token": round(total / count, 4), "total_nats": round(total, 1)}


def main() -> None:
    from transformers import AutoTokenizer  # the reference conversion under test

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=Path("~/.cache/notellm_jax/gemma-3-270m-q4_k_m.gguf"))
    parser.add_argument("--notes", type=int, default=24)
    args = parser.parse_args()
    path = args.gguf.expanduser()
    texts = notes(args.notes)
    ours = load_tokenizer(path)
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    lm = load_causal_lm(path)
    result = {"gguf": path.name, "notes": len(texts), "characters": sum(map(len, texts)),
              "project_sentencepiece_bpe": loss(lm, ours.bos_id, [ours.encode(t, split_special_tokens=True)
                                                                  for t in texts]),
              "transformers_gguf_unigram": loss(lm, ours.bos_id, [theirs.encode(
                  t, add_special_tokens=False, split_special_tokens=True) for t in texts]),
              "machine": cpu_model(), "cpus": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
