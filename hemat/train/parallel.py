"""Data parallelism from outside the model (the model file knows nothing of it): process-group setup
under torchrun, DDP or FSDP2 wrapping, gradient-sync control for accumulation, and full (unsharded)
state dicts for checkpoints, gathered to rank 0."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)

from hemat.errors import HematError
from hemat.model.hf import meta_model
from hemat.model.transformer import CausalLM

STRATEGIES = ("ddp", "fsdp")


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistEnv:
    """Read torchrun's environment and start the process group (NCCL on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise HematError("train.device is cuda but no CUDA device is available")
        torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=torch_device if backend == "nccl" else None)
    return DistEnv(rank, world_size, local_rank, local_world_size, torch_device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def default_threads(local_world_size: int) -> int:
    """The cores this process may run on, shared among the ranks on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world_size))


def launch(nproc: int, argv: list[str]) -> None:
    """Re-run this command under torchrun with nproc processes (replaces the current process, so
    signals reach torchrun, which forwards them to the workers)."""
    if nproc < 1:
        raise HematError(f"--nproc must be at least 1, got {nproc}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "hemat", *argv]
    os.execv(sys.executable, cmd)


def wrap(module: nn.Module, model: CausalLM, strategy: str, env: DistEnv, find_unused: bool = False) -> nn.Module:
    """`module` holds `model` and computes the loss in its forward. Under several processes it is
    wrapped in DDP, or sharded with FSDP2 (each decoder layer its own unit, then the root)."""
    if not env.distributed:
        return module
    if strategy not in STRATEGIES:
        raise HematError(f"train.parallel: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # broadcast_buffers off: each rank keeps its own tokens_per_expert counts, and the router biases
        # stay equal on every rank because the trainer updates them from all-reduced counts
        return DistributedDataParallel(module, device_ids=[env.device] if env.device.type == "cuda" else None,
                                       broadcast_buffers=False, find_unused_parameters=find_unused)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        if hasattr(layer, "shared_head"):  # an MTP layer's output norm runs outside the layer's forward
            fully_shard(layer.shared_head.norm)
        fully_shard(layer)
    fully_shard(module)
    return module


def grad_sync(wrapped: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-step of an accumulation."""
    if hasattr(wrapped, "no_sync") and not enabled:
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def _full(**kw) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, **kw)


def full_model(wrapped: nn.Module, model: CausalLM, prefix: str = "model.") -> CausalLM | None:
    """The whole model on rank 0, for saving (None on other ranks). Under FSDP every rank takes part
    in gathering the shards into a CPU copy; otherwise it is the model itself."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(wrapped, FSDPModule):
        return model if not dist.is_initialized() or dist.get_rank() == 0 else None
    state = get_model_state_dict(wrapped, options=_full(cpu_offload=True))
    if not state:
        return None
    copy = meta_model(model.config)
    copy.load_state_dict({k.removeprefix(prefix): v for k, v in state.items()}, assign=True)
    return copy


def full_optimizer_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """{"state": {param name: {key: value}}, "param_groups": [...]} on CPU (rank 0; others get {})."""
    return get_optimizer_state_dict(wrapped, optimizer, options=_full(cpu_offload=True))


def load_model_state(wrapped: nn.Module, state: dict[str, torch.Tensor], prefix: str = "model.") -> None:
    """Load a full state dict (every rank passes the whole of it) into a plain, DDP or FSDP model."""
    try:
        set_model_state_dict(wrapped, {prefix + k: v for k, v in state.items()}, options=_full())
    except (RuntimeError, KeyError, ValueError) as e:
        raise HematError(f"checkpoint weights do not fit this model: {e}") from None


def load_optimizer_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    try:
        set_optimizer_state_dict(wrapped, optimizer, state, options=_full())
    except (RuntimeError, KeyError, ValueError) as e:
        raise HematError(f"checkpoint optimizer state does not fit this model and optimizer: {e}") from None
