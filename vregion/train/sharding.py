"""FSDP for models that do not fit one device: parameters sharded across the workers.

`finetune.parallel: fsdp` shards with PyTorch's `fully_shard` (FSDP2): each LLM decoder layer
is its own unit (gathered just before it runs, freed after), the rest of the model one root
unit. Frozen and trainable parameters may share a unit, so selective tuning needs no special
wrapping. Ray Train's `prepare_model(parallel_strategy="fsdp")` is not used: it refuses to run
without CUDA, and FSDP2 runs the same code on CPU workers (gloo) and GPUs (NCCL).

Checkpoints stay unsharded, so a run can resume on another number of workers and the export
needs no process group: the trainable weights and the optimizer state are gathered to full
tensors on every checkpoint (collectives: every rank must call these functions, in step).
"""

from __future__ import annotations

import torch
from torch import nn


def shard_model(model: nn.Module) -> nn.Module:
    """Shard `model` in place across the default process group; returns it."""
    from torch.distributed.fsdp import fully_shard

    from vregion.models.layer_map import layer_map

    for layer in layer_map(model).layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def resident_params(model: nn.Module) -> int:
    """Parameters this process holds: all of them unsharded, about 1/world with FSDP."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights as full CPU tensors, names as in the unsharded model."""
    return {n: _full(p) for n, p in model.named_parameters() if p.requires_grad}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state with full tensors, keyed by parameter name (not position)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=False)
    )


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """Load `full_optimizer_state` output into the optimizer of the sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
    )
