"""Category and hashtag generation with the trained NoteLLM scored: its metrics (METHOD.md 5). The generator
itself (prompts, trie, decoding) is `infer.generator`.

    notellm generate --config configs/<name>.py --checkpoint <work_dir>/export
        [--task category|hashtag|both] [--split test] [--out DIR] [--constrain-categories] [--limit N]

For every note of the split, the generation prompt is `build_example(..., with_output=False)` with the
prompt settings the model was trained with (the export's), left-padded to one fixed length (the task's
longest prompt rounded up to a multiple of 8) in batches
of `generation.batch_size` (the last batch is filled with copies of its last prompt and trimmed),
then decoded greedily with the KV cache (`notellm_jax.model.decode.greedy_decode`), stopping at EOS or
after `generation.max_new_tokens` (`generation.repetition_penalty` applies to generated tokens).

Decisions:
- Hashtag prompts ask for j = min(prompt.max_topics, #tags) topics (the range seen in training);
  the prompt's input note never shows the tags. Notes without tags get no hashtag prompt (counted).
- The closed category set is the categories of the training notes (split.json's train_notes). With
  `--constrain-categories` the category output is decoded through a token trie over those
  categories, each encoded exactly as a training output (+ EOS), so it is always one of them; the
  decode budget is then the trie depth. Test notes whose gold category is not in the closed set
  cannot be judged by Acc./Ill.: they are written, left out of the category metrics and counted.
- Scoring reads only the records written to generations.jsonl (note_id, task, text, gold,
  finished): gold is the category, or the note's tags joined with ", " as training outputs are.
  Generated and gold hashtag texts both go through `parse_hashtags`; tag P/R/F1 compare those tag
  sets, BLEU-4 and ROUGE-1/2/L compare the whitespace-joined tags (generation_metrics' convention).
- `finished` is False when no EOS came within the budget; such outputs are scored as they are and
  counted as `unfinished`.
Outputs in the out folder: generations.jsonl and metrics.json (also returned).
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from notellm_jax.config import Config
from notellm_jax.data import store
from notellm_jax.data.prompts import TASKS, Note
from notellm_jax.eval.generation_metrics import category_metrics, hashtag_prf, parse_hashtags, text_metrics, tokenize
from notellm_jax.infer.generator import (PAD_MULTIPLE, Generator, category_trie, closed_categories, decode_budget,
                                         generation_prompt)
from notellm_jax.model.decode import TokenTrie

TASK_CHOICES = {"category": ("category",), "hashtag": ("hashtag",), "both": TASKS}
SPLITS = ("train", "test")


def generation_notes(config: Config, split: str, limit: int | None = None) -> tuple[list[Note], list[str]]:
    """(the split's notes in split.json order, or a seeded sample of `limit` of them (`store.notes_of`); the
    training notes' categories)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for every note), got {limit}")
    all_notes = store.load_notes(config.data_dir / "notes.parquet")
    notes = store.notes_of(config.data_dir, split, sample=limit, seed=config.data.seed, notes=all_notes)
    if not notes:
        raise ValueError(f"{config.data_dir / 'split.json'}: the {split} split has no notes, nothing to generate")
    return notes, closed_categories(config, all_notes)


def generate_task(gen: Generator, notes: Sequence[Note], task: str, config: Config,
                  trie: TokenTrie | None = None) -> tuple[list[dict[str, Any]], int]:
    """(one record per note with a prompt, notes without one) for `task`, printing progress per batch."""
    prompts = [(note, generation_prompt(note, task, gen.tokenizer, gen.prompt)) for note in notes]
    kept = [(note, ex) for note, ex in prompts if ex is not None]
    max_new = decode_budget(config, trie)
    # One prompt length for the whole task, so the decode program compiles once.
    length = -(-max((len(ex.input_ids) for _, ex in kept), default=1) // PAD_MULTIPLE) * PAD_MULTIPLE
    size = config.generation.batch_size
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    for first in range(0, len(kept), size):
        chunk = kept[first:first + size]
        examples = [ex for _, ex in chunk]
        examples += [examples[-1]] * (size - len(examples))
        outputs = gen.decode(examples, length, max_new, config.generation.repetition_penalty, trie)
        for (note, _), tokens in zip(chunk, outputs):
            gold = note.category if task == "category" else ", ".join(note.topics)
            records.append({"note_id": note.note_id, "task": task, **gen.output(tokens), "gold": gold})
        rate = len(records) / (time.perf_counter() - start)
        print(f"[generate] {task}: {len(records)}/{len(kept)} notes, {rate:.1f} notes/s", flush=True)
    return records, len(notes) - len(kept)


def score_generations(records: Sequence[dict[str, Any]], categories: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Metrics per task present in `records` (see the module docstring for what is compared)."""
    scores: dict[str, dict[str, Any]] = {}
    by_task = {task: [r for r in records if r["task"] == task] for task in TASKS}
    unknown = sorted({r["task"] for r in records} - set(TASKS))
    if unknown:
        raise ValueError(f"records with unknown task(s) {unknown}; expected {TASKS}")
    closed = {" ".join(tokenize(c)) for c in categories}
    if by_task["category"]:
        judged = [r for r in by_task["category"] if " ".join(tokenize(r["gold"])) in closed]
        entry: dict[str, Any] = {"gold_outside_closed_set": len(by_task["category"]) - len(judged),
                                 "closed_set_size": len(closed),
                                 "unfinished": sum(not r["finished"] for r in by_task["category"])}
        if judged:
            entry.update(category_metrics([r["text"] for r in judged], [r["gold"] for r in judged], categories))
        scores["category"] = entry
    if by_task["hashtag"]:
        rows = by_task["hashtag"]
        predicted = [parse_hashtags(r["text"]) for r in rows]
        gold = [parse_hashtags(r["gold"]) for r in rows]
        scores["hashtag"] = {**hashtag_prf(predicted, gold),
                             **text_metrics([" ".join(p) for p in predicted], [" ".join(g) for g in gold]),
                             "unfinished": sum(not r["finished"] for r in rows)}
    return scores


def generate_and_score(config: Config, export_dir: str | Path, out_dir: str | Path,
                       tasks: Sequence[str] = ("category", "hashtag"), constrain: bool = False,
                       limit: int | None = None, split: str = "test") -> dict[str, Any]:
    """Generate every requested task for the split's notes, write generations.jsonl + metrics.json, return
    the metrics (per task, plus the run's settings and timings)."""
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {list(tasks)}")
    notes, categories = generation_notes(config, split, limit)
    gen = Generator(config, export_dir)
    records: list[dict[str, Any]] = []
    result: dict[str, Any] = {"split": split, "notes": len(notes), "constrained": constrain,
                              "repetition_penalty": config.generation.repetition_penalty,
                              "max_new_tokens": config.generation.max_new_tokens, "seconds": {},
                              "without_prompt": {}}
    for task in tasks:
        trie = category_trie(categories, gen.tokenizer, gen.prompt) if constrain and task == "category" else None
        start = time.perf_counter()
        task_records, skipped = generate_task(gen, notes, task, config, trie)
        result["seconds"][task] = round(time.perf_counter() - start, 3)
        result["without_prompt"][task] = skipped
        records += task_records
    result.update(score_generations(records, categories))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "generations.jsonl", "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=1))
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a NoteLLM export folder (<work_dir>/export)")
    parser.add_argument("--task", choices=("both", "category", "hashtag"), default="both")
    parser.add_argument("--split", choices=("train", "test"), default="test")
    parser.add_argument("--out", help="output folder (default <work_dir>/generation)")
    parser.add_argument("--constrain-categories", action="store_true", default=None,
                        help="decode categories through the closed-set trie (default: generation.constrain_categories)")
    parser.add_argument("--limit", type=int, help="only the split's first N notes")


def run(args, config: Config) -> dict[str, Any]:
    """`notellm generate`: generate categories and/or hashtags for a split's notes and score them."""
    constrain = config.generation.constrain_categories if args.constrain_categories is None else True
    out = Path(args.out) if args.out else config.work_dir / "generation"
    result = generate_and_score(config, args.checkpoint, out, TASK_CHOICES[args.task], constrain, args.limit,
                                args.split)
    print(json.dumps(result, indent=1))
    return result
