"""Several LoRA adapters served at once (`hemat serve --lora NAME=DIR ...`): each is a model id, requests for
different adapters and the base share one batch, and each request's greedy output equals what
`hemat generate --lora DIR` gives alone (the adapter merged into the weights)."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch

import hemat
from hemat.cli import build_parser
from hemat.errors import HematError
from hemat.infer.adapters import prepare_with_adapters
from hemat.infer.cli import _load_engine
from hemat.infer.engine import Engine, EngineRequestError
from hemat.infer.sampling import SamplingParams
from hemat.model.adapter_io import load_adapter, save_adapter
from hemat.model.lora import LoraConfig, LoraError, add_adapters
from hemat.model.transformer import CausalLM
from test_serve import CORPUS, build_checkpoint

BASE = "tiny"
MAX_TOKENS = 12
PROMPTS = ["Hello there", "The quick brown fox", CORPUS[:150]]  # the last spans prefix-cache pages
LINEAR = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapter(checkpoint: Path, out: Path, config: LoraConfig, seed: int) -> Path:
    """An adapter of the checkpoint's model with random nonzero factors (B = 0 would change nothing)."""
    torch.manual_seed(seed)
    model = hemat.from_pretrained(checkpoint)
    add_adapters(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return save_adapter(model, out)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("adapters") / "base")


@pytest.fixture(scope="module")
def adapters(checkpoint) -> dict[str, Path]:
    root = checkpoint.parent
    return {"every-linear": make_adapter(checkpoint, root / "a", LoraConfig(rank=4, targets=LINEAR), 1),
            "kv-b-and-up": make_adapter(checkpoint, root / "b", LoraConfig(rank=8, alpha=4.0, rslora=True,
                                                                            targets=("kv_b_proj", "up_proj")), 2)}


def generate_alone(checkpoint: Path, adapter: Path | None, prompt: str, chat: bool = False) -> str:
    """Greedy text from `hemat generate [--lora DIR] [--chat]`'s engine: the adapter merged into the weights."""
    argv = ["generate", "--model", str(checkpoint), "--prompt", prompt, "--temperature", "0",
            "--max-tokens", str(MAX_TOKENS), "--ignore-eos"] + (["--lora", str(adapter)] if adapter else [])
    engine, params = _load_engine(build_parser("generate").parse_args(argv))
    prompt = [{"role": "user", "content": prompt}] if chat else prompt
    return engine.generate(prompt, params)[0].outputs[0].text


