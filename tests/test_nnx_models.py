"""The models are Flax NNX modules with one copy of their weights, decoded by an engine
that owns its programs; the package has no import cycles and no model-type branches
outside `hsd_jax/models`."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import hsd_jax
from hsd_jax.engine import Decoder
from hsd_jax.models import init_params
from hsd_jax.models.modules import CausalLM, GPT2LMHeadModel, PhiForCausalLM

PACKAGE = Path(hsd_jax.__file__).resolve().parent
IDS = [[5, 17, 3, 9, 2], [8, 40, 2, 11, 30]]


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_loaded_models_are_nnx_modules_that_split_and_merge(model_dir):
    lm = hsd_jax.load(model_dir)
    assert isinstance(lm, nnx.Module)
    assert type(lm) is (GPT2LMHeadModel if lm.config.model_type == "gpt2" else PhiForCausalLM)
    logits = np.asarray(lm(IDS))
    graphdef, state = nnx.split(lm)
    assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(lm.params))
    again = nnx.merge(graphdef, state)
    np.testing.assert_array_equal(np.asarray(again(IDS)), logits)
    assert again.tokenizer is lm.tokenizer and again.config == lm.config
    # The Params are the weights: changing one through the NNX state changes the logits.
    params = nnx.state(lm, nnx.Param)
    assert sum(x.size for x in jax.tree.leaves(params)) == sum(x.size for x in jax.tree.leaves(lm.params))
    assert "Param" in repr(lm)


def test_a_model_built_from_its_config_and_rngs_is_the_familys_initialisation(model_dir):
    lm = hsd_jax.load(model_dir, tokenizer=False)
    cls = type(lm)
    fresh = cls(lm.config, rngs=nnx.Rngs(3))
    expected = init_params(lm.config, nnx.Rngs(3).params())
    for a, b in zip(_leaves(fresh.params), _leaves(expected)):
        np.testing.assert_array_equal(a, b)
    assert np.asarray(fresh(IDS)).shape == (2, 5, lm.config.vocab_size)
    other = PhiForCausalLM if cls is GPT2LMHeadModel else GPT2LMHeadModel
    with pytest.raises(hsd_jax.HsdError, match="builds"):
        other(lm.config, rngs=nnx.Rngs(0))
    with pytest.raises(hsd_jax.HsdError, match="rngs"):
        cls(lm.config)


def test_from_pretrained_and_save_pretrained_round_trip(model_dir, tmp_path):
    lm = GPT2LMHeadModel if "gpt2" in str(model_dir) else PhiForCausalLM
    model = lm.from_pretrained(model_dir)
    model.save_pretrained(tmp_path / "copy")
    again = CausalLM.from_pretrained(tmp_path / "copy")
    np.testing.assert_array_equal(np.asarray(again(IDS)), np.asarray(model(IDS)))


def test_the_decode_layout_replaces_the_stacked_weights(model_dir):
    lm = hsd_jax.load(model_dir, tokenizer=False)
    stacked = _leaves(lm.params)
    before = np.asarray(lm(IDS))
    nbytes = sum(x.nbytes for x in stacked)
    out = hsd_jax.generate(lm, input_ids=IDS, max_new_tokens=4)
    assert lm.layout == "decode"  # generate converted the model, in place, once
    assert sum(x.nbytes for x in jax.tree.leaves(lm.params)) == nbytes  # one copy, not two
    assert isinstance(lm.params["layers"], tuple) and "kernel_t" in str(jax.tree_util.tree_structure(lm.params))
    np.testing.assert_allclose(np.asarray(lm(IDS)), before, rtol=1e-5, atol=1e-5)
    for a, b in zip(_leaves(lm.stacked_params()), stacked):  # the exact weights, transposed back
        np.testing.assert_array_equal(a, b)
    assert hsd_jax.generate(lm, input_ids=IDS, max_new_tokens=4).sequences == out.sequences
    lm.to_layout("stacked")
    for a, b in zip(_leaves(lm.params), stacked):
        np.testing.assert_array_equal(a, b)


def test_the_decoder_owns_a_bounded_cache_of_programs(gpt2_dir):
    lm = hsd_jax.load(gpt2_dir, tokenizer=False)
    first = hsd_jax.generate(lm, input_ids=IDS, max_new_tokens=4, schedule="hsd:s=1,min=0,max=3")
    assert first.compile_seconds > 0 and len(lm.decoder) == 1
    # Another schedule of the same shape reuses the compiled program (the op table is an argument).
    again = hsd_jax.generate(lm, input_ids=IDS, max_new_tokens=4, schedule="skipdecode:min=1,max=4")
    assert again.compile_seconds == 0.0 and len(lm.decoder) == 1
    lm.decoder.max_programs = 2
    for width in (6, 7, 8):  # new prompt widths: new programs; the oldest goes
        hsd_jax.generate(lm, input_ids=[[1] * width], max_new_tokens=4)
    assert len(lm.decoder) == 2
    other = hsd_jax.load(gpt2_dir, tokenizer=False)
    assert other.decoder is not lm.decoder and isinstance(other.decoder, Decoder)


def _imports(path: Path) -> set[str]:
    """The hsd_jax modules `path` imports at module level (not inside functions)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hsd_jax"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("hsd_jax"))
    return found


