"""Tokenizer loading for every weight format, checked against sentencepiece / transformers directly."""
import pytest
import sentencepiece as spm

from notellm_jax.weights.tokenizer import load_tokenizer

TEXTS = ["Once upon a time, there was a little girl named Lily.", "A café\nwith 日本 text, 42 times!"]


@pytest.fixture(scope="module")
def tok512(stories_dir):
    return load_tokenizer(stories_dir / "tok512.model")


@pytest.fixture(scope="module")
def sp512(stories_dir):
    return spm.SentencePieceProcessor(model_file=str(stories_dir / "tok512.model"))


def test_sentencepiece_ids_and_round_trip(tok512, sp512):
    for text in TEXTS:
        assert tok512.encode(text) == sp512.encode(text)
        assert tok512.decode(tok512.encode(text)) == text
    assert (tok512.bos_id, tok512.eos_id, tok512.pad_id) == (sp512.bos_id(), sp512.eos_id(), sp512.eos_id())


def test_emb_is_one_token_at_base_vocab_size(tok512, sp512):
    assert tok512.base_vocab_size == sp512.vocab_size() == 512
    assert tok512.emb_id == 512 and tok512.vocab_size == 513
    ids = tok512.encode('The compression word is:"[EMB]".')
    # After the special token the quote is not preceded by an inserted space piece.
    expected = sp512.encode('The compression word is:"') + [512, sp512.piece_to_id('"'), sp512.piece_to_id(".")]
    assert ids == expected and ids.count(512) == 1
    assert tok512.decode(ids) == 'The compression word is:"".'
    assert tok512.decode(ids, skip_special_tokens=False) == 'The compression word is:"[EMB]".'
    assert 512 not in tok512.encode("a [EMB] b", split_special_tokens=True)


def test_llama2c_bin_finds_tokenizer_beside_it(stories_dir, tok512):
    tok = load_tokenizer(stories_dir / "stories260K.bin")
    assert tok.encode(TEXTS[0]) == tok512.encode(TEXTS[0]) and tok.emb_id == 512


@pytest.mark.slow
def test_gguf_matches_transformers(smollm2_gguf, tmp_path, monkeypatch):
    """Converted by transformers, and the same again from the cached conversion (no second conversion)."""
    import transformers
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    converted = load_tokenizer(smollm2_gguf, cache_dir=tmp_path)
    (folder,) = (tmp_path / "tokenizers").iterdir()
    assert (folder / "tokenizer.json").is_file()
    calls = []
    real = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **kw: calls.append(kw.get("gguf_file")) or real(*a, **kw))
    cached = load_tokenizer(smollm2_gguf, cache_dir=tmp_path)
    assert calls == [None]  # read from the cached folder, not converted again
    for tok in (converted, cached):
        assert tok.base_vocab_size == len(ref) and tok.emb_id == len(ref)
        for text in TEXTS + ["a </s> <|im_end|> b"]:
            assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
            assert tok.encode(text, split_special_tokens=True) == ref.encode(text, add_special_tokens=False,
                                                                               split_special_tokens=True)
        ids = tok.encode('is:"[EMB]".')
        assert ids == (ref.encode('is:"', add_special_tokens=False) + [tok.emb_id]
                       + ref.encode('".', add_special_tokens=False))
        message = [{"role": "user", "content": "What is the capital of France?"}]
        assert tok.hf.apply_chat_template(message, add_generation_prompt=True, tokenize=True) == ref.apply_chat_template(
            message, add_generation_prompt=True, tokenize=True)  # [EMB] does not disturb the chat template
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (converted.bos_id, converted.eos_id, converted.pad_id)
        assert tok.decode(ids + [tok.eos_id]) == converted.decode(ids + [tok.eos_id])


def test_bad_inputs_raise_clear_errors(tmp_path, tok512):
    with pytest.raises(FileNotFoundError, match="nowhere.model"):
        load_tokenizer(tmp_path / "nowhere.model")
    garbage = tmp_path / "broken.model"
    garbage.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="broken.model"):
        load_tokenizer(garbage)
    lonely = tmp_path / "model.bin"
    lonely.write_bytes(b"\0" * 28)
    with pytest.raises(FileNotFoundError, match="tok\\*.model"):
        load_tokenizer(lonely)
    odd = tmp_path / "weights.xyz"
    odd.write_text("x")
    with pytest.raises(ValueError, match="unknown tokenizer format"):
        load_tokenizer(odd)
