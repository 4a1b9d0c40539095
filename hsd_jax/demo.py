"""`hsd-jax demo`: the whole pipeline offline, in a few minutes on a laptop CPU.

1. writes a small data-to-text task (`hsd_jax.demo_data`: invented restaurant records
   and sentences, train and dev splits of distinct records);
2. trains a 12-layer GPT-2 from random weights on it, with a byte-level BPE learned on
   the training pairs, through `hsd_jax.train` (the code path of `hsd-jax train`);
3. decodes the dev records under vanilla, SkipDecode, HSD (two budgets, with and
   without a warm-up layer) and CALM (two lambdas) with beam 4 and scores them through `hsd_jax.evaluate` (the code path
   of `hsd-jax eval`): the paper-style table and the quality-against-layers plot.

Nothing is downloaded. Everything follows from the seed, so a seed gives the same table.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from hsd_jax import demo_data
from hsd_jax.errors import HsdError
from hsd_jax.io import check_output_dir, write_json

MARKER = "demo.json"  # what the demo writes first: a folder holding it may be replaced by --overwrite
PARTS = (MARKER, "data", "model", "eval")  # everything a demo writes in its folder


@dataclasses.dataclass(frozen=True)
class DemoSize:
    """How much data, model and training a demo run uses."""

    num_train: int  # training pairs (two renderings per record)
    num_dev: int  # dev records, each with `refs_per_dev` references
    refs_per_dev: int
    layers: int
    width: int
    heads: int
    vocab: int  # BPE tokens learned on the training pairs
    epochs: int
    batch_size: int
    learning_rate: float
    max_new_tokens: int


# ~3.5 minutes on a 2-core CPU (the README has the measured time).
FULL = DemoSize(num_train=3000, num_dev=100, refs_per_dev=4, layers=12, width=128, heads=4, vocab=1024,
                epochs=3, batch_size=16, learning_rate=2e-3, max_new_tokens=64)
# Under a minute, for the tests: the same pipeline on a sliver of it.
SMOKE = DemoSize(num_train=400, num_dev=6, refs_per_dev=2, layers=12, width=32, heads=2, vocab=1024,
                 epochs=4, batch_size=16, learning_rate=3e-3, max_new_tokens=24)


def schedules(size: DemoSize) -> list[str]:
    """The rows of the demo's table: vanilla; SkipDecode and two HSD budgets near half the depth,
    HSD as the paper runs it (layer 0 may be skipped) and with layer 0 always run; two CALM lambdas."""
    L = size.layers
    hsd = [f"hsd:s=1,min=0,max={L // 2}", f"hsd:s=2,min=0,max={L // 3}"]
    return ["vanilla", f"skipdecode:min={L // 6},max={2 * L // 3}", *hsd, *(f"{h},warmup=1" for h in hsd),
            "calm:lambda=0.02", "calm:lambda=0.005"]


@dataclasses.dataclass
class DemoResult:
    output: Path
    model: Path
    table: str
    seconds: float


def run_demo(output: str | Path, *, smoke: bool = False, seed: int = 0, overwrite: bool = False,
             progress: bool = True) -> DemoResult:
    """Runs the demo into `output` (data/, model/, eval/) and returns where things are."""
    from hsd_jax.models.modules import load
    from hsd_jax.evaluate import evaluate_to_folder, group_references, markdown_table
    from hsd_jax.train import TrainConfig, train

    start = time.perf_counter()
    size = SMOKE if smoke else FULL
    out = _prepare(Path(output), overwrite)
    write_json(out / MARKER, {"smoke": smoke, "seed": seed, "size": dataclasses.asdict(size)})

    splits = demo_data.make_splits(seed=seed, num_train=size.num_train, num_dev=size.num_dev,
                                   refs_per_dev=size.refs_per_dev)
    # dev is scored from `splits`; its file is there for the user to read
    train_file, _ = demo_data.write_splits(splits, out / "data")
    config = out / "data" / "model_config.json"
    write_json(config, {"model_type": "gpt2", "n_layer": size.layers, "n_embd": size.width, "n_head": size.heads,
                        "n_positions": 128, "vocab_size": size.vocab})

    model = out / "model"
    train(TrainConfig(model=f"random:{config}", tokenizer=f"bpe:{size.vocab}", train_file=str(train_file),
                      output=str(model), epochs=size.epochs, batch_size=size.batch_size,
                      learning_rate=size.learning_rate, weight_decay=0.01, seed=seed,
                      save_every=10**9, log_every=10, progress=progress))

    lm = load(model, layout="decode")  # it only decodes
    sources, references = group_references(splits.dev_pairs())
    title = f"demo model ({size.layers} layers) on {len(sources)} dev records, beam 4"
    results = evaluate_to_folder(lm, sources, references, schedules(size), out / "eval",
                                 settings={"model": str(model), "dataset": "demo dev", "seed": seed}, title=title,
                                 num_beams=4, max_new_tokens=size.max_new_tokens, batch_size=32, overwrite=True)
    return DemoResult(output=out, model=model, table=markdown_table(results, title),
                      seconds=time.perf_counter() - start)


def _prepare(out: Path, overwrite: bool) -> Path:
    check_output_dir(out)
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise HsdError(f"--output {out} is not empty and holds no demo; choose a new folder")
        if not overwrite:
            raise HsdError(f"--output {out} holds an earlier demo; pass --overwrite to run it again there, "
                           "or choose another --output")
        for part in PARTS:  # only what a demo writes: other files in the folder stay
            path = out / part
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out
