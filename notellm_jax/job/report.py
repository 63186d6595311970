"""The main job's report folder: report.md (tables), metrics.json (everything), PNG plots.

Reads only what the pipeline's stages wrote under <work_dir>: data/stats.json, models/*/logs/metrics.jsonl,
eval/*.recall.json, eval/generation/*/metrics.json, embeddings/, timings.json.
"""
from __future__ import annotations

import datetime
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import jax
import numpy as np

from notellm_jax.config import Config
from notellm_jax.eval.recall import DEFAULT_KS, load_test_data, with_query_sites
from notellm_jax.eval.retrieval import format_difference, group_differences, pairing_problem
from notellm_jax.errors import MissingInputError
from notellm_jax.infer.embeddings import embedding_dir, read_embeddings
from notellm_jax.job.seeds import seed_summary
from notellm_jax.runtime import machine_summary


def git_commit(cwd: str | Path | None = None) -> str:
    """The short commit of the checkout at `cwd` (default: the working directory), with "-dirty" when a
    tracked file differs from it (untracked files, such as the ignored runs/, do not count); "unknown"
    outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True, cwd=cwd).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], capture_output=True, cwd=cwd).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def run_info() -> dict[str, Any]:
    return {"commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_summary(),
            "python": platform.python_version(), "jax": jax.__version__,
            "devices": sorted({d.device_kind for d in jax.devices()})}


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def training_summary(config: Config, objective: str) -> dict[str, Any] | None:
    """Start/end of the loss curve, validation, throughput of one trained variant (from metrics.jsonl)."""
    path = config.work_dir / "models" / objective / "logs" / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    if not train:
        return None
    steady = train[1:] or train  # the first window includes compilation
    return {"steps": train[-1]["step"], "first": {k: train[0].get(k) for k in ("step", "loss", "loss_cl", "loss_gen", "accuracy")},
            "last": {k: train[-1].get(k) for k in ("step", "loss", "loss_cl", "loss_gen", "accuracy", "log_logit_scale")},
            "val": val[-1] if val else None,
            "median_step_time_s": float(np.median([r["step_time_s"] for r in steady])),
            "median_tokens_per_s": float(np.median([r["tokens_per_s"] for r in steady])),
            "median_mfu": float(np.median([r["mfu"] for r in steady])),
            "curve": [(r["step"], r["loss_cl"], r.get("loss_gen")) for r in train]}  # no loss_gen: gcl_only


def _fmt(entry: dict[str, Any] | None, with_ci: bool = True) -> str:
    if not entry or entry.get("recall") is None:
        return "n/a"
    text = f"{100 * entry['recall']:.1f}"
    if with_ci and entry.get("ci_low") is not None:
        text += f" [{100 * entry['ci_low']:.1f}, {100 * entry['ci_high']:.1f}]"
    return text


def _recall_table(models: list[str], recalls: dict[str, Any], labels: dict[str, str], section: str,
                  ks: list[int], paper_ks: dict[str, int]) -> list[str]:
    """paper_ks: {ratio: k} (k = ratio x pool, the paper's k/N for R@100, 1k, 10k, 100k of ~258k notes)."""
    head = [f"R@{k}" for k in ks] + [f"R@{k} (k/N={100 * float(r):.2g}%)" for r, k in paper_ks.items()]
    paper_ks = list(paper_ks.values())
    lines = ["| model | " + " | ".join(head) + " | Avg. (paper ks) |", "|---" * (len(head) + 2) + "|"]
    for model in models:
        result = (recalls.get(model) or {}).get(section) or {}
        table = result.get("recall", {})
        cells = [_fmt(table.get(str(k))) for k in ks + paper_ks]
        paper_values = [table.get(str(k), {}).get("recall") for k in paper_ks]
        avg = f"{100 * np.mean(paper_values):.1f}" if paper_values and None not in paper_values else "n/a"
        lines.append(f"| {labels.get(model, model)} | " + " | ".join(cells) + f" | {avg} |")
    return lines


def _plot_recall(models: list[str], recalls: dict[str, Any], labels: dict[str, str], out: Path) -> None:
    import matplotlib  # matplotlib: only where a figure is drawn, with its Agg backend chosen first
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # as above
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model in models:
        table = ((recalls.get(model) or {}).get("cooccurrence") or {}).get("recall", {})
        points = sorted((int(k), v["recall"]) for k, v in table.items() if v.get("recall") is not None)
        if points:
            ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", label=labels.get(model, model))
    ax.set_xscale("log")
    ax.set_xlabel("k (candidates retrieved)")
    ax.set_ylabel("Recall@k (%)")
    ax.set_title("Item-to-item recall on the test period (co-occurrence pairs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _plot_projection(config: Config, model: str, label: str, out: Path) -> bool:
    """2-D PCA of the model's test-note embeddings, coloured by category (site)."""
    emb_dir = embedding_dir(config, model)
    if not (emb_dir / "embeddings.json").is_file():
        return False
    import matplotlib  # matplotlib: only where a figure is drawn, with its Agg backend chosen first
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # as above
    data = load_test_data(config.data_dir)
    ids, vectors = read_embeddings(emb_dir, data["test_ids"])
    centred = vectors - vectors.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    categories = [data["categories"][i] for i in ids]
    fig, ax = plt.subplots(figsize=(7, 6))
    palette = plt.get_cmap("tab20")  # 20 distinct colours: the default cycle repeats after 10 categories
    for i, category in enumerate(sorted(set(categories))):
        rows = [j for j, c in enumerate(categories) if c == category]
        ax.scatter(xy[rows, 0], xy[rows, 1], s=6, alpha=0.7, color=palette(i % 20), label=f"{category} ({len(rows)})")
    ax.set_title(f"{label}: test-note embeddings, first two principal components")
    ax.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def _generation_lines(generation: dict[str, Any], labels: dict[str, str]) -> list[str]:
    lines = ["| model | notes | category Acc. | Ill. | hashtag P | R | F1 | BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-L |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in generation.items():
        cat, tag = m.get("category") or {}, m.get("hashtag") or {}
        base = name.replace("-constrained", "")
        label = labels.get(base, base) + (" (constrained decoding)" if name.endswith("-constrained") else "")
        pct = lambda d, k: f"{100 * d[k]:.1f}" if k in d else "n/a"  # noqa: E731
        lines.append(f"| {label} | {m.get('notes')} | {pct(cat, 'accuracy')} | {pct(cat, 'illusory')} | "
                     f"{pct(tag, 'precision')} | {pct(tag, 'recall')} | {pct(tag, 'f1')} | {pct(tag, 'bleu4')} | "
                     f"{pct(tag, 'rouge1')} | {pct(tag, 'rouge2')} | {pct(tag, 'rougeL')} |")
    return lines


def _header_lines(config: Config, info: dict[str, Any], stats: dict[str, Any], first: dict[str, Any]) -> list[str]:
    lines = [f"# NoteLLM report: {config.name}", "",
             f"Commit `{info['commit']}`, {info['date']}, {info['machine']}, jax {info['jax']} on {', '.join(info['devices'])}.",
             f"Model `{config.model.checkpoint}`, prompt layout `{config.prompt.layout}`, "
             f"train top {config.model.train_top_layers or 'all'} layers, {config.train.batch_pairs} pairs/batch, "
             f"lr {config.train.learning_rate}, alpha {config.train.alpha}, r {config.prompt.hashtag_fraction}.", "",
             "## Data", ""]
    splits = stats.get("splits", {})
    if splits:
        lines += [f"- notes: {splits.get('notes')}; pairs: {splits.get('pairs')}; notes in pairs: {splits.get('notes_in_pairs')}",
                  f"- test pool: {first['test_notes']} test notes, {first['pairs_kept']} disjoint query pairs kept of "
                  f"{first['pairs_read']} read, {first['pool_size']} candidates per query", ""]
    return lines


def _recall_lines(config: Config, models: list[str], recalls: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """Both recall tables, exposure buckets and within-category recall, and the ScaNN summary."""
    first = recalls[models[0]]["cooccurrence"]
    ks, paper_ks = [k for k in (config.retrieval.ks or DEFAULT_KS) if k in first["ks"]], first["paper_ks"]
    lines = ["## Recall@k (%, exact search; 95% bootstrap interval over queries)", "",
             "Co-occurrence pairs of the test period (METHOD.md 5 protocol):", ""]
    lines += _recall_table(models, recalls, labels, "cooccurrence", ks, paper_ks)
    lines += _group_recall_lines(config, models, recalls, labels, ks, paper_ks)
    lines += _difference_lines(config, models, recalls, labels, ks)
    lines += ["", "Explicit PostLinks between test questions (a second relevance set):", ""]
    lines += _recall_table(models, recalls, labels, "postlinks", ks, paper_ks)
    k_small = ks[min(2, len(ks) - 1)] if ks else min(paper_ks.values())
    lines += ["", f"Exposure buckets and within-category recall at k={k_small}:", "",
              "| model | low exposure | high exposure | within category |", "|---|---|---|---|"]
    for m in models:
        co = recalls[m]["cooccurrence"]
        exposure = co.get("exposure") or {}
        within = (co.get("within_category") or {}).get("recall", {})
        lines.append(f"| {labels.get(m, m)} | {_fmt((exposure.get('low') or {}).get(str(k_small)))} | "
                     f"{_fmt((exposure.get('high') or {}).get(str(k_small)))} | {_fmt(within.get(str(k_small)))} |")
    scann = recalls[models[0]].get("scann") or {}
    if scann:
        overlap = {k: round(v, 3) for k, v in (scann.get("overlap_with_exact") or {}).items()}
        timing = {k: round(v, 4) for k, v in (scann.get("timing") or {}).items()}
        lines += ["", f"ScaNN ({labels.get(models[0], models[0])}): params {scann.get('params')}, "
                  f"neighbour overlap with exact top-k {overlap}, timing (s, queries/s) {timing}."]
    return lines


HEADLINE_WHY = ("all-MiniLM-L6-v2 (the SentenceBERT baselines) was trained on about 68.7M Stack Exchange pairs from a "
                "2021 dump of the then-live sites, so only on the sites it cannot have read is its zero-shot "
                "figure zero-shot and a comparison with it a test of what was learnt (retrieval.site_groups).")


def group_order(config: Config, groups) -> list[str]:
    """Site groups in report order: the headline group first, the other groups, all sites last."""
    head = config.retrieval.headline_group
    named = [g for g in groups if g != "all"]
    return ([head] if head in named else []) + [g for g in named if g != head] + (["all"] if "all" in groups else [])


def _difference_lines(config: Config, models: list[str], recalls: dict[str, Any], labels: dict[str, str],
                      ks: list[int]) -> list[str]:
    """The first model (NoteLLM) minus each other one on the co-occurrence queries, with paired bootstrap
    intervals, per site group (the headline group first): an interval above 0 says the first is better."""
    ref = models[0]
    ref_co = recalls[ref]["cooccurrence"]
    ev = config.retrieval
    tables: dict[str, list[str]] = {}
    queries: dict[str, int] = {}
    skipped = []
    for m in models[1:]:
        co = recalls[m]["cooccurrence"]
        if pairing_problem(ref_co, co):
            skipped.append(labels.get(m, m))
            continue
        groups = group_differences(ref_co["ranks"], co["ranks"], ref_co.get("query_sites"), ev.site_groups, ks,
                                   ev.bootstrap_samples, ev.bootstrap_seed)
        for group, diff in groups.items():
            queries[group] = diff[str(ks[0])]["queries"]
            tables.setdefault(group, []).append(
                f"| {labels.get(m, m)} | " + " | ".join(format_difference(diff[str(k)]) for k in ks) + " |")
    lines = []
    order = group_order(config, tables)
    if order and order[0] != "all":
        lines += ["", f"Paired differences lead with the {order[0]} sites: {HEADLINE_WHY}"]
    for group in order:
        lines += ["", f"{labels.get(ref, ref)} minus each model, {group} sites ({queries[group]} queries), R@k points on the "
                  "same queries (paired bootstrap 95% interval; above 0: the first is better):", "",
                  "| model | " + " | ".join(f"R@{k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|", *tables[group]]
    if skipped:
        lines += ["", "Not paired (no per-query ranks from the same queries; rerun the recall stage): "
                  f"{', '.join(skipped)}."]
    return lines


def _group_recall_lines(config: Config, models: list[str], recalls: dict[str, Any], labels: dict[str, str],
                        ks: list[int], paper_ks: dict[str, int]) -> list[str]:
    """One recall table per site group (a pair's group: its query note's site), the headline group first."""
    groups = (recalls[models[0]]["cooccurrence"].get("groups") or {})
    lines = []
    for group in [g for g in group_order(config, groups) if g != "all"]:
        entry = groups[group]
        by_model = {m: {"group": ((recalls[m]["cooccurrence"].get("groups") or {}).get(group))} for m in models}
        missing = f"; no query from {', '.join(entry['sites_without_queries'])}" if entry["sites_without_queries"] else ""
        lines += ["", f"Site group **{group}**: {entry['queries']} queries from {', '.join(entry['sites'])}{missing}; "
                  f"{entry['targets_outside_group']} of them have their ground truth on a site outside the group:", ""]
        lines += _recall_table(models, by_model, labels, "group", ks, paper_ks)
    return lines


def _training_lines(training: dict[str, Any], labels: dict[str, str]) -> list[str]:
    lines = ["## Training", "", "| variant | steps | loss_cl start → end | loss_gen start → end | val loss_cl | "
             "step time (s) | tokens/s | MFU |", "|---|---|---|---|---|---|---|---|"]
    for o, t in training.items():
        if t is None:
            continue
        val = t["val"]["loss_cl"] if t["val"] else float("nan")
        first_gen, last_gen = t["first"]["loss_gen"], t["last"]["loss_gen"]  # None: a gcl_only step skips the head
        gen = "not computed" if first_gen is None else f"{first_gen:.3f} → {last_gen:.3f}"
        lines.append(f"| {labels.get(o, o)} | {t['steps']} | {t['first']['loss_cl']:.3f} → {t['last']['loss_cl']:.3f} | "
                     f"{gen} | {val:.3f} | "
                     f"{t['median_step_time_s']:.2f} | {t['median_tokens_per_s']:.0f} | {100 * t['median_mfu']:.1f}% |")
    return lines


def read_timings(path: Path) -> list[dict[str, Any]]:
    """timings.json: one record per `notellm job` invocation in this work dir, oldest first. A file from
    before per-invocation records (one flat {stage: seconds} dict) reads as one record marked "merged"."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "invocations" not in data:
        return [{"started": None, "commit": None, "merged": True, "stages": data, "skipped": []}]
    return data["invocations"]


def latest_stage_times(invocations: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each stage's latest run that did work: {stage: {"seconds", "started", "commit"}}, in first-run order."""
    latest: dict[str, dict[str, Any]] = {}
    for record in invocations:
        for stage, seconds in record["stages"].items():
            latest[stage] = {"seconds": seconds, "started": record.get("started"), "commit": record.get("commit")}
    return latest


def _wall_time_lines(invocations: list[dict[str, Any]]) -> list[str]:
    """The stage times of timings.json: per stage its latest real run, then every job invocation."""
    if not invocations:
        return ["## Wall time", "", "No timings.json in this work dir (the stages were not run by `notellm job`).", ""]
    lines = ["## Wall time per stage (s)", "",
             "Each stage's latest run that did work in this work dir; the stages may come from different"
             " `notellm job` invocations (listed below). A stage that found its outputs was skipped and records"
             " no time.", "", "| stage | seconds | invocation started | commit |", "|---|---|---|---|"]
    for stage, run in latest_stage_times(invocations).items():
        lines.append(f"| {stage} | {run['seconds']} | {run['started'] or 'unknown'} | {run['commit'] or 'unknown'} |")
    lines += ["", "### Job invocations", "",
              "Wall time is recorded after each stage, so the invocation writing this report is counted up to"
              " its report stage.", "",
              "| started | commit | stages that ran | skipped | wall (s) |", "|---|---|---|---|---|"]
    for record in invocations:
        if record.get("merged"):
            lines.append(f"| unknown (merged before per-invocation records) | unknown | {', '.join(record['stages'])}"
                         " | unknown | unknown |")
            continue
        ran = ", ".join(f"{k} {v}" for k, v in record["stages"].items()) or "none"
        lines.append(f"| {record['started']} | {record['commit']} | {ran} | {', '.join(record['skipped']) or 'none'}"
                     f" | {record['wall_s']} |")
    return lines + [""]


def _seed_lines(config: Config, summary: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """Per group: each model's R@k over the seeds (mean ± sd, then each seed's), and the reference minus each
    model with paired intervals over the queries pooled across seeds."""
    ks, ref = summary["ks"], summary["reference"]
    lines = ["## Seeds", "", f"{len(summary['seeds'])} runs of the recipe, train.seed (and data.seed offset) "
             f"{', '.join(map(str, summary['seeds']))}: R@k (%) as mean ± standard deviation over the seeds, then "
             "each seed's; models that no seed changes have sd 0. Differences: the mean over seeds of each query's "
             "difference, 95% interval resampling queries with all their seeds (job/seeds.py)."]
    order = group_order(config, summary["groups"])
    if order[0] != "all":
        lines += ["", f"The {order[0]} sites lead: {HEADLINE_WHY}"]
    for group in order:
        entry = summary["groups"][group]
        lines += ["", f"**{group}** sites ({entry['queries']} queries):", "",
                  "| model | " + " | ".join(f"R@{k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
        for m, fig in entry["models"].items():
            cells = [f"{100 * fig['mean'][i]:.1f} ± {100 * fig['sd'][i]:.1f} ("
                     + " / ".join(f"{100 * seed[i]:.1f}" for seed in fig["per_seed"]) + ")" for i in range(len(ks))]
            lines.append(f"| {labels.get(m, m)} | " + " | ".join(cells) + " |")
        lines += ["", f"{labels.get(ref, ref)} minus each model, pooled over seeds:", "",
                  "| model | " + " | ".join(f"R@{k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
        lines += [f"| {labels.get(m, m)} | " + " | ".join(format_difference(d[str(k)]) for k in ks) + " |"
                  for m, d in entry["differences"].items()]
    return lines + [""]


def _read_recalls(config: Config, models: list[str]) -> dict[str, Any]:
    """Each model's recall result; one written before site groups were kept gets them from the test data."""
    recalls = {m: _read_json(config.work_dir / "eval" / f"{m}.recall.json") for m in models}
    missing = [m for m, r in recalls.items() if r is None]
    if missing:
        raise MissingInputError(f"no recall results for {missing}: run the pipeline's recall stage first")
    if (config.data_dir / "split.json").is_file():
        for result in recalls.values():
            result["cooccurrence"] = with_query_sites(config, result["cooccurrence"])
    return recalls


def write_report(config: Config, labels: dict[str, str], generating: tuple[str, ...],
                 seeds: list[Config] | None = None) -> Path:
    """<work_dir>/report; with `seeds` (job/seeds.py's configs, more than one), a section pooling them."""
    out = config.work_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    models = list(config.job.train_variants) + list(config.job.baselines)
    recalls = _read_recalls(config, models)
    generation = {p.name: _read_json(p / "metrics.json")
                  for p in sorted((config.work_dir / "eval" / "generation").glob("*")) if (p / "metrics.json").is_file()}
    training = {o: training_summary(config, o) for o in config.job.train_variants}
    stats = _read_json(config.data_dir / "stats.json") or {}
    invocations = read_timings(config.work_dir / "timings.json")
    info = run_info()

    _plot_recall(models, recalls, labels, out / "recall_at_k.png")
    projected = _plot_projection(config, models[0], labels.get(models[0], models[0]), out / "embedding_projection.png")

    first = recalls[models[0]]["cooccurrence"]
    lines = _header_lines(config, info, stats, first)
    summary = (seed_summary(config, seeds, models, [k for k in (config.retrieval.ks or DEFAULT_KS) if k in first["ks"]])
               if seeds and len(seeds) > 1 else None)
    lines += _seed_lines(config, summary, labels) + ["The sections below are seed 0's run alone.", ""] if summary else []
    lines += _recall_lines(config, models, recalls, labels)
    lines += ["", "![recall](recall_at_k.png)", ""]
    if projected:
        lines += ["![projection](embedding_projection.png)", ""]
    if generation:
        lines += ["## Generation (test notes)", ""] + _generation_lines(generation, labels) + [""]
    lines += _training_lines(training, labels)
    lines += [""] + _wall_time_lines(invocations)
    (out / "report.md").write_text("\n".join(lines))
    (out / "metrics.json").write_text(json.dumps(
        {"run": info, "config": config.to_dict(),
         "timings": {"invocations": invocations, "latest": latest_stage_times(invocations)},
         "data": stats, "training": training, "recall": recalls, "generation": generation,
         **({"seeds": summary} if summary else {})}, indent=1, default=str))
    return out
