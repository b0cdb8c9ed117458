"""GPU benchmark (issue 7): hemat against transformers' DeepseekV3ForCausalLM on the GPU reference config
(hemat/configs/gpu-reference.yaml: hidden 1024, 12 layers, MLA, 32 routed + 2 shared experts top-4, vocab
32768), on one GPU, in under five minutes. Nothing is downloaded: a random model is built, saved, and
loaded by both sides, so both run the same weights.

- MFU is against a bf16 matmul rate measured here (a large square matmul), with FLOPs per token from
  hemat.cost (6·N_active + attention; no MTP term: hemat's MTP loss is off, the same work as transformers).
- Training: batch 8 × 2048, bf16 autocast over fp32 master weights, fused AdamW, grad clip 1.0, the same
  batches on every side (a learnable synthetic token stream, so the loss curves mean something).
  Rows: transformers; hemat bf16 and hemat FP8 (block-wise scaled forward GEMMs, hemat/model/fp8.py),
  eager, then compiled per decoder layer while the time budget lasts. The FP8 and bf16 runs start from
  the same weights and see the same batches; their loss curves are printed (and plotted with --out).
- Decode: prompt 128, 128 new tokens, greedy, EOS ignored, prefill included, at batch 1 and 32: hemat's
  engine (CUDA graphs for the decode step; with MTP drafts too, when the checkpoint has MTP layers; a
  random model's drafts are rarely accepted) and transformers `generate`; KV-cache bytes per token.

Each section runs under its share of a hard time budget (SIGALRM); a failing or late section prints its
error in the table and the others still run. The table is printed last; --out also writes it as markdown
(and the loss curves as PNG next to it). --tiny runs the same code on CPU with a tiny model in seconds
(fp32, FP8 emulated, the decode step's bucketed static-shape path run eagerly).

    python benchmarks/gpu_bench.py [--out benchmarks/results/gpu-h200.md] [--budget 270] [--tiny]
        [--compile auto|on|off] [--fp8 on|off] [--cuda-graphs auto|eager|off] [--steps 30]
"""

from __future__ import annotations

import argparse
import gc
import signal
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

import hemat
from hemat import cost
from hemat.infer.engine import Engine
from hemat.infer.sampling import SamplingParams
from hemat.model import fp8
from hemat.model.config import ModelConfig
from hemat.model.params import count_parameters
from hemat.model.transformer import CausalLM
from hemat.presets import load_model_config
from hemat.train.config import TrainConfig
from hemat.train.loop import Trainer
from hemat.train.schedule import lr_factor
from train_throughput import RandomBatches  # this directory's sibling script: the same batch source

TINY = dict(
    model_type="deepseek_v3", vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2,
    num_experts_per_tok=2, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
    v_head_dim=32, first_k_dense_replace=1, max_position_embeddings=512, num_nextn_predict_layers=1,
)
GOALS = {"train_ratio": 2.5, "mfu": 0.45, "decode_1": 10.0, "decode_32": 5.0}  # the issue's goals


@dataclass
class Setup:
    config: ModelConfig
    device: torch.device
    path: Path  # the saved random checkpoint
    tmp: Path
    batch: int
    seq: int
    steps: int
    warmup: int  # untimed first steps
    amp: torch.dtype | None  # autocast dtype (None: fp32)
    decode_batches: tuple[int, int]
    prompt: int
    new_tokens: int
    graphs: str
    peak: float = 0.0  # measured matmul FLOP/s
    pool: torch.Tensor | None = None  # training batches [steps, batch, seq + 1]
    results: dict = field(default_factory=dict)


