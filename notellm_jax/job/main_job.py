"""The main job: prepare -> train -> embed -> recall eval -> generation eval -> report.

    python -m notellm_jax.job --config configs/smollm2_se.py [--set ...] [--force STAGE,...] [--only STAGE,...]
    notellm job --config ...   (the same)

Stages (each skips work whose outputs exist, unless named in --force: `prepare.skip_stage`, the rule
prepare's own stages follow):
  prepare    <work_dir>/data: notes, events, pairs, splits, TFRecord shards (notellm_jax.data.prepare)
  train      one NoteLLM per objective in job.train_variants (NoteLLM, w/o CSFT = PromptEOL+CSE, w/o GCL),
             each under <work_dir>/models/<objective>, all reading the same data and frozen-feature cache
  embed      the test notes with every trained variant and every baseline in job.baselines but the lexical
             one, BM25 (<work_dir>/embeddings/<model>)
  recall     Recall@k with the paper's protocol, exact and ScaNN, overall and per site group
             (<work_dir>/eval/<model>.recall.json); BM25 is scored here from the note text
  generate   category / hashtag generation of the trained variants that were taught to generate
             (<work_dir>/eval/generation/<variant>[-constrained])
  report     <work_dir>/report: report.md, metrics.json, recall-curve and embedding-projection PNGs

With job.seeds = N > 1 the stages run for each seed in turn (job/seeds.py: seed 0 in <work_dir>, seed i in
<work_dir>/seeds/<i>), each seed's report in its own work dir, and <work_dir>/report adds the seeds pooled.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from notellm_jax.config import Config, override
from notellm_jax.data import store
from notellm_jax.data.prepare import prepare, skip_stage, stages_to_run
from notellm_jax.errors import ConfigError
from notellm_jax.eval.baselines import LEXICAL_BASELINES, embed_baseline
from notellm_jax.eval.generation import generate_and_score
from notellm_jax.eval.recall import evaluate_embeddings, evaluate_lexical
from notellm_jax.infer.embed import embed_notes
from notellm_jax.infer.embeddings import embedding_dir
from notellm_jax.job.report import git_commit, read_timings, write_report
from notellm_jax.job.seeds import seed_configs, share_feature_cache
from notellm_jax.train import train

JOB_STAGES = ("prepare", "train", "embed", "recall", "generate", "report")

LABELS = {
    "notellm": "NoteLLM",
    "gcl_only": "PromptEOL+CSE (NoteLLM w/o CSFT)",
    "csft_only": "NoteLLM w/o GCL (CSFT only)",
    "llm_last_token": "LLM zero-shot (last token, no prompt)",
    "prompteol": "PromptEOL zero-shot",
    "sbert_zeroshot": "SentenceBERT zero-shot (all-MiniLM-L6-v2)",
    "sbert_finetuned": "SentenceBERT fine-tuned (in-batch negatives)",
    "bm25": "BM25 (title, hashtags, content)",
}
GENERATING = ("notellm", "csft_only")  # variants trained with the generation loss


def variant_config(config: Config, objective: str) -> Config:
    """The run config of one trained variant: its own folder, the shared prepared data."""
    return override(config, {"name": f"{config.name}-{objective}",
                             "paths.work_dir": str(config.work_dir / "models" / objective),
                             "paths.data_dir": str(config.data_dir), "train.objective": objective})


class Timer:
    """The wall time of each stage that did work in this invocation, and the names of those that found
    their outputs and were skipped (those record no time)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.skipped: list[str] = []

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        print(f"[job] {name} ...", file=sys.stderr, flush=True)
        start = time.time()
        result = fn()
        self.seconds[name] = round(time.time() - start, 1)
        print(f"[job] {name} done in {self.seconds[name]:.0f}s", file=sys.stderr, flush=True)
        return result

    def skip(self, name: str, why: str = "outputs exist") -> None:
        self.skipped.append(name)
        print(f"[job] {name}: {why}, skipped", file=sys.stderr, flush=True)

    def done(self, name: str, marker: Path, force: bool, why: str = "outputs exist") -> bool:
        """True (and `name` recorded as skipped) when `skip_stage` says so for `marker`, the file a step
        writes last."""
        if not skip_stage([marker], force):
            return False
        self.skip(name, why)
        return True


def _export_dir(config: Config, objective: str) -> Path:
    return variant_config(config, objective).work_dir / "export"


def stage_prepare(config: Config, force: bool, timer: Timer) -> None:
    if not stages_to_run(config, force=force):
        timer.skip("prepare", f"outputs exist in {config.data_dir}")
        return
    timer.run("prepare", lambda: prepare(config, force=force))


def stage_train(config: Config, force: bool, timer: Timer) -> None:
    for objective in config.job.train_variants:
        sub = variant_config(config, objective)
        if timer.done(f"train {objective}", sub.work_dir / "export" / "notellm.json", force, "export exists"):
            continue
        if force and sub.work_dir.exists():
            shutil.rmtree(sub.work_dir / "checkpoints", ignore_errors=True)
        timer.run(f"train {objective}", lambda sub=sub: train(sub))


