"""Reading model weights without trusting the file, and writing MistNet checkpoints.

Official YOLOv5 ``.pt`` files are ``torch.save`` zip archives whose pickle holds upstream *module
objects*: ``torch.load(weights_only=False)`` would run whatever code a crafted file names, and
``weights_only=True`` refuses them. :class:`SafeUnpickler` admits only an allowlist of globals:
upstream and ``torch.nn`` module classes become inert stand-ins that merely store their state, and
tensors are rebuilt by our own functions from the archive's raw storages. Anything else is refused
before it is called. Plain state_dict archives and ``.safetensors`` files go through the same checks,
and every result is validated against the architecture it claims to be.

:func:`save_checkpoint` writes safetensors with the metadata as JSON, so a checkpoint this project
wrote is read back without any pickle at all.
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import struct
import tempfile
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from common.errors import CheckpointError, MistnetError

METADATA_KEY = "mistnet"
MAX_PICKLE_DEPTH = 64
_STANDIN_MODULES = ("models.yolo", "models.common")
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}
_NUMPY_SCALAR_KINDS = "biuf"


@dataclass(frozen=True)
class LoadedWeights:
    """A validated float32 state_dict and what it is: ``build(arch, num_classes)`` accepts it."""

    state_dict: dict[str, torch.Tensor]
    arch: str
    num_classes: int
    metadata: dict[str, Any] = field(default_factory=dict)
    decoder_state: dict[str, torch.Tensor] = field(default_factory=dict)  # a MistNet cut decoder's


# -- inert stand-ins for pickled objects ----------------------------------------------------------


class StandIn:
    """Takes the place of an upstream or torch.nn class: keeps the pickled state, runs nothing."""

    origin = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_args"] = args

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.origin}: unexpected pickled state of type {type(state).__name__}")
        self.__dict__["state"] = state

    @property
    def state(self) -> dict[str, Any]:
        return self.__dict__.get("state", {})


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True)
class _Storage:
    flat: torch.Tensor


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(isinstance(v, int) and v >= 0 for v in value):
        raise CheckpointError(f"tensor {what} {value!r} is not a tuple of non-negative ints")
    return tuple(value)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any) -> torch.Tensor:
    """Our stand-in for ``torch._utils._rebuild_tensor_v2``: a bounds-checked strided view."""
    if not isinstance(storage, _Storage) or not isinstance(offset, int) or offset < 0:
        raise CheckpointError("malformed tensor record (storage or offset)")
    shape, strides = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise CheckpointError(f"tensor size {shape} and stride {strides} disagree")
    try:
        return torch.as_strided(storage.flat, shape, strides, offset)
    except RuntimeError as exc:
        raise CheckpointError(f"tensor record out of bounds of its storage: {exc}") from None


def _rebuild_parameter(data: Any, *_rest: Any) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise CheckpointError("malformed parameter record")
    return data


def _numpy_dtype(spec: Any, *_rest: Any) -> np.dtype[Any]:
    dtype = np.dtype(spec) if isinstance(spec, str) and len(spec) <= 4 else None
    if dtype is None or dtype.kind not in _NUMPY_SCALAR_KINDS:
        raise CheckpointError(f"numpy dtype {spec!r} is not an allowed numeric type")
    return dtype


def _numpy_scalar(dtype: Any, data: Any = b"") -> Any:
    """Training checkpoints keep e.g. ``best_fitness`` as a numpy scalar: numbers only."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMPY_SCALAR_KINDS:
        raise CheckpointError("numpy scalar of a non-numeric dtype")
    if isinstance(data, str):
        data = data.encode("latin1")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise CheckpointError("malformed numpy scalar")
    return np.frombuffer(data, dtype)[0].item()


