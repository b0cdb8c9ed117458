"""The OpenAI-compatible server, driven by the official `openai` client against a live uvicorn on
127.0.0.1 with a tiny real model. The helpers here (checkpoints, LiveServer) are also used by
test_serve_browser.py and test_serve_schema.py."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

import hemat
from hemat.infer.engine import Engine
from hemat.model.config import ModelConfig
from hemat.model.transformer import CausalLM
from hemat.serve.app import ServeSettings, create_app
from hemat.tokenizer import train_tokenizer

API_KEY = "test-key-123"
MODEL_NAME = "tiny"
REASONING, ANSWER = "Thinking about it", "Hello!"
PRICE_IN, PRICE_OUT = 0.5, 2.0
NO_EOS = {"ignore_eos": True}  # a hemat extension: generate exactly max_tokens

CORPUS = (
    "Hello there! How are you today? I am fine, thank you.\n"
    "Thinking about it, the answer is 42 because 6 * 7 = 42.\n"
    "The quick brown fox jumps over the lazy dog near the river bank.\n"
    "<think>\nlet me add the numbers\n</think>\nThe sum of 12 and 30 is 42.\n"
)


# ---- checkpoints ------------------------------------------------------------------------------------------
def tiny_config(vocab_size: int) -> ModelConfig:
    """DeepSeek-V3 in miniature: MLA, a dense layer then a MoE layer, one MTP depth."""
    return ModelConfig(
        model_type="deepseek_v3", vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
        moe_intermediate_size=32, num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2,
        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        max_position_embeddings=256, num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1,
    )


def build_checkpoint(out: Path, scripted: bool = False) -> Path:
    """A trained 400-token tokenizer and a random tiny model, saved as a checkpoint directory.

    scripted=True sets weights so that the model answers every chat prompt (which ends in the
    <|assistant|> token) with `<think>REASONING</think>ANSWER<eos>`: the attention and MLP outputs are
    zeroed, so the final hidden state is the current token's embedding, and the chain's tokens get
    one-hot embeddings whose lm_head rows point at the next token of the chain (a bigram model)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "corpus.txt").write_text(CORPUS * 30, encoding="utf-8")
    tokenizer = train_tokenizer([out / "corpus.txt"], 400, out, show_progress=False)
    (out / "corpus.txt").unlink()
    torch.manual_seed(0)
    model = CausalLM(tiny_config(tokenizer.vocab_size))
    if scripted:
        chain = ([tokenizer.token_to_id("<|assistant|>"), tokenizer.think_start_id] + tokenizer.encode(REASONING)
                 + [tokenizer.think_end_id] + tokenizer.encode(ANSWER) + [tokenizer.eos_token_id])
        assert len(set(chain)) == len(chain), f"the scripted chain repeats a token: {chain}"
        hidden = model.config.hidden_size
        with torch.no_grad():
            for layer in model.model.layers[: model.config.num_hidden_layers]:
                for name, param in layer.named_parameters():
                    if name.endswith("o_proj.weight") or "down_proj" in name:
                        param.zero_()
            for i, (token, following) in enumerate(zip(chain, chain[1:])):
                model.model.embed_tokens.weight[token] = torch.nn.functional.one_hot(torch.tensor(i), hidden)
                model.lm_head.weight[following, i] = 10.0
    model.save_pretrained(out)
    return out


def make_engine(checkpoint: Path, **kwargs) -> tuple[Engine, object]:
    tokenizer = hemat.load_tokenizer(checkpoint)
    return Engine(hemat.from_pretrained(checkpoint), tokenizer, **kwargs), tokenizer


