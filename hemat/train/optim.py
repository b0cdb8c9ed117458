"""Optimizers: AdamW (torch's fused kernel), or Muon for the hidden weight matrices with AdamW for
everything else (embedding, output head, norms, biases, router).

Muon (Keller Jordan, 2024) keeps a momentum of the gradient and replaces each update matrix by its
nearest semi-orthogonal matrix, computed with a few Newton–Schulz iterations, so every direction of
the update moves at a similar rate. Stacked expert weights [E, out, in] are treated as E matrices."""

from __future__ import annotations

import torch
from torch import nn

from hemat.train.config import TrainConfig

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed support
    DTensor = None


def is_muon_param(name: str, param: torch.Tensor) -> bool:
    """Hidden matrices of the decoder layers (and the MTP layers' projection); not the router, and not LoRA's
    factors (an expert adapter's A stacks every expert's rows: orthogonalising it would mix the experts)."""
    return (param.ndim >= 2 and ".layers." in f".{name}" and not name.endswith("mlp.gate.weight")
            and ".lora_" not in name)


def build_optimizer(named_params: list[tuple[str, nn.Parameter]], config: TrainConfig) -> torch.optim.Optimizer:
    """Parameter groups by role; each group's "base_lr" is its peak LR, which the schedule scales."""
    params = [(n, p) for n, p in named_params if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2]  # norms and biases are not decayed
    no_decay = [p for n, p in params if p.ndim < 2]
    if config.optimizer == "muon":
        muon = [p for n, p in params if is_muon_param(n, p)]
        muon_ids = {id(p) for p in muon}
        decay = [p for p in decay if id(p) not in muon_ids]
        groups = [
            {"params": muon, "use_muon": True, "lr": config.muon_lr, "base_lr": config.muon_lr,
             "weight_decay": config.weight_decay},
            {"params": decay, "use_muon": False, "lr": config.lr, "base_lr": config.lr,
             "weight_decay": config.weight_decay},
            {"params": no_decay, "use_muon": False, "lr": config.lr, "base_lr": config.lr, "weight_decay": 0.0},
        ]
        return Muon([g for g in groups if g["params"]], momentum=config.muon_momentum,
                    betas=(config.beta1, config.beta2), eps=config.eps)
    groups = [
        {"params": decay, "lr": config.lr, "base_lr": config.lr, "weight_decay": config.weight_decay},
        {"params": no_decay, "lr": config.lr, "base_lr": config.lr, "weight_decay": 0.0},
    ]
    # fused: one kernel for all parameters, on GPU and CPU alike (on CPU ~7× faster than foreach)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=(config.beta1, config.beta2),
                             eps=config.eps, fused=True)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Scale every group's peak LR by `factor`; returns the first group's LR (for logging)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """≈ U Vᵀ for g = U S Vᵀ (over the last two dims): the quintic iteration tuned for speed over
    accuracy, so singular values land in about [0.7, 1.2] rather than exactly 1."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16() if g.is_cuda else g.float()
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if transposed else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Groups with use_muon=True get Muon (Nesterov momentum, orthogonalised, scaled by
    sqrt(max(1, rows/cols))); the others get AdamW. Weight decay is decoupled in both."""

    def __init__(self, param_groups, lr: float = 0.02, momentum: float = 0.95, ns_steps: int = 5,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
        defaults = dict(lr=lr, momentum=momentum, ns_steps=ns_steps, betas=betas, eps=eps,
                        weight_decay=weight_decay, use_muon=False)
        super().__init__(param_groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.mul_(1 - group["lr"] * group["weight_decay"])
                if group["use_muon"]:
                    self._muon_update(p, group)
                else:
                    self._adamw_update(p, group)

    def _muon_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - group["momentum"])
        g = p.grad.lerp(buf, group["momentum"])  # Nesterov
        if DTensor is not None and isinstance(g, DTensor):  # FSDP shard: orthogonalise the whole matrix
            update = newton_schulz(g.full_tensor(), group["ns_steps"])
            update = distribute_tensor(update, g.device_mesh, g.placements, src_data_rank=None)
        else:
            update = newton_schulz(g, group["ns_steps"])
        scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
        p.add_(update, alpha=-group["lr"] * scale)

    def _adamw_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = state["step"].item()
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**t))
