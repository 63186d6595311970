"""`notellm convert EXPORT DST --to hf|sentence-transformers`: the converted folders reproduce the export.

The export is the real stories260K decoder with the trainer's seeded random projection (`load_initial_params`,
`save_notellm`), as in test_embed. References: the project's own embedder (`note_encoder`) and its decoder's
logits; the converted folders are read by transformers and sentence-transformers themselves.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from notellm_jax.config import load_config
from notellm_jax.data.note_format import format_note
from notellm_jax.data.prompts import Note, build_example
from notellm_jax.errors import ConfigError
from notellm_jax.infer.encoder import note_encoder
from notellm_jax.infer.export_formats import run as convert
from notellm_jax.model.llama import Llama
from notellm_jax.model.params import unstack_layers
from notellm_jax.sharding import make_mesh
from notellm_jax.weights.export import load_notellm, save_notellm
from notellm_jax.weights.loading import load_initial_params
from notellm_jax.weights.tokenizer import resolve_tokenizer

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.py")
# Within the tiny prompt's budgets (16 title / 32 content tokens): the formatted text is the project's prompt.
NOTES = [Note("a", "Hot coffee", "Grind it fine.", ["brewing", "grind"], "coffee"),
         Note("b", "Tea or coffee?", "", ["tea"], "coffee"),
         Note("c", "A bird 'sang'", "It was a sunny day and Lily saw a big red bird.", ["story"], "stories"),
         Note("d", "Cats", "Tom and Sam", [], "pets")]


def _args(src, dst, to):
    return type("Args", (), {"src": str(src), "dst": str(dst), "to": to, "overwrite": False, "config": TINY})()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(config, export folder, hf folder, sentence-transformers folder)."""
    work = tmp_path_factory.mktemp("convert_run")
    config = load_config(TINY, [f"paths.work_dir={work}", "embed.batch_size=8"])
    params, llama_cfg = load_initial_params(config, resolve_tokenizer(config).vocab_size)
    export = save_notellm(work / "export", params, llama_cfg, config)
    return (config, export, convert(_args(export, work / "hf", "hf")),
            convert(_args(export, work / "st", "sentence-transformers")))


def _project_vectors(config, export_dir) -> np.ndarray:
    encoder = note_encoder(config, export_dir, make_mesh(1, -1, 1))
    return encoder.embedder([encoder.tokens(n) for n in NOTES])


def test_sentence_transformers_folder_gives_the_project_vectors(converted):
    from sentence_transformers import SentenceTransformer

    config, export_dir, _, st_dir = converted
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((st_dir / "modules.json").read_text())]
    assert modules == ["Transformer", "Pooling", "Dense", "Normalize"]
    model = SentenceTransformer(str(st_dir), device="cpu")
    layout = load_notellm(export_dir).prompt.layout
    got = model.encode([format_note(n.title, n.content, n.topics, layout) for n in NOTES], batch_size=4)
    np.testing.assert_allclose(got, _project_vectors(config, export_dir), atol=1e-4)


def test_hf_folder_loads_in_transformers_with_the_project_tokens_and_logits(converted):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, export_dir, hf_dir, _ = converted
    export = load_notellm(export_dir)
    tokenizer = resolve_tokenizer(config, export.tokenizer)
    hf_tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    example = build_example(NOTES[2], tokenizer, export.prompt, "category", with_output=False)
    text = format_note(NOTES[2].title, NOTES[2].content, NOTES[2].topics, export.prompt.layout)
    assert hf_tokenizer(text)["input_ids"] == example.input_ids[:example.embed_read_pos + 1]
    assert hf_tokenizer.convert_tokens_to_ids("[EMB]") == tokenizer.emb_id == example.input_ids[example.embed_read_pos + 1]
    ids = np.asarray([example.input_ids])  # the whole category prompt, [EMB] and the guidance included
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    cfg = export.llama.replace(scan_layers=False)
    decoder = Llama(cfg)
    params = {"params": unstack_layers(jax.device_get(export.params["decoder"]))}
    jax_logits = np.asarray(decoder.apply(params, decoder.apply(params, ids), method=Llama.logits))
    np.testing.assert_allclose(torch_logits, jax_logits[..., :cfg.vocab_size], atol=1e-4)
    np.testing.assert_array_equal(_projection(hf_dir), np.asarray(export.params["proj"]["kernel"]).T)
    assert "format_note" in (hf_dir / "README.md").read_text()


def _projection(folder: Path) -> np.ndarray:
    from safetensors.numpy import load_file
    return load_file(folder / "notellm_projection.safetensors")["weight"]


def test_sentence_transformers_target_refuses_weight_files(stories_dir, tmp_path):
    with pytest.raises(ConfigError, match="needs a NoteLLM export"):
        convert(_args(stories_dir / "stories260K.bin", tmp_path / "out", "sentence-transformers"))


def test_format_note_imports_without_jax_or_numpy():
    code = ("import sys; sys.modules['jax'] = sys.modules['numpy'] = None\n"
            "from notellm_jax.data.note_format import format_note\n"
            "print(format_note('T', 'C', ['x', 'y']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.strip().endswith("{'title': 'T', 'topic': 'x, y', 'content': 'C'} The compression word is:\"")
