"""A trained NoteLLM export in the ecosystem's own formats, and the `notellm convert` command.

    notellm convert SRC DST [--to hf|orbax|sentence-transformers] [--overwrite] [--config C]

SRC a NoteLLM export (a folder with notellm.json, what training writes under
<work_dir>/models/<variant>/export): `--to hf` writes the fine-tuned decoder as a transformers
LlamaForCausalLM folder (the [EMB] row included) with its tokenizer ([EMB] appended, BOS as the project
prepends it, right padding), the [EMB] projection (`notellm_projection.safetensors`, a torch Linear weight
[emb_dim, hidden], no bias) and a model card (README.md) saying how notes are formatted and read out.
`--to sentence-transformers` writes the same folder plus the sentence-transformers modules: Transformer,
last-token Pooling, the projection as a Dense module (no bias, identity activation) and Normalize, so
`SentenceTransformer(DST).encode(format_note(...))` gives the project's vectors.
SRC a weight file or folder (HF, llama2.c, GGUF, orbax): `weights.convert` (`--to hf|orbax`).
`--config` only supplies the roots the export's recorded tokenizer is resolved against (default: the
project's default paths and NOTELLM_SHARED / NOTELLM_CACHE).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from notellm_jax.config import ENVIRONMENT_PATHS, Config, load_config, override
from notellm_jax.data.note_format import format_note
from notellm_jax.errors import CheckpointError, ConfigError
from notellm_jax.weights import convert as weights_convert
from notellm_jax.weights.export import NoteLLMExport, load_notellm, save_hf_decoder
from notellm_jax.weights.tokenizer import NoteTokenizer, resolve_tokenizer

PROJECTION_FILE = "notellm_projection.safetensors"
HEAD_FILE = "notellm_head.json"
EXPORT_TARGETS = ("hf", "sentence-transformers")
# A note the written tokenizer must encode exactly as the project does (quotes, spaces, digits, non-ASCII).
PROBE = ("Grinding 'fine' beans?", "Brew at 93 \u00b0C,  then\nwait: caf\u00e9 style.", ["grind", "brewing"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    weights_convert.add_arguments(parser, targets=tuple(weights_convert.WRITERS) + ("sentence-transformers",))
    parser.add_argument("--config", help="configs/<name>.py[:arg]: the roots an export's tokenizer is found under")


def is_export(path: str | Path) -> bool:
    return (Path(path) / "notellm.json").is_file()


def run(args, config=None) -> Path:
    """`notellm convert`: an export to `--to hf|sentence-transformers`, anything else through weights.convert."""
    if not is_export(args.src):
        if args.to not in weights_convert.WRITERS:
            raise ConfigError(f"--to {args.to} needs a NoteLLM export (a folder with notellm.json); {args.src} "
                              f"is not one (training writes it under <work_dir>/models/<variant>/export)")
        return weights_convert.run(args)
    if args.to not in EXPORT_TARGETS:
        raise ConfigError(f"{args.src} is a NoteLLM export, already in orbax; --to takes {EXPORT_TARGETS} for it")
    dst = weights_convert.check_destination(args.dst, args.overwrite)
    start = time.perf_counter()
    config = config or _roots_config(args.config)
    export = load_notellm(args.src)
    tokenizer = resolve_tokenizer(config, export.tokenizer, export.prompt.emb_token)
    print(f"converting NoteLLM export {args.src} -> {dst} ({args.to})", flush=True)
    write_hf_export(export, tokenizer, dst)
    if args.to == "sentence-transformers":
        add_sentence_transformers_modules(export, dst)
    print(f"converted {args.src} -> {dst} ({args.to}, {export.llama.num_params():,} decoder parameters, "
          f"{time.perf_counter() - start:.1f} s)")
    return dst


def _roots_config(spec: str | None) -> Config:
    if spec:
        return load_config(spec, environ=os.environ)
    config = Config()
    for variable, dotted in ENVIRONMENT_PATHS.items():
        if os.environ.get(variable):
            config = override(config, {dotted: os.environ[variable]})
    return config


def projection_weight(export: NoteLLMExport) -> np.ndarray:
    """The [EMB] projection as a torch Linear weight [emb_dim, hidden] (the Flax kernel is [hidden, emb_dim])."""
    return np.ascontiguousarray(np.asarray(export.params["proj"]["kernel"], np.float32).T)


def write_hf_export(export: NoteLLMExport, tokenizer: NoteTokenizer, dst: Path) -> Path:
    """The decoder, its tokenizer, the projection and the model card in `dst`."""
    save_hf_decoder(export.params, export.llama, dst)
    save_tokenizer(tokenizer, export, dst)
    save_file({"weight": projection_weight(export)}, dst / PROJECTION_FILE, metadata={"format": "pt"})
    head = {"emb_dim": export.emb_dim, "hidden_size": export.llama.hidden_size, "bias": False,
            "normalize": True, "read": "last token of format_note(...) (the token before [EMB])",
            "emb_token": tokenizer.emb_token, "emb_token_id": tokenizer.emb_id,
            "prompt": {k: getattr(export.prompt, k) for k in
                       ("layout", "title_max_tokens", "content_max_tokens", "max_length")},
            "run": export.meta.get("run"), "base_checkpoint": export.meta.get("checkpoint")}
    (dst / HEAD_FILE).write_text(json.dumps(head, indent=2))
    (dst / "README.md").write_text(model_card(export, tokenizer))
    return dst


def save_tokenizer(tokenizer: NoteTokenizer, export: NoteLLMExport, dst: Path) -> None:
    """The project's tokenizer as a fast transformers tokenizer that `AutoTokenizer` loads and that encodes
    like the project: BOS prepended exactly when the project prepends it, no EOS, [EMB] at its id, right
    padding (the last-token read of a causal model needs the real tokens first). Checked on a probe note."""
    from transformers import AutoTokenizer  # transformers: only for the tokenizer files

    hf = copy.deepcopy(tokenizer.hf)
    if not hf.is_fast:  # a sentencepiece model (llama2.c, LLaMA-2): convert, keeping its non-legacy spaces
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp)
            hf = AutoTokenizer.from_pretrained(tmp, use_fast=True, from_slow=True,
                                               legacy=getattr(tokenizer.hf, "legacy", True))
        for key in ("from_slow", "add_prefix_space"):  # either makes a reload convert again, from a file
            hf.init_kwargs.pop(key, None)                # no longer there; tokenizer.json holds both rules
        hf.vocab_file = None
        if tokenizer.encode("a  b") == tokenizer.encode("a b"):
            _collapse_spaces(hf)
    for flag, value in (("add_bos_token", tokenizer.bos_id is not None), ("add_eos_token", False)):
        if hasattr(hf, flag):
            setattr(hf, flag, value)
    hf.padding_side = "right"
    if hf.pad_token is None:
        hf.pad_token = hf.convert_ids_to_tokens(tokenizer.pad_id)
    hf.model_max_length = export.prompt.max_length
    hf.save_pretrained(str(dst))
    check_tokenizer(tokenizer, export, dst)


def _collapse_spaces(hf) -> None:
    """sentencepiece's `remove_extra_whitespaces` (runs of spaces count as one), which transformers' fast
    conversion leaves out: a normalizer step in front. (Its leading/trailing-space rules differ too, but a
    formatted note neither starts nor ends with a space.)"""
    from tokenizers import Regex, normalizers  # tokenizers (with transformers): only for the tokenizer files

    steps = [normalizers.Replace(Regex(" {2,}"), " ")]
    if hf.backend_tokenizer.normalizer is not None:
        steps.append(hf.backend_tokenizer.normalizer)
    hf.backend_tokenizer.normalizer = normalizers.Sequence(steps)


def check_tokenizer(tokenizer: NoteTokenizer, export: NoteLLMExport, folder: Path) -> None:
    """The written tokenizer gives the project's token ids for a formatted probe note and knows [EMB]."""
    from transformers import AutoTokenizer  # transformers: only for the tokenizer files

    written = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    text = format_note(*PROBE, layout=export.prompt.layout)
    expected = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + \
        tokenizer.encode(text, split_special_tokens=True)
    got = written(text)["input_ids"]
    if got != expected or written.convert_tokens_to_ids(tokenizer.emb_token) != tokenizer.emb_id:
        raise CheckpointError(f"{folder}: the written tokenizer does not encode like {tokenizer.source} "
                              f"(probe note: {got[:8]}... against {expected[:8]}...); not converted")


