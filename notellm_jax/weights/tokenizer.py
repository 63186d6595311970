"""The tokenizer that belongs to each weight format, plus the NoteLLM `[EMB]` token.

Every format goes through a transformers 4.57 tokenizer so all of them behave alike:
sentencepiece `.model` files (llama2.c, LLaMA-2) through the slow `LlamaTokenizer` in its
non-legacy mode (it matches the `sentencepiece` library on plain text and does not insert a
space after an added special token, so `is:"[EMB]".` keeps its quotes tight), Hugging Face
folders through `AutoTokenizer`, GGUF files through transformers' GGUF tokenizer conversion, except
Gemma's (its sentencepiece BPE vocabulary rebuilt as a sentencepiece model and converted by transformers'
Gemma converter: transformers 4.57 reads a Gemma GGUF vocabulary as a Unigram model, which splits words).
`[EMB]` is appended as a special token at id == base vocabulary size, so the embedding table
grows by exactly one row (`model.params.add_tokens`).

`resolve_tokenizer` is the one way tools find a run's tokenizer: the configured source (or the one an
export recorded), resolved against the configured roots, so an export copied to another machine works.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from notellm_jax.errors import CheckpointError, MissingInputError
from notellm_jax.weights.gguf import gguf_field, open_gguf

log = logging.getLogger(__name__)


class NoteTokenizer:
    """A transformers tokenizer with `[EMB]` appended; encodes without adding BOS/EOS."""

    def __init__(self, hf, emb_token: str = "[EMB]", source: str = ""):
        from transformers import AddedToken  # transformers (torch with it): only to build a tokenizer

        self.hf = hf
        self.source = source
        self.emb_token = emb_token
        vocab = hf.get_vocab()
        # The model's vocabulary is every id the tokenizer can produce: one past the largest id, not len(hf),
        # which counts distinct token strings (transformers' GGUF conversion of Gemma 3 gives its tab byte token
        # <0x09> and its user-defined tab token one string, so there len(hf) is one short of its 262,144 ids).
        top = max(vocab.values()) + 1
        existing = vocab.get(emb_token)
        if existing is not None and existing != top - 1:
            raise ValueError(f"{source}: {emb_token!r} already exists at id {existing}, not at the end of the "
                             f"vocabulary ({top} ids); cannot use it as the appended [EMB] token")
        self.base_vocab_size = top if existing is None else top - 1
        if existing is None:
            hf.add_special_tokens(
                {"additional_special_tokens": [AddedToken(emb_token, special=True, normalized=False)]},
                replace_additional_special_tokens=False)
        self.emb_id = hf.convert_tokens_to_ids(emb_token)
        if self.emb_id != self.base_vocab_size:
            raise ValueError(f"{source}: {emb_token!r} got id {self.emb_id}, expected {self.base_vocab_size}")
        if hf.eos_token_id is None:
            raise ValueError(f"{source}: tokenizer defines no EOS token")
        self.bos_id: int | None = hf.bos_token_id
        self.eos_id: int = hf.eos_token_id
        self.pad_id: int = hf.pad_token_id if hf.pad_token_id is not None else self.eos_id

    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + 1

    def encode(self, text: str, split_special_tokens: bool = False) -> list[int]:
        """Token ids of `text` with no BOS/EOS added.

        Special-token strings in `text` (such as `[EMB]`) become their ids unless
        `split_special_tokens` is set: user text is encoded with it set, so a note that
        literally contains "</s>" or "[EMB]" cannot inject control tokens.
        """
        return self.hf.encode(text, add_special_tokens=False, split_special_tokens=split_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens,
                              clean_up_tokenization_spaces=False, spaces_between_special_tokens=False)


def _sentencepiece_tokenizer(model_file: Path):
    from transformers import LlamaTokenizer  # transformers (torch with it): only to build a tokenizer

    return LlamaTokenizer(vocab_file=str(model_file), legacy=False, add_bos_token=False, add_eos_token=False)


def _tokenizer_beside_llama2c(bin_file: Path) -> Path:
    """llama2.c checkpoints carry no tokenizer: use `tokenizer.model` or the single `tok*.model` beside it."""
    folder = bin_file.parent
    if (folder / "tokenizer.model").is_file():
        return folder / "tokenizer.model"
    candidates = sorted(folder.glob("tok*.model"))
    if len(candidates) != 1:
        found = ", ".join(c.name for c in candidates) or "none"
        raise MissingInputError(f"{bin_file}: llama2.c checkpoint needs exactly one tokenizer.model or tok*.model "
                                f"beside it (found: {found}); set model.tokenizer")
    return candidates[0]


def _is_transformers_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file())


# transformers converts a GGUF vocabulary in Python: ~1-2 min for SmolLM2's 49k tokens on the 2-core CPU,
# paid by every tool that loads it. The converted tokenizer is kept as a transformers folder under the
# cache, keyed by the file's size and a hash of its first 8 MiB (the GGUF metadata, where the vocabulary
# and merges live, comes first).
_GGUF_KEY_BYTES = 8 << 20


def _gguf_cache_folder(path: Path, cache_dir: Path, route: str) -> Path:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(_GGUF_KEY_BYTES))
    return cache_dir / "tokenizers" / f"{path.stem}-{path.stat().st_size}-{digest.hexdigest()[:16]}{route}"


# GGUF architectures whose vocabulary is a sentencepiece BPE model (tokenizer.ggml.model "llama", no merges).
_SENTENCEPIECE_GGUF = ("gemma2", "gemma3")


def _gemma_gguf_tokenizer(path: Path, fields: dict):
    """A Gemma GGUF's vocabulary as the sentencepiece BPE model it came from: its pieces (user-defined
    whitespace runs keep their spaces, so transformers matches them as added tokens, as sentencepiece matches
    them first), scores and types in a ModelProto, converted by transformers' Gemma converter (BPE, merges
    from the scores, byte fallback). transformers 4.57's own GGUF conversion builds a Unigram model from these
    scores, which splits words ("should" -> "sh" "ou" "ld")."""
    from sentencepiece import sentencepiece_model_pb2  # the protobuf model format: only to build a tokenizer
    from transformers import GemmaTokenizerFast  # transformers (torch with it): only to build a tokenizer

    value = lambda key: gguf_field(fields, f"tokenizer.ggml.{key}", path)  # noqa: E731
    if value("model") != "llama":
        raise CheckpointError(f"{path}: Gemma GGUF with tokenizer model {value('model')!r}, expected 'llama'")
    proto = sentencepiece_model_pb2.ModelProto()
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    spec.model_type, spec.byte_fallback = sentencepiece_model_pb2.TrainerSpec.BPE, True
    spec.unk_id, spec.bos_id, spec.eos_id = (int(value(f"{k}_token_id")) for k in ("unknown", "bos", "eos"))
    spec.pad_id = int(gguf_field(fields, "tokenizer.ggml.padding_token_id", path, default=-1))
    norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces = "identity", False, False
    for i, (piece, score, kind) in enumerate(zip(value("tokens"), value("scores"), value("token_type"))):
        proto.pieces.add(piece=piece, score=score, type=2 if i == spec.unk_id else kind)  # 2: UNKNOWN
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(proto.SerializeToString())
        hf = GemmaTokenizerFast(vocab_file=str(Path(tmp) / "tokenizer.model"))
    hf.chat_template = gguf_field(fields, "tokenizer.chat_template", path, default=None)
    return hf


def _gguf_tokenizer(path: Path, cache_dir: Path | None):
    from transformers import AutoTokenizer  # transformers (torch with it): only to build a tokenizer

    fields = open_gguf(path).fields
    gemma = gguf_field(fields, "general.architecture", path, default=None) in _SENTENCEPIECE_GGUF
    folder = _gguf_cache_folder(path, cache_dir, "-spm" if gemma else "") if cache_dir is not None else None
    if folder is not None and (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if gemma:
        hf = _gemma_gguf_tokenizer(path, fields)
    else:
        hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    if folder is not None:
        tmp = None
        try:  # written beside and renamed into place: a reader never sees half a folder
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
            hf.save_pretrained(str(tmp))
            if not folder.exists():  # else another process got there first
                os.rename(tmp, folder)
        except OSError as e:
            log.warning("%s: converted tokenizer not cached under %s (%s)", path, folder.parent, e)
        finally:
            if tmp is not None and tmp.exists():  # not renamed: a failed write, or a lost race
                shutil.rmtree(tmp, ignore_errors=True)
    return hf


def _load_hf_tokenizer(path: Path, cache_dir: Path | None = None):
    if path.is_dir():
        if _is_transformers_folder(path):
            from transformers import AutoTokenizer  # transformers (torch with it): only to build a tokenizer

            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if (path / "tokenizer.model").is_file():
            return _sentencepiece_tokenizer(path / "tokenizer.model")
        raise MissingInputError(f"{path}: folder has no tokenizer.json, tokenizer_config.json or tokenizer.model")
    suffix = path.suffix.lower()
    if suffix == ".model":
        return _sentencepiece_tokenizer(path)
    if suffix == ".gguf":
        return _gguf_tokenizer(path, cache_dir)
    if suffix == ".bin":
        return _sentencepiece_tokenizer(_tokenizer_beside_llama2c(path))
    raise ValueError(f"{path}: unknown tokenizer format (expected a folder, .model, .gguf or llama2.c .bin)")


def load_tokenizer(path: str | Path, emb_token: str = "[EMB]", cache_dir: str | Path | None = None) -> NoteTokenizer:
    """Load the tokenizer for a weight file or folder and append `emb_token` at id == base vocab size.
    With `cache_dir`, a GGUF file's converted tokenizer is kept there and reused."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingInputError(f"tokenizer path not found: {path}")
    try:
        hf = _load_hf_tokenizer(path, None if cache_dir is None else Path(cache_dir).expanduser())
    except (FileNotFoundError, ValueError):
        raise
    except Exception as e:  # parse failures inside transformers/sentencepiece: name the file
        raise ValueError(f"{path}: cannot load tokenizer ({type(e).__name__}: {e})") from e
    tokenizer = NoteTokenizer(hf, emb_token=emb_token, source=str(path))
    if path.suffix.lower() == ".gguf":
        _apply_gguf_special_tokens(tokenizer, path)
    if _is_transformers_folder(path):
        _keep_bos_only_if_prepended(tokenizer)
    return tokenizer


