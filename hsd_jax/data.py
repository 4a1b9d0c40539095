"""Sequence-to-sequence data for decoder-only models: datasets, prompt format, batches.

Prompt format (training, generation and evaluation all use it through this module):

    "<source> =" + " <target>" + EOS      e.g.  "dog frisbee catch throw =" " A dog leaps ..." <|endoftext|>
    |-- prompt --|  |------ loss on these tokens ------|

`encode_source(tokenizer, source, max_len)` gives the prompt a generator is fed;
`encode_pair(tokenizer, source, target, max_len)` gives the training row, whose first
`prompt_len` tokens are exactly `encode_source`'s. The loss covers only the target
tokens and the EOS. When a row does not fit `max_len`, the source is cut from the end
(the lead of an article is kept) and the separator is kept whole; a target is never
cut, and one that cannot fit is an error.

Sources of pairs: a dataset name from `DATASETS` (read from the shared data folder
when it holds that split, else from the Hugging Face hub through `datasets`), or a
local `.jsonl` / `.json` / `.csv` / `.tsv` file with a source and a target field.
A split name may end in `:selection` or `:report` (`validation:selection`): one fixed
half of that split's sources, by `holdout_half`, so that recipe choices made on one
half are reported on the other.

Batches are length-bucketed: rows are shuffled per epoch (seeded by seed and epoch),
sorted by length within chunks of `BUCKET_CHUNK` batches, cut into batches, and the
batches shuffled; each batch is right-padded to a few fixed lengths (`padded_length`)
so jit compiles a handful of shapes, not one per batch.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import warnings
import weakref
from io import StringIO
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from hsd_jax.errors import HsdError, HsdWarning

SEPARATOR = " ="  # ends every prompt; the target follows after a space
DEFAULT_SOURCE_FIELD = "source"
DEFAULT_TARGET_FIELD = "target"
BUCKET_CHUNK = 64  # batches per length-sorted chunk: bigger = less padding, less randomness
PARQUET_REVISION = "refs/convert/parquet"  # the hub's parquet export of script-based datasets

Pair = tuple[str, str]


# ---------------------------------------------------------------- prompt format


def format_source(source: str) -> str:
    """The prompt text for `source` (what a generator is given)."""
    return source.strip() + SEPARATOR


def format_target(target: str) -> str:
    """The text the model learns to continue the prompt with (EOS follows)."""
    return " " + target.strip()


def _ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise HsdError("the tokenizer has no EOS token, which ends every target; "
                       "use a tokenizer that defines eos_token (GPT-2's and Phi's do)")
    return int(tokenizer.eos_token_id)


def _assemble(src: list[int], sep: list[int], tgt: list[int], eos: int, max_len: int, where: str = ""):
    """(ids, prompt_len): source cut to fit, separator and target + EOS kept whole."""
    fixed = len(sep) + len(tgt) + 1
    if fixed >= max_len:
        raise HsdError(f"target{where} is {len(tgt)} tokens and cannot fit the {max_len}-token context "
                       f"with the separator, the EOS and at least one source token; raise --max-length "
                       f"(up to the model's context) or drop or shorten such targets")
    src = src[: max_len - fixed]
    prompt = src + sep
    return prompt + tgt + [eos], len(prompt)


def encode_source(tokenizer, source: str, max_len: int, *, cut: bool = True, where: str = "the source",
                  fix: str = "shorten it", separator: bool = True) -> list[int]:
    """Prompt token ids for `source`, cut (as training cuts it) so the prompt has at most
    `max_len` tokens; with `cut=False` a longer prompt is an HsdError naming `where` and `fix`.
    `separator=False`: `source` is a plain prompt, tokenized as given (`hsd_jax.generate`'s
    way), with nothing added (hsd-jax generate without --seq2seq).

    A source far too long is known by its characters, without tokenizing it all (a 10 MB
    line took 3 GB and 24 s): no token covers more characters than the longest string in
    the vocabulary (byte-level BPE, as GPT-2's and Phi's: a token is at most that many
    bytes), so a text longer than `max_len` times that cannot fit, and the first
    `max_len` tokens of a longer text lie within that many characters."""
    require_utf8(source, where)
    text = source.strip() if separator else source
    sep = _ids(tokenizer, [SEPARATOR])[0] if separator else []
    if len(sep) >= max_len:
        raise HsdError(f"max_len {max_len} leaves no room for a source before the separator")
    room = max_len - len(sep)
    with_sep = " with the separator" if separator else ""
    if len(text) > room:  # only then can the characters tell (a token covers at least one)
        longest = _longest_token(tokenizer)
        reach = room * longest
        if len(text) > reach:
            if not cut:
                raise HsdError(f"{where} is {len(text):,} characters, too long for the {max_len} tokens that fit"
                               f"{with_sep} (a token covers at most {longest} characters); {fix}")
            text = text[:reach]
    src = _ids(tokenizer, [text])[0] if separator else tokenizer.encode(text)
    if not cut and len(src) + len(sep) > max_len:
        raise HsdError(f"{where} is {len(src) + len(sep)} tokens{with_sep}, more than the {max_len} "
                       f"that fit; {fix}")
    return src[:room] + sep


def require_utf8(text: str, where: str) -> None:
    """An HsdError if `text` holds a lone surrogate, which no tokenizer takes (its TypeError
    says nothing of the text): what Python makes of command-line bytes that are not UTF-8,
    or a JSON escape such as "\\ud800"."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise HsdError(f"{where} holds {text[err.start]!r} at character {err.start + 1}, which is not text (bytes "
                       "that are not UTF-8, or a JSON escape of half a character); give UTF-8 text") from None


