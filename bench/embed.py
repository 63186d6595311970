"""CPU embedding speed: the project's embedder against transformers on PyTorch, side by side in one run.

    python bench/embed.py [--notes 150] [--threads 2] [--out bench/results/embed/DATE-cpu2-epyc-TAG.json]

One export of SmolLM2-135M (configs/smollm2_se.py: the GGUF's weights, the trainer's seeded projection,
`load_initial_params` + `save_notellm`) embeds the same real notes (the first questions of
coffee.stackexchange.com) with the same token ids (the project's category prompt up to the read position):
- the project's `note_encoder` embedder in float32 and bfloat16, batch 8 and 32, prefix cache on and off;
  with token-budget batches (`embed.batch_tokens`, `--batch-tokens`) and the prefix cache; and the path a
  top-k export's new notes take (`--top-layers` trained, the frozen bottom through the feature cache), with
  and without the prefix cache, its store emptied before the timed pass (every note new, as in the service);
- the same export converted by `notellm convert --to hf` (`infer.export_formats.write_hf_export`), run by
  transformers' LlamaModel in float32, bfloat16, float32 + torch.compile and bfloat16 + torch.compile,
  length-sorted right-padded batches read at each row's last token, then the projection and L2 normalisation.
Each path runs the notes once to warm up (compiles every shape), then once timed; notes/s is of the timed
pass. Vectors are compared with the project's float32 embedder without prefix cache (the reference): max abs
difference and the lowest cosine. The machine's load (`uptime`) is recorded before and after: the CPUs may
be shared with other jobs. positions_per_note: token positions each path computes per note (rows x padded
length of its calls), shapes: how many (rows, length) shapes it compiled. `--small` checks the script in a few
minutes (12 notes, batch 8, one budget, PyTorch float32 only): not a measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SITE = "coffee.stackexchange.com"
TORCH_PATHS = ("torch_float32", "torch_bfloat16", "torch_float32_compile", "torch_bfloat16_compile")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "smollm2_se.py"))
    parser.add_argument("--notes", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="8,32", help="batch sizes of the project's paths")
    parser.add_argument("--torch-batch", type=int, default=32)
    parser.add_argument("--torch-paths", default=",".join(TORCH_PATHS),
                        help="which PyTorch paths run (torch.compile of bfloat16 can take many minutes on a CPU "
                             "without fast bfloat16)")
    parser.add_argument("--batch-tokens", default="2048,4096", help="token budgets of the project's token-budget "
                        "paths (float32 and, for the first, bfloat16; prefix cache on)")
    parser.add_argument("--top-layers", type=int, default=4, help="trained top layers of the feature-cache paths' "
                        "export (configs/smollm2_se.py trains 4; 0 = no such paths)")
    parser.add_argument("--small", action="store_true", help="a quick check of the script (not a measurement)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if args.small:
        args.notes, args.batches, args.torch_paths = 12, "8", "torch_float32"
        args.batch_tokens, args.torch_batch = args.batch_tokens.split(",")[0], 8
    return args


def real_notes(config, count: int):
    """The first `count` questions of one Stack Exchange site as notes (title, text of the body, tags)."""
    from notellm_jax.data.importers.stackexchange import html_to_text, iter_rows, parse_tags
    from notellm_jax.data.prompts import Note

    notes = []
    for row in iter_rows(config.resolve(f"data/stackexchange/{SITE}") / "Posts.xml"):
        if row.get("PostTypeId") == "1" and row.get("Title"):
            notes.append(Note(row["Id"], row["Title"], html_to_text(row.get("Body", "")),
                              parse_tags(row.get("Tags", "")), "coffee"))
        if len(notes) == count:
            break
    return notes


def timed(fn, warm, items) -> tuple[np.ndarray, float]:
    """fn(items) timed after fn(warm), a few items that reach every shape (compiles)."""
    fn(warm)
    start = time.perf_counter()
    out = fn(items)
    return out, time.perf_counter() - start


def token_ids(config, export_dir: Path, notes) -> list[list[int]]:
    """Each note's prompt tokens up to the read position, as the project's embedder builds them."""
    from notellm_jax.config import override
    from notellm_jax.infer.encoder import note_encoder

    encoder = note_encoder(override(config, {"embed.prefix_cache": False}), export_dir)
    return [encoder.tokens(n) for n in notes]


def run_encoder(encoder, notes, name: str, results: dict) -> None:
    """Time one project path after a warm-up pass over the same notes (it compiles every shape the timed pass
    meets); a feature cache is emptied before the timed pass, so every note is new to it, as in the service."""
    tokens = [encoder.tokens(n) for n in notes]
    encoder.embedder(tokens)
    if encoder.cache is not None:
        encoder.cache.clear()
    start = time.perf_counter()
    vectors = encoder.embedder(tokens)
    seconds = time.perf_counter() - start
    plan = encoder.embedder.plan([len(t) for t in tokens])
    # the prefix runs once for every note
    spent = (sum(rows * length for _, rows, length in plan) + len(encoder.prefix)) / len(tokens)
    results[name] = (vectors, seconds, spent, len({(rows, length) for _, rows, length in plan}))
    print(f"{name}: {len(notes) / seconds:.2f} notes/s", file=sys.stderr, flush=True)


def project_paths(config, export_dir: Path, notes, args, top_export: Path | None) -> dict:
    """{name: (vectors, seconds, positions computed per note, shapes)} for the project's embedder."""
    from notellm_jax.config import override
    from notellm_jax.infer.encoder import note_encoder
    from notellm_jax.weights.export import load_notellm

    results = {}
    budgets = [int(b) for b in args.batch_tokens.split(",") if b]
    for dtype in ("float32", "bfloat16"):
        export = load_notellm(export_dir)
        export.llama = export.llama.replace(compute_dtype=dtype)
        for batch in [int(b) for b in args.batches.split(",")]:
            for prefix in (False, True):
                if dtype == "bfloat16" and not prefix:
                    continue
                encoder = note_encoder(override(config, {"embed.prefix_cache": prefix}), export, batch_size=batch)
                run_encoder(encoder, notes, f"jax_{dtype}_b{batch}_{'prefix' if prefix else 'noprefix'}", results)
        for budget in budgets[:1] if dtype == "bfloat16" else budgets:
            encoder = note_encoder(override(config, {"embed.batch_tokens": budget}), export)
            run_encoder(encoder, notes, f"jax_{dtype}_tok{budget}_prefix", results)
    if top_export is not None:
        batch = int(args.batches.split(",")[0])
        for prefix in (False, True):
            encoder = note_encoder(override(config, {"embed.prefix_cache": prefix}), top_export, batch_size=batch)
            assert encoder.cache is not None, "the top-k export should embed through the feature cache"
            run_encoder(encoder, notes, f"jax_float32_b{batch}_featurecache_{'prefix' if prefix else 'noprefix'}",
                        results)
    return results


