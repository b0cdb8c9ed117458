"""QLoRA: the frozen quantized linear layer against autograd through F.linear with the weight dequantized from
the quantizers' own output (forward and input gradient, no weight gradient, nothing saved for the backward); the
frozen quantized routed experts, with and without their LoRA, against RoutedExperts and LoraExperts on the
dequantized weights; quantize_base on dense, MLA and MoE models and its refusals; `hemat sft --set
lora.quantize=int4` (dense and MoE) killed with SIGKILL and resumed reproduces an uninterrupted run's losses
exactly, and its PEFT-format adapter loads back."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from hemat.errors import HematError
from hemat.infer.quantize import QuantizationError, quantize_int4, quantize_int8
from hemat.model.adapter_io import load_adapter, save_adapter
from hemat.model.config import ModelConfig
from hemat.model.hf import from_pretrained
from hemat.model.lora import LoraConfig, LoraExperts, add_adapters, merge_adapters
from hemat.model.moe import RoutedExperts
from hemat.model.qlora import FrozenQuantizedExperts, FrozenQuantizedLinear, quantize_base
from hemat.model.transformer import CausalLM
from hemat.train.grpo import load_grpo_config, run_grpo
from hemat.train.sft import load_sft_config
from test_lora_train import SFT, STEPS, killed_and_resumed
from test_sft import FAST, TINY, make_checkpoint

# a dense MLA model (no routed experts) whose every projection input divides the int4 group size 32
DENSE_MLA = dict(first_k_dense_replace=2, num_nextn_predict_layers=0, q_lora_rank=32, kv_lora_rank=32, v_head_dim=16)
# TINY's MoE layer (4 routed experts, top 2, one shared) with inputs that divide 32 as well
MOE_MLA = {**DENSE_MLA, "first_k_dense_replace": 1, "moe_intermediate_size": 32}
QWEN2 = dict(model_type="qwen2", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=1)


def reference_weight(weight: torch.Tensor, fmt: str, group_size: int) -> torch.Tensor:
    """The weight the format stores, from the quantizers' outputs: q · scale, or (q - zero point) · scale by group."""
    if fmt == "int8":
        q, scale = quantize_int8(weight)
        return q.float() * scale[:, None]
    q, scale, zero_point = quantize_int4(weight, group_size)
    out, inputs = weight.shape
    return ((q.float() - zero_point.float()[..., None].repeat_interleave(group_size, -1).view(out, inputs))
            * scale.repeat_interleave(group_size, -1))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_quantized_linear_matches_autograd_through_the_dequantized_weight(fmt, dtype):
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 128) * 0.1, torch.randn(48)
    layer = FrozenQuantizedLinear(weight, bias, fmt, group_size=32)
    assert list(layer.parameters()) == []  # frozen: nothing for an optimizer, no weight gradient
    expected_weight = reference_weight(weight, fmt, 32)
    assert (expected_weight - weight).abs().max() < 0.1 * weight.abs().max()  # a real quantization of `weight`

    x = torch.randn(3, 5, 128, dtype=dtype, requires_grad=True)
    x_ref = x.detach().float().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert not [t for t in saved if t.numel() >= weight.numel()]  # no dequantized weight kept for the backward
    y_ref = F.linear(x_ref, expected_weight, bias)
    grad = torch.randn_like(y_ref)
    y.backward(grad.to(dtype))
    y_ref.backward(grad)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    assert y.dtype == dtype and torch.allclose(y.float(), y_ref, **tol)
    assert torch.allclose(x.grad.float(), x_ref.grad, **tol)
    assert torch.allclose(layer.weight.float(), expected_weight, atol=1e-6)