class LiveServer:
    """create_app(...) served by uvicorn on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, checkpoint: Path, settings: ServeSettings | None = None, **engine_kwargs):
        self.engine, self.tokenizer = make_engine(checkpoint, **engine_kwargs)
        self.settings = settings or ServeSettings(served_model_name=MODEL_NAME)
        self.app = create_app(self.engine, self.tokenizer, self.settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def client(self, api_key: str | None = None, **kwargs) -> openai.OpenAI:
        key = api_key or self.settings.api_key or "unused"
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **kwargs)

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.settings.api_key}"} if self.settings.api_key else {}

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", headers=self.headers()).text
        return parse_metrics(text)


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("serve") / "random")


@pytest.fixture(scope="session")
def scripted_checkpoint(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("serve") / "scripted", scripted=True)


@pytest.fixture(scope="module")
def server(random_checkpoint):
    settings = ServeSettings(served_model_name=MODEL_NAME, api_key=API_KEY, price_input=PRICE_IN,
                             price_output=PRICE_OUT)
    with LiveServer(random_checkpoint, settings) as live:
        yield live


@pytest.fixture(scope="module")
def scripted(scripted_checkpoint):
    with LiveServer(scripted_checkpoint) as live:
        yield live


def chat(text: str) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


# ---- chat -------------------------------------------------------------------------------------------------
def test_chat_non_streaming_with_usage_and_cost(server):
    client = server.client()
    r = client.chat.completions.create(model=MODEL_NAME, messages=chat("Hi"), max_tokens=12, seed=1, extra_body=NO_EOS)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL_NAME
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    u = r.usage
    prompt_ids = server.tokenizer.apply_chat_template(chat("Hi"), tokenize=True)
    assert u.prompt_tokens == len(prompt_ids) and u.completion_tokens == 12
    assert u.total_tokens == u.prompt_tokens + 12
    assert u.prompt_tokens_details.cached_tokens == u.prompt_cache_hit_tokens
    assert u.prompt_cache_hit_tokens + u.prompt_cache_miss_tokens == u.prompt_tokens
    assert u.completion_tokens_details.reasoning_tokens == 0
    cost = u.model_extra["cost"]
    assert cost["input_usd"] == pytest.approx(u.prompt_tokens * PRICE_IN / 1e6)
    assert cost["output_usd"] == pytest.approx(12 * PRICE_OUT / 1e6)
    assert cost["total_usd"] == pytest.approx(cost["input_usd"] + cost["output_usd"])


def test_prefix_cache_hits_are_reported(server):
    client = server.client()
    messages = [{"role": "system", "content": "You are a helpful assistant. " * 5}, {"role": "user", "content": "Hi"}]
    first = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=2).usage
    second = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=2).usage
    assert first.prompt_tokens == second.prompt_tokens > 32
    assert second.prompt_tokens_details.cached_tokens >= 32  # whole 16-token pages of the shared prefix
    assert second.prompt_cache_hit_tokens == second.prompt_tokens_details.cached_tokens
    assert second.prompt_cache_miss_tokens == second.prompt_tokens - second.prompt_cache_hit_tokens


def test_chat_stream_matches_non_stream_and_reports_usage(server):
    client = server.client()
    kwargs = dict(model=MODEL_NAME, messages=chat("Tell me a story"), max_tokens=16, seed=7, temperature=0.9)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in body)
    text = "".join(c.choices[0].delta.content or "" for c in body)
    assert text == whole.choices[0].message.content
    assert body[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    # without include_usage there is no usage chunk
    plain = list(client.chat.completions.create(**kwargs, stream=True))
    assert all(c.choices for c in plain) and "".join(c.choices[0].delta.content or "" for c in plain) == text


def test_n_choices_streaming_and_not(server):
    client = server.client()
    kwargs = dict(model=MODEL_NAME, messages=chat("Pick"), max_tokens=8, n=3, seed=3, extra_body=NO_EOS)
    r = client.chat.completions.create(**kwargs)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1  # each choice has its own seed (seed + i)
    assert r.usage.completion_tokens == 24
    texts = {}
    for c in client.chat.completions.create(**kwargs, stream=True):
        for choice in c.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert [texts[i] for i in range(3)] == [c.message.content for c in r.choices]


def test_stop_string_cuts_the_output(server):
    client = server.client()
    kwargs = dict(model=MODEL_NAME, messages=chat("Go"), max_tokens=24, seed=11, extra_body=NO_EOS)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), full
    cut = client.chat.completions.create(**kwargs, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[: full.index(stop)]


def test_logprobs(server):
    client = server.client()
    r = client.chat.completions.create(model=MODEL_NAME, messages=chat("Hi"), max_tokens=5, logprobs=True,
                                       top_logprobs=3, seed=2, extra_body=NO_EOS)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.bytes == list(entry.token.encode())
    c = client.completions.create(model=MODEL_NAME, prompt="The fox", max_tokens=4, logprobs=2, seed=2,
                                  extra_body=NO_EOS)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == c.choices[0].text


# ---- completions ------------------------------------------------------------------------------------------
def test_completions_streaming_and_not(server):
    client = server.client()
    kwargs = dict(model=MODEL_NAME, prompt="The quick brown", max_tokens=10, seed=5, extra_body=NO_EOS)
    r = client.completions.create(**kwargs)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 10
    assert r.usage.prompt_tokens == len(server.tokenizer.encode("The quick brown")) + 1  # + BOS
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in chunks[:-1]) == r.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    # several prompts (text and token ids) x n: choice i * n + j
    ids = server.tokenizer.encode("Hello there", add_special_tokens=True)
    multi = client.completions.create(model=MODEL_NAME, prompt=[ids, ids], max_tokens=3, n=2, seed=5)
    assert [c.index for c in multi.choices] == [0, 1, 2, 3]
    assert multi.choices[0].text == multi.choices[2].text  # same prompt, same seed
    assert multi.usage.prompt_tokens == 2 * len(ids)


def test_models_and_health(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    card = client.models.retrieve(MODEL_NAME)
    assert card.id == MODEL_NAME
    assert card.model_extra["weight_format"] == "float32" and card.model_extra["weight_bytes"] > 0
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # no key needed


# ---- safety -----------------------------------------------------------------------------------------------
def test_api_key_required_everywhere_but_health_and_page(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").chat.completions.create(model=MODEL_NAME, messages=chat("Hi"), max_tokens=2)
    for path in ("/v1/models", "/metrics", "/openapi.json", "/no/such/route"):
        r = httpx.get(server.url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
    r = httpx.post(server.url + "/v1/completions", headers={"Authorization": "Basic " + API_KEY}, json={})
    assert r.status_code == 401
    for path in ("/health", "/", "/static/app.js", "/static/style.css"):
        assert httpx.get(server.url + path).status_code == 200, path
    assert httpx.get(server.url + "/no/such/route", headers=server.headers()).status_code == 404


@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 100_000}, "max_tokens"),  # more than the context
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"extra_body": {"temperature": "hot"}}, "temperature"),
    ({"extra_body": {"frobnicate": True}}, "frobnicate"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),  # no tool_call_id
    ({"messages": []}, "messages"),
])
def test_bad_parameters_are_400_naming_the_field(server, kwargs, param):
    request = dict(model=MODEL_NAME, messages=chat("Hi"), max_tokens=2) | kwargs
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(**request)
    assert info.value.param == param
    assert param.split("[")[0] in info.value.message


def test_malformed_requests(server):
    url, headers = server.url, server.headers()
    json_headers = headers | {"Content-Type": "application/json"}
    r = httpx.post(url + "/v1/chat/completions", headers=json_headers, content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", headers=headers, json=[1, 2])
    assert r.status_code == 400
    r = httpx.post(url + "/v1/chat/completions", headers=headers, json={"model": "gpt-4", "messages": chat("x")})
    assert r.status_code == 404 and r.json()["error"] == {
        "message": "The model `gpt-4` does not exist; this server serves `tiny`", "type": "invalid_request_error",
        "param": "model", "code": "model_not_found"}
    big = {"model": MODEL_NAME, "messages": chat("x" * (server.settings.max_body_bytes + 1))}
    assert httpx.post(url + "/v1/chat/completions", headers=headers, json=big).status_code == 413
    r = httpx.post(url + "/v1/completions", headers=headers, json={"model": MODEL_NAME, "prompt": [99999]})
    assert r.status_code == 400 and "prompt_ids[0]" in r.json()["error"]["message"]
    long_prompt = "hello " * 400  # past the 256-token context
    r = httpx.post(url + "/v1/completions", headers=headers, json={"model": MODEL_NAME, "prompt": long_prompt})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert httpx.delete(url + "/v1/models", headers=headers).status_code == 405
    assert httpx.get(f"{url}/health").status_code == 200  # still alive


# ---- reasoning --------------------------------------------------------------------------------------------
def test_reasoning_content_in_message_and_stream(scripted):
    client = scripted.client()
    r = client.chat.completions.create(model=MODEL_NAME, messages=chat("Hi"), temperature=0.7)
    message = r.choices[0].message
    assert message.model_extra["reasoning_content"] == REASONING and message.content == ANSWER
    assert r.choices[0].finish_reason == "stop"
    think = scripted.tokenizer.encode(REASONING)
    assert r.usage.completion_tokens_details.reasoning_tokens == len(think) + 2  # with <think> and </think>
    assert r.usage.completion_tokens == len(think) + 2 + len(scripted.tokenizer.encode(ANSWER)) + 1  # + eos
    reasoning, content = "", ""
    for c in client.chat.completions.create(model=MODEL_NAME, messages=chat("Hi"), stream=True):
        delta = c.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
    assert (reasoning, content) == (REASONING, ANSWER)
    # an earlier turn's reasoning goes back through the chat template
    history = chat("Hi") + [{"role": "assistant", "content": ANSWER, "reasoning_content": REASONING},
                            {"role": "user", "content": "Again"}]
    again = client.chat.completions.create(model=MODEL_NAME, messages=history)
    assert again.choices[0].message.content == ANSWER


# ---- load -------------------------------------------------------------------------------------------------
def test_32_concurrent_streams_each_equal_to_its_single_run(server):
    client = server.client(timeout=120)

    def run(i: int) -> str:
        stream = client.chat.completions.create(model=MODEL_NAME, messages=chat(f"Request number {i}"), max_tokens=12,
                                                seed=100 + i, temperature=1.0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    single = [run(i) for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(run, range(32)))
    assert together == single
    assert len(set(single)) > 16  # the seeds and prompts really differ


def test_disconnect_cancels_and_frees_pages(server):
    before = server.metrics()
    body = {"model": MODEL_NAME, "messages": chat("Long answer please"), "max_tokens": 200, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=server.headers()) as r:
        lines = r.iter_lines()
        assert next(l for l in lines if l.startswith("data:"))
        next(l for l in lines if '"content"' in l and '"role"' not in l)  # generation is under way
    # a non-streaming client that gives up is noticed too (the scheduler paused, so it cannot finish first)
    server.engine.stop()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/chat/completions", json=body | {"stream": False}, headers=server.headers(),
                       timeout=httpx.Timeout(5.0, read=0.3))
    finally:
        server.engine.start()
    gone = 'hemat_requests_total{route="/v1/chat/completions",status="499"}'
    after = wait_for(lambda: (m := server.metrics())["hemat_engine_requests_cancelled"]
                     >= before["hemat_engine_requests_cancelled"] + 2 and m.get(gone) == 1 and m,
                     what="the cancellations")
    assert after["hemat_requests_cancelled_total"] == before["hemat_requests_cancelled_total"] + 2
    wait_for(lambda: (m := server.metrics())["hemat_engine_running"] == 0
             and m["hemat_engine_pages_free"] == m["hemat_engine_pages_total"], what="the pages to be freed")


def test_queue_full_is_429_with_retry_after(random_checkpoint):
    settings = ServeSettings(served_model_name=MODEL_NAME, max_concurrent=1, max_queue=1)
    with LiveServer(random_checkpoint, settings) as live:
        body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 4}
        url = f"{live.url}/v1/completions"
        admission = live.app.state.admission
        live.engine.stop()  # pause the scheduler: the admitted request holds its slot until it resumes
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(httpx.post, url, json=body, timeout=60)
            wait_for(lambda: admission.running == 1, what="the first request to be admitted")
            queued = pool.submit(httpx.post, url, json=body, timeout=60)
            wait_for(lambda: admission.waiters, what="the second request to queue")
            assert live.metrics()["hemat_queue_depth"] == 1
            refused = httpx.post(url, json=body)
            assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
            assert refused.json()["error"]["type"] == "rate_limit_error"
            live.engine.start()
            assert running.result().status_code == 200 and queued.result().status_code == 200
        metrics = live.metrics()
        assert metrics['hemat_requests_total{route="/v1/completions",status="429"}'] == 1
        assert metrics['hemat_requests_total{route="/v1/completions",status="200"}'] == 2
        assert admission.running == 0 and metrics["hemat_queue_depth"] == 0


def test_metrics(server):
    client = server.client()
    client.chat.completions.create(model=MODEL_NAME, messages=chat("count me"), max_tokens=4, temperature=0)
    m = server.metrics()
    assert m['hemat_requests_total{route="/v1/chat/completions",status="200"}'] >= 1
    assert m['hemat_requests_total{route="/v1/chat/completions",status="400"}'] >= 0
    assert m["hemat_prompt_tokens_total"] > 0 and m["hemat_completion_tokens_total"] >= 4
    assert m["hemat_time_to_first_token_seconds_count"] >= 1
    assert m["hemat_time_per_output_token_seconds_count"] >= 1
    # the MTP drafts ("auto" measures them on greedy requests first): rounds, drafted and accepted tokens, ratio
    assert m["hemat_engine_spec_drafted"] >= m["hemat_engine_spec_rounds"] >= 1
    assert m["hemat_engine_spec_acceptance_rate"] == m["hemat_engine_spec_accepted"] / m["hemat_engine_spec_drafted"]
    assert m["hemat_queue_depth"] == 0 and m["hemat_requests_running"] == 0
    assert 0 <= m["hemat_cache_usage_ratio"] <= 1 and m["hemat_engine_pages_total"] > 0
    assert m["hemat_cost_usd_total"] > 0
    assert m['hemat_engine_weight_format{format="float32"}'] == 1 and m["hemat_engine_weight_bytes"] > 0


def test_mid_stream_failure_is_an_error_event(random_checkpoint):
    with LiveServer(random_checkpoint) as live:
        forward = live.engine.model.model.forward
        calls = {"n": 0}

        def failing_forward(*args, **kwargs):  # fault injection: the 4th forward pass fails
            calls["n"] += 1
            if calls["n"] == 4:
                raise RuntimeError("device lost")
            return forward(*args, **kwargs)

        live.engine.model.model.forward = failing_forward
        stream = live.client().chat.completions.create(model=MODEL_NAME, messages=chat("Hi"), max_tokens=50,
                                                       extra_body=NO_EOS, stream=True)
        with pytest.raises(openai.APIError, match="device lost"):
            for _ in stream:
                pass
        live.engine.model.model.forward = forward
        r = live.client().chat.completions.create(model=MODEL_NAME, messages=chat("Hi"), max_tokens=3)
        assert r.choices[0].message.content is not None  # the server keeps serving


def test_prompts_are_logged_only_with_log_prompts(random_checkpoint, caplog):
    caplog.set_level(logging.INFO, logger="hemat.serve")
    secret = "my-secret-prompt-42"
    for log_prompts in (False, True):
        settings = ServeSettings(served_model_name=MODEL_NAME, log_prompts=log_prompts)
        with LiveServer(random_checkpoint, settings) as live:
            caplog.clear()
            live.client().chat.completions.create(model=MODEL_NAME, messages=chat(secret), max_tokens=3)
            assert "done: " in caplog.text  # requests are logged, with token counts
            assert (secret in caplog.text) == log_prompts
            assert (" output: " in caplog.text) == log_prompts


# ---- the command ------------------------------------------------------------------------------------------
def test_serve_command_sigterm_finishes_streams_and_exits_cleanly(random_checkpoint):
    env = dict(os.environ, HEMAT_API_KEY=API_KEY)
    proc = subprocess.Popen(
        [sys.executable, "-m", "hemat", "serve", "--model", str(random_checkpoint), "--port", "0",
         "--served-model-name", MODEL_NAME, "--speculative", "off"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = ""
        for line in proc.stdout:
            if "listening on" in line:
                break
        url = re.search(r"http://\S+", line).group(0)
        body = {"model": MODEL_NAME, "messages": chat("Hi"), "max_tokens": 200, "ignore_eos": True, "stream": True}
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data:")
            proc.send_signal(signal.SIGTERM)
            rest = [l for l in lines if l.startswith("data:")]
        assert rest[-1] == "data: [DONE]"  # the in-flight stream was finished, not cut
        usage_free = [json.loads(l[5:]) for l in rest[:-1]]
        assert usage_free[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()


def test_serve_command_rejects_bad_flags(random_checkpoint):
    from hemat.cli import build_parser
    from hemat.errors import HematError

    args = build_parser("serve").parse_args(["serve", "--model", str(random_checkpoint), "--max-concurrent", "0"])
    with pytest.raises(HematError, match="--max-concurrent"):
        args.func(args)
    assert args.host == "127.0.0.1"  # loopback unless told otherwise


@pytest.mark.parametrize("kind", ["qwen3", "deepseek_v2"])
def test_served_qwen3_and_deepseek_v2_complete_as_transformers_greedy(tmp_path, kind):
    """A checkpoint transformers saved (with a hemat tokenizer beside it) served through the API: greedy
    completion text equals transformers' greedy `generate`, decoded."""
    from hf_models import make_hf_model

    (tmp_path / "corpus.txt").write_text(CORPUS * 30, encoding="utf-8")
    tokenizer = train_tokenizer([tmp_path / "corpus.txt"], 400, tmp_path / "ckpt", show_progress=False)
    reference = make_hf_model(kind, tmp_path / "ckpt", vocab_size=tokenizer.vocab_size)
    ids = tokenizer.encode("The quick brown", add_special_tokens=True)
    with torch.no_grad():
        prompt = torch.tensor([ids])  # BOS is id 0: an explicit mask, or generate would take it for padding
        out = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
    with LiveServer(tmp_path / "ckpt") as live:
        r = live.client().completions.create(model=MODEL_NAME, prompt=ids, max_tokens=12, temperature=0,
                                             extra_body=NO_EOS)
    assert r.usage.completion_tokens == 12
    assert r.choices[0].text == tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
