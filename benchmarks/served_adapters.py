"""The cost of serving several LoRA adapters at once (batched LoRA, hemat/infer/adapters.py): tokens/s of a
batch of streams on the base model alone (MLA folded, the adapter-free engine), on the multi-adapter engine
with every stream on the base, and on it with the streams spread over the adapters; side by side from one
run, rounds alternating, the best round of each row reported. Greedy, MTP off (random weights accept no
drafts), random weights of a preset (default cpu-tiny) with adapters of rank --rank on every linear
projection of the decoder layers.

    python benchmarks/served_adapters.py [--config cpu-tiny] [--adapters 4] [--rank 16] [--batch 8]
        [--prompt-tokens 32] [--new-tokens 64] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import hemat
from hemat.infer.adapters import prepare_with_adapters
from hemat.infer.engine import Engine
from hemat.infer.sampling import SamplingParams
from hemat.model.adapter_io import save_adapter
from hemat.model.lora import LoraConfig, add_adapters
from hemat.model.transformer import CausalLM
from hemat.presets import load_model_config

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
          "gate_proj", "up_proj", "down_proj")


def make_adapters(path: Path, n: int, rank: int, root: Path) -> dict[str, Path]:
    out = {}
    for i in range(n):
        torch.manual_seed(i + 1)
        model = hemat.from_pretrained(path)
        names = [t for t in LINEAR if any(name.endswith("." + t) for name, _ in model.named_modules())]
        add_adapters(model, LoraConfig(rank=rank, targets=tuple(names)))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        out[f"adapter-{i}"] = save_adapter(model, root / f"adapter-{i}")
    return out


def run(engine: Engine, prompts: list[list[int]], adapters: list[str | None], new_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    requests = [engine.submit(prompt_ids=p, params=params, adapter=a) for p, a in zip(prompts, adapters)]
    outs = [r.result() for r in requests]
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
    return len(prompts) * new_tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="cpu-tiny", help="preset or YAML to build a random model from")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice; 1 is steadier on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        torch.manual_seed(0)
        CausalLM(load_model_config(args.config)).save_pretrained(path)
        adapters = make_adapters(path, args.adapters, args.rank, Path(tmp))
        plain = Engine(hemat.from_pretrained(path), max_batch_size=args.batch, speculative="off")
        multi = Engine(prepare_with_adapters(hemat.from_pretrained(path), adapters), max_batch_size=args.batch,
                       speculative="off")
    config = plain.config
    print(f"model: {args.config} ({config.model_type}), {args.adapters} adapters of rank {args.rank}; batch "
          f"{args.batch}, prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy, "
          f"{torch.get_num_threads()} threads, best of {args.rounds} rounds")
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, config.vocab_size, (args.batch, args.prompt_tokens), generator=gen).tolist()
    names = list(adapters)
    mixed = [names[i % len(names)] for i in range(args.batch)]
    rows = {"base model alone (no adapters loaded)": (plain, [None] * args.batch),
            f"{args.adapters} adapters loaded, every stream on the base": (multi, [None] * args.batch),
            f"{args.adapters} adapters loaded, streams spread over them": (multi, mixed)}
    for engine, row_adapters in rows.values():  # warm-up
        run(engine, prompts[:2], row_adapters[:2], 4)
    best = dict.fromkeys(rows, 0.0)
    for _ in range(args.rounds):
        for name, (engine, row_adapters) in rows.items():
            best[name] = max(best[name], run(engine, prompts, row_adapters, args.new_tokens))
    first = next(iter(best.values()))
    for name, rate in best.items():
        print(f"{name:<50} {rate:8.1f} tokens/s  {rate / first:5.2f}x")


if __name__ == "__main__":
    main()