def expert_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **MOE_MLA, "vocab_size": 96, **overrides})


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_frozen_quantized_experts_are_routed_experts_on_the_dequantized_weights(fmt):
    """Output, input gradient and adapter gradients against RoutedExperts (its grouped path) and LoraExperts (W + ΔW
    merged per call) on each expert's weight dequantized from the quantizers' output; expert 3 gets no tokens."""
    torch.manual_seed(0)
    experts = RoutedExperts(expert_config())
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    frozen = FrozenQuantizedExperts(experts, fmt, group_size=32)
    assert list(frozen.parameters()) == []
    reference = RoutedExperts(expert_config())
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            stack = torch.stack([reference_weight(w, fmt, 32) for w in getattr(experts, name)])
            assert (stack - getattr(experts, name)).abs().max() < 0.1 * getattr(experts, name).abs().max()
            getattr(reference, name).copy_(stack)
            assert torch.allclose(getattr(frozen, name), stack, atol=1e-6)
    adapted, adapted_ref = LoraExperts(frozen, LoraConfig(rank=4)), LoraExperts(reference, LoraConfig(rank=4))
    factors = [p for n, p in adapted.named_parameters() if "_lora." in n]
    factors_ref = [p for n, p in adapted_ref.named_parameters() if "_lora." in n]
    with torch.no_grad():
        for p, p_ref in zip(factors, factors_ref, strict=True):
            p.normal_(std=0.1), p_ref.copy_(p)  # the same adapter, B ≠ 0: it changes the output

    x = torch.randn(10, 32, requires_grad=True)
    ids = torch.tensor([[0, 1], [2, 1], [1, 0], [0, 2], [2, 0], [1, 2], [0, 1], [2, 1], [1, 0], [0, 2]])
    weights = torch.rand(10, 2)
    for module, ref in ((frozen, reference), (adapted, adapted_ref)):
        x_ref = x.detach().clone().requires_grad_(True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = module(x, weights, ids)
        assert not [t for t in saved if t.numel() >= experts.gate_up_proj[0].numel()]  # no expert weight kept
        y_ref = ref(x_ref, weights, ids)
        grad = torch.randn_like(y_ref)
        x.grad = None
        y.backward(grad), y_ref.backward(grad)
        assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    for p, p_ref in zip(factors, factors_ref):
        assert p.grad.abs().sum() > 0 and torch.allclose(p.grad, p_ref.grad, atol=1e-5)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("shape", [QWEN2, {**TINY, **DENSE_MLA, "vocab_size": 96},
                                   {**TINY, **MOE_MLA, "vocab_size": 96}], ids=["qwen2", "mla", "moe"])
def test_quantize_base_is_the_model_with_dequantized_weights(fmt, shape):
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(**shape))
    projections = [n for n, m in model.named_modules()
                   if type(m) in (torch.nn.Linear, RoutedExperts) and n.startswith("model.layers.")]
    names = quantize_base(model, fmt, group_size=32)
    assert names == projections and len(names) >= 7 * model.config.num_hidden_layers
    # the reference: the same architecture with each projection's weight set to its dequantized value
    reference = CausalLM(ModelConfig(**shape))
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if k in reference.state_dict()},
                              strict=False)
    with torch.no_grad():
        for name in names:
            frozen, ref = model.get_submodule(name), reference.get_submodule(name)
            for weight in ("gate_up_proj", "down_proj") if isinstance(frozen, RoutedExperts) else ("weight",):
                getattr(ref, weight).copy_(getattr(frozen, weight))
    adapted = add_adapters(model, LoraConfig(rank=4))
    assert adapted == names
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)
    tokens = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        assert torch.allclose(model(tokens), reference(tokens), atol=1e-5)  # a fresh adapter changes nothing
    model.train()
    model(tokens).logsumexp(-1).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if ".lora_B" in n]
    experts = sum(isinstance(model.get_submodule(n).base_layer, RoutedExperts) for n in names)
    assert len(grads) == len(names) + experts and all(g is not None and g.abs().sum() > 0 for g in grads)
    with pytest.raises(HematError, match="quantized base"):
        merge_adapters(model)


def test_quantize_base_refuses_what_it_cannot_quantize():
    moe = CausalLM(expert_config(moe_intermediate_size=16, n_shared_experts=2))  # only the experts' 16 is off
    with pytest.raises(QuantizationError, match=r"does not divide the input dimension 16 of "
                                                r"model\.layers\.1\.mlp\.experts\.down_proj"):
        quantize_base(moe, "int4", 32)
    with pytest.raises(QuantizationError, match=r"does not divide the input dimension 64 of model\.layers\.0"):
        quantize_base(CausalLM(ModelConfig(**QWEN2)), "int4", 128)
    with pytest.raises(HematError, match="lora.quantize must be one of int8, int4"):
        load_sft_config("cpu-tiny", ["lora.rank=4", "lora.quantize=nf4"])
    with pytest.raises(HematError, match="lora.quantize=int4 needs lora.rank > 0"):
        load_sft_config("cpu-tiny", ["lora.quantize=int4"])
    with pytest.raises(HematError, match="lora.group_size must be one of"):
        load_sft_config("cpu-tiny", ["lora.rank=4", "lora.quantize=int4", "lora.group_size=48"])


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("qlora") / "base", **DENSE_MLA)