def _latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
    """Pickle protocol 2 spells bytes as ``_codecs.encode(str, "latin1")``: allow exactly that."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError("malformed bytes record")
    return text.encode("latin1")


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch", "Size"): tuple,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("_codecs", "encode"): _latin1_bytes,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles a torch zip archive's ``data.pkl`` admitting only allowlisted globals."""

    def __init__(self, data: bytes, load_storage: Callable[[str, torch.dtype, int], torch.Tensor]) -> None:
        super().__init__(io.BytesIO(data))
        self._load_storage = load_storage
        self._storages: dict[str, _Storage] = {}
        self._standins: dict[str, type[StandIn]] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Fresh objects per file: a pickle can set attributes on what find_class returns (BUILD), and
        # that must not leak into the next file this process reads.
        if (module, name) in _SAFE_GLOBALS:
            target = _SAFE_GLOBALS[(module, name)]
            return target if isinstance(target, type) else functools.partial(target)
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if name.isidentifier() and (module in _STANDIN_MODULES or module.startswith("torch.nn.modules.")):
            origin = f"{module}.{name}"
            if origin not in self._standins:
                self._standins[origin] = type(name, (StandIn,), {"origin": origin})
            return self._standins[origin]
        raise CheckpointError(
            f"refused: the file references {module}.{name}, which is not on the allowlist "
            "(a checkpoint only needs model classes and tensors)"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise CheckpointError(f"unexpected persistent id {str(pid)[:80]}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise CheckpointError("malformed storage record")
        if key not in self._storages:
            self._storages[key] = _Storage(self._load_storage(key, stype.dtype, numel))
        return self._storages[key]


# -- reading ---------------------------------------------------------------------------------------


def _read_torch_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as zf:
        pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: a zip archive but not a torch checkpoint (no single */data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "byteorder" in zf.namelist() and zf.read(prefix + "byteorder").strip() != b"little":
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")

        def load_storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
            name = f"{prefix}data/{key}"
            expected = numel * torch.empty(0, dtype=dtype).element_size()
            size = zf.getinfo(name).file_size  # checked before reading: no decompression bombs
            if size != expected:
                raise CheckpointError(f"storage {key}: {size} bytes, expected {expected}")
            raw = zf.read(name)
            return torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)

        return SafeUnpickler(zf.read(pickles[0]), load_storage).load()


def _module_tensors(node: StandIn, prefix: str, out: dict[str, torch.Tensor], depth: int = 0) -> None:
    """Collect a stand-in module tree's parameters and persistent buffers under state_dict names."""
    if depth > MAX_PICKLE_DEPTH:
        raise CheckpointError("module tree nested too deep")
    state = node.state
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is None or name in skip:
                continue
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, StandIn):
            raise CheckpointError(f"{prefix}{name} is a {type(child).__name__}, not a module")
        _module_tensors(child, f"{prefix}{name}.", out, depth + 1)


def _json_safe(value: Any, depth: int = 0) -> Any:
    """Plain data only: metadata must survive json.dumps and carry nothing live."""
    if depth > 8:
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_json_safe(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v, depth + 1) for k, v in value.items()}
    return None


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _upstream_metadata(ckpt: dict[str, Any], module: StandIn) -> dict[str, Any]:
    meta: dict[str, Any] = {"format": "yolov5", "class": module.origin}
    for key in ("epoch", "date"):
        if isinstance(ckpt.get(key), int | str):
            meta[key] = ckpt[key]
    names = module.state.get("names")
    if isinstance(names, list | dict):
        meta["names"] = _json_safe(list(names.values()) if isinstance(names, dict) else names)
    return meta


