"""`hemat generate` (one prompt, streamed to stdout) and `hemat chat` (an interactive terminal chat that
streams, shows reasoning dimmed apart from the answer, and prints tokens/s after each reply)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from hemat.errors import HematError
from hemat.infer.quantize import add_quantize_arguments
from hemat.model.hub import resolve_model_source

DIM, RESET = "\033[2m", "\033[0m"


def add_command(subparsers) -> set[str]:
    gen = subparsers.add_parser(
        "generate", help="generate a completion for one prompt",
        description="Load a checkpoint directory (weights + tokenizer) and stream a completion of --prompt. "
        "Sampling defaults come from the checkpoint's generation_config.json.",
    )
    gen.add_argument("--prompt", required=True, help="the prompt text (raw, unless --chat)")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    gen.add_argument("--n", type=int, default=1, help="samples of the prompt, printed one after another")
    _add_common(gen)
    gen.set_defaults(func=_generate)
    chat = subparsers.add_parser(
        "chat", help="chat with a model in the terminal",
        description="Interactive chat: replies stream, reasoning (<think>…</think>) is shown dimmed, and each reply "
        "ends with its tokens/s. /reset starts over, /exit or Ctrl-D quits, Ctrl-C stops a reply.",
    )
    chat.add_argument("--system", help="a system message to start the conversation with")
    _add_common(chat)
    chat.set_defaults(func=_chat)
    return {"generate", "chat"}


def draft_tokens_arg(text: str) -> int | str:
    """A command line's --draft-tokens: 'auto' or a count >= 1."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--draft-tokens must be 'auto' or an integer >= 1, got {text!r}")
    return int(text)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR",
                   help="checkpoint directory with tokenizer.json, or a Hub id org/name[@revision]")
    p.add_argument("--lora", metavar="DIR", default=None,
                   help="a LoRA adapter (hemat's or PEFT's adapter_config.json + adapter_model.safetensors) merged "
                        "into --model's weights")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    p.add_argument("--speculative", choices=("auto", "mtp", "off"), default="auto",
                   help="MTP speculative decoding when the checkpoint has MTP layers: auto (greedy requests draft "
                   "where measured to be faster), mtp (always draft) or off (default auto)")
    add_quantize_arguments(p)
    p.add_argument("--draft-tokens", type=draft_tokens_arg, default=None,
                   help="MTP draft tokens per round, chained past the MTP depth (default: the depth), or auto: "
                   "per sequence from its running acceptance")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=512, help="most tokens to generate (default 512)")
    s.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--min-p", type=float, default=0.0)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--presence-penalty", type=float, default=0.0)
    s.add_argument("--frequency-penalty", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stop", action="append", default=[], metavar="TEXT", help="a stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")


def _sampling_params(args, model_dir: Path):
    from hemat.infer.sampling import SamplingParams

    defaults = {}
    path = model_dir / "generation_config.json"
    if path.is_file():
        try:
            defaults = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise HematError(f"{path}: not valid JSON ({e})") from None
    sampled = defaults.get("do_sample", True)
    temperature = args.temperature
    if temperature is None:
        temperature = defaults.get("temperature", 1.0) if sampled else 0.0
    top_p = args.top_p if args.top_p is not None else (defaults.get("top_p", 1.0) if sampled else 1.0)
    return SamplingParams(
        temperature=temperature, top_p=top_p, top_k=args.top_k, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.seed, stop=args.stop, max_tokens=args.max_tokens,
        n=getattr(args, "n", 1), ignore_eos=args.ignore_eos,
    )


def _load_engine(args):
    import torch

    import hemat
    from hemat.infer.engine import Engine
    from hemat.infer.quantize import load_for_inference

    model_dir = resolve_model_source(args.model)
    device = args.device or ("cpu" if args.quantize or not torch.cuda.is_available() else "cuda")
    model = load_for_inference(model_dir, args.quantize, args.group_size, device, args.dtype, args.lora)
    tokenizer = hemat.load_tokenizer(model_dir)
    context = model.config.max_position_embeddings
    params = _sampling_params(args, model_dir)
    engine = Engine(model, tokenizer, max_batch_size=params.n, speculative=args.speculative,
                    num_speculative_tokens=args.draft_tokens,
                    cache_tokens=params.n * (context + 64))  # + room for page rounding and MTP drafts
    return engine, params


def _fit(engine, params, prompt: str | None = None, messages: list[dict] | None = None):
    """params with max_tokens cut to the context the prompt leaves (the engine refuses more)."""
    tokenizer = engine.tokenizer
    if messages is not None:
        n = len(tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True)))
    else:
        n = len(tokenizer.encode(prompt, add_special_tokens=True))
    room = engine.max_context - n
    return dataclasses.replace(params, max_tokens=min(params.max_tokens, room)) if room > 0 else params