def qlora_cmd(checkpoint: Path, run: Path) -> list[str]:
    overrides = [x for item in FAST + SFT + ["lora.quantize=int4", "lora.group_size=32"] for x in ("--set", item)]
    return [sys.executable, "-m", "hemat", "sft", "--model", str(checkpoint), "--run-dir", str(run),
            "--lora", "4", "--set", "lora.alpha=8", *overrides]


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("qlora-moe") / "base", **MOE_MLA)


@pytest.mark.parametrize("base", ["dense_checkpoint", "moe_checkpoint"])
def test_qlora_sft_learns_resumes_exactly_and_saves_a_peft_adapter(base, request, tmp_path):
    """Over the MoE base the routed experts are int4 too, and adapted (PEFT's target_parameters names); the run
    uses gradient checkpointing, and the MoE layers count their experts' loads (logged; a LoRA run leaves the
    routers' correction biases, which belong to the frozen base, as they are)."""
    checkpoint = request.getfixturevalue(base)
    reference, stdout, resumed = killed_and_resumed(lambda run: qlora_cmd(checkpoint, run), tmp_path)
    assert "over an int4 base (group 32)" in stdout and "over an int4 base" in resumed
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert any("load_imbalance" in r for r in records) == (base == "moe_checkpoint")

    final = reference / "checkpoints" / f"step-{STEPS}"
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    saved = load_file(final / "adapter_model.safetensors")
    assert saved and all(k.startswith("base_model.model.model.layers.") and ".lora_" in k for k in saved)
    assert any(".mlp.experts." in k for k in saved) == (base == "moe_checkpoint")
    # the adapter loads back onto the quantized base, tensor for tensor, and moves its logits
    model = from_pretrained(checkpoint, dtype=torch.bfloat16)
    quantize_base(model, "int4", 32)
    tokens = torch.tensor([[3, 5, 7, 11, 13]])
    with torch.no_grad():
        base_logits = model(tokens)
        load_adapter(model, final)
        adapted = model(tokens)
    save_adapter(model, tmp_path / "again")
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)
    assert (adapted.float() - base_logits.float()).abs().max() > 1e-3


def test_qlora_grpo_runs_over_the_quantized_base(moe_checkpoint, tmp_path):
    """GRPO's rollouts (the inference engine over the adapted quantized base) and its reference (the base with
    the adapters off) work over an int8 base with quantized routed experts."""
    overrides = FAST + [f"grpo.model={moe_checkpoint}", "grpo.problems=20", "grpo.prompts_per_step=2",
                        "grpo.group_size=4", "grpo.max_new_tokens=8", "grpo.micro_batch_size=4", "grpo.lr=1e-2",
                        "grpo.warmup_steps=0", "grpo.temperature=1.0", "grpo.eval_problems=0", "grpo.steps=2",
                        "grpo.minibatches=1", "lora.rank=4", "lora.quantize=int8"]

    def score(problem, completion_ids, text):  # parity of the first token: groups with mixed rewards
        from hemat.train.rewards import verify

        return verify(problem, text), float(completion_ids[0] % 2)

    run = tmp_path / "run"
    run_grpo(load_grpo_config("cpu-tiny", overrides), run, score_fn=score)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # a fresh adapter is the base (up to bf16 rounding between the policy's and the reference's passes); after
    # step 1 moved the adapters, the reference (adapters off) differs from the policy
    assert abs(records[0]["kl"]) < 1e-6 and math.isfinite(records[1]["kl"]) and records[1]["kl"] > 1e-5
    assert (run / "checkpoints" / "step-2" / "adapter_model.safetensors").is_file()
