"""Category and hashtag generation with the trained NoteLLM, and its metrics (METHOD.md 5).

    python -m notellm_jax.eval.generation --config configs/<name>.py --checkpoint <work_dir>/export
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

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from notellm_jax.config import Config, PromptConfig
from notellm_jax.data import store
from notellm_jax.data.prompts import TASKS, Example, Note, build_example, pad_batch
from notellm_jax.eval.generation_metrics import category_metrics, hashtag_prf, parse_hashtags, text_metrics, tokenize
from notellm_jax.model.decode import TokenTrie, greedy_decode
from notellm_jax.model.llama import Llama
from notellm_jax.weights.tokenizer import NoteTokenizer, resolve_tokenizer

TASK_CHOICES = {"category": ("category",), "hashtag": ("hashtag",), "both": TASKS}
SPLITS = ("train", "test")
PAD_MULTIPLE = 8  # prompts are left-padded to the task's longest prompt rounded up to this


class Generator:
    """The decoder of a NoteLLM export with its tokenizer and the prompt settings it was trained with."""

    def __init__(self, config: Config, export_dir: str | Path, mesh=None):
        """The weights are restored onto `mesh` (default: the config's) in their logical shardings, as the
        embedder's are; the decode program then runs over the whole mesh."""
        from notellm_jax import sharding as shd
        from notellm_jax.weights.export import load_notellm

        export = load_notellm(export_dir, mesh or shd.mesh_from_config(config.mesh))
        self.tokenizer: NoteTokenizer = resolve_tokenizer(config, export.tokenizer, export.prompt.emb_token)
        if self.tokenizer.vocab_size > export.llama.vocab_size:  # equal, or a padded table (Qwen)
            raise ValueError(f"{export_dir}: the model has a {export.llama.vocab_size}-token vocabulary but its "
                             f"tokenizer {export.tokenizer} has {self.tokenizer.vocab_size} (with "
                             f"{export.prompt.emb_token}): they do not belong together")
        self.prompt: PromptConfig = export.prompt
        self.model = Llama(export.llama)
        self.params = export.params["decoder"]

    def decode(self, examples: Sequence[Example], length: int, max_new_tokens: int, repetition_penalty: float,
               trie: TokenTrie | None) -> list[list[int]]:
        """Generated tokens of one batch of prompts left-padded to `length`, cut after the first EOS."""
        batch = pad_batch(list(examples), length, "left", self.tokenizer.pad_id, max_targets=1)
        new = greedy_decode(self.model, self.params, batch["input_ids"], batch["attention_mask"], max_new_tokens,
                            self.tokenizer.eos_id, repetition_penalty, trie)
        eos = self.tokenizer.eos_id
        return [row[:row.index(eos) + 1] if eos in row else row for row in new.tolist()]

    def output(self, tokens: list[int]) -> dict[str, Any]:
        """{text, finished} of one row of `decode` (finished: it ended with EOS within the budget)."""
        finished = bool(tokens) and tokens[-1] == self.tokenizer.eos_id
        return {"text": self.tokenizer.decode(tokens).strip(), "finished": finished}


def split_notes(config: Config, split: str, limit: int | None = None) -> tuple[list[Note], list[str]]:
    """(the split's notes in split.json order, or a sample of `limit` of them; the training notes' categories).

    The sample is drawn uniformly without replacement (seeded by `data.seed`) and kept in split.json order.
    It is not the first `limit` notes: split.json lists notes grouped by category (site), so a prefix would
    score generation on one or two categories only."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for every note), got {limit}")
    all_notes = store.load_notes(config.data_dir / "notes.parquet")
    notes = store.split_notes(config.data_dir, split, all_notes)
    if limit is not None and limit < len(notes):
        keep = np.sort(np.random.default_rng(config.data.seed).choice(len(notes), limit, replace=False))
        notes = [notes[i] for i in keep]
    if not notes:
        raise ValueError(f"{config.data_dir / 'split.json'}: the {split} split has no notes, nothing to generate")
    return notes, closed_categories(config, all_notes)


def closed_categories(config: Config, all_notes: Sequence[Note] | None = None) -> list[str]:
    """The closed category set: the training notes' categories, sorted (`all_notes`: notes.parquet loaded)."""
    notes = list(all_notes) if all_notes is not None else None
    return sorted({note.category for note in store.split_notes(config.data_dir, "train", notes)})


def generation_prompt(note: Note, task: str, tokenizer: NoteTokenizer, prompt: PromptConfig) -> Example | None:
    """The note's generation prefix for `task`; None for the hashtag task of a note without tags."""
    if task == "hashtag":
        if not note.topics:
            return None
        return build_example(note, tokenizer, prompt, task, with_output=False,
                             topics=note.topics[:min(prompt.max_topics, len(note.topics))])
    return build_example(note, tokenizer, prompt, task, with_output=False)


def category_trie(categories: Sequence[str], tokenizer: NoteTokenizer, prompt: PromptConfig) -> TokenTrie:
    """Trie over each category's training-output tokens + EOS; each must decode back to its category."""
    sequences = []
    for category in categories:
        blank = Note(note_id=f"category {category!r}", title="", content="", topics=[], category=category)
        tokens = build_example(blank, tokenizer, prompt, "category").target_ids  # output + EOS
        decoded = tokenizer.decode(tokens[:-1])
        if tokenize(decoded) != tokenize(category):
            raise ValueError(f"category {category!r} decodes back as {decoded!r} under {tokenizer.source}: "
                             "constrained decoding could never produce it")
        sequences.append(tokens)
    return TokenTrie.build(sequences, tokenizer.eos_id)


def decode_budget(config: Config, trie: TokenTrie | None) -> int:
    """New tokens per prompt: the trie's depth when constrained (every category fits), else the config's."""
    return trie.depth if trie is not None else config.generation.max_new_tokens


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
    notes, categories = split_notes(config, split, limit)
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


def run(args, config: Config) -> dict[str, Any]:
    """`notellm generate`: generate categories and/or hashtags for a split's notes and score them."""
    constrain = config.generation.constrain_categories if args.constrain_categories is None else True
    out = Path(args.out) if args.out else config.work_dir / "generation"
    result = generate_and_score(config, args.checkpoint, out, TASK_CHOICES[args.task], constrain, args.limit,
                                args.split)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    import sys

    from notellm_jax.main import main

    main(["generate", *sys.argv[1:]])
