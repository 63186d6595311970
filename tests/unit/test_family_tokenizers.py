"""Tokenizers of Hugging Face model folders (LLaMA-3 and Qwen styles), built locally with `tokenizers` and
saved with transformers: [EMB] appended, BOS/EOS/PAD and the chat template from the folder's own files,
and [EMB] placed on an unused row when the embedding table is larger than the tokenizer (Qwen)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import notellm_jax  # noqa: F401
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from notellm_jax.config import load_config
from notellm_jax.weights.tokenizer import NoteTokenizer, load_tokenizer
from notellm_jax.weights.loading import load_initial_params

CORPUS = ["How do I descale an espresso machine?", "Best budget headphones for running in the rain",
          "The compression word is the last token.", "Tea, coffee and gadgets: a weekend of questions."] * 20
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_CHAT = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def byte_level_bpe(specials: list[str], prepend: str | None = None) -> Tokenizer:
    """A 300-token byte-level BPE (the LLaMA-3 / Qwen kind) trained on CORPUS; `prepend` is added in
    front of every sequence by the post-processor, as LLaMA-3's tokenizer.json does with its BOS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if prepend:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{prepend} $A", pair=f"{prepend} $A $B", special_tokens=[(prepend, tok.token_to_id(prepend))])
    return tok


def save_tokenizer(folder: Path, tok: Tokenizer, **special) -> transformers.PreTrainedTokenizerFast:
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    hf.save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)  # the reference: what the folder says


def llama3_folder(folder: Path) -> transformers.PreTrainedTokenizerFast:
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    return save_tokenizer(folder, byte_level_bpe(specials, prepend="<|begin_of_text|>"),
                          bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=LLAMA3_CHAT)


def qwen_folder(folder: Path) -> transformers.PreTrainedTokenizerFast:
    return save_tokenizer(folder, byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
                          eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML)


def test_llama3_style_folder(tmp_path):
    ref = llama3_folder(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.base_vocab_size == len(ref) == 300 and tok.emb_id == 300
    assert (tok.bos_id, tok.eos_id) == (ref.convert_tokens_to_ids("<|begin_of_text|>"), ref.convert_tokens_to_ids("<|eot_id|>"))
    assert tok.pad_id == tok.eos_id  # no PAD in the files: EOS pads
    assert tok.encode(CORPUS[0]) == ref.encode(CORPUS[0], add_special_tokens=False)
    ids = tok.encode('is:"[EMB]".')
    assert ids == ref.encode('is:"', add_special_tokens=False) + [300] + ref.encode('".', add_special_tokens=False)
    assert 300 not in tok.encode("a [EMB] b", split_special_tokens=True)
    # The chat template is the folder's own (written by save_pretrained, read back by AutoTokenizer).
    assert tok.hf.chat_template == LLAMA3_CHAT
    prompt = tok.hf.apply_chat_template([{"role": "user", "content": CORPUS[1]}], add_generation_prompt=True)
    assert prompt[0] == tok.bos_id and prompt.count(tok.bos_id) == 1


def test_qwen_style_folder_has_no_bos(tmp_path):
    ref = qwen_folder(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.emb_id == len(ref) == 300
    assert tok.bos_id is None
    assert (tok.eos_id, tok.pad_id) == (ref.convert_tokens_to_ids("<|im_end|>"), ref.convert_tokens_to_ids("<|endoftext|>"))
    assert tok.hf.chat_template == CHATML
    prompt = tok.hf.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    assert tok.decode(prompt, skip_special_tokens=False) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_named_bos_that_the_tokenizer_does_not_prepend_is_not_used(tmp_path):
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    ref = save_tokenizer(tmp_path, byte_level_bpe(specials), bos_token="<|im_start|>", eos_token="<|im_end|>")
    assert ref.bos_token_id is not None and ref("a")["input_ids"][0] != ref.bos_token_id
    assert load_tokenizer(tmp_path).bos_id is None


def test_emb_takes_an_unused_row_of_a_padded_table(tmp_path):
    """Qwen's tables have more rows than its tokenizer has tokens: [EMB] takes row len(tokenizer), which is
    re-initialised to the mean of the rows before it; no row is added and every other row is kept."""
    qwen_folder(tmp_path)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=320, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=False))
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok = load_tokenizer(tmp_path)
    config = load_config(str(Path(__file__).parents[2] / "configs" / "tiny.py") + ":random",
                         [f"model.checkpoint={tmp_path}"])
    params, cfg = load_initial_params(config, tok.vocab_size)
    assert cfg.vocab_size == 320 and cfg.model_type == "qwen2"
    embedding = np.asarray(params["decoder"]["embed_tokens"]["embedding"])
    head = np.asarray(params["decoder"]["lm_head"]["kernel"])
    want_embedding = model.model.embed_tokens.weight.detach().numpy().copy()
    want_head = model.lm_head.weight.detach().numpy().T.copy()
    want_embedding[300] = want_embedding[:300].mean(0)
    want_head[:, 300] = want_head[:, :300].mean(1)
    # The checkpoint's 320 rows are real rows (kept, not masked); vocab_pad_multiple pads them to 384.
    assert cfg.padded_vocab_size == 384 and embedding.shape == (384, 16) and head.shape == (16, 384)
    assert not embedding[320:].any() and not head[:, 320:].any()
    np.testing.assert_allclose(embedding[:320], want_embedding, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(head[:, :320], want_head, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="do not belong together"):
        load_initial_params(config, 400)


def test_two_ids_sharing_one_string_leave_a_hole_counted_in_the_vocabulary():
    """Gemma 3's GGUF vocabulary, converted by transformers to a Unigram model, has two ids with one string (its
    byte token <0x09> and its user-defined tab): the token -> id map is one short, so the vocabulary is one past
    the largest id, and [EMB] goes there, not at len(tokenizer)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("a", -1.0), ("\t", -1.0), ("b", -1.0), ("\t", -2.0)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=None, byte_fallback=False))
    tok.decoder = decoders.Fuse()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")
    assert len(hf) == 5  # what the old rule took as the vocabulary
    note = NoteTokenizer(hf, source="shared string")
    assert (note.base_vocab_size, note.emb_id, note.vocab_size) == (6, 6, 7)
    assert note.encode("a\tb[EMB]") == [2, 5, 4, 6]  # the string's id is the last one holding it
    assert note.decode([2, 3, 4, 6]) == note.decode([2, 5, 4, 6]) == "a\tb"