def _keep_bos_only_if_prepended(tokenizer: NoteTokenizer) -> None:
    """A Hugging Face folder's tokenizer files say whether a sequence starts with BOS (LLaMA-2/3 and
    Mistral prepend it; Qwen defines none; SmolLM2 names one but its template starts with <|im_start|>):
    the prompt builder prepends `bos_id` only where the model's own tokenizer would."""
    hf = tokenizer.hf
    if hf.bos_token_id is not None and hf("a", add_special_tokens=True)["input_ids"][:1] != [hf.bos_token_id]:
        tokenizer.bos_id = None


def tokenizer_source(config) -> str:
    """The run's tokenizer as configured (relative to the config's roots or absolute): `model.tokenizer`,
    else the checkpoint itself (HF folders and GGUF files carry their tokenizer)."""
    return config.model.tokenizer or config.model.checkpoint


def resolve_tokenizer(config, source: str | None = None, emb_token: str | None = None) -> NoteTokenizer:
    """The tokenizer of `source` (default: the run's own, `tokenizer_source(config)`; an export passes the
    source it recorded), resolved against `paths.cache_dir` / `paths.shared_dir`, with [EMB] appended."""
    return load_tokenizer(config.resolve(source or tokenizer_source(config)), emb_token or config.prompt.emb_token,
                          cache_dir=config.paths.cache_dir)


def _apply_gguf_special_tokens(tokenizer: NoteTokenizer, path: Path) -> None:
    """Take BOS/EOS/PAD and whether BOS is prepended from the GGUF metadata itself.

    transformers' GGUF tokenizer conversion gets these wrong for some files (SmolLM2-135M-Instruct: EOS
    becomes <|im_start|> instead of <|im_end|>, so generation would never stop at the end of a turn).
    """
    fields = open_gguf(path).fields
    value = lambda key: gguf_field(fields, key, path, default=None)  # noqa: E731
    eos, pad, bos = (value(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "padding_token_id", "bos_token_id"))
    if eos is not None:
        tokenizer.eos_id = int(eos)
    if pad is not None:
        tokenizer.pad_id = int(pad)
    add_bos = value("tokenizer.ggml.add_bos_token")
    tokenizer.bos_id = None if add_bos is False or bos is None else int(bos)
