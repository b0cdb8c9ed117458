"""Local decode on a CPU: transformers (fp32, bf16) and hemat (fp32, bf16, int8, int4) side by side on one
checkpoint, the same prompts, greedy, the same thread count. Each row runs in its own process, so that
its resident memory is its own. Columns: decode tokens/s at each batch size (time to the last token minus
time to the first, over the tokens in between), time to the first token at batch 1 (the prompt's
prefill), resident memory, and the bytes of weights. Batch-1 decode is bounded by the bytes of
weights read per token over the memory bandwidth, measured here by a sum over 1 GiB.

    python benchmarks/local_decode.py [--shape r1-distill-qwen-1.5b | --shape smollm-135m | --model DIR]
        [--rows hemat-int4,llama.cpp-q4_0,...] [--batch-sizes 1,8] [--prompt-tokens 512] [--new-tokens 128]

The llama.cpp rows run hemat's own `export-gguf` file (q8_0, q4_0) through llama-cpp-python, which has no
binary wheel for most CPUs: `bash benchmarks/setup_llama_cpp.sh` builds it from its source package (about
15 minutes on 2 cores). Without it those rows are skipped with a note. llama-cpp-python decodes one
sequence at a time through its high-level API, so its rows have batch 1 only. A hemat row named with
`+compile` (e.g. hemat-int4+compile) decodes through the compiled step, compiled before the timing; with
`+torch` (e.g. hemat-int4+torch), int8/int4 run PyTorch's weight-only packed kernels instead of hemat's native
kernels (HEMAT_NATIVE_KERNELS=0).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {path.stem: path for path in (Path(__file__).parent / "shapes").glob("*.json")}  # random weights of these
ROWS = ("transformers-fp32", "transformers-bf16", "hemat-fp32", "hemat-bf16", "hemat-int8", "hemat-int4",
        "llama.cpp-q8_0", "llama.cpp-q4_0")


def memory_gb() -> tuple[float, float]:
    """(resident, peak resident) GiB of this process."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[k].split()[0]) / 1024**2 for k in ("VmRSS", "VmHWM"))


def bandwidth_gbs() -> float:
    """Memory read bandwidth: the best of a few sums over 1 GiB."""
    x = torch.ones(256 * 1024**2)
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return best


# ---- one row, in a child process -------------------------------------------------------------------------
def load_row(row: str, path: Path, group_size: int, max_tokens: int, threads: int):
    """→ (generate(prompts, new_tokens), weight bytes, cache_bytes() → the KV cache bytes held, None where the
    library does not say); hemat's cache holds max_tokens per sequence."""
    library, fmt = row.split("+")[0].split("-")
    if library == "llama.cpp":
        return load_llama_cpp(path / f"model-{fmt}.gguf", max_tokens, threads)
    if library == "transformers":
        import transformers

        transformers.logging.set_verbosity_error()
        dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0

        def generate(prompts: torch.Tensor, new_tokens: int) -> None:
            with torch.inference_mode():
                model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False)

        return generate, sum(p.numel() * p.element_size() for p in model.parameters()), lambda: None
    import hemat
    from hemat.infer.engine import Engine
    from hemat.infer.quantize import load_for_inference
    from hemat.infer.sampling import SamplingParams

    dtype = "bfloat16" if fmt == "bf16" else "float32"
    compile_decode = "+compile" in row
    model = load_for_inference(path, fmt if fmt.startswith("int") else None, group_size, dtype=dtype)
    engines = {}

    def generate(prompts: torch.Tensor, new_tokens: int) -> None:
        batch, length = prompts.shape
        if batch not in engines:
            engines[batch] = engine = Engine(model, max_batch_size=batch, speculative="off",
                                             cache_tokens=batch * (max_tokens + 32), compile_decode=compile_decode)
            if compile_decode:  # compiled before the timing, like a server warmed at start-up
                engine.static_decode.compiled.queue(engine.static_decode.bucket(batch, max_tokens))
                engine.static_decode.compiled.wait()
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        outs = engines[batch].generate(prompts.tolist(), params)
        assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)

    def cache_bytes() -> int:
        return sum(t.nbytes for engine in engines.values() for store in engine.cache.stores for t in store)

    return generate, model.weight_bytes, cache_bytes


def load_llama_cpp(gguf: Path, max_tokens: int, threads: int):
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=max_tokens + 32, n_batch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)

    def generate(prompts: torch.Tensor, new_tokens: int) -> None:
        if len(prompts) != 1:
            raise ValueError("llama-cpp-python's rows decode batch 1 only")
        made = 0
        for made, _ in enumerate(llm.generate(prompts[0].tolist(), temp=0.0, reset=True), start=1):
            if made == new_tokens:
                break
        assert made == new_tokens

    return generate, gguf.stat().st_size, lambda: None