# ---- time budget ------------------------------------------------------------------------------------
class SectionTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    """Raise SectionTimeout in the main thread after `seconds` (SIGALRM, so even a long compile stops)."""
    def expire(signum, frame):
        raise SectionTimeout(f"stopped at its time limit ({seconds:.0f} s)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def section(setup: Setup, name: str, deadline: float, need: float, cap: float, run) -> None:
    """results[name] = run(stop_at), within min(cap, what is left) seconds; skipped below `need`;
    an exception becomes the row's error, and the benchmark goes on."""
    left = deadline - time.monotonic()
    if left < need:
        setup.results[name] = {"error": f"skipped: {left:.0f} s of the budget left, ~{need:.0f} s needed"}
        print(f"[{name}] {setup.results[name]['error']}", flush=True)
        return
    limit = min(cap, left)
    print(f"[{name}] running (at most {limit:.0f} s)", flush=True)
    started = time.monotonic()
    try:
        with time_limit(limit):
            setup.results[name] = run(started + 0.8 * limit)
    except Exception as e:
        if not isinstance(e, SectionTimeout):
            traceback.print_exc()
        first_line = (str(e).strip().splitlines() or [""])[0][:160]
        setup.results[name] = {"error": f"{type(e).__name__}: {first_line}"}
    print(f"[{name}] {time.monotonic() - started:.1f} s: "
          f"{ {k: v for k, v in setup.results[name].items() if k != 'losses'} }", flush=True)
    gc.collect()
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- measurements -----------------------------------------------------------------------------------
def matmul_flops(device: torch.device, dtype: torch.dtype, size: int, seconds: float) -> float:
    """FLOP/s of a square matmul repeated for `seconds` (the MFU denominator)."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or count < 3:
        for _ in range(10):
            a @ b
        count += 10
        sync(device)
    return 2 * size**3 * count / elapsed


def markov_tokens(vocab: int, rows: int, length: int, seed: int = 0) -> torch.Tensor:
    """A learnable token stream: each token is followed by one of 4 fixed successors, chosen at random
    (the best achievable loss is ln 4 ≈ 1.39)."""
    gen = torch.Generator().manual_seed(seed)
    successors = torch.randint(vocab, (vocab, 4), generator=gen)
    choice = torch.randint(4, (rows, length), generator=gen)
    out = torch.empty(rows, length, dtype=torch.long)
    out[:, 0] = torch.randint(vocab, (rows,), generator=gen)
    for i in range(1, length):
        out[:, i] = successors[out[:, i - 1], choice[:, i]]
    return out


def timed_steps(setup: Setup, step, stop_at: float) -> dict:
    """Run step(i) → loss for setup.steps steps (fewer past stop_at); tokens/s over the median timed step."""
    times, losses = [], []
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(setup.device)
    for i in range(setup.steps):
        sync(setup.device)
        start = time.perf_counter()
        losses.append(step(i))
        sync(setup.device)
        times.append(time.perf_counter() - start)
        if time.monotonic() > stop_at and len(times) > setup.warmup:
            break
    timed = times[setup.warmup:] or times[-1:]
    tokens_per_s = setup.batch * setup.seq / statistics.median(timed)
    flops = cost.flops_per_token(setup.config, setup.seq, include_mtp=False)
    out = {"tokens_per_s": tokens_per_s, "mfu": flops * tokens_per_s / setup.peak, "losses": losses,
           "steps": f"{len(timed)} timed + {len(times) - len(timed)} warm-up", "first_step_s": times[0]}
    if setup.device.type == "cuda":
        out["peak_gb"] = torch.cuda.max_memory_allocated(setup.device) / 1e9
    return out


def train_config(setup: Setup, **overrides) -> TrainConfig:
    values = dict(steps=setup.steps, seq_len=setup.seq, batch_tokens=setup.batch * setup.seq,
                  micro_batch_size=setup.batch, optimizer="adamw", lr=1e-3, warmup_steps=5, schedule="constant",
                  weight_decay=0.1, grad_clip=1.0, mtp_weight=0.0, device=setup.device.type,
                  dtype="bfloat16" if setup.amp == torch.bfloat16 else "float32", progress=False,
                  peak_tflops=setup.peak / 1e12, price_per_hour=1.0, inject_nan_steps=[])
    config = TrainConfig(**{**values, **overrides})
    config.validate()
    return config


def train_hemat(setup: Setup, stop_at: float, *, use_fp8: bool, compile: bool) -> dict:
    model = hemat.from_pretrained(setup.path)
    emulate = use_fp8 and setup.device.type != "cuda"  # CPU: the same FP8 module, its GEMM emulated
    config = train_config(setup, fp8=use_fp8 and not emulate, compile=compile)
    trainer = Trainer(model, config, setup.tmp / "run", RandomBatches(setup.pool))
    converted = fp8.convert_to_fp8(trainer.model) if emulate else [
        n for n, m in trainer.model.named_modules() if isinstance(m, fp8.FP8Linear)]
    trainer._start = time.perf_counter()  # fit() sets this clock; the step's cost record reads it
    out = timed_steps(setup, lambda i: trainer._train_step()["loss"], stop_at)
    notes = [f"{len(converted)} projections in FP8" + (" (emulated on CPU)" if emulate else "")] if use_fp8 else []
    notes += [f"first step (compiling) {out['first_step_s']:.0f} s"] if compile else []
    out["note"] = "; ".join(notes)
    return out


def train_transformers(setup: Setup, stop_at: float) -> dict:
    import transformers

    model = transformers.DeepseekV3ForCausalLM.from_pretrained(setup.path).to(setup.device).train()
    config = train_config(setup)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps, fused=True)
    source = RandomBatches(setup.pool)
    autocast = torch.autocast(setup.device.type, dtype=setup.amp) if setup.amp else nullcontext()

    def step(i: int) -> float:
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(i, config.steps, config.warmup_steps, config.schedule)
        inputs, _ = source.next_batch()
        inputs = inputs.to(setup.device)
        with autocast:
            loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return timed_steps(setup, step, stop_at)


def prompts(setup: Setup, batch: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, setup.config.vocab_size, (batch, setup.prompt), generator=gen).tolist()


def decode_hemat(setup: Setup, stop_at: float, model, batch: int, speculative: str) -> dict:
    engine = Engine(model, None, max_batch_size=batch, speculative=speculative, cuda_graphs=setup.graphs,
                    cache_tokens=batch * (setup.prompt + setup.new_tokens + 64))
    params = SamplingParams(temperature=0.0, max_tokens=setup.new_tokens, ignore_eos=True)
    engine.generate(prompts(setup, batch, seed=1), params)  # warm-up: captures the CUDA graphs it uses
    rates = []
    for seed in (2, 3):  # fresh prompts each round: no prefix-cache hits
        sync(setup.device)
        start = time.perf_counter()
        outs = engine.generate(prompts(setup, batch, seed), params)
        sync(setup.device)
        assert all(len(o.outputs[0].token_ids) == setup.new_tokens for o in outs)
        rates.append(batch * setup.new_tokens / (time.perf_counter() - start))
        if time.monotonic() > stop_at:
            break
    stats, static = engine.stats(), engine.static_decode
    if static is None:
        step = "eager"
    elif not static.enabled:
        step = "eager (graph capture failed, see the warning above)"
    else:
        step = f"{stats['decode_graphs']} CUDA graph(s)" if static.capture else "bucketed static step, eager"
    out = {"tokens_per_s": max(rates), "kv_bytes_per_token": stats["kv_bytes_per_token"], "step": step}
    if speculative != "off":
        out["acceptance"] = stats.get("spec_acceptance_rate")
    return out


def decode_transformers(setup: Setup, stop_at: float, model, batch: int) -> dict:
    ids = torch.tensor(prompts(setup, batch, seed=2), device=setup.device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, return_dict_in_generate=True)
    with torch.inference_mode():
        model.generate(ids[:, :8], max_new_tokens=4, **kwargs)  # warm-up
        sync(setup.device)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=setup.new_tokens, **kwargs)
        sync(setup.device)
    elapsed = time.perf_counter() - start
    assert out.sequences.shape[1] == setup.prompt + setup.new_tokens
    cache = out.get("cache") or out.past_key_values
    total = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return {"tokens_per_s": batch * setup.new_tokens / elapsed,
            "kv_bytes_per_token": total / (batch * cache.layers[0].keys.shape[-2])}


# ---- the report -------------------------------------------------------------------------------------
def fmt(value, spec: str = ",.0f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def cell(result: dict | None, key: str, spec: str = ",.0f", suffix: str = "") -> str:
    if result is None:
        return "-"
    if "error" in result:
        return result["error"]
    return fmt(result.get(key), spec, suffix)


def ratio(a: dict | None, b: dict | None, key: str = "tokens_per_s") -> float | None:
    if not a or not b or key not in a or key not in b:
        return None
    return a[key] / b[key]


def report(setup: Setup, header: list[str]) -> str:
    r = setup.results
    hf = r.get("train transformers")
    lines = header + ["", f"Training: batch {setup.batch} × {setup.seq}, {'bf16 autocast' if setup.amp else 'fp32'} "
                      "(fp8: FP8 forward GEMMs of the big projections), fused AdamW", "",
                      "| run | tokens/s | MFU | peak GB | vs transformers | note |", "|---|---|---|---|---|---|"]
    best = None
    for name in ("train transformers", "train hemat", "train hemat fp8", "train hemat compiled",
                 "train hemat fp8 compiled"):
        if name not in r:
            continue
        x, rel = r[name], ratio(r[name], hf)
        faster = best is None or x.get("tokens_per_s", 0) > best["tokens_per_s"]
        if name != "train transformers" and "tokens_per_s" in x and faster:
            best = x
        lines.append(f"| {name.removeprefix('train ')} | {cell(x, 'tokens_per_s')} | {cell(x, 'mfu', '.1%')} | "
                     f"{cell(x, 'peak_gb', '.1f')} | {fmt(rel, '.2f', '×')} | {x.get('note', '')} |")
    batches = setup.decode_batches
    lines += ["", f"Decode: prompt {setup.prompt}, {setup.new_tokens} new tokens, greedy, tokens/s (prefill included)",
              "",
              f"| run | batch {batches[0]} | batch {batches[1]} | vs transformers | KV bytes/token | note |",
              "|---|---|---|---|---|---|"]
    for label, key in (("transformers generate", "transformers"), ("hemat engine", "hemat"),
                       ("hemat engine + MTP drafts", "hemat mtp")):
        small, large = r.get(f"decode {key} b{batches[0]}"), r.get(f"decode {key} b{batches[1]}")
        if small is None and large is None:
            continue
        rel = [ratio(x, r.get(f"decode transformers b{b}")) for x, b in ((small, batches[0]), (large, batches[1]))]
        note = []
        for x, b in ((small, batches[0]), (large, batches[1])):
            if x and "tokens_per_s" in x and "step" in x:
                accepted = f", MTP acceptance {x['acceptance']:.0%}" if x.get("acceptance") is not None else ""
                note.append(f"b{b}: {x['step']}{accepted}")
        note = "; ".join(note)
        kv = next((x["kv_bytes_per_token"] for x in (small, large) if x and "kv_bytes_per_token" in x), None)
        lines.append(f"| {label} | {cell(small, 'tokens_per_s')} | {cell(large, 'tokens_per_s')} | "
                     f"{fmt(rel[0], '.1f', '×')} / {fmt(rel[1], '.1f', '×')} | {fmt(kv)} | {note} |")
    def decode_ratio(b: int) -> float | None:
        return ratio(r.get(f"decode hemat b{b}"), r.get(f"decode transformers b{b}"))

    checks = [("training ≥ 2.5× transformers", ratio(best, hf), GOALS["train_ratio"], ".2f", "×"),
              ("training MFU ≥ 45%", best.get("mfu") if best else None, GOALS["mfu"], ".1%", ""),
              (f"decode batch {batches[0]} ≥ 10×", decode_ratio(batches[0]), GOALS["decode_1"], ".1f", "×"),
              (f"decode batch {batches[1]} ≥ 5×", decode_ratio(batches[1]), GOALS["decode_32"], ".1f", "×")]
    lines += ["", "Goals (issue 7): " + "; ".join(
        f"{name}: {fmt(value, spec, suffix)} {'met' if value is not None and value >= goal else 'NOT met'}"
        for name, value, goal, spec, suffix in checks)]
    return "\n".join(lines)


def loss_table(setup: Setup) -> tuple[str, dict]:
    curves = {name.removeprefix("train "): setup.results[name]["losses"] for name in
              ("train hemat", "train hemat fp8", "train transformers")
              if "losses" in setup.results.get(name, {})}
    if not curves:
        return "", curves
    names = list(curves)
    lines = ["Loss per step (same initial weights, same batches):", "",
             "| step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i in range(max(len(c) for c in curves.values())):
        values = (fmt(c[i] if i < len(c) else None, ".4f") for c in curves.values())
        lines.append(f"| {i + 1} | " + " | ".join(values) + " |")
    return "\n".join(lines), curves


def plot(curves: dict, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("hemat FP8 vs hemat and transformers (same weights, same batches)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---- main -------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU, the same code, in seconds")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here, and the loss curves as PNG")
    parser.add_argument("--budget", type=float, default=None, help="seconds for everything (default 270; tiny 60)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 30; tiny 6)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="add compiled hemat training rows (auto: on CUDA, while the budget lasts)")
    parser.add_argument("--fp8", choices=("on", "off"), default="on", help="the hemat FP8 training rows")
    parser.add_argument("--cuda-graphs", choices=("auto", "eager", "off"), default=None,
                        help="the engine's decode step (default: auto on CUDA, eager with --tiny)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 with --tiny)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        print("no CUDA device: run with --tiny for the CPU check of this script", file=sys.stderr)
        return 2
    if args.threads or args.tiny:
        torch.set_num_threads(args.threads or 1)
    budget = args.budget or (60.0 if args.tiny else 270.0)
    deadline = time.monotonic() + budget - (2 if args.tiny else 10)  # room to print and write the report
    import transformers

    transformers.logging.set_verbosity_error()  # the MTP weights transformers does not load are expected
    config = ModelConfig(**TINY) if args.tiny else load_model_config("gpu-reference")
    device = torch.device("cuda" if cuda else "cpu")
    use_compile = args.compile == "on" or (args.compile == "auto" and cuda)

    with tempfile.TemporaryDirectory() as tmp:
        setup = Setup(config=config, device=device, path=Path(tmp) / "model", tmp=Path(tmp),
                      batch=8 if cuda else 2, seq=2048 if cuda else 64, steps=args.steps or (30 if cuda else 6),
                      warmup=5 if cuda else 2, amp=torch.bfloat16 if cuda else None,
                      decode_batches=(1, 32) if cuda else (1, 4), prompt=128 if cuda else 16,
                      new_tokens=128 if cuda else 16, graphs=args.cuda_graphs or ("auto" if cuda else "eager"))
        setup.peak = matmul_flops(device, torch.bfloat16 if cuda else torch.float32, 8192 if cuda else 256,
                                  1.0 if cuda else 0.2)
        torch.manual_seed(0)
        with device:  # initialised on the device: seconds, not a minute, for 700M parameters
            CausalLM(config).save_pretrained(setup.path)
        setup.pool = markov_tokens(config.vocab_size, setup.steps * setup.batch, setup.seq + 1).view(
            setup.steps, setup.batch, setup.seq + 1)
        dtype_name = "bf16" if cuda else "fp32"
        name = torch.cuda.get_device_name(device) if cuda else "CPU"
        counts = count_parameters(config)
        header = [f"# hemat GPU benchmark{' (--tiny, CPU)' if args.tiny else ''}", "",
                  f"{name}; torch {torch.__version__}, transformers {transformers.__version__}; "
                  f"measured {dtype_name} matmul {setup.peak / 1e12:,.1f} TFLOP/s; model "
                  f"{counts.total / 1e6:,.0f}M parameters, {counts.active / 1e6:,.0f}M active; training FLOPs/token "
                  f"{cost.flops_per_token(config, setup.seq, include_mtp=False) / 1e9:.2f} G"]
        print(header[-1], flush=True)

        cap_train = 60 if cuda else 30
        section(setup, "train transformers", deadline, 15, cap_train, lambda stop: train_transformers(setup, stop))
        section(setup, "train hemat", deadline, 10, cap_train,
                lambda stop: train_hemat(setup, stop, use_fp8=False, compile=False))
        if args.fp8 == "on":
            section(setup, "train hemat fp8", deadline, 10, cap_train,
                    lambda stop: train_hemat(setup, stop, use_fp8=True, compile=False))

        models = {}  # the decode models, loaded by the first section that needs them
        decode_dtype = torch.bfloat16 if cuda else torch.float32

        def hemat_model():
            if "hemat" not in models:
                models["hemat"] = hemat.from_pretrained(setup.path, device=device, dtype=decode_dtype).eval()
            return models["hemat"]

        def hf_model():
            if "hf" not in models:
                reference = transformers.DeepseekV3ForCausalLM.from_pretrained(setup.path).to(device, decode_dtype)
                reference.generation_config.eos_token_id = None  # both sides generate exactly new_tokens
                reference.generation_config.pad_token_id = 0
                models["hf"] = reference.eval()
            return models["hf"]

        decode_cap = 40 if cuda else 15
        for b in setup.decode_batches:
            section(setup, f"decode hemat b{b}", deadline, 5, decode_cap,
                    lambda stop: decode_hemat(setup, stop, hemat_model(), b, "off"))
        for b in setup.decode_batches:
            section(setup, f"decode transformers b{b}", deadline, 10, decode_cap,
                    lambda stop: decode_transformers(setup, stop, hf_model(), b))
        models.pop("hf", None)
        if config.num_nextn_predict_layers:
            for b in setup.decode_batches:
                section(setup, f"decode hemat mtp b{b}", deadline, 5, decode_cap,
                        lambda stop: decode_hemat(setup, stop, hemat_model(), b, "mtp"))
        models.clear()

        if use_compile:  # last: compiling takes the longest and is cut by the budget first
            section(setup, "train hemat compiled", deadline, 45, 150,
                    lambda stop: train_hemat(setup, stop, use_fp8=False, compile=True))
            if args.fp8 == "on":
                section(setup, "train hemat fp8 compiled", deadline, 45, 150,
                        lambda stop: train_hemat(setup, stop, use_fp8=True, compile=True))

    losses, curves = loss_table(setup)
    table = report(setup, header)
    if losses:
        print("\n" + losses)
    print("\n" + table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n\n" + losses + "\n")
        png = args.out.with_name(args.out.stem + "-loss.png")
        plotted = bool(curves) and plot(curves, png)
        print(f"\nwrote {args.out}" + (f" and {png}" if plotted else " (no loss plot: no curves or no matplotlib)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