def torch_paths(hf_dir: Path, ids: list[list[int]], pad_id: int, batch: int, names=TORCH_PATHS) -> dict:
    """{name: (vectors, seconds, positions per note, shapes)} for transformers on PyTorch."""
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModel

    weight = torch.from_numpy(load_file(hf_dir / "notellm_projection.safetensors")["weight"])
    order = np.argsort([len(t) for t in ids], kind="stable")
    lengths = [len(ids[i]) for i in order]
    spent = sum(len(order[s:s + batch]) * max(lengths[s:s + batch]) for s in range(0, len(order), batch))
    results = {}
    for name in names:
        dtype, compile_ = (torch.float32 if "float32" in name else torch.bfloat16), name.endswith("_compile")
        model = AutoModel.from_pretrained(str(hf_dir), dtype=dtype).eval()
        forward = torch.compile(model) if compile_ else model

        def run(ids):
            order = np.argsort([len(t) for t in ids], kind="stable")
            out = np.zeros((len(ids), weight.shape[0]), np.float32)
            with torch.inference_mode():
                for start in range(0, len(order), batch):
                    rows = order[start:start + batch]
                    width = max(len(ids[r]) for r in rows)
                    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
                    mask = torch.zeros((len(rows), width), dtype=torch.long)
                    for i, r in enumerate(rows):
                        x[i, :len(ids[r])] = torch.tensor(ids[r])
                        mask[i, :len(ids[r])] = 1
                    hidden = forward(input_ids=x, attention_mask=mask).last_hidden_state
                    last = hidden[torch.arange(len(rows)), mask.sum(1) - 1].float() @ weight.T
                    out[rows] = torch.nn.functional.normalize(last, dim=-1).numpy()
            return out

        by_length = [ids[i] for i in np.argsort([len(t) for t in ids], kind="stable")]
        # The shortest, a middle and the longest batch: torch.compile turns to dynamic shapes on a second length.
        middle = len(by_length) // 2
        warm = by_length[:batch] + by_length[middle:middle + batch] + by_length[-batch:]
        vectors, seconds = timed(run, warm, ids)
        results[name] = (vectors, seconds, spent / len(ids), None)
        print(f"{name}: {len(ids) / seconds:.2f} notes/s", file=sys.stderr, flush=True)
    return results