def export_gguf_files(path: Path, formats: list[str]) -> None:
    """hemat's own GGUF export of the checkpoint at `path` (q8_0, q4_0) for the llama.cpp rows; a checkpoint
    without a tokenizer gets a small byte-level BPE one (the rows feed token ids, the text does not matter)."""
    import hemat
    from hemat.model.gguf_io import export_gguf
    from hemat.tokenizer import load_tokenizer, train_tokenizer

    if (path / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(path)
    else:
        corpus = path / "corpus.txt"
        corpus.write_text("the quick brown fox jumps over the lazy dog 0123456789\n" * 200)
        tokenizer = train_tokenizer([corpus], 300, path / "tokenizer", show_progress=False)
    model = hemat.from_pretrained(path)
    for fmt in formats:
        export_gguf(model, tokenizer, path / f"model-{fmt}.gguf", fmt, progress=False)


def run_row(args) -> None:
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    generate, weight_bytes, cache_bytes = load_row(args.row, Path(args.model), args.group_size,
                                                   args.prompt_tokens + args.new_tokens, args.threads)
    load_s = time.perf_counter() - start
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    gen = torch.Generator().manual_seed(0)

    def prompts(batch: int) -> torch.Tensor:  # fresh each time: no prefix cache hit
        return torch.randint(2, vocab, (batch, args.prompt_tokens), generator=gen)

    batches = [b for b in map(int, args.batch_sizes.split(",")) if b == 1 or not args.row.startswith("llama.cpp")]
    for batch in batches:  # warm-up
        generate(prompts(batch)[:, :16], 2)
    result = {"row": args.row, "weight_bytes": weight_bytes, "load_s": load_s, "decode": {}}
    for batch in batches:
        start = time.perf_counter()
        generate(prompts(batch), 1)
        first = time.perf_counter() - start
        start = time.perf_counter()
        generate(prompts(batch), args.new_tokens)
        total = time.perf_counter() - start
        result["decode"][batch] = batch * (args.new_tokens - 1) / max(total - first, 1e-9)
        if batch == 1:
            result["ttft_s"] = first
    result["rss_gb"], result["peak_rss_gb"] = memory_gb()
    result["cache_bytes"] = cache_bytes()
    print(json.dumps(result))


# ---- the table -------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="r1-distill-qwen-1.5b",
                        help="a model shape of benchmarks/shapes/")
    parser.add_argument("--model", help="a checkpoint directory instead of random weights of --shape")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size (64 for smollm-135m's 576)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = parser.parse_args()
    if args.row:
        return run_row(args)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            from hemat.model.config import ModelConfig
            from hemat.model.transformer import CausalLM

            torch.manual_seed(0)
            path = str(Path(tmp) / "model")
            CausalLM(ModelConfig.from_file(SHAPES[args.shape])).save_pretrained(path)
        print(f"model: {args.model or args.shape + ' (random weights)'}; prompt {args.prompt_tokens} tokens, "
              f"{args.new_tokens} new tokens, greedy; {args.threads} threads")
        rows = args.rows.split(",")
        llama_rows = [row for row in rows if row.startswith("llama.cpp")]
        if llama_rows and importlib.util.find_spec("llama_cpp") is None:
            print(f"skipping {', '.join(llama_rows)}: llama-cpp-python is not installed "
                  "(bash benchmarks/setup_llama_cpp.sh builds it)")
            rows = [row for row in rows if row not in llama_rows]
        elif llama_rows:
            export_gguf_files(Path(path), [row.split("-")[1] for row in llama_rows])
        results = []
        for row in rows:
            command = [sys.executable, __file__, "--row", row, "--model", path, "--batch-sizes", args.batch_sizes,
                       "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
                       "--threads", str(args.threads), "--group-size", str(args.group_size)]
            env = dict(os.environ, HEMAT_NATIVE_KERNELS="0") if "+torch" in row else None
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode:
                print(f"{row}: failed\n{done.stderr[-2000:]}")
                continue
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  {row} done", file=sys.stderr)
    torch.set_num_threads(args.threads)
    bandwidth = bandwidth_gbs()
    batches = list(map(int, args.batch_sizes.split(",")))
    base = next((r for r in results if r["row"] == "transformers-fp32"), None)
    head = " | ".join(f"batch {b} tok/s" for b in batches)
    print(f"\n| row | {head} | vs transformers fp32 (batch {batches[0]}) | TTFT s | load s | RSS GiB | "
          "peak RSS GiB | weights GB | cache GB | RSS / (weights + cache) | batch-1 ceiling tok/s |")
    print("|---" * (len(batches) + 10) + "|")
    for r in results:
        rates = " | ".join(f"{r['decode'][str(b)]:.2f}" if str(b) in r["decode"] else "-" for b in batches)
        ratio = f"{r['decode'][str(batches[0])] / base['decode'][str(batches[0])]:.2f}x" if base else "-"
        ceiling = bandwidth * 1e9 / r["weight_bytes"]
        cache = "-" if r["cache_bytes"] is None else f"{r['cache_bytes'] / 1e9:.3f}"
        held = r["weight_bytes"] + (r["cache_bytes"] or 0)  # transformers' cache is freed after each call
        print(f"| {r['row']} | {rates} | {ratio} | {r['ttft_s']:.2f} | {r['load_s']:.1f} | {r['rss_gb']:.2f} | "
              f"{r['peak_rss_gb']:.2f} | {r['weight_bytes'] / 1e9:.3f} | {cache} | "
              f"{r['rss_gb'] * 1024**3 / held:.2f}x | {ceiling:.1f} |")
    print(f"\nmemory read bandwidth {bandwidth:.1f} GB/s (sum over 1 GiB, {args.threads} threads); ceiling = bandwidth / "
          "weight bytes. RSS after the run; its peak includes loading (int8/int4 quantized while loading).")


if __name__ == "__main__":
    main()