def add_sentence_transformers_modules(export: NoteLLMExport, dst: Path) -> None:
    """modules.json and the module folders beside the HF files: Transformer (this folder), last-token
    Pooling (the read position is the formatted text's last token; right padding), Dense (the projection,
    no bias, identity) and Normalize (the project's vectors are unit length)."""
    import torch  # torch and sentence-transformers: only for this target
    from sentence_transformers import SentenceTransformer  # as above
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer  # as above

    hidden = export.llama.hidden_size
    transformer = Transformer(str(dst), max_seq_length=export.prompt.max_length,
                              model_kwargs={"dtype": torch.float32})
    dense = Dense(hidden, export.emb_dim, bias=False, activation_function=torch.nn.Identity(),
                  init_weight=torch.from_numpy(projection_weight(export)))
    model = SentenceTransformer(modules=[transformer, Pooling(hidden, pooling_mode="lasttoken"), dense, Normalize()],
                                device="cpu")
    card = (dst / "README.md").read_text()
    model.save(str(dst), create_model_card=False)
    (dst / "README.md").write_text(card)  # the project's card, not a generic one


def model_card(export: NoteLLMExport, tokenizer: NoteTokenizer) -> str:
    """README.md: what the folder holds, how a note is formatted and where its vector is read."""
    p = export.prompt
    example = format_note("Crispy oven potatoes", "Parboil, shake in the pot, roast hot.", ["potatoes", "oven"],
                          layout=p.layout)
    bos = "the tokenizer prepends BOS" if tokenizer.bos_id is not None else "no BOS is prepended"
    return f"""# NoteLLM export `{export.meta.get('run')}` (converted by notellm_jax)

A decoder fine-tuned with NoteLLM (arXiv 2403.01744) from `{export.meta.get('checkpoint')}`: it compresses a
note into the hidden state of the token just before its `{tokenizer.emb_token}` token; a linear projection
(no bias) of that state, L2-normalised, is the note's {export.emb_dim}-d vector.

## Files
- `config.json`, `model.safetensors`, tokenizer files: a transformers `{export.llama.model_type}` causal LM whose
  vocabulary ends with `{tokenizer.emb_token}` (id {tokenizer.emb_id}); right padding; {bos}.
- `{PROJECTION_FILE}`: `weight` [{export.emb_dim}, {export.llama.hidden_size}], a torch Linear weight, no bias.
- `{HEAD_FILE}`: the same facts for programs (prompt layout and token budgets included).
- With `--to sentence-transformers` also `modules.json` and its modules: Transformer, last-token Pooling, Dense
  (the projection, identity activation), Normalize.

## How a note is formatted and read out
Prompt layout `{p.layout}`. The text to embed is the note's embedding prompt up to the read position,
`notellm_jax.data.note_format.format_note(title, content, topics, layout="{p.layout}")` (standard library only):

```
{example}
```

The vector is read at the last token of that text, after the model's final norm: exactly sentence-transformers'
`lasttoken` pooling of right-padded input. Title and content were cut to {p.title_max_tokens} and
{p.content_max_tokens} tokens in training (tokenised alone); cut longer fields first (the project's
`data.prompts.cut_to_tokens`), and keep the whole text within {p.max_length} tokens: a truncated text would be
read at the wrong token. The project tokenises note text with special-token parsing off, so a note that
literally contains `{tokenizer.emb_token}` or a control token's text encodes differently here.

```python
from sentence_transformers import SentenceTransformer
from notellm_jax.data.note_format import format_note
model = SentenceTransformer("PATH")
vectors = model.encode([format_note("Crispy oven potatoes", "Parboil, roast hot.", ["potatoes"], "{p.layout}")])
```

With transformers alone: run `AutoModel` on `AutoTokenizer(texts, padding=True)`, take each row's
`last_hidden_state` at its last attended position, multiply by `weight.T` from `{PROJECTION_FILE}` and
normalise. The causal LM head generates the category or topics after the full prompt (see the project's
`data.prompts.build_example`).
"""