_LONGEST_TOKEN = weakref.WeakKeyDictionary()  # tokenizer -> its longest vocabulary string, in characters


def _longest_token(tokenizer) -> int:
    """Characters in the longest string of the vocabulary (added tokens included): at least
    the characters of text one token stands for. Worked out once per tokenizer (16 ms for GPT-2's)."""
    try:
        return _LONGEST_TOKEN[tokenizer]
    except KeyError:
        pass
    except TypeError:  # not weakly referable: worked out each time
        return max(map(len, tokenizer.get_vocab()))
    _LONGEST_TOKEN[tokenizer] = longest = max(map(len, tokenizer.get_vocab()))
    return longest


def encode_pair(tokenizer, source: str, target: str, max_len: int) -> tuple[list[int], int]:
    """Training ids (prompt + target + EOS) and the prompt length; see the module doc."""
    src, sep, tgt = _ids(tokenizer, [source.strip(), SEPARATOR, format_target(target)])
    return _assemble(src, sep, tgt, eos_id(tokenizer), max_len)


@dataclasses.dataclass
class Encoded:
    """Tokenised pairs: row i is tokens[i], of which the first prompt_lens[i] are the prompt."""

    tokens: list[np.ndarray]  # each (len_i,) int32
    prompt_lens: np.ndarray  # (N,) int32
    max_len: int

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(t) for t in self.tokens], np.int32)

    def fingerprint(self) -> str:
        """A hash of every token and prompt boundary: a resumed run checks the data is the same."""
        h = hashlib.sha256()
        h.update(self.prompt_lens.tobytes())
        for t in self.tokens:
            h.update(t.tobytes())
        return h.hexdigest()[:16]


def encode_pairs(tokenizer, pairs: Sequence[Pair], max_len: int, what: str = "data") -> Encoded:
    """Tokenises all pairs at once (the fast tokenizer batches in Rust)."""
    if not pairs:
        raise HsdError(f"{what} holds no (source, target) pairs")
    eos = eos_id(tokenizer)
    (sep,) = _ids(tokenizer, [SEPARATOR])
    srcs = _ids(tokenizer, [s.strip() for s, _ in pairs])
    tgts = _ids(tokenizer, [format_target(t) for _, t in pairs])
    tokens, prompt_lens = [], []
    for i, (src, tgt) in enumerate(zip(srcs, tgts)):
        ids, n = _assemble(src, sep, tgt, eos, max_len, where=f" of pair {i} in {what}")
        tokens.append(np.asarray(ids, np.int32))
        prompt_lens.append(n)
    return Encoded(tokens, np.asarray(prompt_lens, np.int32), max_len)


