"""Serving load: N concurrent streaming clients against `hemat serve` on loopback.

Starts `hemat serve` in a child process (127.0.0.1, a free port) over a checkpoint (--checkpoint)
or a random model built from a preset (default cpu-tiny, with a tokenizer trained on hemat's synthetic
corpus), or targets a running server (--url). First one stream alone, then --concurrency clients at once,
each sending --requests streaming chat requests of exactly --max-tokens tokens (EOS ignored). Reports
time to first token and per-token latency (p50, p99), aggregate output tokens/s against the single
stream, and dollars per million output tokens at --price-per-hour. Then the same concurrent load as a
mix, every other stream constrained to a JSON schema (response_format json_schema), with its aggregate
tokens/s as a ratio of the all-unconstrained run and the grammar mask's cost per constrained token (from
the server's /metrics); the two loads alternate (plain, mix, mix, plain) so that a drift in the machine's
speed weighs on both. Bounded by --timeout seconds.

    python benchmarks/serve_load.py [--checkpoint DIR | --config cpu-tiny | --url URL] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from hemat.cost import default_price, detect_device, devices_in_use, serving_cost_per_million

MAX_CLIENTS = 256
# the mix's constraint: one long free-text field, so that constrained streams run to max_tokens as the others do
MIX_FORMAT = {"type": "json_schema", "json_schema": {"name": "story", "strict": True, "schema": {
    "type": "object", "additionalProperties": False, "required": ["title", "story"],
    "properties": {"title": {"type": "string", "maxLength": 12}, "story": {"type": "string"}}}}}


@dataclass
class Sample:
    ttft_s: float
    per_token_s: float | None  # None for a one-token reply
    tokens: int


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


async def one_request(client: httpx.AsyncClient, url: str, headers: dict, model: str, max_tokens: int,
                      i: int, constrained: bool = False) -> Sample:
    body = {"model": model, "messages": [{"role": "user", "content": f"Tell me a story about request {i}."}],
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 1.0, "seed": i, "stream": True,
            "stream_options": {"include_usage": True}}
    if constrained:
        body["response_format"] = MIX_FORMAT
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
            if delta.get("content") or delta.get("reasoning_content"):
                now = time.perf_counter()
                first = first or now
                last = now
    if first is None:
        raise RuntimeError("the stream carried no text")
    per_token = (last - first) / (tokens - 1) if tokens > 1 and last > first else None
    return Sample(first - start, per_token, tokens)


async def run_clients(url: str, headers: dict, model: str, clients: int, requests: int, max_tokens: int,
                      offset: int, mix: bool = False) -> tuple[list[Sample], float]:
    """clients concurrent loops of `requests` sequential requests → (samples, wall seconds). mix: the
    even-numbered clients' requests are constrained to MIX_FORMAT."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def loop(c: int) -> list[Sample]:
            return [await one_request(client, url, headers, model, max_tokens, offset + c * requests + r,
                                      constrained=mix and c % 2 == 0)
                    for r in range(requests)]

        start = time.perf_counter()
        results = await asyncio.gather(*(loop(c) for c in range(clients)))
        return [s for r in results for s in r], time.perf_counter() - start


def summarize(samples: list[Sample], wall: float) -> dict:
    per_token = [s.per_token_s for s in samples if s.per_token_s is not None]
    ttft = [s.ttft_s for s in samples]
    tokens = sum(s.tokens for s in samples)
    return {
        "requests": len(samples), "output_tokens": tokens, "wall_s": round(wall, 3),
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
        "per_token_p50_ms": 1e3 * percentile(per_token, 50) if per_token else None,
        "per_token_p99_ms": 1e3 * percentile(per_token, 99) if per_token else None,
    }


class ServerProcess:
    """`hemat serve` in a child process on 127.0.0.1 (a free port), as it is deployed: the clients' own
    Python work then does not compete with the server for one interpreter lock."""

    def __init__(self, checkpoint: Path, max_concurrent: int, speculative: str, log: Path):
        self.model = "bench"
        self.log = log
        self.command = [sys.executable, "-m", "hemat", "serve", "--model", str(checkpoint), "--port", "0",
                        "--served-model-name", self.model, "--max-concurrent", str(max_concurrent),
                        "--speculative", speculative]

    def __enter__(self) -> str:
        self.log_file = open(self.log, "w")
        self.proc = subprocess.Popen(self.command, stdout=self.log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.proc.poll() is None:
            found = re.search(r"listening on (http://\S+)", self.log.read_text())
            if found:
                return found.group(1)
            time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"hemat serve did not start:\n{self.log.read_text()[-2000:]}")

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()


def build_random_checkpoint(config_name: str, out: Path) -> Path:
    """A random-weight model of the preset with a tokenizer trained on the synthetic corpus."""
    from hemat.data.synthetic import format_pretrain_document, generate_problems
    from hemat.model.transformer import CausalLM
    from hemat.presets import load_model_config
    from hemat.tokenizer import train_tokenizer

    config = load_model_config(config_name)
    corpus = out / "corpus.txt"
    out.mkdir(parents=True, exist_ok=True)
    corpus.write_text("\n".join(format_pretrain_document(p) for p in generate_problems(3000)), encoding="utf-8")
    tokenizer = train_tokenizer([corpus], config.vocab_size, out, show_progress=False)
    corpus.unlink()
    torch.manual_seed(0)
    CausalLM(config.replace(vocab_size=tokenizer.vocab_size)).save_pretrained(out)
    return out


