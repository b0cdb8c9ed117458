"""The alternative code paths added for speed, each against the straightforward computation it replaces:
grouped experts with their own backward, the router's group masking, the RoPE tables, the MLA training
projection. The inference forms (folded MLA, fused MLP, packed weights) are tested in test_quantize.py."""

import math

import pytest
import torch
import torch.nn.functional as F

from hemat.model import dense
from hemat.model.config import ModelConfig
from hemat.model.rope import RotaryEmbedding, apply_rope
from hemat.model.transformer import CausalLM


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        model_type="deepseek_v3", vocab_size=96, hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=3, n_routed_experts=6, n_shared_experts=1, num_experts_per_tok=2,
        n_group=2, topk_group=1, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
        v_head_dim=8, first_k_dense_replace=1, max_position_embeddings=128, initializer_range=0.2,
    )
    return ModelConfig(**{**base, **overrides})


def tiny_model(seed: int = 0, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(tiny_config(**overrides)).eval()


def routed(moe, x):
    weights, ids, _ = moe.gate(x)
    counts = torch.bincount(ids.flatten(), minlength=moe.gate.n_experts)
    order = ids.flatten().argsort(stable=True)
    return weights, ids, counts, x[order // ids.shape[1]]


def test_grouped_cpu_experts_match_the_loop_forward_and_backward():
    moe = tiny_model().moe_layers()[0]
    x = torch.randn(30, 48)
    weights, ids, counts, rows = routed(moe, x)
    counts[0] += counts[1]  # expert 1 gets no tokens: its weight gradient must be exactly zero
    counts[1] = 0
    grads = []
    for path in (moe.experts.looped, moe.experts.grouped_cpu):
        moe.zero_grad()
        r = rows.detach().requires_grad_()
        out = path(r, counts)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), r.grad, moe.experts.gate_up_proj.grad.clone(), moe.experts.down_proj.grad.clone()))
    for reference, got in zip(*grads):
        assert (reference - got).abs().max() <= 1e-5
    assert grads[1][2][1].abs().max() == 0 and grads[1][3][1].abs().max() == 0


def test_router_group_masking_matches_masked_fill():
    router = tiny_model(n_group=3, topk_group=2).moe_layers()[0].gate
    with torch.no_grad():
        router.e_score_correction_bias.uniform_(-0.5, 0.5)
    x = torch.randn(50, 48)
    weights, ids, scores = router(x)
    biased = (scores + router.e_score_correction_bias).view(50, 3, 2)
    kept = biased.topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices
    mask = torch.zeros(50, 3, dtype=torch.bool).scatter_(1, kept, True)
    reference = biased.masked_fill(~mask[..., None], float("-inf")).flatten(1).topk(2, dim=-1).indices
    assert torch.equal(ids, reference)
    assert torch.allclose(weights.sum(-1), torch.ones(50))


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_tables_rotate_like_the_pairwise_formula(interleaved):
    config = tiny_config(rope_interleave=interleaved) if interleaved else ModelConfig(
        model_type="llama", vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=3)
    rotary = RotaryEmbedding(config)
    positions = torch.arange(12).view(2, 6)
    x = torch.randn(2, 6, 3, config.rope_dim)
    angles = positions.float()[..., None, None] * rotary.inv_freq
    cos, sin = angles.cos(), angles.sin()
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        expected = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    else:
        a, b = x.chunk(2, dim=-1)
        expected = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    tables = rotary(positions)
    assert tables[2] is None  # gradients wanted: the elementwise rotation
    assert (apply_rope(x, *tables, interleaved=interleaved) - expected).abs().max() <= 1e-6
    with torch.no_grad():
        tables = rotary(positions)
    assert tables[2].shape == (2, 6, config.rope_dim, config.rope_dim)  # inference: one matrix per token
    assert (apply_rope(x, *tables, interleaved=interleaved) - expected).abs().max() <= 1e-6


def test_additive_mask_is_converted_once_per_mask():
    mask = torch.tensor([[[True, True, False], [True, True, True]]])
    bias = dense.additive_mask(mask, 2, torch.float32)
    assert bias is dense.additive_mask(mask, 2, torch.float32)
    assert bias.shape == (1, 4, 3) and bias[0, 0, 2] == -math.inf and bias[0, 3, 2] == 0
    other = dense.additive_mask(mask.clone(), 2, torch.float32)
    assert other is not bias and torch.equal(other, bias)


def test_mla_training_path_gradients_match_separate_projections():
    """The training forward runs q_a and kv_a as one matmul over concatenated weights; gradients reach both."""
    torch.manual_seed(0)
    attn = tiny_model().train().model.layers[0].self_attn
    x = torch.randn(2, 5, 48)
    rope = RotaryEmbedding(tiny_config())(torch.arange(5).expand(2, -1))
    attn(x, rope).square().sum().backward()
    q_a, kv_a = attn.q_a_proj.weight, attn.kv_a_proj_with_mqa.weight
    latent = F.linear(x, kv_a)[..., :16]
    q = attn.q_b_proj(attn.q_a_layernorm(F.linear(x, q_a)))
    expected = torch.autograd.grad((q.square().sum() + latent.square().sum()), (q_a, kv_a))
    got = torch.autograd.grad((attn.q_b_proj(attn.q_a_layernorm(attn._down_project(x)[..., :24])).square().sum()
                               + attn._down_project(x)[..., 24:40].square().sum()), (q_a, kv_a))
    for e, g in zip(expected, got):
        assert (e - g).abs().max() <= 1e-5
    assert q_a.grad.abs().sum() > 0 and kv_a.grad.abs().sum() > 0
