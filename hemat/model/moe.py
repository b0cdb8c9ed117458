"""DeepSeekMoE (DeepSeek-V3 §2.1.2, DeepSeek-V2 §2.2): shared experts that every token uses, plus
fine-grained routed experts chosen by a router: V3's sigmoid scores with auxiliary-loss-free load
balancing (a correction bias) and group-limited routing, or V2's softmax scores, greedy over all experts
or over the best groups."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hemat.model.config import ModelConfig
from hemat.model.dense import MLP


def expert_counts(ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert [E] (int64). Not torch.bincount: on CUDA it reads the largest id on
    the host, a synchronisation per MoE layer that also keeps a decode step out of a CUDA graph."""
    flat = ids.flatten()
    return torch.zeros(n_experts, dtype=torch.long, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))


class Router(nn.Module):
    """s = sigmoid(x · Wᵀ) (scoring_func sigmoid, V3) or softmax(x · Wᵀ) (V2), in fp32. topk_method
    noaux_tc (V3): a correction bias b (updated by the trainer, not by gradients) only decides which
    experts are chosen, the gating weights are the unbiased scores, and a group scores the sum of its two
    best biased scores. greedy (V2): the top k of all experts, no bias. group_limited_greedy (V2): a group
    scores its best expert's score."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.norm_topk_prob, self.scaling = config.norm_topk_prob, config.routed_scaling_factor
        self.softmax = config.scoring_func == "softmax"
        self.topk_method = config.topk_method
        self.grouped = self.topk_method != "greedy" and self.topk_group < self.n_group
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        bias = torch.zeros(self.n_experts, dtype=torch.float32) if self.topk_method == "noaux_tc" else None
        self.register_buffer("e_score_correction_bias", bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] → (weights [N, k], expert ids [N, k], scores [N, E])."""
        weight = self.weight
        if not x.dtype == weight.dtype == torch.float32:
            x, weight = x.float(), weight.float()
        if torch.is_autocast_enabled(x.device.type):  # fp32 means fp32 under autocast too
            with torch.autocast(x.device.type, enabled=False):
                logits = F.linear(x, weight)
        else:
            logits = F.linear(x, weight)
        scores = logits.softmax(dim=-1) if self.softmax else logits.sigmoid()
        bias = self.e_score_correction_bias
        biased = scores if bias is None else scores + bias
        if self.grouped:
            # keep the topk_group best groups. Dropped groups are masked with -inf as DeepSeek's reference
            # code does: masking with 0.0 (older transformers) can still pick a dropped expert when the kept
            # biased scores are negative.
            grouped = biased.view(-1, self.n_group, self.n_experts // self.n_group)
            if self.topk_method == "group_limited_greedy":
                group_scores = grouped.amax(dim=-1)
            else:
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            kept = group_scores.topk(self.topk_group, dim=-1).indices
            dropped = torch.full_like(group_scores, float("-inf")).scatter_(1, kept, 0.0)
            biased = (grouped + dropped[..., None]).flatten(1)
        ids = biased.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return (weights * self.scaling if self.scaling != 1.0 else weights), ids, scores


class GroupedLinear(torch.autograd.Function):
    """y = x · W[e]ᵀ for each expert e's block of rows (tokens sorted by expert, `offsets` the end row of
    each block), for CPU: torch._grouped_mm has CPU kernels for every product needed, but its own
    backward fails there. The gradients are two more grouped matmuls, so the stacked weights' gradient
    is written once, not zero-filled and accumulated expert by expert."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight, offsets)
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, offsets = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = torch._grouped_mm(grad, weight, offs=offsets) if ctx.needs_input_grad[0] else None
        grad_weight = torch._grouped_mm(grad.t(), x, offs=offsets) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, None


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored stacked (gate and up fused), computed batched over the tokens routed
    to each expert: tokens are sorted by expert, and two grouped matmuls run every expert's block."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        e, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.n_experts, self.hidden_size, self.intermediate_size = e, h, i
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                counts: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, H], routing weights and expert ids [N, k], counts [E] (tokens per expert, or None) → [N, H]."""
        if counts is None:
            counts = expert_counts(ids, self.n_experts)
        top_k = ids.shape[1]
        order = ids.flatten().argsort(stable=True)
        token_of = order // top_k
        expert_out = self.sorted_forward(x[token_of], counts)
        expert_out = expert_out * weights.flatten()[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, expert_out)

    def sorted_forward(self, routed: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The experts over their tokens sorted by expert, by the fastest path of the device."""
        if routed.is_cuda:
            return self.grouped(routed, counts)
        if torch.is_autocast_enabled("cpu"):  # F.linear follows autocast; the grouped matmuls would not
            return self.looped(routed, counts)
        return self.grouped_cpu(routed, counts)

    def looped(self, routed: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """One matmul per expert over its contiguous block of tokens (the reference for the other paths)."""
        outputs = []
        for expert, chunk in enumerate(routed.split(counts.tolist())):
            if chunk.shape[0]:
                gate, up = self.project(chunk, "gate_up_proj", expert).chunk(2, dim=-1)
                outputs.append(self.project(F.silu(gate) * up, "down_proj", expert))
        return torch.cat(outputs)

    def project(self, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        """x · W[expert]ᵀ for the stacked weight `name` (the looped path's one read of a weight: QLoRA's frozen
        quantized experts override it)."""
        return F.linear(x, getattr(self, name)[expert])

    def grouped(self, routed: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """All experts in two grouped GEMMs, with no host sync (the GPU path; CPU has no backward for it).
        In the autocast dtype: CUDA's grouped GEMM kernel takes bf16 only (other dtypes fall back to a
        loop that reads the offsets on the host), and torch.compile accepts nothing else."""
        offsets = counts.cumsum(0).to(torch.int32)
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else routed.dtype
        gate_up, down = self.gate_up_proj.to(dtype), self.down_proj.to(dtype)
        gate, up = torch._grouped_mm(routed.to(dtype), gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offsets)

    def grouped_cpu(self, routed: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The grouped GEMMs with GroupedLinear's backward (the CPU path)."""
        offsets = counts.cumsum(0).to(torch.int32)
        gate, up = GroupedLinear.apply(routed, self.gate_up_proj, offsets).chunk(2, dim=-1)
        return GroupedLinear.apply(F.silu(gate) * up, self.down_proj, offsets)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = RoutedExperts(config)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        # Tokens routed to each expert, summed over training forwards until the trainer reads and resets it
        # (aux-loss-free balancing updates the correction bias, where the router has one, from this load).
        self.register_buffer("tokens_per_expert", torch.zeros(config.n_routed_experts), persistent=False)
        self.balance_alpha = 0.0  # sequence-wise balance loss weight α, set by the trainer
        self.balance_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        flat = x.reshape(-1, h)
        weights, ids, scores = self.gate(flat)
        counts = None
        if self.training:  # inference forwards (e.g. GRPO rollouts) must not count towards balancing
            counts = expert_counts(ids, self.gate.n_experts)
            with torch.no_grad():
                self.tokens_per_expert += counts.to(self.tokens_per_expert.dtype)
        out = self.experts(flat, weights, ids, counts).view(b, t, h)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        if self.training and self.balance_alpha > 0:
            self.balance_loss = self.sequence_balance_loss(scores.view(b, t, -1), ids.view(b, t, -1))
        return out

    def sequence_balance_loss(self, scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 eq. 17-20: α Σ_i f_i P_i per sequence, averaged over the batch, where f_i is
        expert i's share of the sequence's selections (scaled by E/K) and P_i its mean normalised score.
        With softmax scores (already normalised) it is DeepSeek-V2's expert-level balance loss (eq. 12-14)
        computed per sequence, as V2's `seq_aux` does."""
        n_experts, top_k, t = scores.shape[-1], ids.shape[-1], ids.shape[1]
        selected = torch.zeros_like(scores).scatter_(-1, ids, 1.0).sum(dim=1)
        f = selected * n_experts / (top_k * t)
        p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)
        return self.balance_alpha * (f * p).sum(dim=-1).mean()