def test_served_adapters_share_a_batch_and_match_generate_alone(checkpoint, adapters):
    expected = {(m, p): generate_alone(checkpoint, adapters.get(m), p) for m in [BASE, *adapters] for p in PROMPTS}
    assert expected[("every-linear", PROMPTS[0])] != expected[(BASE, PROMPTS[0])]  # the adapters change the output
    assert expected[("kv-b-and-up", PROMPTS[0])] != expected[(BASE, PROMPTS[0])]
    flags = [f for name, path in adapters.items() for f in ("--lora", f"{name}={path}")]
    proc = subprocess.Popen([sys.executable, "-m", "hemat", "serve", "--model", str(checkpoint), "--port", "0",
                             "--served-model-name", BASE, *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        for line in proc.stdout:
            if "listening on" in line:
                break
        client = openai.OpenAI(base_url=re.search(r"http://\S+", line).group(0) + "/v1", api_key="unused",
                               max_retries=0)
        assert [m.id for m in client.models.list()] == [BASE, "every-linear", "kv-b-and-up"]
        assert client.models.retrieve("kv-b-and-up").model_extra["parent"] == BASE

        def complete(key):
            r = client.completions.create(model=key[0], prompt=key[1], max_tokens=MAX_TOKENS, temperature=0,
                                          extra_body={"ignore_eos": True})
            return r.model, r.choices[0].text

        keys = list(expected) * 2  # 18 concurrent streams: every model and prompt, twice (prefix cache hits)
        with ThreadPoolExecutor(len(keys)) as pool:
            results = list(pool.map(complete, keys))
        for key, (model, text) in zip(keys, results):
            assert model == key[0]
            assert text == expected[key], key
        for model in [BASE, *adapters]:  # one after another: each finds only its own adapter's cached prefix
            assert complete((model, PROMPTS[2]))[1] == expected[(model, PROMPTS[2])]
        r = client.chat.completions.create(model="kv-b-and-up", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
        assert r.choices[0].message.content == generate_alone(checkpoint, adapters["kv-b-and-up"], "Hi", chat=True)
        with pytest.raises(openai.NotFoundError) as e:  # as OpenAI answers an unknown model
            client.completions.create(model="no-such-adapter", prompt="Hi", max_tokens=1)
        assert e.value.body["code"] == "model_not_found" and "`every-linear`" in e.value.body["message"]
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()



def test_gqa_adapters_with_biases_in_one_batch_match_each_merged(tmp_path):
    """Qwen2 (grouped-query attention, biased q/k/v, tied embeddings): the engine's mixed batch, MLA-free."""
    from hf_models import make_hf_model

    make_hf_model("qwen2", tmp_path / "base")
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj")
    adapters = {"x": make_adapter(tmp_path / "base", tmp_path / "x", LoraConfig(rank=4, targets=targets), 3),
                "y": make_adapter(tmp_path / "base", tmp_path / "y", LoraConfig(rank=2, targets=("v_proj",)), 4)}
    prompts = [[0, 5, 9, 17, 33], [0, 7, 7, 2, 90, 41, 3, 12]]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = {}
    for name in [None, *adapters]:
        model = hemat.from_pretrained(tmp_path / "base")
        if name:
            load_adapter(model, adapters[name])
        expected[name] = [o.outputs[0].token_ids for o in Engine(model).generate(prompts, params)]
    assert expected["x"] != expected[None] and expected["y"] != expected[None]
    engine = Engine(prepare_with_adapters(hemat.from_pretrained(tmp_path / "base"), adapters))
    requests = [(name, i, engine.submit(prompt_ids=p, params=params, adapter=name))
                for name in [None, *adapters] for i, p in enumerate(prompts)]
    for name, i, request in requests:
        assert request.result().outputs[0].token_ids == expected[name][i], (name, i)
    with pytest.raises(EngineRequestError, match="unknown adapter 'z'; this engine has 'x', 'y'"):
        engine.submit(prompt_ids=prompts[0], adapter="z")


def test_start_up_errors_name_the_adapter(checkpoint, adapters, tmp_path):
    base = hemat.from_pretrained(checkpoint)
    other = CausalLM(dataclasses.replace(base.config, kv_lora_rank=16))  # another base: other shapes
    add_adapters(other, LoraConfig(rank=4, targets=LINEAR))
    save_adapter(other, tmp_path / "other")
    with pytest.raises(LoraError, match=re.escape(str(tmp_path / "other" / "adapter_model.safetensors"))):
        prepare_with_adapters(base, {"ok": adapters["every-linear"], "other": tmp_path / "other"})
    experts = make_adapter(checkpoint, tmp_path / "experts", LoraConfig(rank=4), 5)  # the defaults adapt experts
    with pytest.raises(LoraError, match=r"experts.*adapts routed experts \(model\.layers\.1\.mlp\.experts\)"):
        prepare_with_adapters(base, {"e": experts})
    a = str(adapters["every-linear"])
    for flags, message in [([f"a={a}", f"a={a}"], "the name 'a' is given twice"),
                           ([f"{BASE}={a}"], f"the name '{BASE}' is the base model's served name"),
                           ([a], "--lora takes NAME=DIR")]:
        argv = ["serve", "--model", str(checkpoint), "--served-model-name", BASE]
        args = build_parser("serve").parse_args(argv + [f for flag in flags for f in ("--lora", flag)])
        with pytest.raises(HematError, match=message):
            args.func(args)
