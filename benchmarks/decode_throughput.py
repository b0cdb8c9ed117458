"""Decode throughput: hemat's engine against transformers' `generate` on the same checkpoint.

Builds a random model from a preset (default cpu-tiny), saves it, loads it in both, then alternates the
contenders in one run at each batch size (greedy, fixed prompt and output lengths, EOS ignored on all
sides, prefill included in the time): transformers, hemat's plain decoding and, when the checkpoint
carries MTP layers, MTP speculative decoding with k = 1, 2, 3 chained drafts and with "auto" (per-sequence
chain lengths), the engine's default speculative="auto" (drafting only where measured to pay), and with
--compile the plain decode step and each MTP setting's draft-and-verify round compiled by torch.compile
(their buckets compiled before the timing, the compile time printed, their greedy tokens checked against
plain decoding's). Prints
wall-clock tokens/s, each one's ratio to plain decoding (and the hemat/transformers ratio of tokens per
second of process CPU time, less disturbed by other load on a shared machine), the draft acceptance and
tokens per round, and KV-cache bytes per token. A random model's drafts are rarely right: measure MTP
on a trained checkpoint (the speedrun's `pretrain/checkpoints/step-500`).

    python benchmarks/decode_throughput.py [--config cpu-tiny | --checkpoint DIR] [--draft-tokens 1,2,3,auto] [--compile] [--quick]
    python benchmarks/decode_throughput.py --config benchmarks/shapes/smollm-135m.json   # a 135M llama
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import hemat
from hemat.infer.engine import Engine
from hemat.infer.sampling import SamplingParams
from hemat.model.transformer import CausalLM
from hemat.presets import load_model_config


def hf_kv_bytes_per_token(cache, batch: int) -> float:
    """Bytes transformers' DynamicCache holds per token (all layers, keys and values)."""
    total, length = 0, 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            total += t.numel() * t.element_size()
        length = layer.keys.shape[-2]
    return total / (batch * length)


def time_hf(model, prompts: torch.Tensor, new_tokens: int) -> tuple[float, float, float]:
    """(tokens/s wall-clock, tokens/s of process CPU time, KV bytes per token)."""
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                             do_sample=False, return_dict_in_generate=True)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert out.sequences.shape[1] == prompts.shape[1] + new_tokens
    tokens = prompts.shape[0] * new_tokens
    kv = hf_kv_bytes_per_token(out.get("cache") or out.past_key_values, prompts.shape[0])
    return tokens / elapsed, tokens / cpu, kv