async def grammar_counters(url: str, headers: dict) -> tuple[float, float]:
    """(seconds spent masking, constrained tokens masked) from the server's /metrics (0 before any)."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{url}/metrics", headers=headers)).text
    found = dict(re.findall(r"^hemat_engine_grammar_(mask_seconds|masked_tokens) (\S+)$", text, re.M))
    return float(found.get("mask_seconds", 0)), float(found.get("masked_tokens", 0))


async def measure(url: str, headers: dict, model: str, args) -> dict:
    await run_clients(url, headers, model, 2, 1, 4, 10_000, mix=True)  # warm-up, the grammar compile included
    single, single_wall = await run_clients(url, headers, model, 1, args.single_requests, args.max_tokens, 0)
    seconds0, masked0 = await grammar_counters(url, headers)
    runs = {False: ([], 0.0), True: ([], 0.0)}
    for mix in (False, True, True, False):  # ABBA: a drift in the machine's speed weighs on both alike
        samples, wall = await run_clients(url, headers, model, args.concurrency, args.requests, args.max_tokens,
                                          1000, mix=mix)
        runs[mix] = (runs[mix][0] + samples, runs[mix][1] + wall)
    seconds1, masked1 = await grammar_counters(url, headers)
    one, all_, mix = summarize(single, single_wall), summarize(*runs[False]), summarize(*runs[True])
    return {
        "concurrency": args.concurrency, "max_tokens": args.max_tokens, "price_per_hour": args.price_per_hour,
        "single": one, "concurrent": all_, "speedup": all_["tokens_per_s"] / one["tokens_per_s"],
        "mix": mix, "mix_ratio": mix["tokens_per_s"] / all_["tokens_per_s"],
        "mask_us_per_token": 1e6 * (seconds1 - seconds0) / (masked1 - masked0) if masked1 > masked0 else None,
        "usd_per_m_output_single": serving_cost_per_million(args.price_per_hour, one["tokens_per_s"]),
        "usd_per_m_output_concurrent": serving_cost_per_million(args.price_per_hour, all_["tokens_per_s"]),
    }


def print_report(r: dict) -> None:
    rows = [("", "1 stream", f"{r['concurrency']} streams")]
    for key, label in [("tokens_per_s", "output tokens/s"), ("ttft_p50_ms", "TTFT p50 (ms)"),
                       ("ttft_p99_ms", "TTFT p99 (ms)"), ("per_token_p50_ms", "per-token p50 (ms)"),
                       ("per_token_p99_ms", "per-token p99 (ms)"), ("requests", "requests")]:
        fmt = lambda v: "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))
        rows.append((label, fmt(r["single"][key]), fmt(r["concurrent"][key])))
    rows.append((f"$/M output tokens at ${r['price_per_hour']:g}/h", f"{r['usd_per_m_output_single']:.4f}",
                 f"{r['usd_per_m_output_concurrent']:.4f}"))
    width = max(len(row[0]) for row in rows)
    for row in rows:
        print(f"{row[0]:<{width}}  {row[1]:>12}  {row[2]:>12}")
    print(f"aggregate throughput: {r['speedup']:.2f}x one stream")
    mask = r["mask_us_per_token"]
    print(f"mix, half the streams JSON-schema constrained: {r['mix']['tokens_per_s']:.1f} tokens/s = "
          f"{r['mix_ratio']:.2f}x all unconstrained; grammar mask "
          f"{'-' if mask is None else f'{mask:.1f}'} us per constrained token")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", type=Path, help="checkpoint directory (model + tokenizer)")
    source.add_argument("--config", default="cpu-tiny", help="preset to build a random model from (default cpu-tiny)")
    source.add_argument("--url", help="a running server instead of an in-process one")
    parser.add_argument("--api-key", help="for --url servers that need one")
    parser.add_argument("--model", help="model id for --url (default: the server's first)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent streaming clients (default 16)")
    parser.add_argument("--requests", type=int, default=2, help="requests per client (default 2)")
    parser.add_argument("--single-requests", type=int, default=3, help="requests of the single stream (default 3)")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (default 64)")
    parser.add_argument("--speculative", choices=("auto", "off"), default="auto", help="in-process engine's MTP drafts")
    parser.add_argument("--price-per-hour", type=float, default=None,
                        help="USD per hour of the serving machine (default: hemat.cost's rate for this device)")
    parser.add_argument("--timeout", type=float, default=600, help="give up after this many seconds (default 600)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = parser.parse_args()
    if not 1 <= args.concurrency <= MAX_CLIENTS:
        parser.error(f"--concurrency must be in [1, {MAX_CLIENTS}], got {args.concurrency}")
    for name in ("requests", "single_requests", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.price_per_hour is None:
        device = detect_device()
        args.price_per_hour = default_price(device) * devices_in_use(device)

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    async def run(url: str, model: str | None) -> dict:
        if model is None:
            async with httpx.AsyncClient() as client:
                model = (await client.get(f"{url}/v1/models", headers=headers)).json()["data"][0]["id"]
        return await asyncio.wait_for(measure(url, headers, model, args), args.timeout)

    try:
        if args.url:
            report = asyncio.run(run(args.url.rstrip("/"), args.model))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = args.checkpoint or build_random_checkpoint(args.config, Path(tmp) / "model")
                server = ServerProcess(checkpoint, args.concurrency, args.speculative, Path(tmp) / "server.log")
                with server as url:
                    report = asyncio.run(run(url, server.model))
    except TimeoutError:
        print(f"serve_load: gave up after --timeout {args.timeout:g} s", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