def _extract(obj: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata from whatever the pickle held: a module, a checkpoint dict or a state_dict."""
    if _is_state_dict(obj):
        return dict(obj), {"format": "state_dict"}
    if isinstance(obj, StandIn):
        out: dict[str, torch.Tensor] = {}
        _module_tensors(obj, "", out)
        return out, {"format": "module", "class": obj.origin}
    if isinstance(obj, dict):
        module = next((obj[k] for k in ("ema", "model") if isinstance(obj.get(k), StandIn)), None)
        if module is not None:
            out = {}
            _module_tensors(module, "", out)
            return out, _upstream_metadata(obj, module)
        for key in ("state_dict", "model"):
            if _is_state_dict(obj.get(key)):
                return dict(obj[key]), {"format": "state_dict"}
    raise CheckpointError(f"no model weights found (top-level object is a {type(obj).__name__})")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    with safe_open(str(path), framework="pt") as f:
        raw_meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a Mapping
    meta: dict[str, Any] = {k: v for k, v in raw_meta.items() if k != METADATA_KEY}
    if METADATA_KEY in raw_meta:
        try:
            stored = json.loads(raw_meta[METADATA_KEY])
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: metadata is not valid JSON: {exc}") from None
        if not isinstance(stored, dict):
            raise CheckpointError(f"{path}: metadata is not a JSON object")
        meta.update(stored)
    meta.setdefault("format", "safetensors")
    return tensors, meta


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < n <= size - 8


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Raw tensors and metadata of a checkpoint file, by content (not by suffix); nothing validated yet."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist")
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(16)
        if head.startswith(b"PK\x03\x04"):
            return _extract(_read_torch_zip(path))
        if _looks_like_safetensors(head, size):
            return _read_safetensors(path)
        if head[:1] == b"\x80":
            raise CheckpointError(
                f"{path}: a bare pickle (legacy torch format); only zip archives and "
                "safetensors are read safely — re-save it with a current torch"
            )
        raise CheckpointError(f"{path}: not a torch zip archive or a safetensors file")
    except MistnetError:
        raise
    except (zipfile.BadZipFile, zlib.error, SafetensorError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # any other failure while decoding untrusted bytes means a bad file
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None


# -- validation ------------------------------------------------------------------------------------


def infer_arch(state: Mapping[str, torch.Tensor]) -> tuple[str, int]:
    """(arch, num_classes) from tensor names and shapes alone."""
    from common.models import yolo

    if "model.0.conv.weight" in state and "model.24.m.0.weight" in state:
        repeats = len({k.split(".")[3] for k in state if k.startswith("model.2.m.")})
        arch = yolo.yolo_size_from_shapes(int(state["model.0.conv.weight"].shape[0]), repeats)
        outputs = int(state["model.24.m.0.weight"].shape[0])
        if arch is None or outputs % 3 or outputs // 3 <= 5:
            raise CheckpointError(
                f"YOLOv5 weights of an unknown size (layer 0 width "
                f"{state['model.0.conv.weight'].shape[0]}, {repeats} bottlenecks in layer 2)"
            )
        return arch, outputs // 3 - 5
    if "model.0.0.weight" in state and "model.7.weight" in state:
        return "lenet5", int(state["model.7.weight"].shape[0])
    raise CheckpointError(
        f"cannot tell the architecture: the tensors match no known model (first keys: {', '.join(list(state)[:3])})"
    )


def expected_state(arch: str, num_classes: int) -> dict[str, torch.Tensor]:
    """The state_dict layout of ``arch`` without allocating it (built on the meta device)."""
    from common.models.registry import build

    with torch.device("meta"):
        return build(arch, num_classes).state_dict()


def check_state_dict(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse missing, unexpected or misshapen tensors, naming the first few."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {list(state[k].shape)} (expected {list(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({', '.join(missing[:3])})")
    if extra:
        problems.append(f"{len(extra)} unexpected ({', '.join(extra[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} wrongly shaped ({'; '.join(wrong[:3])})")
    if problems:
        raise CheckpointError(f"weights do not fit {what}: " + ", ".join(problems))


def _to_float32(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        k: (v.to(torch.float32) if v.is_floating_point() else v).detach().clone().contiguous() for k, v in state.items()
    }


def load_weights(path: str | Path, arch: str | None = None, num_classes: int | None = None) -> LoadedWeights:
    """Read any supported weight file safely and validate it against its (inferred) architecture.

    ``arch``/``num_classes``, when given, are what the caller expects: a file holding anything else
    is refused rather than silently half-loaded.
    """
    from common.models.cutdecoder import split_state

    tensors, meta = read_tensors(path)
    tensors, decoder_state = split_state(tensors)
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    inferred_arch, inferred_nc = infer_arch(tensors)
    claimed_arch = meta.get("arch") or inferred_arch
    claimed_nc = meta.get("num_classes") or inferred_nc
    if (claimed_arch, claimed_nc) != (inferred_arch, inferred_nc):
        raise CheckpointError(
            f"{path}: metadata says {claimed_arch} with {claimed_nc} classes, "
            f"but the tensors are {inferred_arch} with {inferred_nc}"
        )
    if arch is not None and arch != inferred_arch:
        raise CheckpointError(f"{path}: holds {inferred_arch} weights, expected {arch}")
    if num_classes and num_classes != inferred_nc:
        raise CheckpointError(f"{path}: has {inferred_nc} classes, expected {num_classes}")
    expected = expected_state(inferred_arch, inferred_nc)
    for k in expected:
        if k.endswith("num_batches_tracked") and k not in tensors:  # some exporters drop these counters
            tensors[k] = torch.tensor(0, dtype=torch.long)
    check_state_dict(expected, tensors, f"{inferred_arch} with {inferred_nc} classes")
    meta = {**meta, "arch": inferred_arch, "num_classes": inferred_nc}
    _check_decoder(path, decoder_state, meta)
    return LoadedWeights(_to_float32(tensors), inferred_arch, inferred_nc, meta, _to_float32(decoder_state))


def _check_decoder(path: str | Path, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Cut-decoder tensors must come with the metadata that rebuilds the decoder, and fit it."""
    from common.models.cutdecoder import CutDecoder

    if not state and "decoder" not in meta:
        return
    try:
        expected = CutDecoder.from_config(meta["decoder"]).state_dict()
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: cut-decoder tensors without valid decoder metadata ({exc})") from None
    check_state_dict(expected, state, "the checkpoint's cut decoder")


def build_decoder(weights: LoadedWeights) -> Any:
    """The checkpoint's cut decoder with its weights, or None when it has none."""
    from common.models.cutdecoder import CutDecoder

    if "decoder" not in weights.metadata:
        return None
    decoder = CutDecoder.from_config(weights.metadata["decoder"])
    decoder.load_state_dict(weights.decoder_state, strict=True)
    return decoder


def load_model(
    path: str | Path,
    arch: str | None = None,
    num_classes: int | None = None,
) -> tuple[nn.Module, LoadedWeights]:
    """A model of the file's architecture with its weights loaded, plus what was read."""
    from common.models.cutdecoder import attach
    from common.models.registry import build

    weights = load_weights(path, arch, num_classes)
    model = build(weights.arch, weights.num_classes)
    model.load_state_dict(weights.state_dict, strict=True)
    decoder = build_decoder(weights)
    if decoder is not None:
        attach(model, decoder)
    return model, weights


# -- writing ---------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor | np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"metadata value of type {type(value).__name__} is not JSON-serializable")


def save_checkpoint(path: str | Path, model_state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    """Write tensors + JSON metadata as safetensors, atomically (a crash never leaves half a file)."""
    path = Path(path)
    try:
        meta_json = json.dumps(dict(metadata), default=_json_default, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint metadata cannot be stored: {exc}") from None
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model_state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={METADATA_KEY: meta_json})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
