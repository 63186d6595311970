"""Hyper-parameter sweep on VALIDATION pairs only: `notellm sweep --config C --grid G.json --out DIR
[--steps N] [--mode one_at_a_time|product] [--set section.field=value ...]`.

G.json maps config fields to candidate values, e.g. {"train.learning_rate": [3e-5, 1e-4, 3e-4],
"model.train_top_layers": [2, 4], "model.lora_rank": [8], "train.batch_pairs": [16, 32],
"model.log_logit_scale_init": [3.0, 2.3], "train.logit_scale_lr_multiplier": [1, 100], "train.alpha": [0.01, 0.1],
"prompt.hashtag_fraction": [0.4], "prompt.content_max_tokens": [48, 96]}, plus optionally "settings": a list
of explicit override dicts (for changes that must go together, e.g. {"model.lora_rank": 8,
"model.train_top_layers": 0}). "one_at_a_time" (default) varies one field at a time around the base config;
"product" runs every combination. Each setting trains
`--steps` steps and is scored by the trainer's validation pass (train.eval_batches batches of the val
pairs: contrastive loss and in-batch accuracy, generation loss). Test pairs are never read.

Settings share the prepared data folder, so the frozen-bottom feature cache (persisted beside it) is
computed once per (base model, frozen depth) and reused. A setting that changes the tokenised prompt
(token budgets, layout) gets its own shards, written once into DIR/data-<hash> from the same parquet files.
Each setting trains in DIR/setting-<hash of its overrides>; its checkpoints and export are deleted after
scoring (the table and each setting's metrics.jsonl are kept):
DIR/sweep.json and DIR/sweep.md, ranked by validation contrastive loss.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import shutil
import time
from pathlib import Path
from typing import Any

from notellm_jax.config import Config, override
from notellm_jax.data.shards import prompt_hash, write_shards
from notellm_jax.train import train
from notellm_jax.weights.tokenizer import tokenizer_source

SCORE = "val_loss_cl"  # lower is better; also reported: val_accuracy, val_loss_gen, val_loss
COLUMNS = ("val_loss_cl", "val_accuracy", "val_loss_gen", "val_loss", "loss", "log_logit_scale", "seconds")


def settings(grid: dict[str, list], mode: str) -> list[dict[str, Any]]:
    """The override dicts to run: the base ({}) first, then one field at a time, or every combination; then
    the grid's explicit "settings"."""
    explicit = list(grid.get("settings", []))
    fields = {k: v for k, v in grid.items() if k != "settings"}
    if mode == "product":
        keys = sorted(fields)
        return [dict(zip(keys, values)) for values in itertools.product(*(fields[k] for k in keys))] + explicit
    if mode != "one_at_a_time":
        raise ValueError(f"sweep mode {mode!r}: choose one_at_a_time or product")
    return [{}] + [{key: value} for key in sorted(fields) for value in fields[key]] + explicit


def _typed(config: Config, updates: dict[str, Any]) -> Config:
    """`override` with JSON numbers cast to the field's type (an int grid value for a float field)."""
    typed = {}
    for dotted, value in updates.items():
        section, field = dotted.split(".")
        current = getattr(getattr(config, section), field)
        typed[dotted] = type(current)(value) if isinstance(current, (int, float)) and not isinstance(current, bool) \
            else value
    return override(config, typed)


