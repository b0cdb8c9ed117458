"""The GPU-only paths of issue 7, each checked on CPU against what it replaces: MLA attention with V
padded to the qk head size (CUDA's flash backend) and the backend probe, block-wise FP8 quantisation
and the FP8 linear layer (its GEMM emulated), and the engine's bucketed static-shape decode step (what
a CUDA graph records) against the plain decode step."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hemat.errors import HematError
from hemat.infer.cache import PagedCache
from hemat.infer.cuda_graphs import BucketedDecode
from hemat.infer.engine import Engine
from hemat.infer.sampling import SamplingParams
from hemat.model import fp8
from hemat.model.config import ModelConfig
from hemat.model.mla import _probe_sdpa_backend, attention_with, causal_attention, sdpa_backend
from hemat.model.transformer import CausalLM
from hemat.train.config import ConfigValueError, TrainConfig


def tiny_model(kind: str = "deepseek_v3", seed: int = 0, **overrides) -> CausalLM:
    if kind in ("deepseek_v3", "deepseek_v2"):
        base = dict(
            model_type=kind, vocab_size=96, hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
            num_hidden_layers=2, num_attention_heads=3, n_routed_experts=6, n_shared_experts=1, num_experts_per_tok=2,
            n_group=2, topk_group=1, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=8, first_k_dense_replace=1, max_position_embeddings=128, initializer_range=0.2,
        )
    else:
        base = dict(model_type=kind, vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(**{**base, **overrides})).eval()


# ---- attention: V padded to the qk head size ---------------------------------------------------------
def reference_attention(q, k, v, scale):
    """softmax(q kᵀ · scale + causal mask) v, written out; [B, T, H, d] layout."""
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
    t = q.shape[1]
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(dim=-1), v)


@pytest.mark.parametrize("path", ["flash_padded_v", "math", "causal_attention"])
def test_attention_with_v_padded_equals_plain_attention_forward_and_backward(path):
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 10, 3, 24, generator=gen) for _ in "qk")
    v = torch.randn(2, 10, 3, 16, generator=gen)
    weights = torch.randn(2, 10, 3, 16, generator=gen)
    results = []
    for fn in (reference_attention, causal_attention if path == "causal_attention" else
               lambda *a: attention_with(path, *a)):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*inputs, 24**-0.5)
        (out * weights).sum().backward()
        results.append([out.detach()] + [t.grad for t in inputs])
    assert results[1][0].shape == v.shape
    for expected, got in zip(*results):
        assert (expected - got).abs().max() <= 1e-5


def test_backend_probe_skips_backends_without_a_kernel_and_is_traceable():
    # CPU has no cuDNN kernel: the probe falls through to flash with V padded (CPU's flash kernel)
    assert _probe_sdpa_backend(24, 16, "torch.float32", "cpu", True) == "flash_padded_v"
    assert _probe_sdpa_backend(24, 24, "torch.bfloat16", "cpu", False) == "flash_padded_v"

    def attention(q, k, v):  # how a compiled layer reaches it: the probe's answer becomes a constant
        backend = sdpa_backend(q.shape[-1], v.shape[-1], str(q.dtype), str(q.device), False)
        return attention_with(backend, q, k, v, 0.25)

    q, k, v = torch.randn(1, 6, 2, 24), torch.randn(1, 6, 2, 24), torch.randn(1, 6, 2, 16)
    traced = torch.compile(attention, backend="eager", fullgraph=True)
    assert (traced(q, k, v) - reference_attention(q, k, v, 0.25)).abs().max() <= 1e-5


# ---- FP8 ----------------------------------------------------------------------------------------------
def test_tile_and_block_scales_map_each_largest_magnitude_to_448():
    x = torch.randn(4, 256)
    x[1, :128] = 0.0  # an all-zero tile stays zero, with no NaN from a zero scale
    x[2, 130] = -1000.0  # an outlier coarsens its own tile only
    q, scale = fp8.quantize_tiles(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (4, 2)
    amax = x.abs().view(4, 2, 128).amax(dim=-1)
    nonzero = amax > 0
    assert torch.allclose(scale[nonzero], amax[nonzero] / 448)
    assert (q.float().abs().view(4, 2, 128).amax(dim=-1)[nonzero] == 448).all()
    assert (q[1, :128].float() == 0).all() and torch.isfinite(fp8.dequantize_tiles(q, scale)).all()
    assert scale[2, 1] == 1000.0 / 448 and scale[2, 0] == amax[2, 0] / 448

    w = torch.randn(256, 384)
    wq, wscale = fp8.quantize_blocks(w)
    assert wscale.shape == (2, 3)
    block_amax = w.abs().view(2, 128, 3, 128).amax(dim=(1, 3))
    assert torch.allclose(wscale, block_amax / 448)


def test_fp8_round_trip_error_is_within_e4m3_rounding():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 512, generator=gen) * torch.logspace(-3, 3, 512)  # magnitudes over six decades
    q, scale = fp8.quantize_tiles(x)
    back = fp8.dequantize_tiles(q, scale)
    # e4m3: 3 mantissa bits, so a normal value is off by at most 2^-4 of itself; below the smallest
    # normal (2^-6 after scaling) by at most half the subnormal spacing, 2^-10 of the tile's scale
    bound = torch.maximum(x.abs() * 2**-4, scale.repeat_interleave(128, dim=1) * 2**-10)
    assert ((back - x).abs() <= bound * (1 + 1e-6)).all()
    assert (back - x).abs().max() > 0  # it does round

    w = torch.randn(256, 256, generator=gen)
    wq, wscale = fp8.quantize_blocks(w)
    wback = fp8.dequantize_blocks(wq, wscale)
    wbound = torch.maximum(w.abs() * 2**-4, wscale.repeat_interleave(128, 0).repeat_interleave(128, 1) * 2**-10)
    assert ((wback - w).abs() <= wbound * (1 + 1e-6)).all()


def fp8_pair(bias: bool = True) -> tuple[nn.Linear, nn.Module]:
    torch.manual_seed(0)
    reference = nn.Linear(256, 384, bias=bias)
    holder = nn.Sequential(nn.Linear(256, 384, bias=bias))
    holder.load_state_dict({f"0.{k}": v for k, v in reference.state_dict().items()})
    assert fp8.convert_to_fp8(holder) == ["0"]
    return reference, holder[0]


def test_fp8_linear_forward_is_the_quantised_product_and_close_to_the_linear():
    reference, layer = fp8_pair()
    x = torch.randn(2, 5, 256)  # any leading shape
    y = layer(x)
    xq, xs = fp8.quantize_tiles(x.reshape(-1, 256))
    wq, ws = fp8.quantize_blocks(reference.weight.detach())
    product = fp8.dequantize_tiles(xq, xs) @ fp8.dequantize_blocks(wq, ws).t() + reference.bias
    assert (y - product.view(2, 5, 384)).abs().max() <= 1e-5
    expected = reference(x)
    assert ((y - expected).norm() / expected.norm()) < 0.05  # e4m3 rounding, averaged over 256 products
    layer.eval()  # eval mode is a plain nn.Linear
    assert torch.equal(layer(x), expected)


def test_fp8_linear_backward_is_the_high_precision_product():
    reference, layer = fp8_pair()
    x = torch.randn(6, 256, requires_grad=True)
    grad = torch.randn(6, 384)
    layer(x).backward(grad)
    xq, xs = fp8.quantize_tiles(x.detach())
    assert torch.allclose(x.grad, grad @ reference.weight.detach(), atol=1e-6)  # the weight as stored
    assert torch.allclose(layer.weight.grad, grad.t() @ fp8.dequantize_tiles(xq, xs), atol=1e-5)  # the saved FP8 input
    assert torch.allclose(layer.bias.grad, grad.sum(0), atol=1e-6)


def test_fp8_linear_under_bf16_autocast_keeps_autocast_dtypes():
    _, layer = fp8_pair(bias=False)
    x = torch.randn(4, 256, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32


def test_convert_to_fp8_swaps_the_big_projections_only_and_trains():
    sizes = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, n_shared_experts=2,
                 num_attention_heads=2, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32,
                 v_head_dim=64, vocab_size=128, initializer_range=0.02)
    model, reference = tiny_model(**sizes), tiny_model(**sizes)
    params = dict(model.named_parameters())
    converted = fp8.convert_to_fp8(model)
    assert set(converted) == {
        "model.layers.0.self_attn.q_a_proj", "model.layers.0.self_attn.q_b_proj", "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.q_a_proj", "model.layers.1.self_attn.q_b_proj", "model.layers.1.self_attn.o_proj",
        "model.layers.1.mlp.shared_experts.gate_proj", "model.layers.1.mlp.shared_experts.up_proj",
        "model.layers.1.mlp.shared_experts.down_proj",
    }  # not kv_a (288 outputs), kv_b (64 inputs), lm_head, the router or the routed experts
    assert type(model.lm_head) is nn.Linear
    assert all(p is params[n] for n, p in model.named_parameters())  # the same parameters, the same names
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))  # eval: plain linears
    model.train()
    reference.train()
    losses = []
    for m in (model, reference):
        logits = m(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        losses.append(loss.item())
    assert math.isfinite(losses[0]) and abs(losses[0] - losses[1]) < 0.01 * losses[1]
    for name in converted:  # FP8 rounding of every projection, compounded through two layers
        got, expected = model.get_submodule(name).weight.grad, reference.get_submodule(name).weight.grad
        assert got is not None and ((got - expected).norm() / expected.norm()) < 0.15


def test_fp8_training_needs_cuda():
    with pytest.raises(ConfigValueError, match="train.fp8"):
        TrainConfig(fp8=True, device="cpu").validate()
    with pytest.raises(HematError, match="CUDA"):
        fp8.check_fp8_device(torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine device=auto picks the GPU")
def test_trainer_refuses_fp8_without_a_gpu(tmp_path):
    from hemat.train.loop import Trainer

    config = TrainConfig(fp8=True, device="auto", steps=1, seq_len=8, batch_tokens=16, micro_batch_size=2,
                         progress=False, price_per_hour=1.0, peak_tflops=1.0)
    with pytest.raises(HematError, match="train.fp8 needs a CUDA GPU"):
        Trainer(tiny_model(), config, tmp_path / "run", source=None)


# ---- the bucketed static-shape decode step ------------------------------------------------------------
def test_buckets():
    model = tiny_model()
    cache = PagedCache(model.config, num_pages=8, page_size=16, dtype=torch.float32, device=torch.device("cpu"))
    steps = BucketedDecode(model, cache, max_batch_size=6, max_context=4096, capture=False)
    assert steps.bucket.batches == [1, 2, 4, 6]
    assert steps.bucket.spans == [256, 512, 1024, 2048, 4096]
    assert steps.bucket(3, 300) == (4, 512 // 16) and steps.bucket(6, 1) == (6, 256 // 16)
    short = BucketedDecode(model, cache, max_batch_size=1, max_context=100, capture=False)
    assert short.bucket.batches == [1] and short.bucket.spans == [112]  # the context in whole pages


@pytest.mark.parametrize("kind", ["deepseek_v3", "deepseek_v2", "llama", "qwen3"])
def test_bucketed_decode_step_equals_the_plain_decode_step(kind):
    model = tiny_model(kind)
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 13, 9]
    tables = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    caches, logits = [], []
    for bucketed in (False, True):
        cache = PagedCache(model.config, num_pages=16, page_size=4, dtype=torch.float32, device=torch.device("cpu"))
        ids = torch.randint(0, 96, (3, 13), generator=torch.Generator().manual_seed(0))
        next_ids = torch.randint(0, 96, (3,), generator=gen).tolist() if not bucketed else next_ids
        with torch.inference_mode():
            positions = cache.begin_step(tables, [0, 0, 0], lengths)
            model.model(ids, positions, cache)  # prefill, ragged
            if bucketed:
                steps = BucketedDecode(model, cache, max_batch_size=8, max_context=128, capture=False)
                assert steps.bucket(3, 14) == (4, 128 // 4)  # one padding row, 32 pages of span
                out = steps(next_ids, tables, lengths)[1]
            else:
                positions = cache.begin_step(tables, lengths, [1, 1, 1])
                out = model.logits(model.model(torch.tensor(next_ids)[:, None], positions, cache)[:, 0])
        caches.append([store.clone() for stores in cache.stores for store in stores])
        logits.append(out)
    assert logits[1].shape == logits[0].shape == (3, 96)
    assert (logits[1] - logits[0]).abs().max() <= 1e-5
    assert torch.equal(logits[1].argmax(-1), logits[0].argmax(-1))
    for plain, bucketed in zip(*caches):  # the padding row wrote only to the scratch page 0 (slots 0-3)
        assert (plain[4:] - bucketed[4:]).abs().max() <= 1e-5


def test_step_indices_are_the_same_with_the_graphs_own_aranges():
    model = tiny_model()
    cache = PagedCache(model.config, num_pages=16, page_size=4, dtype=torch.float32, device=torch.device("cpu"))
    table = torch.tensor([[3, 4, 0, 0], [5, 6, 7, 8], [0, 0, 0, 0]])
    start, total = torch.tensor([[6], [13], [0]]), torch.tensor([[7], [14], [1]])
    steps = []
    for own in (False, True):
        positions = cache.set_step(table, start, total, 1, 16, own_aranges=own)
        steps.append((positions, cache._write, cache._read, cache._mask))
    for a, b in zip(*steps):
        assert torch.equal(a, b)
    assert steps[0][1].tolist() == [4 * 4 + 2, 8 * 4 + 1, 0]  # position 6 is on page 4; row 2 is padding


@pytest.mark.parametrize("kind", ["deepseek_v3", "deepseek_v2", "llama", "qwen3"])
def test_engine_with_the_bucketed_step_generates_the_same_tokens(kind):
    model = tiny_model(kind)
    prompts = [torch.randint(2, 96, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 19, 11)]
    outputs = {}
    for mode in ("off", "eager"):
        engine = Engine(model, page_size=8, max_batch_size=3, speculative="off", cuda_graphs=mode)
        assert (engine.static_decode is not None) == (mode == "eager")
        greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        sampled = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, ignore_eos=True, seed=7)
        outputs[mode] = [r.outputs[0].token_ids for r in engine.generate(prompts, greedy)]
        outputs[mode] += [r.outputs[0].token_ids for r in engine.generate(prompts, [sampled] * 3)]
    assert outputs["off"] == outputs["eager"]


def test_cuda_graphs_option_is_checked():
    model = tiny_model()
    with pytest.raises(HematError, match="cuda_graphs"):
        Engine(model, cuda_graphs="sometimes")
    if not torch.cuda.is_available():
        with pytest.raises(HematError, match="needs a CUDA device"):
            Engine(model, cuda_graphs="on")
        assert Engine(model).static_decode is None  # auto: off on CPU


def test_graphs_are_dropped_when_the_weights_change():
    model = tiny_model()
    cache = PagedCache(model.config, num_pages=8, page_size=4, dtype=torch.float32, device=torch.device("cpu"))
    steps = BucketedDecode(model, cache, max_batch_size=2, max_context=128, capture=False)
    key = steps._weights_key()
    assert steps._weights_key() == key
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # an optimizer step that moves the version counter
    assert steps._weights_key() != key


# ---- the benchmark script itself ---------------------------------------------------------------------
def test_gpu_bench_tiny_runs_every_section_and_writes_the_table(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench.md"
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_bench.py"), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    table = out.read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    for run in ("transformers", "hemat", "hemat fp8"):  # training rows with a measured rate, no error
        assert run in rows and "error" not in rows[run].lower(), rows.get(run)
        assert float(rows[run].split("|")[2].replace(",", "")) > 0
    for run in ("transformers generate", "hemat engine"):
        assert run in rows and "error" not in rows[run].lower(), rows.get(run)
    printed = done.stdout.split("wrote ")[0].strip().splitlines()
    assert printed[-1].startswith("Goals (issue 7)") and "| hemat engine |" in "\n".join(printed[-12:])  # table last
    assert (tmp_path / "bench-loss.png").stat().st_size > 0
