"""Fine-tuning memory and speed, hemat against transformers + peft on the same model, data and LoRA rank:
peak resident memory (VmHWM of a fresh process per configuration: the imports, the model, its gradients,
AdamW's state and the activations) and tokens/s of the fastest training step (sequence length 512, batch 4, AdamW),
for full fine-tuning (fp32), LoRA (a bf16 base, fp32 adapters: what peft's autocast_adapter_dtype keeps) and
QLoRA (hemat: an int4 base, group 64; peft: a bitsandbytes NF4 base, blocks of 64, loaded by transformers'
from_pretrained from a checkpoint this script writes first; qwen2 shapes only, since bitsandbytes quantizes
linear layers, not the stacked experts of transformers' DeepseekV3).

Shapes (random weights): `deepseek-tiny` is the cpu-tiny preset's DeepSeek-V3 (MLA + MoE; no MTP, which
transformers does not run), LoRA on the MLA projections and the routed experts (peft's target_parameters);
`qwen2-small` is Qwen2-0.5B's layer shape (hidden 896, 14 heads, 2 KV heads, MLP 4864, vocab 151936) with 4
layers, LoRA on every linear layer; `qwen2-1.5b` is DeepSeek-R1-Distill-Qwen-1.5B's full shape (LoRA only on
a small machine: full fine-tuning needs ~16 bytes per parameter).

    PYTHONPATH=. python benchmarks/finetune_memory.py [--shapes deepseek-tiny qwen2-small] [--modes full lora qlora]
        [--steps 2]"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SEQ, BATCH, RANK, ALPHA, LR = 512, 4, 16, 32, 1e-4
DEEPSEEK_TINY = dict(
    vocab_size=2048, hidden_size=256, intermediate_size=768, moe_intermediate_size=128, num_hidden_layers=4,
    first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
    num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=True, q_lora_rank=128,
    kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=1024,
    rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
)
QWEN2_SMALL = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=4, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
    bos_token_id=0, eos_token_id=1,
)
QWEN2_15B = {**QWEN2_SMALL, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
             "num_attention_heads": 12, "tie_word_embeddings": False}
SHAPES = {"deepseek-tiny": ("deepseek_v3", DEEPSEEK_TINY), "qwen2-small": ("qwen2", QWEN2_SMALL),
          "qwen2-1.5b": ("qwen2", QWEN2_15B)}
MLA_TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
DENSE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def build_hemat(kind: str, shape: dict, mode: str):
    import torch

    from hemat.model.config import ModelConfig
    from hemat.model.lora import LoraConfig, add_adapters
    from hemat.model.qlora import quantize_base
    from hemat.model.hf import meta_model
    from hemat.train.loop import lm_loss

    extra = {"num_nextn_predict_layers": 0} if kind == "deepseek_v3" else {}
    lora = mode != "full"
    model = meta_model(ModelConfig(model_type=kind, **shape, **extra))
    if lora:  # built in its final dtype, as from_pretrained builds it: a bf16 base never exists in fp32
        model.to(torch.bfloat16)
        for moe in model.moe_layers():  # the router stays fp32, as from_pretrained keeps it
            moe.gate.float()
    model.to_empty(device="cpu")
    model.init_weights()
    if mode == "qlora":
        quantize_base(model, "int4", 64)
    if lora:
        targets = MLA_TARGETS + ["experts"] if kind == "deepseek_v3" else DENSE_TARGETS
        add_adapters(model, LoraConfig(rank=RANK, alpha=ALPHA, targets=tuple(targets)))
    model.train()
    return model, lambda inputs, targets: lm_loss(model, (inputs, targets))[0]


def build_peft(kind: str, shape: dict, mode: str):
    import peft
    import torch
    import transformers

    config_class = {"deepseek_v3": transformers.DeepseekV3Config, "qwen2": transformers.Qwen2Config}[kind]
    model_class = {"deepseek_v3": transformers.DeepseekV3ForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[kind]
    lora = mode != "full"
    if mode == "qlora":
        nf4 = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_compute_dtype=torch.bfloat16)
        model = model_class.from_pretrained(os.environ["CHECKPOINT"], quantization_config=nf4, dtype=torch.bfloat16,
                                            attn_implementation="sdpa")
    else:
        config = config_class(**shape)
        config._attn_implementation = "sdpa"
        model = model_class._from_config(config, dtype=torch.bfloat16 if lora else torch.float32)
    if lora:
        extra = ({"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
                 if kind == "deepseek_v3" else {})
        targets = MLA_TARGETS if kind == "deepseek_v3" else DENSE_TARGETS
        model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, **extra))
    model.train()

    def loss(inputs, targets):  # what transformers' own loss does: logits in fp32, then cross-entropy
        logits = model(input_ids=inputs, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    return model, loss


def measure(impl: str, shape_name: str, mode: str, steps: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    kind, shape = SHAPES[shape_name]
    baseline = _status_kib("VmRSS")
    torch.manual_seed(0)
    model, loss_fn = (build_hemat if impl == "hemat" else build_peft)(kind, shape, mode)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, fused=True)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, shape["vocab_size"], (BATCH, SEQ + 1), generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    times, losses = [], []
    for _ in range(steps + 1):  # the first step warms up (allocations, AdamW's state)
        start = time.perf_counter()
        loss = loss_fn(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {"trainable": sum(p.numel() for p in params), "total": sum(p.numel() for p in model.parameters()),
            "tokens_per_s": BATCH * SEQ / min(times[1:]), "peak_rss": _status_kib("VmHWM") * 1024,
            "baseline_rss": baseline * 1024, "first_loss": losses[0]}


def write_checkpoint(shape_name: str, path: str) -> None:
    """A random bf16 checkpoint of the shape, for transformers' from_pretrained to quantize while loading."""
    import torch
    import transformers

    _, shape = SHAPES[shape_name]
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM._from_config(transformers.Qwen2Config(**shape), dtype=torch.bfloat16)
    model.save_pretrained(path)


