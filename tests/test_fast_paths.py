"""The alternative code paths added for speed, each against the straightforward computation it replaces:
grouped experts with their own backward, pairwise experts at decode, the folded MLA decode, packed and
derived weights (and their invalidation when a trainer changes the weights), the RoPE tables."""

import math

import pytest
import torch
import torch.nn.functional as F

from hemat.infer.cache import PagedCache
from hemat.infer.engine import Engine
from hemat.infer.sampling import SamplingParams
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


def test_pairwise_experts_at_decode_match_the_sorted_path():
    moe = tiny_model().moe_layers()[0]
    x = torch.randn(3, 48)
    weights, ids, counts, _ = routed(moe, x)
    with torch.no_grad():
        assert ids.numel() <= moe.experts.FEW_PAIRS
        pairwise = moe.experts(x, weights, ids)  # few pairs, no grad: one by one
    expected = moe.experts(x, weights, ids, counts)  # grad enabled: the sorted grouped path
    assert (pairwise - expected).abs().max() <= 1e-5


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


def decode_with_paged_cache(model, ids: torch.Tensor) -> torch.Tensor:
    """Prefill 6 tokens, then decode the rest one at a time through a PagedCache → logits [B, T, V]."""
    b, t = ids.shape
    cache = PagedCache(model.config, num_pages=20, page_size=4, dtype=torch.float32, device=torch.device("cpu"))
    tables = [[1 + i + b * j for j in range(8)] for i in range(b)]
    pieces = []
    with torch.inference_mode():
        for start, n in [(0, 6)] + [(s, 1) for s in range(6, t)]:
            positions = cache.begin_step(tables, [start] * b, [n] * b)
            pieces.append(model(ids[:, start : start + n], positions=positions, cache=cache))
    return torch.cat(pieces, dim=1)


def test_folded_and_unfolded_mla_decode_equal_the_full_forward():
    model = tiny_model()
    assert all(layer.self_attn.fold for layer in model.model.layers)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
    folded = decode_with_paged_cache(model, ids)
    for layer in model.model.layers:
        layer.self_attn.fold = False
    unfolded = decode_with_paged_cache(model, ids)
    assert (folded - full).abs().max() <= 1e-4 and (unfolded - full).abs().max() <= 1e-4


def test_inference_copies_of_weights_follow_changes_and_respect_the_budget(monkeypatch):
    model = tiny_model()
    mlp = model.model.layers[0].mlp
    x = torch.randn(4, 48)

    def plain():
        return mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))

    with torch.no_grad():
        assert (mlp(x) - plain()).abs().max() <= 1e-5  # through the kept transposed copies
        kept = dense.transposed(mlp, "down", mlp.down_proj.weight)
        mlp.up_proj.weight.mul_(2)  # an in-place change moves the version counter: rebuilt
        assert (mlp(x) - plain()).abs().max() <= 1e-5
        assert dense.transposed(mlp, "down", mlp.down_proj.weight) is kept  # unchanged sources: kept
    optimizer = torch.optim.AdamW(mlp.parameters(), lr=0.1, fused=True)
    mlp(x).sum().backward()
    optimizer.step()  # no version bump from the fused kernel...
    dense.weights_changed()  # ...so the trainer announces the change
    with torch.no_grad():
        assert (mlp(x) - plain()).abs().max() <= 1e-5
        monkeypatch.setattr(dense, "DERIVED_BUDGET_BYTES", 0)
        dense.weights_changed()
        assert dense.transposed(mlp, "gate_up", mlp.gate_proj.weight, mlp.up_proj.weight) is None
        assert (mlp(x) - plain()).abs().max() == 0  # past the budget: the plain path
        logits = decode_with_paged_cache(model, torch.randint(0, 96, (2, 9)))  # every path without copies
    assert logits.shape == (2, 9, 96)


def test_derived_weights_follow_optimizer_steps_through_the_engine():
    """A fused AdamW step does not move version counters; the trainer's weights_changed() must make the
    engine's folded attention weights follow (GRPO rollouts share the model being trained)."""
    model = tiny_model()
    prompt = torch.randint(2, 96, (7,), generator=torch.Generator().manual_seed(3)).tolist()
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engine = Engine(model, max_batch_size=2, page_size=4, speculative="off")
    engine.generate([prompt], params)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    model.train()
    model(torch.randint(0, 96, (2, 10))).logsumexp(-1).sum().backward()
    optimizer.step()
    dense.weights_changed()
    model.eval()
    engine = Engine(model, max_batch_size=2, page_size=4, speculative="off")  # no prefix pages from before
    out = engine.generate([prompt], params)[0].outputs[0].token_ids
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt):]


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