# ---------------------------------------------------------------- batches


def padded_length(n: int, max_len: int) -> int:
    """Powers of two from 32 to 256, then multiples of 256, capped at `max_len`: few shapes to compile."""
    p = 32
    while p < n and p < 256:
        p *= 2
    if p < n:
        p = -(-n // 256) * 256
    return min(p, max_len)


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
    return -(-num_rows // batch_size)


def batch_plan(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Row indices of each batch of one epoch; a pure function of (lengths, batch size, seed, epoch).

    Every row appears once; only the epoch's last batch can be short. A resumed run
    recomputes the plan of its epoch and skips the batches already done.
    """
    n = len(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    chunk = batch_size * BUCKET_CHUNK
    batches = []
    for start in range(0, n, chunk):
        rows = order[start:start + chunk]
        rows = rows[np.argsort(lengths[rows], kind="stable")]
        batches.extend(rows[i:i + batch_size] for i in range(0, len(rows), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def make_batch(data: Encoded, rows: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """Right-padded arrays (B, T) for `rows`; missing rows (a short last batch) are all-masked filler.

    tokens int32; attention_mask bool (real tokens); loss_mask bool (target tokens and
    EOS: the positions whose token the previous position must predict).
    """
    width = padded_length(max(len(data.tokens[r]) for r in rows), data.max_len)
    tokens = np.zeros((batch_size, width), np.int32)
    attention = np.zeros((batch_size, width), bool)
    loss = np.zeros((batch_size, width), bool)
    for i, r in enumerate(rows):
        t = data.tokens[r]
        tokens[i, :len(t)] = t
        attention[i, :len(t)] = True
        loss[i, data.prompt_lens[r]:len(t)] = True
    return {"tokens": tokens, "attention_mask": attention, "loss_mask": loss}


# ---------------------------------------------------------------- datasets


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    hub_id: str
    source_field: str
    target_field: str
    config: str | None = None
    local: Callable[[Path, str], list[Pair] | None] | None = None  # reader for the shared data folder
    # reader of a split whose references are withheld (a test split): its sources only
    local_sources: Callable[[Path, str], list[str] | None] | None = None


def _commongen_local(root: Path, split: str) -> list[Pair] | None:
    name = {"train": "train", "validation": "dev"}.get(split)
    if name is None:
        return None
    src, tgt = root / "commongen" / f"commongen.{name}.src_alpha.txt", root / "commongen" / f"commongen.{name}.tgt.txt"
    if not (src.exists() and tgt.exists()):
        return None
    sources, targets = src.read_text().splitlines(), tgt.read_text().splitlines()
    if len(sources) != len(targets):
        raise HsdError(f"{src} and {tgt} should align line by line but have {len(sources)} and {len(targets)} lines")
    return list(zip(sources, targets))


def _commongen_local_sources(root: Path, split: str) -> list[str] | None:
    """CommonGen's test concept sets, in the published order: `{"concept_set": "dog_N#throw_V"}`
    becomes "dog throw", the form of the training sources (words without their part of speech)."""
    path = root / "commongen" / f"commongen.{split}.inputs.jsonl"
    if split != "test" or not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    return [" ".join(word.rsplit("_", 1)[0] for word in row["concept_set"].split("#")) for row in rows]


def _e2e_local(root: Path, split: str) -> list[Pair] | None:
    path = root / "e2e" / "devset.csv"
    if split != "validation" or not path.exists():
        return None
    return read_pairs(path, "mr", "ref")


# Hub ids, configs and fields, as found (2025) on the dataset cards and their
# `dataset_info` metadata at huggingface.co/datasets/<id> and in the TFDS community
# catalog of hub datasets (tensorflow.org/datasets/community_catalog/huggingface/<name>):
# - cnn_dailymail: abisee/cnn_dailymail, config "3.0.0", article -> highlights
#   (the "cnn_dailymail" id redirects there; catalog entry cnn_dailymail/3.0.0).
# - xsum: EdinburghNLP/xsum, document -> summary (catalog entry xsum; card commits).
# - e2e_nlg: tuetschek/e2e_nlg, meaning_representation -> human_reference (card's
#   dataset_info, commit 6a3c3d4); main holds only a loading script, which datasets >= 4
#   no longer runs, so the hub's parquet export (refs/convert/parquet) is the fallback.
# - common_gen: allenai/common_gen, concepts (a list of words) -> target (card's
#   dataset_info; converted to parquet).
# - healthcaremagic: lavita/ChatDoctor-HealthCareMagic-100k, input (the patient's
#   question) -> output (the doctor's answer); `instruction` is one fixed sentence for
#   every row, so it is left out; only a train split exists. Found via the model cards
#   that cite it (e.g. vikash06/doctorLLM) and its hub page.
DATASETS: dict[str, DatasetSpec] = {
    "cnn_dailymail": DatasetSpec("abisee/cnn_dailymail", "article", "highlights", config="3.0.0"),
    "xsum": DatasetSpec("EdinburghNLP/xsum", "document", "summary"),
    "e2e_nlg": DatasetSpec("tuetschek/e2e_nlg", "meaning_representation", "human_reference", local=_e2e_local),
    "common_gen": DatasetSpec("allenai/common_gen", "concepts", "target", local=_commongen_local,
                              local_sources=_commongen_local_sources),
    "healthcaremagic": DatasetSpec("lavita/ChatDoctor-HealthCareMagic-100k", "input", "output"),
}
_SPLIT_ALIASES = {"dev": "validation", "valid": "validation", "val": "validation"}


# ---------------------------------------------------------------- held-out halves

HALVES = ("selection", "report")


def holdout_half(source: str) -> str:
    """The half of a held-out split that `source` belongs to: "selection" (every recipe
    decision is made on it) or "report" (scored once, at the end). The rule is fixed and
    needs no list: the first bit of the SHA-256 of the source's words, sorted and joined
    by one space, so that a CommonGen concept set falls in the same half whatever the
    order of its concepts (the shared files list them alphabetically, the hub as written).
    Every reference of a source goes with it."""
    key = " ".join(sorted(source.split()))
    return HALVES[hashlib.sha256(key.encode("utf-8")).digest()[0] & 1]


def _split_and_half(split: str) -> tuple[str, str | None]:
    """("validation", "report") for "dev:report"; the half is None for a whole split."""
    base, colon, half = split.partition(":")
    if colon and half not in HALVES:
        raise HsdError(f"split {split!r}: after ':' comes one of {', '.join(HALVES)} "
                       f"(e.g. validation:selection), not {half!r}")
    base = _SPLIT_ALIASES.get(base, base)
    return base, (half if colon else None)


def _in_half(items: list, half: str | None, source=lambda item: item) -> list:
    return items if half is None else [item for item in items if holdout_half(source(item)) == half]


def shared_data_dir() -> Path | None:
    """$HSD_DATA_DIR, else ../shared/data next to the project (or the working directory).
    A $HSD_DATA_DIR that is not a folder is not passed over for another copy: the user asked
    for that one (the hub is tried, and its error names the variable)."""
    env = os.environ.get("HSD_DATA_DIR")
    if env:
        return Path(env) if Path(env).is_dir() else None
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), None)


def load_dataset_pairs(name: str, split: str = "train", file_flag: str = "--train-file") -> list[Pair]:
    """(source, target) pairs of a named dataset: from the shared data folder if it has them, else the hub.
    `file_flag` is the command's option for a local data file (train's --train-file, eval's --eval-file),
    named by the errors that say how to do without the hub."""
    if name not in DATASETS:
        raise HsdError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}. "
                       f"For other data pass {file_flag} FILE.jsonl|.csv with --source-field/--target-field")
    spec = DATASETS[name]
    split, half = _split_and_half(split)
    root = shared_data_dir()
    if spec.local is not None and root is not None:
        pairs = spec.local(root, split)
        if pairs is not None:
            return _in_half(pairs, half, lambda pair: pair[0])
    rows = _hub_rows(spec, split, _offline_fix(spec, root, file_flag))
    pairs = _pairs_from_rows(rows, spec.source_field, spec.target_field, f"{spec.hub_id} ({split})")
    return _in_half(pairs, half, lambda pair: pair[0])


def load_dataset_sources(name: str, split: str = "test", file_flag: str = "--eval-file") -> list[str]:
    """The sources of a named dataset's split, in order, repeats kept: for decoding a split
    whose references are withheld (`hsd-jax eval --blind`). From the shared data folder
    if it has them, else the hub's rows (whose targets, empty on a test split, are ignored)."""
    if name not in DATASETS:
        raise HsdError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}. "
                       f"For other data pass {file_flag} FILE.jsonl|.csv with --source-field")
    spec = DATASETS[name]
    split, half = _split_and_half(split)
    root = shared_data_dir()
    if root is not None:
        if spec.local_sources is not None and (sources := spec.local_sources(root, split)) is not None:
            return _in_half(sources, half)
        if spec.local is not None and (pairs := spec.local(root, split)) is not None:
            return _in_half(list(dict.fromkeys(source for source, _ in pairs)), half)
    rows = _hub_rows(spec, split, _offline_fix(spec, root, file_flag))
    return _in_half(_sources_from_rows(rows, spec.source_field, f"{spec.hub_id} ({split})"), half)


def read_sources(path: str | os.PathLike, source_field: str | None = None) -> list[str]:
    """The source field of every row of a local data file, in order (no target needed)."""
    path = Path(path)
    rows = _read_rows(path)
    return _sources_from_rows(rows, source_field or DEFAULT_SOURCE_FIELD, str(path))


def _sources_from_rows(rows, source_field: str, what: str) -> list[str]:
    sources = []
    for i, row in enumerate(rows):
        if source_field not in row:
            raise HsdError(f"row {i + 1} of {what} has no field {source_field!r}; its fields are "
                           f"{', '.join(map(str, row)) or '(none)'}; pass --source-field")
        source = _text(row[source_field], source_field, f"row {i + 1} of {what}")
        if not source.strip():  # one prediction per row: an empty source cannot be skipped silently
            raise HsdError(f"row {i + 1} of {what} has an empty {source_field!r}")
        sources.append(source)
    if not sources:
        raise HsdError(f"{what} holds no rows")
    return sources


def _offline_fix(spec: DatasetSpec, root: Path | None, file_flag: str) -> str:
    """Where a dataset can come from without the hub: a local file (`file_flag`), or the shared
    data folder, for the datasets that have a reader for it."""
    local = [name for name, s in DATASETS.items() if s.local is not None]
    if spec.local is None:
        return (f"pass a local {file_flag} (HSD_DATA_DIR, a local copy of the shared data folder, "
                f"serves only {', '.join(local)})")
    env = os.environ.get("HSD_DATA_DIR")
    if root:
        found = f"{root} does not hold this split"
    else:
        found = f"it is {env}, which is not a folder" if env else "it is not set and there is no ../shared/data"
    return f"pass a local {file_flag}, or set HSD_DATA_DIR to a local copy of the shared data folder ({found})"


def _hub_rows(spec: DatasetSpec, split: str, offline_fix: str):
    import datasets

    from hsd_jax import hub

    hub.configure()  # datasets asks the hub through huggingface_hub's client: a hub that never answers times out
    first_error = None
    for revision in (None, PARQUET_REVISION):
        try:
            return datasets.load_dataset(spec.hub_id, spec.config, split=split, revision=revision)
        except Exception as err:  # noqa: BLE001 - network, script and split errors come in many types
            first_error = first_error or err
            if hub.unreachable(err):  # the other revision would only wait as long again
                break
    what = f"{spec.hub_id}" + (f" ({spec.config})" if spec.config else "") + f" split {split!r}"
    if hub.unreachable(first_error):
        raise hub.explain(first_error, what, offline_fix) from first_error
    raise HsdError(f"could not load {what} from the Hugging Face hub ({type(first_error).__name__}: "
                   f"{str(first_error).splitlines()[0] if str(first_error) else ''}); check the split name "
                   f"and your network, or {offline_fix}") from first_error


def _text(value, field: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if value is None:  # a CSV row short of this cell, or a JSON null: empty, like an empty cell (and said so)
        return ""
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return " ".join(value)  # e.g. CommonGen's concept list
    raise HsdError(f"field {field!r} of {where} is {type(value).__name__}, not text")


def _pairs_from_rows(rows, source_field: str, target_field: str, what: str) -> list[Pair]:
    """Pairs from dict rows; a list-valued target gives one pair per reference."""
    pairs: list[Pair] = []
    skipped: list[int] = []
    for i, row in enumerate(rows):
        for field in (source_field, target_field):
            if field not in row:
                raise HsdError(f"row {i + 1} of {what} has no field {field!r}; its fields are "
                               f"{', '.join(map(str, row)) or '(none)'}; pass --source-field/--target-field")
        source = _text(row[source_field], source_field, f"row {i + 1} of {what}")
        targets = row[target_field]
        for target in targets if isinstance(targets, (list, tuple)) else [targets]:
            target = _text(target, target_field, f"row {i + 1} of {what}")
            if source.strip() and target.strip():
                pairs.append((source, target))
            else:
                skipped.append(i + 1)
    if skipped:
        rows_text = ", ".join(map(str, skipped[:5])) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        warnings.warn(HsdWarning(f"{what}: skipped {len(skipped)} pair(s) with an empty {source_field!r} or "
                                 f"{target_field!r} (row {rows_text}, the first row being 1)"), stacklevel=2)
    if not pairs:
        raise HsdError(f"{what} holds no pair with a non-empty {source_field!r} and {target_field!r}")
    return pairs


def read_pairs(path: str | os.PathLike, source_field: str | None = None, target_field: str | None = None) -> list[Pair]:
    """Pairs from a local .jsonl / .json / .csv / .tsv file (fields default to source/target)."""
    path = Path(path)
    return _pairs_from_rows(_read_rows(path), source_field or DEFAULT_SOURCE_FIELD,
                            target_field or DEFAULT_TARGET_FIELD, str(path))


def _read_rows(path: Path) -> list[dict]:
    """The rows of a local .jsonl / .json / .csv / .tsv file, as dicts."""
    text = _read_text(path)
    if not text.strip():
        raise HsdError(f"data file {path} is empty")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        # Lines end at "\n" only: splitlines would also split at U+2028 inside a JSON string.
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise HsdError(f"line {n} of {path} is not JSON ({err}); "
                                   "a .jsonl file holds one object a line") from err
    elif suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise HsdError(f"{path} is not JSON ({err})") from err
        if isinstance(rows, dict) and isinstance(rows.get("data"), list):
            rows = rows["data"]
        if not isinstance(rows, list):
            raise HsdError(f"{path} should hold a list of objects (or {{\"data\": [...]}})")
    elif suffix in (".csv", ".tsv"):
        # newline="" as the csv docs ask: a quoted field keeps its line breaks (and U+2028).
        rows = list(csv.DictReader(StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ","))
    else:
        raise HsdError(f"cannot read {path}: use a .jsonl, .json, .csv or .tsv file")
    if not rows:
        raise HsdError(f"data file {path} holds no rows")
    if not all(isinstance(r, dict) for r in rows):
        raise HsdError(f"{path} should hold one JSON object per row")
    return rows


def _read_text(path: Path) -> str:
    """A data file's text; a missing, unreadable or non-UTF-8 file is one HsdError."""
    if not path.exists():
        raise HsdError(f"data file {path} does not exist")
    if not path.is_file():
        raise HsdError(f"data file {path} is not a regular file; give a .jsonl, .json, .csv or .tsv file")
    try:
        return path.read_bytes().decode("utf-8-sig")  # -sig: drops the byte-order mark Excel writes
    except OSError as err:
        raise HsdError(f"cannot read data file {path} ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise HsdError(f"data file {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                       f"{err.start}); save it as UTF-8") from None


def write_jsonl(pairs: Sequence[Pair], path: str | os.PathLike) -> Path:
    """Writes pairs as {"source", "target"} lines (the default fields of read_pairs), atomically."""
    from hsd_jax import io

    io.write_jsonl(path, ({"source": s, "target": t} for s, t in pairs))
    return Path(path)