def _style(text: str, dim: bool) -> str:
    """Reasoning is dimmed on a colour terminal; NO_COLOR or a pipe gets the plain text."""
    if dim and sys.stdout.isatty() and not os.environ.get("NO_COLOR"):
        return f"{DIM}{text}{RESET}"
    return text


class _Printer:
    """Writes a stream of (reasoning, answer) pieces: reasoning dimmed, a line break before the answer."""

    def __init__(self):
        self.in_reasoning = False
        self.answer_started = False

    def write(self, reasoning: str, text: str) -> None:
        if reasoning:
            sys.stdout.write(_style(reasoning, dim=True))
            self.in_reasoning = True
        if text:
            if self.in_reasoning and not self.answer_started:
                sys.stdout.write("\n\n")
            sys.stdout.write(text)
            self.answer_started = True
        sys.stdout.flush()


def _generate(args) -> int | None:
    engine, params = _load_engine(args)
    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        request = engine.submit(messages=messages, params=_fit(engine, params, messages=messages))
    else:
        request = engine.submit(args.prompt, params=_fit(engine, params, prompt=args.prompt))
    start = time.perf_counter()
    printers = {}
    try:
        for event in request:
            if params.n == 1:
                printers.setdefault(0, _Printer()).write(event.reasoning_text, event.text)
    except KeyboardInterrupt:
        request.cancel()
        request.result()
    out = request.result()
    if params.n > 1:
        for c in out.outputs:
            print(f"--- sample {c.index} ({c.finish_reason}) ---")
            if c.reasoning_text:
                print(_style(c.reasoning_text, dim=True))
            print(c.text)
    else:
        print()
    _report(out, time.perf_counter() - start, engine)
    return 1 if out.error else None


def _report(out, elapsed: float, engine) -> None:
    tokens = out.metrics["completion_tokens"]
    line = f"[{tokens} tokens in {elapsed:.2f} s, {tokens / max(elapsed, 1e-9):.1f} tokens/s"
    if out.cached_tokens:
        line += f", {out.cached_tokens} prompt tokens from cache"
    rate = engine.stats().get("spec_acceptance_rate")
    if rate is not None:
        line += f", MTP acceptance {rate:.0%}"
    reasons = sorted({c.finish_reason for c in out.outputs})
    print(line + f", finish: {', '.join(reasons)}]", file=sys.stderr)
    if out.error:
        print(f"error: {out.error}", file=sys.stderr)


def _chat(args) -> None:
    engine, params = _load_engine(args)
    start_messages = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start_messages)
    print("hemat chat: /reset starts over, /exit or Ctrl-D quits, Ctrl-C stops a reply", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            messages = list(start_messages)
            continue
        messages.append({"role": "user", "content": line})
        try:
            request = engine.submit(messages=messages, params=_fit(engine, params, messages=messages))
        except HematError as e:  # typically the conversation outgrew the context: say so, keep chatting
            messages.pop()
            print(f"error: {e} (/reset starts a new conversation)", file=sys.stderr)
            continue
        start, printer = time.perf_counter(), _Printer()
        try:
            for event in request:
                printer.write(event.reasoning_text, event.text)
        except KeyboardInterrupt:
            request.cancel()
        out = request.result()
        print()
        _report(out, time.perf_counter() - start, engine)
        messages.append({"role": "assistant", "content": out.outputs[0].text})
