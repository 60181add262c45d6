"""FSDP2 for the student (``model.fsdp``): weights, gradients and AdamW state sharded over the processes of an
``accelerate launch``, with torch's own ``fully_shard`` (the call accelerate's FSDP2 plugin makes).

Units: every decoder layer (the model's ``_no_split_modules`` classes) is one FSDP unit, gathered for its forward
and backward and resharded after; the root unit (embeddings, final norm, LM head) stays gathered from its forward
to its backward, so the fused loss reads the LM head's full weight. Gradients are reduce-scattered (averaged over
processes, like DDP) at the end of every backward; AdamW steps on each process's shard.

Sampling decodes a different number of tokens on each process, and a sharded forward is a collective every
process must join. :func:`full_weights` therefore gathers every unit once before sampling (each process then holds
the full weights, 4 bytes per parameter, and decodes alone) and reshards after.

Checkpoints have the single-process layout (:func:`gathered_state` gathers the weights and the optimizer state on
the main process; :func:`shard_optimizer_state` splits a loaded one), so a run resumes on any number of
processes, sharded or not.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn


def _fsdp():
    from torch.distributed.fsdp import FSDPModule, fully_shard

    return FSDPModule, fully_shard


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was sharded by :func:`shard_student`."""
    return isinstance(model, _fsdp()[0])


def shard_student(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``model`` in place over every process of the default process group (on ``device``'s kind) and
    return it. Raises ValueError for a model whose decoder-layer class is unknown (no ``_no_split_modules``)."""
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard = _fsdp()[1]
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"model.fsdp: {type(model).__name__} names no decoder-layer class (_no_split_modules) to "
                         "shard by; set model.fsdp=false")
    # torch warns that a sharded module returned a view (an in-place write into it would skip a hook): tropd only
    # slices the model's outputs, never writes into them
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor", category=UserWarning)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for layer in reversed(layers):  # innermost first, should the listed classes nest
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return model


def _units(model: nn.Module) -> list[nn.Module]:
    FSDPModule = _fsdp()[0]
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def full_weights(model: nn.Module) -> Iterator[None]:
    """Within: every process holds ``model``'s full weights and runs forwards without collectives (ragged decoding,
    an evaluation on one process). Every process must enter together. No-op for a model that is not sharded."""
    if not is_sharded(model):
        yield
        return
    units = _units(model)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model, recurse=False)


def _gather(value, keep: bool):
    """A DTensor gathered whole (a collective: every process calls, in the same order), as a CPU tensor where
    ``keep`` and None elsewhere; other values as they are."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        value = value.full_tensor()
    if not keep:
        return None
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


def gathered_state(model: nn.Module, optimizer: torch.optim.Optimizer, main: bool) -> tuple[dict, dict]:
    """``(model state dict, optimizer state dict)`` with full CPU tensors in the single-process layout on the main
    process (empty dicts elsewhere; one parameter at a time is whole on the device). A collective: every process
    calls it."""
    for unit in _units(model):  # the root stays gathered after a forward without backward
        unit.reshard()
    first = {}  # tied weights (one parameter under two names) are gathered once and saved as one tensor
    named = model.named_parameters(remove_duplicate=False)
    alias = {name: first.setdefault(id(param), name) for name, param in named}
    weights = {}
    for name, value in model.state_dict().items():
        owner = alias.get(name, name)
        weights[name] = weights[owner] if owner in weights else _gather(value, main)
    state = optimizer.state_dict()
    moments = {index: {k: _gather(v, main) for k, v in entry.items()} for index, entry in state["state"].items()}
    return (weights, {**state, "state": moments}) if main else ({}, {})


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A single-process optimizer state dict (full tensors) cut to this process's shards of ``optimizer``'s
    parameters, ready for ``optimizer.load_state_dict``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = {}
    for index, entry in state["state"].items():
        param = params[int(index)]
        out[index] = {k: distribute_tensor(v.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
                      if isinstance(param, DTensor) and isinstance(v, torch.Tensor) and v.shape == param.shape else v
                      for k, v in entry.items()}
    return {**state, "state": out}