def run_one(impl: str, shape: str, mode: str, steps: int, checkpoint: str = "") -> dict | None:
    done = subprocess.run([sys.executable, __file__, "--measure", impl, shape, mode, str(steps)],
                          capture_output=True, text=True, env={**os.environ, "CHECKPOINT": checkpoint})
    if done.returncode != 0:
        print(f"  {impl} {mode} on {shape} failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["deepseek-tiny", "qwen2-small"], choices=list(SHAPES))
    parser.add_argument("--modes", nargs="+", default=["full", "lora", "qlora"], choices=["full", "lora", "qlora"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (the fastest counts: "
                                                                 "the least disturbed by other work on the machine)")
    parser.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        impl, shape, mode, steps = args.measure
        print(json.dumps(measure(impl, shape, mode, int(steps))))
        return
    print(f"seq {SEQ}, batch {BATCH}, AdamW, LoRA rank {RANK} (alpha {ALPHA}); full fine-tuning in fp32, LoRA "
          "over a bf16 base with fp32 adapters, QLoRA over int4 (hemat) / NF4 (peft + bitsandbytes); one process "
          "per row", flush=True)
    print("| shape | mode | trainable | hemat peak RSS | peft peak RSS | ratio | hemat tok/s | peft tok/s | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for shape in args.shapes:
        for mode in args.modes:
            if mode == "qlora" and SHAPES[shape][0] != "qwen2":
                continue
            with tempfile.TemporaryDirectory() as checkpoint:
                if mode == "qlora":
                    write_checkpoint(shape, checkpoint)
                ours = run_one("hemat", shape, mode, args.steps)
                theirs = run_one("peft", shape, mode, args.steps, checkpoint)
            if ours is None or theirs is None:
                continue
            gib = 2**30
            print(f"| {shape} | {mode} | {ours['trainable'] / 1e6:.2f}M of {ours['total'] / 1e6:.0f}M "
                  f"| {ours['peak_rss'] / gib:.2f} GiB | {theirs['peak_rss'] / gib:.2f} GiB "
                  f"| {ours['peak_rss'] / theirs['peak_rss']:.2f}x | {ours['tokens_per_s']:,.0f} "
                  f"| {theirs['tokens_per_s']:,.0f} | {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