def test_the_package_has_no_import_cycles():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(("hsd_jax", *path.relative_to(PACKAGE).with_suffix("").parts))
        modules[name.removesuffix(".__init__")] = path
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    for m in graph:  # a package's submodules are imported through it; that edge is not a cycle
        graph[m] = {i for i in graph[m] if not m.startswith(i + ".")}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, m, n]))
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
    # CALM is a step strategy of the engine, not a client importing the loop's private helpers.
    calm = _imports(PACKAGE / "calm.py")
    assert "importlib" not in (PACKAGE / "calm.py").read_text()
    assert not any(m.startswith(("hsd_jax.generate", "hsd_jax.engine")) for m in calm)


def test_no_model_type_branches_outside_the_models_package():
    pattern = re.compile(r"model_type\s*[!=]=|DEFAULT_TARGETS\[")
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if "models" not in p.relative_to(PACKAGE).parts and pattern.search(p.read_text())]
    assert offenders == []


def test_loading_straight_into_the_decode_layout_gives_the_converted_weights(model_dir):
    direct = hsd_jax.load(model_dir, tokenizer=False, layout="decode")
    converted = hsd_jax.load(model_dir, tokenizer=False).to_layout("decode")
    assert direct.layout == converted.layout == "decode"
    assert jax.tree_util.tree_structure(direct.params) == jax.tree_util.tree_structure(converted.params)
    for a, b in zip(_leaves(direct.params), _leaves(converted.params)):
        np.testing.assert_array_equal(a, b)


def test_bfloat16_safetensors_are_read_exactly(gpt2_dir, tmp_path):
    import shutil

    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    shutil.copytree(gpt2_dir, tmp_path / "m")
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(gpt2_dir / "model.safetensors").items()}
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    lm = hsd_jax.load(tmp_path / "m", tokenizer=False, dtype="bfloat16")
    np.testing.assert_array_equal(np.asarray(lm.params["wte"]), tensors["transformer.wte.weight"])


def test_lora_adapters_are_an_nnx_module_of_lora_params(gpt2_dir):
    from hsd_jax import lora

    model = hsd_jax.load(gpt2_dir, tokenizer=False)
    adapters = lora.LoRAAdapters(model, lora.LoraConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(0))
    trainable = nnx.state(adapters, nnx.LoRAParam)
    assert len(jax.tree.leaves(trainable)) == 2 * len(lora.targets_of(adapters.values)) == 8  # A, B x 4 kernels
    base = model.stacked_params()
    for a, b in zip(_leaves(adapters.merged(model)), _leaves(base)):  # B starts at zero: the base model
        np.testing.assert_array_equal(a, b)
    node = adapters.factors["attn"]["c_attn"]
    node["b"].set_value(jax.numpy.ones_like(node["b"].get_value()))
    merged = adapters.merged(model)["layers"]["attn"]["c_attn"]["kernel"]
    a = np.asarray(node["a"].get_value())
    expected = np.asarray(base["layers"]["attn"]["c_attn"]["kernel"]) + 2.0 * np.einsum("lir,lro->lio", a, np.ones(
        (a.shape[0], 4, merged.shape[-1]), np.float32))
    np.testing.assert_allclose(np.asarray(merged), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the house (issue 28)


def _all_imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """The hsd_jax modules `path` imports anywhere, inside functions too: `from A import B` is
    an edge to module A.B when B is one, else to A."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hsd_jax"):
            found.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("hsd_jax"))
    return {m for m in found if m in modules and m != module and not module.startswith(m + ".")}


def test_no_import_cycle_even_through_imports_inside_functions():
    # Was: checkpoint.py imported the NNX classes, whose from_pretrained / save_pretrained
    # imported checkpoint.py back inside the functions.
    paths = {".".join(("hsd_jax", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): p
             for p in PACKAGE.rglob("*.py")}
    graph = {m: _all_imports(p, m, set(paths)) for m, p in paths.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join([*path, m, n])
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert "hsd_jax.models.modules" not in graph["hsd_jax.checkpoint"]  # tensors in and out, no classes


def test_every_module_is_a_readable_size_and_the_suites_live_with_the_benchmarks():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 600} == {}  # was: train.py, 1,207 lines
    assert not (PACKAGE / "bench_suites.py").exists() and (PACKAGE / "bench" / "suites.py").is_file()
    from hsd_jax.train import TrainConfig, train  # noqa: F401 - the public training import is unchanged


def test_converting_to_the_decode_layout_lets_each_stacked_array_go(gpt2_dir):
    """`decode_layout_leaves` empties the pytree it is given, so no stacked array outlives its
    conversion (the caller's dicts held them all before: the weights twice at the peak)."""
    from hsd_jax.models import decode_layout, decode_layout_leaves

    lm = hsd_jax.load(gpt2_dir, tokenizer=False)
    tree = lm.params
    expected = _leaves(decode_layout(tree))
    converted = decode_layout_leaves(tree)
    assert tree == {}  # every dict the caller handed over is emptied
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(converted), expected))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a device elsewhere holds its own copy")
def test_loaded_weights_are_the_arrays_read_not_copies():
    """On CPU a tensor read from a checkpoint becomes the JAX array itself (`_to_device`);
    `jnp.asarray` made two more copies of each, so the largest tensor was briefly there three times."""
    from hsd_jax.checkpoint import _aligned_empty, _to_device

    read = _aligned_empty((64, 32), np.float32)
    read[...] = np.arange(64 * 32).reshape(64, 32)
    placed = _to_device(read, np.float32)
    assert placed.unsafe_buffer_pointer() == read.ctypes.data
    np.testing.assert_array_equal(np.asarray(_to_device(read.T, np.float32)), read.T)  # converted: a copy
