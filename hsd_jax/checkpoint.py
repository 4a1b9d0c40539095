"""Hugging Face folders <-> config, weights and tokenizer: tensors in, tensors out.

`read_pretrained` reads a local folder or a hub id the way transformers does (config.json
plus model.safetensors, sharded safetensors, or pytorch_model.bin) into a `Pretrained`:
the config, the parameter pytree and the tokenizer; `save_pretrained` writes a folder that
transformers loads back. The per-family name maps live in the families
(`hsd_jax.models.family.Family`: `layer_weights`, `global_weights`, `transposed`).

This module knows nothing of the NNX classes: `hsd_jax.models.modules` turns what it reads
into a model (`CausalLM.from_pretrained`, `hsd_jax.load`), and hands a model's config,
weights and tokenizer back to `save_pretrained`.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hsd_jax.errors import HsdError
from hsd_jax.io import atomic_path, write_json
from hsd_jax.models import FAMILIES, ModelConfig, family, stacked_layout
from hsd_jax.models.common import ACTIVATIONS

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class Pretrained(NamedTuple):
    """What a Hugging Face folder holds, read (`read_pretrained`)."""

    config: ModelConfig
    params: Any  # the parameter pytree, in the layout asked for
    tokenizer: Any  # a transformers tokenizer, or None
    hf_config: dict  # config.json as read
    source: str  # the folder or hub id it came from


def _resolve_folder(model: str | os.PathLike) -> Path:
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    looks_local = os.path.isabs(str(model)) or str(model).startswith((".", "~")) or str(model).count("/") > 1
    if looks_local or path.exists():
        raise HsdError(f"model folder {str(model)!r} does not exist (or is not a folder); "
                       "pass a Hugging Face model folder or a hub id like 'gpt2'")
    from hsd_jax import hub

    try:
        from huggingface_hub import snapshot_download

        hub.configure()  # a hub that never answers fails after HF_HUB_DOWNLOAD_TIMEOUT s, not never
        # Like transformers: safetensors when the repo has them, else the PyTorch weights.
        common = ["*.json", "*.txt", "*.model", "vocab.*", "merges.txt"]
        folder = Path(snapshot_download(str(model), allow_patterns=common + ["*.safetensors"]))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(str(model), allow_patterns=common + ["pytorch_model*.bin"]))
        return folder
    except Exception as err:  # noqa: BLE001 - hub errors come in many types
        raise hub.explain(err, repr(str(model)), "pass a local model folder") from err


def _read_tensors(folder: Path) -> dict[str, np.ndarray]:
    """All weights of a folder as numpy arrays, whatever the format."""
    st = folder / "model.safetensors"
    st_index = folder / "model.safetensors.index.json"
    pt = folder / "pytorch_model.bin"
    pt_index = folder / "pytorch_model.bin.index.json"
    if st.exists():
        files = [st]
    elif st_index.exists():
        files = _shards(st_index)
    elif pt.exists():
        files = [pt]
    elif pt_index.exists():
        files = _shards(pt_index)
    else:
        raise HsdError(f"{folder} holds no weights: expected one of {', '.join(_WEIGHT_FILES)}")
    for f in files:
        if not f.exists():
            raise HsdError(f"weight shard {f} named in the index is missing")
    if files[0].suffix == ".safetensors":
        return _LazyTensors(files)
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        with _explained(f):
            tensors.update(_read_torch(f))
    return tensors


class _LazyTensors(dict):
    """Safetensors weights read one tensor at a time, when asked for, with plain reads
    into fresh arrays: a loader that places each tensor and drops it holds the weights
    plus one tensor. (safetensors' own reader maps the file into memory, and every page
    it touches then counts as resident until the file is closed: the weights twice.)
    Each array is 64-byte aligned, so on CPU it can become the JAX array itself (`_to_device`)."""

    def __init__(self, files: list[Path]):
        super().__init__()
        for f in files:
            with _explained(f):
                for name, entry in _safetensors_header(f).items():
                    dict.__setitem__(self, name, (f, entry))

    def __getitem__(self, name: str) -> np.ndarray:
        f, (dtype, shape, start, stop) = dict.__getitem__(self, name)
        with _explained(f):
            out = _aligned_empty(shape, dtype)
            if out.nbytes != stop - start:
                raise ValueError(f"tensor {name!r} holds {stop - start} bytes, but {shape} of {dtype} needs "
                                 f"{out.nbytes}")
            with open(f, "rb") as handle:
                handle.seek(start)
                if handle.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes:
                    raise ValueError(f"the file ends inside tensor {name!r}")
            return out

    def renamed(self, rename: dict[str, str]) -> "_LazyTensors":
        """The same tensors under new names (nothing is read)."""
        out = _LazyTensors([])
        for old, new in rename.items():
            dict.__setitem__(out, new, dict.__getitem__(self, old))
        return out

    def items(self):
        return ((name, self[name]) for name in self)

    def values(self):
        return (self[name] for name in self)


def _safetensors_header(f: Path) -> dict[str, tuple]:
    """name -> (numpy dtype, shape, first byte, end byte) from a .safetensors file's header:
    8 bytes of little-endian header length, then a JSON object (the format's whole spec)."""
    import ml_dtypes

    dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
    with open(f, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        if not 2 <= size <= f.stat().st_size - 8:
            raise ValueError(f"header length {size} does not fit the file")
        header = json.loads(handle.read(size))
    data = 8 + size
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in dtypes:
            raise ValueError(f"tensor {name!r} has dtype {entry['dtype']}, which hsd-jax does not read")
        start, stop = entry["data_offsets"]
        out[name] = (np.dtype(dtypes[entry["dtype"]]), tuple(entry["shape"]), data + start, data + stop)
    return out


@contextlib.contextmanager
def _explained(f: Path):
    """Any failure reading `f` becomes one HsdError naming the file."""
    try:
        yield
    except HsdError:
        raise
    except Exception as err:  # noqa: BLE001 - corrupt files raise anything
        raise HsdError(f"cannot read weights from {f}: the file looks corrupt or truncated "
                       f"({type(err).__name__}: {err})") from err


def _shards(index: Path) -> list[Path]:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise HsdError(f"{index} has no \"weight_map\" object naming the shard of each weight; "
                       "write the index again with save_pretrained, or merge the shards into model.safetensors")
    return sorted({index.parent / f for f in weight_map.values()})


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as err:
        raise HsdError(f"{path} is a PyTorch checkpoint and reading it needs torch: "
                       "pip install torch, or convert the folder to safetensors") from err
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}


_JSON_KINDS = {list: "list", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def _read_json(path: Path) -> dict:
    """A JSON object from `path`; every JSON file of a model folder holds one."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HsdError(f"cannot read {path}: {err}") from err
    if not isinstance(value, dict):
        raise HsdError(f"{path} holds a JSON {_JSON_KINDS.get(type(value), 'value')}, not an object "
                       f"({{...}}): replace it with the {path.name} that transformers' save_pretrained writes")
    return value


def _check_config(hf: dict, fam, config_path: Path) -> None:
    """Sizes that are not positive integers, and heads that do not split the width, fail
    here with the key's name rather than as a crash inside JAX."""
    for key in fam.size_keys + fam.optional_size_keys:
        if key not in hf or (hf[key] is None and key in fam.optional_size_keys):
            continue  # a missing required key is reported by config_from_hf's KeyError
        value = hf[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HsdError(f"{key} in {config_path} is {value!r}, not a positive whole number: "
                           "write it as an integer, without quotes or a decimal point")
    heads, width = hf.get(fam.heads_key), hf.get(fam.width_key)
    if heads is not None and width is not None and width % heads:
        raise HsdError(f"{fam.heads_key} = {heads} does not divide {fam.width_key} = {width} in {config_path}: "
                       f"each attention head gets {fam.width_key} / {fam.heads_key} dims; "
                       "use the config.json these weights were saved with")


def _check_built_config(config: ModelConfig, config_path: Path) -> None:
    """What the family's names hide: the activation and LayerNorm epsilon JAX would use, and
    token ids the decode loop compares with (a bad one would never stop a row, or crash)."""
    if config.activation not in ACTIVATIONS:
        raise HsdError(f"the activation {config.activation!r} in {config_path} is not one hsd-jax implements "
                       f"({', '.join(ACTIVATIONS)}); use the config.json these weights were saved with")
    eps = config.layer_norm_eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise HsdError(f"the LayerNorm epsilon in {config_path} is {eps!r}, not a small positive number "
                       "(GPT-2 and Phi use 1e-05)")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < config.vocab_size:
            raise HsdError(f"{name} in {config_path} is {value!r}, not one token id below vocab_size "
                           f"{config.vocab_size}; set it to the tokenizer's id (or null)")


def _canonical_names(tensors, fam):
    """Accepts both "transformer.wte.weight" and "wte.weight" (GPT-2's hub checkpoints)."""
    prefix = fam.optional_prefix
    if not prefix:
        return tensors
    rename = {k: k if k.startswith(prefix) or k.startswith("lm_head") else prefix + k for k in tensors}
    if all(k == v for k, v in rename.items()):
        return tensors
    if isinstance(tensors, _LazyTensors):
        return tensors.renamed(rename)
    return {rename[k]: v for k, v in tensors.items()}


def _layers_in(tensors: dict[str, np.ndarray], fam) -> int:
    """How many layers the weights hold: one more than the highest layer index."""
    prefix = fam.layer_prefix.split("{}")[0]
    indices = [name[len(prefix):].split(".")[0] for name in tensors if name.startswith(prefix)]
    return max((int(i) + 1 for i in indices if i.isdigit()), default=0)


def _check_layer_count(tensors: dict[str, np.ndarray], config: ModelConfig, fam, config_path: Path) -> None:
    """The weights must hold exactly the config's layers: extra ones would be silently ignored."""
    found = _layers_in(_canonical_names(tensors, fam), fam)
    if found and found != config.num_layers:
        raise HsdError(f"the weights in {config_path.parent} hold {found} layers but {fam.layers_key} in "
                       f"{config_path} is {config.num_layers}: set {fam.layers_key} to {found} "
                       "(or use the config.json these weights were saved with)")


_ALIGN = 64  # bytes: XLA's CPU client uses a host array this aligned as its buffer, without a copy


def _aligned_empty(shape: tuple, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an `_ALIGN`-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _to_device(value: np.ndarray, dtype) -> jax.Array:
    """`value` as a JAX array of `dtype`, `value` given up by the caller. An aligned,
    contiguous array of that dtype becomes the array itself on CPU (`may_alias`): no copy.
    Anything else is first converted into such an array, so the peak is that tensor twice.
    (`jnp.asarray` would stage a copy of its own: three copies of the tensor at once.)"""
    dtype = np.dtype(dtype)
    if value.dtype != dtype or not value.flags.c_contiguous or value.ctypes.data % _ALIGN:
        converted = _aligned_empty(value.shape, dtype)
        converted[...] = value
        value = converted
    return jax.device_put(value, may_alias=True)


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def params_from_tensors(tensors, config: ModelConfig, dtype=jnp.float32, layout: str = "stacked"):
    """Maps checkpoint names to the parameter pytree, transposing and checking shapes.

    `layout` "stacked" gives (L, ...) layer arrays; "decode" gives the decode layout
    (`hsd_jax.models.decode_layout`) directly, one array per layer and tensor, so a
    model loaded for decoding never holds a stacked copy. Tensors are read one at a
    time from `tensors` (a mapping; `_LazyTensors` reads each on demand).
    """
    if layout not in ("stacked", "decode"):
        raise HsdError(f"layout {layout!r} is unknown; use stacked or decode")
    fam = family(config)
    tensors = _canonical_names(tensors, fam)
    names = list(fam.global_weights) + [fam.layer_prefix.format(i) + suffix
                                        for i in range(config.num_layers) for suffix in fam.layer_weights]
    missing = [n for n in names if n not in tensors]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise HsdError(f"checkpoint is missing weights: {shown}")
    shapes = fam.expected_shapes(config)

    def take(name: str, suffix: str, path: tuple, per_layer: bool) -> np.ndarray:
        """The tensor in the (in, out) convention of the stacked layout, shape-checked."""
        value = np.asarray(tensors[name])
        value = value.T if suffix in fam.transposed else value
        expected = tuple(shapes[path][1:] if per_layer else shapes[path])
        if tuple(value.shape) != expected:
            shown = ("layers", *path[1:]) if per_layer else path
            raise HsdError(f"weight {'/'.join(shown)} has shape {tuple(value.shape)} but the config "
                           f"implies {expected}: the weights do not belong to this config.json")
        return value

    def place(value: np.ndarray, kernel_t: bool):
        return _to_device(value.T if kernel_t else value, dtype)

    decode = layout == "decode"
    params: dict = {}
    for name, path in fam.global_weights.items():
        t = decode and path[-1] == "kernel"  # Phi's untied LM head
        _set(params, (*path[:-1], "kernel_t") if t else path, place(take(name, name, path, False), t))
    if decode:
        layers: list[dict] = [{} for _ in range(config.num_layers)]
        for i in range(config.num_layers):
            for suffix, path in fam.layer_weights.items():
                value = take(fam.layer_prefix.format(i) + suffix, suffix, ("layers", *path), True)
                t = path[-1] == "kernel"
                _set(layers[i], (*path[:-1], "kernel_t") if t else path, place(value, t))
        params["layers"] = tuple(layers)
        return params
    for suffix, path in fam.layer_weights.items():
        stacked = _aligned_empty(shapes[("layers", *path)], dtype)  # filled layer by layer: no list, no stack
        for i in range(config.num_layers):
            stacked[i] = take(fam.layer_prefix.format(i) + suffix, suffix, ("layers", *path), True)
        _set(params, ("layers", *path), _to_device(stacked, dtype))
        del stacked
    return params


def tensors_from_params(params, config: ModelConfig) -> dict[str, np.ndarray]:
    """The inverse map: checkpoint names -> numpy arrays, in the layout transformers expects."""
    fam = family(config)
    params = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.float32)), stacked_layout(params))

    def get(path):
        node = params
        for key in path:
            node = node[key]
        return node

    out = {}
    for name, path in fam.global_weights.items():
        value = get(path)
        out[name] = np.ascontiguousarray(value.T if name in fam.transposed else value)
    for suffix, path in fam.layer_weights.items():
        stacked = get(("layers", *path))
        for i in range(config.num_layers):
            value = stacked[i]
            out[fam.layer_prefix.format(i) + suffix] = np.ascontiguousarray(
                value.T if suffix in fam.transposed else value)
    return out


def read_pretrained(model: str | os.PathLike, *, dtype: str = "float32", tokenizer: bool = True,
                    layout: str = "stacked") -> Pretrained:
    """Reads a Hugging Face GPT-2 or Phi checkpoint (local folder or hub id): its config,
    its weights as the parameter pytree in `layout` (see `params_from_tensors`) and, with
    `tokenizer`, its tokenizer (None when the folder has none). `hsd_jax.load` makes the model."""
    if dtype not in _DTYPES:
        raise HsdError(f"dtype {dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
    folder = _resolve_folder(model)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise HsdError(f"{folder} has no config.json: it is not a Hugging Face model folder")
    hf = _read_json(config_path)
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise HsdError(f"model_type {model_type!r} in {config_path} is not supported; "
                       f"hsd-jax runs {' and '.join(sorted(FAMILIES))} checkpoints")
    fam = FAMILIES[model_type]
    _check_config(hf, fam, config_path)
    try:
        config = fam.config_from_hf(hf)
    except KeyError as err:
        raise HsdError(f"{config_path} lacks the key {err} that a {model_type} config needs") from err
    unsupported = fam.check_supported(hf)
    if unsupported:
        raise HsdError(f"{config_path} uses options hsd-jax does not implement: {', '.join(unsupported)}")
    _check_built_config(config, config_path)
    tok = _load_tokenizer(folder) if tokenizer else None  # before the weights: a bad file fails fast
    tensors = _read_tensors(folder)
    _check_layer_count(tensors, config, fam, config_path)
    params = params_from_tensors(tensors, config, _DTYPES[dtype], layout)
    del tensors
    return Pretrained(config=config, params=params, tokenizer=tok, hf_config=hf, source=str(model))


_BPE_FILES = ("vocab.json", "merges.txt")  # a GPT-2 BPE tokenizer without tokenizer.json needs both
_TOKENIZER_FIX = ("save the tokenizer again with tokenizer.save_pretrained(folder), or load the model "
                  "without it (hsd_jax.load(..., tokenizer=False))")


def _load_tokenizer(folder: Path):
    """The folder's tokenizer, None when it has no tokenizer files; a broken one is an HsdError."""
    files = {f for f in ("tokenizer.json", *_BPE_FILES, "tokenizer_config.json") if (folder / f).exists()}
    if not files:
        return None
    if "tokenizer.json" in files:
        _check_tokenizer_json(folder / "tokenizer.json")
    elif len(files & set(_BPE_FILES)) == 1:
        (present,), (absent,) = files & set(_BPE_FILES), set(_BPE_FILES) - files
        raise HsdError(f"{folder} has {present} but no {absent}: a GPT-2 BPE tokenizer needs both "
                       f"(or a tokenizer.json); copy {absent} from the model it came from, or {_TOKENIZER_FIX}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:  # noqa: BLE001 - tokenizer files fail in many ways
        first_line = (str(err).splitlines() or [""])[0]
        raise HsdError(f"cannot load the tokenizer in {folder} ({type(err).__name__}: {first_line}); "
                       f"{_TOKENIZER_FIX}") from err


def _check_tokenizer_json(path: Path) -> None:
    """transformers reports a corrupt tokenizer.json as a bare KeyError or TypeError."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HsdError(f"{path} is not valid JSON ({err}): the file is corrupt; {_TOKENIZER_FIX}") from err
    if not isinstance(value, dict) or not isinstance(value.get("model"), dict):
        raise HsdError(f"{path} is not a tokenizer (a tokenizer.json holds a \"model\" object); {_TOKENIZER_FIX}")


def save_pretrained(lm, folder: str | os.PathLike) -> Path:
    """Writes the model `lm` (its `config`, `params` in either layout, `hf_config` and
    `tokenizer`) as a Hugging Face folder (config.json, model.safetensors, tokenizer).

    Files are written to a temporary name and renamed, so a crash never leaves a
    half-written model.safetensors behind.
    """
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = tensors_from_params(lm.params, lm.config)  # either layout
    hf = dict(lm.hf_config)
    hf["torch_dtype"] = "float32"
    with atomic_path(folder / "model.safetensors") as tmp:
        mode = os.stat(tmp).st_mode  # what atomic_path gave it: 0666 less the umask, as any file written
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, mode)  # safetensors writes a new file in its place, mode 0600
    write_json(folder / "config.json", hf)
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(str(folder))
    return folder

