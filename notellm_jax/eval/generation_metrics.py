"""Generation metrics (METHOD.md 5): category Acc./Ill., hashtag P/R/F1, BLEU-4, ROUGE-1/2/L F1.

Own implementations, checked against sacrebleu and rouge_score in tests/test_generation_metrics.py.

Text normalisation, shared by every metric here: lower-case, then split on whitespace
(`tokenize`). A hashtag such as "python-3.x" is one token; a list of generated hashtags is compared
as the whitespace-joined string of its tags. Categories compare after the same normalisation
("Cooking " == "cooking").

BLEU-4 (Papineni et al. 2002) from clipped n-gram counts, n = 1..4, single reference:
- brevity penalty exp(1 - r/c) when the hypothesis length c is below the reference length r;
- "effective order" (on by default): orders for which the hypotheses contain no n-gram at all are
  left out of the geometric mean instead of zeroing it, so a one-tag output can still score, and
  identical non-empty strings score exactly 1.0 whatever their length;
- smoothing "exp" (default; NIST mteval / Chen & Cherry 2014 method 3, sacrebleu's default): an
  order with n-grams but no match gets precision 1 / (2^m * total) for its m-th such order;
  "none": such an order makes the score 0;
- corpus BLEU sums the counts over all pairs before combining; sentence BLEU averages per-pair scores.
The reference NoteLLM code scored identical strings at ~1.3; here they are 1.0 by construction.

ROUGE-N F1 from clipped n-gram overlap, ROUGE-L F1 from the longest common subsequence, per pair,
then averaged over pairs (rouge_score's definitions, without stemming).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

BLEU_ORDER = 4


def tokenize(text: str) -> list[str]:
    """Lower-cased whitespace tokens: the one tokenisation every metric here uses."""
    return text.lower().split()


def _normalise(text: str) -> str:
    return " ".join(tokenize(text))


def _check_lengths(a: Sequence, b: Sequence, what: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} generated {what} for {len(b)} reference {what}")
    if not a:
        raise ValueError(f"no {what} to score")


def category_metrics(predicted: Sequence[str], gold: Sequence[str], categories: Iterable[str]) -> dict[str, float]:
    """Acc. = share of exact (normalised) matches; Ill. = share of predictions outside the closed set."""
    _check_lengths(predicted, gold, "categories")
    closed = {_normalise(c) for c in categories}
    unknown_gold = sorted({g for g in gold if _normalise(g) not in closed})
    if unknown_gold:
        raise ValueError(f"gold categories outside the closed set: {unknown_gold[:5]}")
    pred = [_normalise(p) for p in predicted]
    return {"accuracy": sum(p == _normalise(g) for p, g in zip(pred, gold)) / len(pred),
            "illusory": sum(p not in closed for p in pred) / len(pred), "notes": len(pred)}


def parse_hashtags(text: str) -> list[str]:
    """Generated hashtag text -> normalised tags: split on commas, '#' and whitespace, duplicates removed."""
    return list(dict.fromkeys(tag for tag in re.split(r"[\s,#]+", text.lower()) if tag))


def hashtag_prf(predicted: Sequence[Sequence[str]], gold: Sequence[Sequence[str]]) -> dict[str, float]:
    """Tag-set precision/recall/F1 per note, averaged over notes (macro), plus pooled (micro) values.

    Tags are compared as normalised sets. A note with no predicted tag has precision = recall = 0.
    Notes without any gold tag cannot be scored: they are skipped and counted.
    """
    _check_lengths(predicted, gold, "tag lists")
    per_note, overlap, n_pred, n_gold = [], 0, 0, 0
    for pred_tags, gold_tags in zip(predicted, gold):
        pred_set, gold_set = {_normalise(t) for t in pred_tags} - {""}, {_normalise(t) for t in gold_tags} - {""}
        if not gold_set:
            continue
        hits = len(pred_set & gold_set)
        per_note.append(_prf(hits, len(pred_set), len(gold_set)))
        overlap, n_pred, n_gold = overlap + hits, n_pred + len(pred_set), n_gold + len(gold_set)
    if not per_note:
        raise ValueError("no note has gold tags: hashtag metrics are undefined")
    macro = [sum(values) / len(per_note) for values in zip(*per_note)]
    micro = _prf(overlap, n_pred, n_gold)
    return {"precision": macro[0], "recall": macro[1], "f1": macro[2], "micro_precision": micro[0],
            "micro_recall": micro[1], "micro_f1": micro[2], "notes": len(per_note),
            "skipped_without_gold": len(gold) - len(per_note)}


def _prf(hits: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    precision, recall = hits / max(n_pred, 1), hits / max(n_gold, 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _bleu_stats(hypothesis: str, reference: str) -> list[int]:
    """[hyp_len, ref_len, matches_1..4, totals_1..4]: the sufficient statistics, summable over a corpus."""
    hyp, ref = tokenize(hypothesis), tokenize(reference)
    matches, totals = [], []
    for n in range(1, BLEU_ORDER + 1):
        hyp_counts, ref_counts = _ngrams(hyp, n), _ngrams(ref, n)
        matches.append(sum(min(c, ref_counts[g]) for g, c in hyp_counts.items()))
        totals.append(sum(hyp_counts.values()))
    return [len(hyp), len(ref), *matches, *totals]


def _bleu_from_stats(stats: Sequence[int], smoothing: str, effective_order: bool) -> float:
    if smoothing not in ("exp", "none"):
        raise ValueError(f"unknown BLEU smoothing {smoothing!r} (use 'exp' or 'none')")
    hyp_len, ref_len = stats[0], stats[1]
    matches, totals = stats[2:2 + BLEU_ORDER], stats[2 + BLEU_ORDER:]
    if not any(matches):
        return 0.0
    log_precisions, halvings = [], 1.0
    for match, total in zip(matches, totals):
        if total == 0:  # no n-grams of this order in the hypotheses
            break
        if match == 0:
            if smoothing == "none":
                return 0.0
            halvings *= 2
            log_precisions.append(-math.log(halvings * total))
        else:
            log_precisions.append(math.log(match / total))
    if len(log_precisions) < BLEU_ORDER and not effective_order:
        return 0.0
    brevity = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(sum(log_precisions) / len(log_precisions))


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str], smoothing: str = "exp",
                effective_order: bool = True) -> float:
    """Corpus BLEU-4 in [0, 1]: n-gram counts and lengths summed over all pairs, then combined."""
    _check_lengths(hypotheses, references, "texts")
    totals = [sum(column) for column in zip(*(_bleu_stats(h, r) for h, r in zip(hypotheses, references)))]
    return _bleu_from_stats(totals, smoothing, effective_order)


def sentence_bleu(hypothesis: str, reference: str, smoothing: str = "exp", effective_order: bool = True) -> float:
    """BLEU-4 of one pair in [0, 1] (same rules as corpus_bleu on a one-pair corpus)."""
    return _bleu_from_stats(_bleu_stats(hypothesis, reference), smoothing, effective_order)


def rouge_n(hypothesis: str, reference: str, n: int) -> float:
    """ROUGE-N F1: clipped n-gram overlap against both n-gram counts."""
    hyp, ref = _ngrams(tokenize(hypothesis), n), _ngrams(tokenize(reference), n)
    overlap = sum(min(c, ref[g]) for g, c in hyp.items())
    return _prf(overlap, sum(hyp.values()), sum(ref.values()))[2]


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1: longest common subsequence against both lengths."""
    hyp, ref = tokenize(hypothesis), tokenize(reference)
    return _prf(_lcs_length(hyp, ref), len(hyp), len(ref))[2]


def text_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """BLEU-4 (corpus and mean sentence level) and mean ROUGE-1/2/L F1, all in [0, 1]."""
    _check_lengths(hypotheses, references, "texts")
    pairs = list(zip(hypotheses, references))
    return {"bleu4": corpus_bleu(hypotheses, references),
            "bleu4_sentence": sum(sentence_bleu(h, r) for h, r in pairs) / len(pairs),
            "rouge1": sum(rouge_n(h, r, 1) for h, r in pairs) / len(pairs),
            "rouge2": sum(rouge_n(h, r, 2) for h, r in pairs) / len(pairs),
            "rougeL": sum(rouge_l(h, r) for h, r in pairs) / len(pairs)}