def data_dir_for(config: Config, base: Config, out: Path) -> Path:
    """The base data folder if the setting tokenises prompts the same way, else its own shards."""
    tokenizer = tokenizer_source(config)
    digest = prompt_hash(config, tokenizer)
    if digest == prompt_hash(base, tokenizer):
        return base.data_dir
    folder = out / f"data-{digest}"
    if not (folder / "shards" / "meta.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for source in base.data_dir.glob("*.parquet"):
            shutil.copyfile(source, folder / source.name)
        for name in ("split.json",):
            if (base.data_dir / name).is_file():
                shutil.copyfile(base.data_dir / name, folder / name)
        write_shards(config, folder)
    return folder


def _key(updates: dict[str, Any]) -> str:
    """A setting's identity: its overrides as canonical JSON (matches rows across runs, names its folder)."""
    return json.dumps(updates, sort_keys=True)


def run_setting(base: Config, updates: dict[str, Any], index: int, out: Path, steps: int) -> dict[str, Any]:
    folder = out / f"setting-{hashlib.sha256(_key(updates).encode()).hexdigest()[:10]}"
    shutil.rmtree(folder, ignore_errors=True)  # what a stopped run left: this setting starts from its step 0
    config = _typed(base, {**updates, "train.max_steps": steps, "paths.work_dir": str(folder),
                           "train.checkpoint_every": 10**9, "train.async_checkpoint": False})
    if config.train.eval_batches <= 0:
        raise ValueError("the sweep scores on validation batches: set train.eval_batches > 0")
    config = override(config, {"paths.data_dir": str(data_dir_for(config, base, out))})
    start = time.time()
    metrics = train(config)
    row = {"setting": index, "overrides": updates, "seconds": round(time.time() - start, 1),
           **{k: metrics.get(k) for k in COLUMNS if k != "seconds"}}
    for name in ("checkpoints", "export"):
        shutil.rmtree(config.work_dir / name, ignore_errors=True)
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| rank | setting | overrides | " + " | ".join(COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(COLUMNS)]
    for rank, row in enumerate(rows, 1):
        cells = [f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c)) for c in COLUMNS]
        changed = ", ".join(f"{k}={v}" for k, v in row["overrides"].items()) or "(base)"
        lines.append(f"| {rank} | {row['setting']} | {changed} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write(base: Config, grid: dict, out: Path, steps: int, mode: str, rows: list[dict], planned: int) -> list[dict]:
    ranked = sorted(rows, key=lambda r: (r[SCORE] is None, r[SCORE] if r[SCORE] is not None else 0.0))
    table = {"config": base.name, "steps": steps, "mode": mode, "score": f"{SCORE} (lower is better)",
             "split": "val", "grid": grid, "planned": planned, "base": base.to_dict(), "rows": ranked}
    (out / "sweep.json").write_text(json.dumps(table, indent=2, default=str))
    done = "" if len(rows) == planned else f" {len(rows)} of {planned} settings done so far."
    (out / "sweep.md").write_text(f"Sweep of {base.name}, {steps} steps per setting, scored on validation pairs "
                                  f"({SCORE}, lower is better).{done}\n\n" + markdown(ranked))
    return ranked


def _scored(base: Config, out: Path, steps: int) -> list[dict]:
    """Rows of an earlier run of this sweep folder with the same base config and step count."""
    previous = out / "sweep.json"
    if not previous.is_file():
        return []
    table = json.loads(previous.read_text())
    same_base = json.loads(json.dumps(base.to_dict(), default=str)) == table.get("base")
    return table["rows"] if same_base and table.get("steps") == steps else []


def sweep(base: Config, grid: dict[str, list], out: Path, steps: int, mode: str = "one_at_a_time") -> list[dict]:
    """Runs every setting not yet scored in DIR/sweep.json and rewrites the table after each one: a stopped
    sweep resumes, and a grid that gains a value runs only that setting (rows are matched by their overrides;
    another base config or step count starts over)."""
    out.mkdir(parents=True, exist_ok=True)
    planned = settings(grid, mode)
    earlier = {_key(r["overrides"]): r for r in _scored(base, out, steps)}
    rows: list[dict] = []
    for i, updates in enumerate(planned):
        if _key(updates) in earlier:
            rows.append({**earlier[_key(updates)], "setting": i})
            continue
        print(f"[sweep] setting {i + 1}/{len(planned)}: {updates or '(base)'}", flush=True)
        rows.append(run_setting(base, updates, i, out, steps))
        _write(base, grid, out, steps, mode, rows, len(planned))
    return _write(base, grid, out, steps, mode, rows, len(planned))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", required=True, help="JSON: {section.field: [values, ...]}")
    parser.add_argument("--out", required=True, help="folder for the settings' runs and the table")
    parser.add_argument("--steps", type=int, default=64, help="training steps per setting")
    parser.add_argument("--mode", default="one_at_a_time", choices=("one_at_a_time", "product"))


def run(args, config: Config) -> list[dict]:
    """`notellm sweep`."""
    out = Path(args.out)
    rows = sweep(config, json.loads(Path(args.grid).read_text()), out, args.steps, args.mode)
    print((out / "sweep.md").read_text())
    return rows