def time_hemat(engine: Engine, prompts: torch.Tensor, new_tokens: int) -> tuple[float, float, list]:
    """(tokens/s wall-clock, tokens/s of process CPU time, the generated token ids)."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    start, cpu = time.perf_counter(), time.process_time()
    outs = engine.generate(prompts.tolist(), params)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
    tokens = prompts.shape[0] * new_tokens
    return tokens / elapsed, tokens / cpu, [o.outputs[0].token_ids for o in outs]


def compiled_engine(model, batch: int, span: int, draft_tokens=None) -> Engine:
    """An engine with the compiled decode step (plain, or MTP rounds of draft_tokens drafts), the buckets of
    this run compiled first (timed apart)."""
    engine = Engine(model, max_batch_size=batch, speculative="mtp" if draft_tokens else "off",
                    num_speculative_tokens=draft_tokens, compile_decode=True)
    compiled = engine.compiled_steps
    if draft_tokens:
        drafts = range(1, engine.drafter.max_tokens + 1) if draft_tokens == "auto" else [draft_tokens]
        for n in drafts:
            compiled.queue((*engine.drafter.bucket(batch, span), n))
    else:
        compiled.queue(engine.static_decode.bucket(batch, span))
    compiled.wait()
    stats = engine.stats()
    print(f"           compiled {'MTP k=' + str(draft_tokens) if draft_tokens else 'plain'}: "
          f"{stats['decode_compiled_buckets']} bucket(s) in {stats['decode_compile_s']:.1f} s"
          + (" (FAILED: eager)" if stats["decode_compile_failed"] else ""))
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="cpu-tiny", help="preset or YAML to build a random model from")
    parser.add_argument("--checkpoint", help="an existing checkpoint directory instead of a random model")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds per batch size; the best round of each side is reported, the "
                        "least disturbed by other load on a shared machine")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice; 1 is steadier on a shared machine)")
    parser.add_argument("--draft-tokens", default="1,2,3,auto",
                        help="MTP draft counts to compare with plain decoding ('': none)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the decode step and the MTP rounds compiled by torch.compile")
    parser.add_argument("--quick", action="store_true", help="a short run: 32 new tokens, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.rounds, args.prompt_tokens = 32, 1, 32
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()  # the MTP weights transformers does not load are expected
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.checkpoint) if args.checkpoint else Path(tmp) / "model"
        if not args.checkpoint:
            torch.manual_seed(0)
            CausalLM(load_model_config(args.config)).save_pretrained(path)
        model = hemat.from_pretrained(path)
        reference = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
    reference.generation_config.eos_token_id = None  # both sides generate exactly new_tokens
    reference.generation_config.pad_token_id = 0
    config = model.config
    print(f"model: {config.model_type}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{config.num_hidden_layers} layers, MTP depth {len(model.mtp_layers)}; threads {torch.get_num_threads()}")
    print(f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, {args.rounds} round(s), greedy")

    gen = torch.Generator().manual_seed(0)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    drafts = [d if d == "auto" else int(d) for d in args.draft_tokens.split(",") if d] if model.mtp_layers else []
    hf_kv = None
    for batch in batches:
        prompts = torch.randint(2, config.vocab_size, (batch, args.prompt_tokens), generator=gen)
        engine = Engine(model, max_batch_size=batch, speculative="off")
        engines = {"plain": engine, **{f"MTP k={d}": Engine(model, max_batch_size=batch, speculative="mtp",
                                                            num_speculative_tokens=d) for d in drafts}}
        if drafts:  # the engine's default: drafts where its DraftGate measures them to pay
            engines["speculative auto"] = Engine(model, max_batch_size=batch, speculative="auto")
        if args.compile:
            span = args.prompt_tokens + args.new_tokens + 4  # and the verify positions of up to 3 drafts
            engines["compiled"] = compiled_engine(model, batch, span)
            engines.update({f"MTP k={d} compiled": compiled_engine(model, batch, span, d) for d in drafts})
        time_hf(reference, prompts[:, :8], 4)  # warm up every contender
        for e in engines.values():
            time_hemat(e, prompts[:, :8], 4)
        names = ["transformers", *engines]
        rates = {name: [] for name in names}
        outputs = {}
        for r in range(args.rounds):  # rotate the order so that machine drift weighs on every contender
            for name in names[r % len(names):] + names[: r % len(names)]:
                if name == "transformers":
                    *rate, hf_kv = time_hf(reference, prompts, args.new_tokens)
                    rates[name].append(rate)
                else:
                    *rate, outputs[name] = time_hemat(engines[name], prompts, args.new_tokens)
                    rates[name].append(rate)
        best = {name: tuple(max(x[i] for x in rates[name]) for i in (0, 1)) for name in names}
        plain = best["plain"][0]
        hf_rate, hf_cpu = best["transformers"]
        print(f"batch {batch:3d}: transformers {hf_rate:9.1f} tok/s | hemat {plain:9.1f} tok/s | "
              f"ratio {plain / hf_rate:5.2f}x  (per CPU second: {best['plain'][1] / hf_cpu:5.2f}x)")
        for name in engines:
            if name == "plain":
                continue
            stats, line = engines[name].stats(), f"           {name:18s} {best[name][0]:9.1f} tok/s = " \
                f"{best[name][0] / plain:5.2f}x plain (per CPU second: {best[name][1] / best['plain'][1]:5.2f}x)"
            if name == "speculative auto":
                line += f", {stats['spec_rounds']:,} of its rows' decode steps drafted"
            if name.startswith("MTP"):
                rounds = 1 + stats["spec_accepted"] / max(stats["spec_rounds"], 1)
                line += (f", acceptance {stats['spec_acceptance_rate']:.1%} ({stats['spec_accepted']}/"
                         f"{stats['spec_drafted']} drafts), {rounds:.2f} tokens per round")
            if name.endswith("compiled"):
                same = "identical" if outputs[name] == outputs["plain"] else "DIFFERENT"
                line += (f"; vs transformers {best[name][0] / hf_rate:5.2f}x, greedy tokens {same}, "
                         f"{stats['decode_compiled_steps']} compiled steps")
            print(line)

    kv = engine.cache.bytes_per_token
    element = torch.empty(0, dtype=model.dtype).element_size()
    print(f"KV cache bytes per token: hemat {kv:,} | transformers {hf_kv:,.0f} (transformers / hemat = {hf_kv / kv:.2f})")
    if config.is_mla:
        expected = (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers * element
        verdict = "equal" if kv == expected else "NOT equal"
        print(f"  (kv_lora_rank {config.kv_lora_rank} + qk_rope_head_dim {config.qk_rope_head_dim}) x "
              f"{config.num_hidden_layers} layers x {element} bytes = {expected:,}: {verdict}")
        if drafts:
            print(f"  the MTP layer's entries add {engines[f'MTP k={drafts[0]}'].cache.mtp_bytes_per_token:,} bytes "
                  "per token when drafting")


if __name__ == "__main__":
    main()
