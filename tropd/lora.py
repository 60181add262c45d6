"""LoRA through PEFT: adapters on the student, and the student's base as a teacher.

With ``model.lora.r > 0`` the student is ``W + (alpha / r) · B A`` on every target module, where only ``A`` and
``B`` train (PEFT's ``LoraConfig``); the optimizer sees only them, checkpoints save only them
(``adapter_model.safetensors`` + ``adapter_config.json``), and :func:`tropd.train.merge.merge_checkpoint` folds
them into the base weights as a plain ``from_pretrained``-loadable model (``tropd merge-lora``).

Self-distillation (the student is the teacher plus adapters): :class:`AdaptersDisabled` runs the same module
with its adapters switched off, so the teacher costs no second copy of the weights.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

from torch import nn

# PEFT (0.21) still calls a transformers (5.x) method that warns; nothing a tropd user can act on.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def add_adapters(model: nn.Module, settings) -> nn.Module:
    """``model`` wrapped by PEFT with fresh LoRA adapters (``settings``: ``model.lora`` of the run config); its
    base weights are frozen, the adapters train."""
    from peft import LoraConfig, get_peft_model

    targets = settings.target_modules
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets[0] if targets == ["all-linear"] else list(targets),
                        task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # e.g. a target module name the model does not have
        raise ValueError(f"model.lora.target_modules={list(targets)}: {err}") from None


def load_adapters(model: nn.Module, folder: str | Path) -> nn.Module:
    """``model`` (the base) with the trainable adapters saved in ``folder`` (a LoRA checkpoint)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(folder), is_trainable=True)


def is_adapter_folder(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def check_adapter_folder(folder: str | Path) -> None:
    """Check, without loading weights, that ``folder`` holds readable LoRA adapters (one-line ValueError naming
    the file otherwise)."""
    from tropd.models import _check_safetensors, _read_json

    folder = Path(folder)
    path = folder / ADAPTER_CONFIG
    if _read_json(path).get("peft_type") != "LORA":
        raise ValueError(f"{path} is not a LoRA adapter config (no \"peft_type\": \"LORA\")")
    _check_safetensors(folder / ADAPTER_WEIGHTS)


class _WithoutAdapters:
    """Call ``fn`` with the adapters of ``peft_model`` switched off."""

    def __init__(self, peft_model: nn.Module, fn) -> None:
        self.peft_model, self.fn = peft_model, fn

    def __call__(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.fn(*args, **kwargs)


class AdaptersDisabled(nn.Module):
    """A PEFT model seen with its adapters switched off: the frozen base, sharing its weights (the teacher of
    LoRA self-distillation). Every entry point the pipeline uses (the forward, the inner transformer under
    ``base_model_prefix``, the LM head) runs under ``disable_adapter()``; nothing here trains."""

    def __init__(self, peft_model: nn.Module) -> None:
        super().__init__()
        base = peft_model.get_base_model()
        # plain attributes, not submodules: the parameters stay the student's alone
        object.__setattr__(self, "peft_model", peft_model)
        object.__setattr__(self, base.base_model_prefix,
                           _WithoutAdapters(peft_model, getattr(base, base.base_model_prefix)))
        self.config, self.base_model_prefix = base.config, base.base_model_prefix
        forward = _WithoutAdapters(peft_model, peft_model)
        forward.__signature__ = inspect.signature(base.forward)  # the name of its cache keyword
        self.forward = forward

    def get_output_embeddings(self):
        return _WithoutAdapters(self.peft_model, self.peft_model.get_base_model().get_output_embeddings())

    def parameters(self, recurse: bool = True):  # device/dtype queries see the shared base weights
        return self.peft_model.get_base_model().parameters(recurse)

    def train(self, mode: bool = True) -> AdaptersDisabled:  # the student's mode is the trainer's business
        return self

    def requires_grad_(self, requires_grad: bool = True) -> AdaptersDisabled:
        return self
