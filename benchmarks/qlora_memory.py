"""QLoRA memory: peak resident memory and speed of LoRA training steps over an int4 or int8 base against a bf16
base, on DeepSeek-R1-Distill-Qwen-1.5B's shape (random weights), sequence length 512, batch 4, rank 16 on every
projection (and on the routed experts of a MoE shape), AdamW, gradient checkpointing, the cross-entropy over
`--loss-chunk` tokens at a time (what `hemat sft --set lora.quantize=int4 --set train.gradient_checkpointing=true
--set train.loss_chunk_tokens=512` runs). One fresh process per row; two peaks each (VmHWM, reset in between
through /proc/self/clear_refs): building the model in bf16 and quantizing it layer by layer, then the training
steps. MoE shapes: `deepseek-tiny` is the cpu-tiny preset's DeepSeek-V3 (without MTP); `deepseek-moe` a bigger
DeepSeek-V3 (hidden 1024, 4 layers, 64 routed experts of 512, top 6, 2 shared; 0.4B parameters).

`--kernels` times one projection of the shape for 2048 rows (a training micro-batch) both ways a quantized
base can multiply: the packed inference kernels (hemat.infer.quantize) and dequantizing per call + one matmul
(hemat.model.qlora, what training uses).

    PYTHONPATH=. python benchmarks/qlora_memory.py [--shape qwen2-1.5b|qwen2-small|deepseek-tiny|deepseek-moe|DIR]
        [--bases int4 bf16]
        [--steps 1] [--kernels]"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from finetune_memory import DEEPSEEK_TINY

SEQ, BATCH, RANK, ALPHA = 512, 4, 16, 32
DEEPSEEK_V3 = dict(model_type="deepseek_v3", **DEEPSEEK_TINY, num_nextn_predict_layers=0)
SHAPES = {
    "qwen2-1.5b": json.loads((Path(__file__).parent / "shapes" / "r1-distill-qwen-1.5b.json").read_text()),
    "qwen2-small": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                        num_hidden_layers=4, num_attention_heads=14, num_key_value_heads=2,
                        max_position_embeddings=32768, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1),
    "deepseek-tiny": DEEPSEEK_V3,
    "deepseek-moe": {**DEEPSEEK_V3, "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816,
                     "moe_intermediate_size": 512, "n_routed_experts": 64, "num_experts_per_tok": 6,
                     "n_shared_experts": 2, "n_group": 8, "topk_group": 4, "num_attention_heads": 8,
                     "num_key_value_heads": 8, "q_lora_rank": 512, "kv_lora_rank": 256, "qk_nope_head_dim": 64,
                     "qk_rope_head_dim": 32, "v_head_dim": 64},
}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return 1024 * next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def random_bf16_model(config):
    """Random weights in bf16, allocated the way from_pretrained allocates a model (on the meta device, then
    all at once in bf16) and filled a slice at a time, so no float32 temporary of a whole tensor shows in the peak."""
    import torch

    from hemat.model.hf import meta_model

    model = meta_model(config).to(torch.bfloat16)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                for part in p.view(-1).split(1 << 22):
                    part.normal_(std=config.initializer_range)
    model.reset_buffers()
    return model


def measure(shape: str, base: str, steps: int, loss_chunk: int) -> dict:
    import torch

    from hemat.model.config import ModelConfig
    from hemat.model.hf import from_pretrained
    from hemat.model.lora import LoraConfig, add_adapters
    from hemat.model.qlora import quantize_base
    from hemat.train.loop import lm_loss, recompute_in_backward

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    start = time.perf_counter()
    model = random_bf16_model(ModelConfig(**SHAPES[shape])) if shape in SHAPES else \
        from_pretrained(shape, dtype=torch.bfloat16)
    config = model.config
    if base != "bf16":
        quantize_base(model, base, 64)
    add_adapters(model, LoraConfig(rank=RANK, alpha=ALPHA))
    load_peak, load_s = _status_bytes("VmHWM"), time.perf_counter() - start
    model.train()
    for layer in model.model.layers:
        recompute_in_backward(layer)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    tokens = torch.randint(0, config.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    _reset_peak()
    times, losses = [], []
    for _ in range(steps):
        begin = time.perf_counter()
        loss = lm_loss(model, (tokens[:, :-1], tokens[:, 1:]), chunk=loss_chunk)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - begin)
        losses.append(loss.item())
    return {"load_peak": load_peak, "load_s": load_s, "train_peak": _status_bytes("VmHWM"),
            "step_s": min(times), "losses": losses, "trainable": sum(p.numel() for p in params)}


def kernels(shape: str) -> None:
    import torch

    from hemat.infer.quantize import Int4Linear, Int8Linear
    from hemat.model.qlora import FrozenQuantizedLinear

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    cfg = SHAPES[shape]
    out_features, in_features = cfg["intermediate_size"], cfg["hidden_size"]
    weight = torch.randn(out_features, in_features) * 0.02
    x = torch.randn(BATCH * SEQ, in_features, dtype=torch.bfloat16)

    def best(fn) -> float:
        fn()
        return min(_timed(fn) for _ in range(3))

    print(f"one {in_features}→{out_features} projection, {BATCH * SEQ} bf16 rows (ms, fastest of 3)")
    print("| format | packed inference kernel | dequantize + matmul (training) | ratio |\n| --- | --- | --- | --- |")
    for fmt, packed in (("int8", Int8Linear(weight, None)), ("int4", Int4Linear(weight, None, 64))):
        frozen = FrozenQuantizedLinear(weight, None, fmt, 64)
        a, b = best(lambda: packed(x)), best(lambda: frozen(x))
        print(f"| {fmt} | {a * 1e3:.0f} | {b * 1e3:.0f} | {a / b:.1f}x |", flush=True)
    dense = weight.bfloat16()
    print(f"| bf16 (reference) | | {best(lambda: torch.nn.functional.linear(x, dense)) * 1e3:.0f} | |")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen2-1.5b",
                        help=f"{' or '.join(SHAPES)} (random weights), or a checkpoint directory (read in bf16)")
    parser.add_argument("--bases", nargs="+", default=["int4", "int8", "bf16"], choices=["int4", "int8", "bf16"])
    parser.add_argument("--steps", type=int, default=1, help="training steps (AdamW's state exists after the first)")
    parser.add_argument("--loss-chunk", type=int, default=512, help="tokens per cross-entropy chunk")
    parser.add_argument("--kernels", action="store_true", help="time the two matmul paths instead")
    parser.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        shape, base, steps, chunk = args.measure
        print(json.dumps(measure(shape, base, int(steps), int(chunk))))
        return
    if args.kernels:
        kernels(args.shape)
        return
    print(f"{args.shape}, seq {SEQ}, batch {BATCH}, LoRA rank {RANK} on every projection, AdamW, gradient "
          f"checkpointing, loss chunk {args.loss_chunk}; {os.environ.get('THREADS', '2')} threads; one process per row")
    print("| base | peak RSS, build + quantize | peak RSS, training | s/step | tokens/s | first loss |\n"
          "| --- | --- | --- | --- | --- | --- |", flush=True)
    for base in args.bases:
        done = subprocess.run([sys.executable, __file__, "--measure", args.shape, base, str(args.steps),
                               str(args.loss_chunk)], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"| {base} | failed: {done.stderr.strip().splitlines()[-1:]} | | | | |", flush=True)
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {base} | {r['load_peak'] / 2**30:.2f} GiB | {r['train_peak'] / 2**30:.2f} GiB | {r['step_s']:.1f} "
              f"| {BATCH * SEQ / r['step_s']:.0f} | {r['losses'][0]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
