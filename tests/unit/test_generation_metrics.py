"""Generation metrics against sacrebleu / rouge_score and hand-computed numpy on small cases."""
import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from notellm_jax.eval import generation_metrics as G

TAGS = ["python", "pandas", "python-3.x", "dataframe", "bread", "baking", "yeast", "c++", "linux", "bash", "git"]


def _random_texts(rng, count, max_len=9):
    """Hashtag-like strings over a small vocabulary, so n-grams of every order match sometimes."""
    texts = []
    for _ in range(count):
        words = rng.choice(TAGS, size=rng.integers(1, max_len + 1))
        texts.append(" ".join(w.upper() if rng.random() < 0.2 else w for w in words))  # case must not matter
    return texts


class _WhitespaceLower:
    """rouge_score tokenizer matching G.tokenize (its default drops punctuation such as '-', '+')."""

    def tokenize(self, text):
        return text.lower().split()


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    hyps, refs = _random_texts(rng, 300), _random_texts(rng, 300)
    hyps[:40] = refs[:40]  # some exact copies
    hyps[40] = ""  # an empty generation
    return hyps, refs


@pytest.mark.parametrize("smoothing,effective", [("exp", True), ("exp", False), ("none", False)])
def test_corpus_bleu_equals_sacrebleu(corpus, smoothing, effective):
    hyps, refs = corpus
    ours = G.corpus_bleu(hyps, refs, smoothing=smoothing, effective_order=effective)
    theirs = sacrebleu.corpus_bleu(hyps, [refs], smooth_method=smoothing, tokenize="none", lowercase=True,
                                   use_effective_order=effective).score / 100
    assert ours == pytest.approx(theirs, abs=1e-12)
    assert 0 < ours < 1


def test_sentence_bleu_equals_sacrebleu(corpus):
    hyps, refs = corpus
    ours = np.array([G.sentence_bleu(h, r) for h, r in zip(hyps, refs)])
    theirs = np.array([sacrebleu.sentence_bleu(h, [r], smooth_method="exp", tokenize="none", lowercase=True,
                                               use_effective_order=True).score / 100 for h, r in zip(hyps, refs)])
    np.testing.assert_allclose(ours, theirs, atol=1e-12)
    assert G.text_metrics(hyps, refs)["bleu4_sentence"] == pytest.approx(theirs.mean())


def test_identical_strings_score_exactly_one():
    for text in ["python", "python pandas", "a b c d e f", "Bread baking yeast"]:
        assert G.sentence_bleu(text, text) == 1.0
        assert G.rouge_n(text, text, 1) == 1.0 and G.rouge_l(text, text) == 1.0
    texts = ["python", "pandas dataframe", "git bash linux c++ python"]
    assert G.corpus_bleu(texts, texts) == 1.0
    assert G.text_metrics(texts, [t.upper() for t in texts])["bleu4"] == 1.0
    # Standard BLEU-4 without effective order is 0 for outputs shorter than 4 tokens.
    assert G.corpus_bleu(texts[:2], texts[:2], effective_order=False) == 0.0


def test_bleu_brevity_penalty_by_hand():
    # All 1..3-gram orders match perfectly, the hypothesis has 3 of the reference's 6 tokens.
    assert G.sentence_bleu("a b c", "a b c d e f") == pytest.approx(np.exp(1 - 6 / 3))
    with pytest.raises(ValueError, match="unknown BLEU smoothing"):
        G.sentence_bleu("a", "a", smoothing="floor")


def test_rouge_equals_rouge_score(corpus):
    hyps, refs = corpus
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_WhitespaceLower())
    reference = {name: [] for name in ("rouge1", "rouge2", "rougeL")}
    for h, r in zip(hyps, refs):
        scores = scorer.score(r, h)  # rouge_score takes (target, prediction)
        for name in reference:
            reference[name].append(scores[name].fmeasure)
    np.testing.assert_allclose([G.rouge_n(h, r, 1) for h, r in zip(hyps, refs)], reference["rouge1"], atol=1e-12)
    np.testing.assert_allclose([G.rouge_n(h, r, 2) for h, r in zip(hyps, refs)], reference["rouge2"], atol=1e-12)
    np.testing.assert_allclose([G.rouge_l(h, r) for h, r in zip(hyps, refs)], reference["rougeL"], atol=1e-12)
    means = G.text_metrics(hyps, refs)
    for name, values in reference.items():
        assert means[name] == pytest.approx(np.mean(values))


def test_category_accuracy_and_illusory_by_hand():
    closed = ["cooking", "math", "gis"]
    predicted = ["Cooking", "math ", "physics", "gis", "math", "astronomy"]
    gold = ["cooking", "gis", "math", "gis", "cooking", "math"]
    hit = np.array([1, 0, 0, 1, 0, 0])
    outside = np.array([0, 0, 1, 0, 0, 1])
    out = G.category_metrics(predicted, gold, closed)
    assert out == {"accuracy": hit.mean(), "illusory": outside.mean(), "notes": 6}
    with pytest.raises(ValueError, match=r"outside the closed set: \['biology'\]"):
        G.category_metrics(["math"], ["biology"], closed)
    with pytest.raises(ValueError, match="2 generated categories for 1 reference"):
        G.category_metrics(["math", "gis"], ["math"], closed)


def test_hashtag_prf_by_hand():
    predicted = [["Python", "pandas", "numpy"], [], ["git"], ["bash"]]
    gold = [["python", "pandas"], ["linux"], ["git", "bash", "linux", "c++"], []]
    # Per note (precision, recall): (2/3, 1), (0, 0), (1, 1/4); the last note has no gold and is skipped.
    p = np.array([2 / 3, 0, 1])
    r = np.array([1, 0, 1 / 4])
    f = np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1), 0)
    out = G.hashtag_prf(predicted, gold)
    assert (out["precision"], out["recall"], out["f1"]) == pytest.approx((p.mean(), r.mean(), f.mean()))
    micro_p, micro_r = 3 / 4, 3 / 7
    assert out["micro_precision"] == pytest.approx(micro_p) and out["micro_recall"] == pytest.approx(micro_r)
    assert out["micro_f1"] == pytest.approx(2 * micro_p * micro_r / (micro_p + micro_r))
    assert (out["notes"], out["skipped_without_gold"]) == (3, 1)
    with pytest.raises(ValueError, match="no note has gold tags"):
        G.hashtag_prf([["a"]], [[]])


def test_parse_hashtags():
    assert G.parse_hashtags("#Python, pandas  #python-3.x,pandas\n") == ["python", "pandas", "python-3.x"]
    assert G.parse_hashtags("  ") == []