def stage_embed(config: Config, force: bool, timer: Timer) -> None:
    test_notes = None
    for objective in config.job.train_variants:
        out = embedding_dir(config, objective)
        if timer.done(f"embed {objective}", out / "embeddings.json", force):
            continue
        test_notes = test_notes or store.notes_of(config.data_dir, "test", order="file")
        sub = variant_config(config, objective)
        timer.run(f"embed {objective}", lambda sub=sub, out=out, o=objective:
                  embed_notes(sub, _export_dir(config, o), test_notes, out, name=o))
    for name in config.job.baselines:
        if name in LEXICAL_BASELINES:
            continue  # scored from the note text in the recall stage
        out = embedding_dir(config, name)
        if timer.done(f"embed {name}", out / "embeddings.json", force):
            continue
        timer.run(f"embed {name}", lambda name=name, out=out: embed_baseline(config, name, out))


def _models(config: Config) -> list[str]:
    return list(config.job.train_variants) + list(config.job.baselines)


def stage_recall(config: Config, force: bool, timer: Timer) -> None:
    out_dir = config.work_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    for model in _models(config):
        path = out_dir / f"{model}.recall.json"
        if timer.done(f"recall {model}", path, force):
            continue
        result = timer.run(f"recall {model}", lambda model=model: evaluate_lexical(config, model)
                           if model in LEXICAL_BASELINES else
                           evaluate_embeddings(config, embedding_dir(config, model), name=model))
        path.write_text(json.dumps(result, indent=1))


def stage_generate(config: Config, force: bool, timer: Timer) -> None:
    runs = [(o, False) for o in config.job.train_variants if o in GENERATING]
    if config.generation.constrain_categories and "notellm" in config.job.train_variants:
        runs.append(("notellm", True))
    for objective, constrain in runs:
        name = objective + ("-constrained" if constrain else "")
        out = config.work_dir / "eval" / "generation" / name
        if timer.done(f"generate {name}", out / "metrics.json", force):
            continue
        tasks = ("category",) if constrain else ("category", "hashtag")
        sub = variant_config(config, objective)
        timer.run(f"generate {name}", lambda sub=sub, o=objective, out=out, tasks=tasks, constrain=constrain:
                  generate_and_score(sub, _export_dir(config, o), out, tasks=tasks, constrain=constrain,
                                     limit=config.generation.limit or None))


def stage_report(config: Config, force: bool, timer: Timer, seeds: list[Config] | None = None) -> None:
    timer.run("report", lambda: write_report(config, LABELS, GENERATING, seeds))


STAGE_FNS = {"prepare": stage_prepare, "train": stage_train, "embed": stage_embed, "recall": stage_recall,
             "generate": stage_generate, "report": stage_report}


def _stage_list(text: str | None, default: tuple[str, ...], flag: str) -> list[str]:
    """`--only a,b` / `--force a,b` -> the named stages in job order (`default` if not given)."""
    if text is None:
        return list(default)
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(names) - set(JOB_STAGES))
    if unknown:
        raise ConfigError(f"{flag}: unknown stage(s) {unknown}; stages are {', '.join(JOB_STAGES)}")
    return [s for s in JOB_STAGES if s in names]


def run_pipeline(config: Config, only: list[str], force: list[str]) -> dict[str, Any]:
    """Run the stages; append this invocation's record to <work_dir>/timings.json (rewritten after each
    stage, so an interrupted job keeps what finished) and return it."""
    timer = Timer()
    timings_path = config.work_dir / "timings.json"
    invocations = read_timings(timings_path)
    start = time.time()
    record = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit(), "stages_asked": only, "forced": force,
              "stages": timer.seconds, "skipped": timer.skipped, "wall_s": 0.0}
    invocations.append(record)
    for stage in only:
        STAGE_FNS[stage](config, stage in force, timer)
        record["wall_s"] = round(time.time() - start, 1)
        timings_path.parent.mkdir(parents=True, exist_ok=True)
        timings_path.write_text(json.dumps({"invocations": invocations}, indent=1))
    return record


def run_seeds(config: Config, only: list[str], force: list[str]) -> dict[str, Any]:
    """Every seed's stages (job/seeds.py), seed 0 first, each with its own report; then seed 0's report again,
    the seeds pooled in it. Returns seed 0's timing record with every seed's wall time added."""
    configs = seed_configs(config)
    before_report = [s for s in only if s != "report"]
    record = run_pipeline(config, before_report, force)
    wall = record["wall_s"]
    for i, seed_config in enumerate(configs[1:], start=1):
        print(f"[job] seed {i} of {len(configs) - 1} more (train.seed {seed_config.train.seed}) in "
              f"{seed_config.work_dir}", file=sys.stderr, flush=True)
        seed_config.data_dir.mkdir(parents=True, exist_ok=True)
        share_feature_cache(config, seed_config)
        wall += run_pipeline(seed_config, only, force)["wall_s"]
    if "report" in only:
        timer = Timer()
        stage_report(config, "report" in force, timer, configs)
        wall += timer.seconds["report"]
    return {**record, "wall_s": round(wall, 1), "seeds": len(configs)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", help="comma-separated stages to run (default all)")
    parser.add_argument("--force", help="comma-separated stages to redo even if their outputs exist")


def run(args, config: Config) -> dict[str, Any]:
    """`notellm job`: the stages in order, skipping finished ones; returns this invocation's timing record
    (its "stages": the wall time of each stage that did work)."""
    only = _stage_list(args.only, JOB_STAGES, "--only")
    force = _stage_list(args.force, (), "--force")
    record = run_pipeline(config, only, force) if config.job.seeds == 1 else run_seeds(config, only, force)
    print(f"[job] finished in {record['wall_s']:.0f}s; report: {config.work_dir / 'report' / 'report.md'}",
          file=sys.stderr)
    return record