def agreement(vectors: np.ndarray, reference: np.ndarray) -> dict:
    cos = np.sum(vectors * reference, axis=1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(reference, axis=1)
    return {"max_abs_diff": float(np.abs(vectors - reference).max()), "min_cosine": float(cos.min())}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()


def main() -> None:
    args = parse_args()
    os.environ.setdefault("USE_TF", "0")
    import torch
    torch.set_num_threads(args.threads)
    from notellm_jax.config import load_config, override
    from notellm_jax.infer.export_formats import write_hf_export
    from notellm_jax.runtime import cpu_model
    from notellm_jax.weights.export import load_notellm, save_notellm
    from notellm_jax.weights.loading import load_initial_params
    from notellm_jax.weights.tokenizer import resolve_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench_embed_"))
    config = load_config(args.config, [f"paths.work_dir={work}", "model.train_top_layers=0"], environ=os.environ)
    tokenizer = resolve_tokenizer(config)
    params, llama_cfg = load_initial_params(config, tokenizer.vocab_size)
    export_dir = save_notellm(work / "export", params, llama_cfg, config)
    hf_dir = write_hf_export(load_notellm(export_dir), tokenizer, work / "hf")
    notes = real_notes(config, args.notes)
    result = {"benchmark": "embed", "config": args.config, "model": config.model.checkpoint, "notes": len(notes),
              "threads": args.threads, "machine": f"{platform.node()}: {os.cpu_count()} CPUs ({cpu_model()})",
              "caveat": "2-core VM shared with other jobs during this run: absolute rates vary with the load "
                        "(see load_before / load_after); the paths ran one after another in one process",
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_before": uptime()}
    ids = token_ids(config, export_dir, notes)
    unknown = set(args.torch_paths.split(",")) - set(TORCH_PATHS)
    if unknown:
        raise SystemExit(f"--torch-paths: unknown {sorted(unknown)}; choose from {', '.join(TORCH_PATHS)}")
    paths = torch_paths(hf_dir, ids, tokenizer.pad_id, args.torch_batch, args.torch_paths.split(","))
    top_export = None
    if args.top_layers:
        top_config = override(config, {"model.train_top_layers": args.top_layers})
        top_export = save_notellm(work / "export_top", params, llama_cfg, top_config)
    paths.update(project_paths(config, export_dir, notes, args, top_export))
    reference = paths["jax_float32_b%s_noprefix" % args.batches.split(",")[0]][0]
    result["paths"] = {name: {"notes_per_s": round(len(notes) / seconds, 3), "seconds": round(seconds, 2),
                              "positions_per_note": round(spent, 1), "shapes": shapes,
                              **agreement(vectors, reference)}
                       for name, (vectors, seconds, spent, shapes) in paths.items()}
    result["tokens_per_note"] = round(float(np.mean([len(t) for t in ids])), 1)
    best = lambda prefix: max((v["notes_per_s"], k) for k, v in result["paths"].items() if k.startswith(prefix))  # noqa: E731
    result["best_project"], result["best_torch"] = best("jax"), best("torch")
    result["load_after"] = uptime()
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
