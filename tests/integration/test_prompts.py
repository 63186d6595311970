"""Note Compression Prompts checked against independently tokenised pieces (sentencepiece library)."""
import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from notellm_jax.config import PromptConfig
from notellm_jax.data.prompts import Note, PromptTooLongError, build_example, draw_topics, pad_batch
from notellm_jax.weights.tokenizer import load_tokenizer

NOTE = Note("n1", "A big red ball", "Lily saw a big red ball in the park.", ["ball", "park", "play"], "stories")
INSTRUCTION = "Extract the note information in json format, compress it into one word for recommendation, and "


@pytest.fixture(scope="module")
def tok(stories_dir):
    return load_tokenizer(stories_dir / "tok512.model")


@pytest.fixture(scope="module")
def sp(stories_dir):
    return spm.SentencePieceProcessor(model_file=str(stories_dir / "tok512.model"))


@pytest.fixture(scope="module")
def sp_no_prefix(stories_dir):
    """sentencepiece without its dummy leading space: how text continues after a special token."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((stories_dir / "tok512.model").read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def expected_ids(sp, sp_no_prefix, before, after, output):
    # The output's separating space is sentencepiece's own leading-space piece ("▁stories").
    return [1] + sp.encode(before) + [512] + sp_no_prefix.encode(after) + sp.encode(output) + [2]


def cfg(**kw):
    return PromptConfig(**{"max_length": 256, **kw})


def test_paper_layout_exact_tokens(tok, sp, sp_no_prefix):
    ex = build_example(NOTE, tok, cfg(), "category")
    before = (INSTRUCTION + "generate the category of the note. {'title': 'A big red ball', 'topic': "
              "'ball, park, play', 'content': 'Lily saw a big red ball in the park.'} The compression word is:\"")
    assert ex.input_ids == expected_ids(sp, sp_no_prefix, before, '". The category is:', "stories")
    ex = build_example(NOTE, tok, cfg(), "hashtag", topics=["park", "ball"])
    before = (INSTRUCTION + "generate 2 topics of the note. {'title': 'A big red ball', "
              "'content': 'Lily saw a big red ball in the park.'} The compression word is:\"")
    assert ex.input_ids == expected_ids(sp, sp_no_prefix, before, '". The 2 topics are:', "park, ball")


def test_reference_layout_exact_tokens(tok, sp, sp_no_prefix):
    before = "{'title': 'A big red ball', 'content': 'Lily saw a big red ball in the park.'} The compression word is:\""
    ex = build_example(NOTE, tok, cfg(layout="reference"), "category")
    after = '". Generate the category of the note. The category is:'
    assert ex.input_ids == expected_ids(sp, sp_no_prefix, before, after, "stories")
    hashtag = build_example(NOTE, tok, cfg(layout="reference"), "hashtag", topics=["play"])
    # The embedding prefix (through the token before [EMB]) is the same for both tasks.
    assert hashtag.input_ids[:hashtag.embed_read_pos + 2] == ex.input_ids[:ex.embed_read_pos + 2]


@pytest.mark.parametrize("layout", ["paper", "reference"])
@pytest.mark.parametrize("task", ["category", "hashtag"])
def test_labels_only_on_output_and_eos(tok, layout, task):
    ex = build_example(NOTE, tok, cfg(layout=layout), task, rng=np.random.default_rng(3))
    prefix = build_example(NOTE, tok, cfg(layout=layout), task, rng=np.random.default_rng(3), with_output=False)
    assert ex.input_ids[:ex.prefix_length] == prefix.input_ids and prefix.target_ids == []
    assert ex.input_ids[ex.embed_read_pos + 1] == tok.emb_id and ex.input_ids.count(tok.emb_id) == 1
    assert [ex.input_ids[t + 1] for t in ex.target_positions] == ex.target_ids
    assert ex.target_positions[0] == ex.prefix_length - 1 and ex.target_positions[-1] == len(ex.input_ids) - 2
    text = tok.decode(ex.target_ids, skip_special_tokens=False).strip()
    assert text.endswith("</s>")
    if task == "category":
        assert text == "stories</s>"
    else:
        assert set(text[:-4].split(", ")) <= set(NOTE.topics)


def test_draw_topics_subsets():
    seen = set()
    for seed in range(40):
        topics = draw_topics(NOTE, 2, np.random.default_rng(seed))
        assert 1 <= len(topics) <= 2 and len(set(topics)) == len(topics) and set(topics) <= set(NOTE.topics)
        seen.add(len(topics))
    assert seen == {1, 2}
    with pytest.raises(ValueError, match="no topics"):
        draw_topics(Note("x", "t", "c", [], "k"), 3, np.random.default_rng(0))


@pytest.mark.parametrize("side", ["left", "right"])
def test_emb_index_and_targets_after_padding(tok, side):
    examples = [build_example(NOTE, tok, cfg(), "category"),
                build_example(NOTE, tok, cfg(layout="reference"), "hashtag", topics=["ball"])]
    batch = pad_batch(examples, 200, side, tok.pad_id, 8)
    for row, ex in enumerate(examples):
        ids = batch["input_ids"][row]
        e = batch["embed_read_pos"][row]
        assert ids[e + 1] == tok.emb_id and ids[e] == ex.input_ids[ex.embed_read_pos]
        m = int(batch["target_mask"][row].sum())
        assert m == len(ex.target_ids)
        assert list(ids[batch["target_positions"][row, :m] + 1]) == ex.target_ids
        kept = ids[batch["attention_mask"][row] == 1]
        assert list(kept) == ex.input_ids
        assert (batch["attention_mask"][row, 0] == 1) == (side == "right")
    assert list(batch["task"]) == [0, 1]


def test_budgets_cut_content_never_output(tok):
    long_note = Note("n2", "A big red ball " * 5, "Lily saw a big red ball in the park. " * 20, ["ball"],
                     "a very long category name that is never cut")
    ex = build_example(long_note, tok, cfg(title_max_tokens=6, content_max_tokens=12), "category")
    text = tok.decode(ex.input_ids)
    content = text.split("'content': '")[1].split("'}")[0]
    title = text.split("'title': '")[1].split("', ")[0]
    assert long_note.content.startswith(content) and len(tok.encode(content)) == 12
    assert long_note.title.startswith(title) and len(tok.encode(title)) == 6
    assert tok.decode(ex.target_ids).strip() == "a very long category name that is never cut"
    assert not ex.shrunk
    # A max_length that does not fit shrinks the content further, output untouched.
    full = build_example(long_note, tok, cfg(title_max_tokens=6, content_max_tokens=80), "category")
    tight = build_example(long_note, tok, cfg(title_max_tokens=6, content_max_tokens=80,
                                              max_length=len(full.input_ids) - 10), "category")
    assert tight.shrunk and len(tight.input_ids) <= len(full.input_ids) - 10
    assert tight.target_ids == full.target_ids
    tight_title = tok.decode(tight.input_ids).split("'title': '")[1].split("', ")[0]
    assert tight_title == title
    with pytest.raises(PromptTooLongError, match="n2"):
        build_example(long_note, tok, cfg(max_length=60), "category")


def test_cut_never_splits_a_character(tok):
    note = Note("n3", "日本日本日本", "x", ["t"], "c")
    ex = build_example(note, tok, cfg(title_max_tokens=4), "category")
    title = tok.decode(ex.input_ids).split("'title': '")[1].split("', ")[0]
    assert "\ufffd" not in title and "日本日本日本".startswith(title)


def test_note_text_cannot_inject_special_tokens(tok):
    note = Note("n4", "about [EMB] tokens", "a </s> tag and <s> too", ["x"], "c")
    ex = build_example(note, tok, cfg(), "category")
    assert ex.input_ids.count(tok.emb_id) == 1 and ex.input_ids.count(tok.eos_id) == 1
    assert ex.input_ids.count(tok.bos_id) == 1
