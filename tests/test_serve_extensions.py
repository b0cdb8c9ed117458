"""The server's agent and evaluator features against a live server with the official `openai` client:
prompt logprobs (echo) for lm-evaluation-harness, structured output and function calling."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
import torch

from hemat.serve.app import ServeSettings
from tests.test_serve import MODEL_NAME, LiveServer, build_checkpoint, wait_for


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """test_serve's random tiny checkpoint, with room in its context for tool definitions."""
    out = build_checkpoint(tmp_path_factory.mktemp("ext") / "random")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    return out


@pytest.fixture(scope="module")
def server(checkpoint):
    with LiveServer(checkpoint, ServeSettings(served_model_name=MODEL_NAME)) as live:
        yield live


def reference_logprobs(live: LiveServer, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's own full forward: row i scores token i + 1."""
    with torch.inference_mode():
        return torch.log_softmax(live.engine.model(torch.tensor([ids]))[0].float(), dim=-1)


# ---- echo + prompt logprobs ---------------------------------------------------------------------------------
def test_echo_with_max_tokens_0_scores_token_id_prompts(server):
    prompts = [server.tokenizer.encode("The quick brown fox jumps"), server.tokenizer.encode("Hello there, how")]
    r = server.client().completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=0, echo=True, logprobs=2)
    assert len(r.choices) == 2
    for choice, ids in zip(sorted(r.choices, key=lambda c: c.index), prompts):
        lp = choice.logprobs
        assert choice.text == server.tokenizer.decode(ids) and choice.finish_reason == "length"
        assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        ref = reference_logprobs(server, ids)
        expected = [ref[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
        assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-3)
        for i, top in enumerate(lp.top_logprobs[1:]):
            assert 1 <= len(top) <= 2  # two ids may print as the same string
            assert max(top.values()) == pytest.approx(ref[i].max().item(), abs=1e-3)
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert r.usage.completion_tokens == 0


def test_echo_with_one_generated_token_as_lm_eval_asks(server):
    """lm-eval's local-completions: max_tokens 1, logprobs 1, echo, temperature 0; it reads [ctxlen:-1]."""
    ids = server.tokenizer.encode("I am fine, thank you")
    for _ in range(2):  # the second run's prompt is in the prefix cache: scoring must not use it
        r = server.client().completions.create(model=MODEL_NAME, prompt=ids, max_tokens=1, echo=True, logprobs=1,
                                               temperature=0, seed=1234)
        lp = r.choices[0].logprobs
        assert len(lp.token_logprobs) == len(ids) + 1
        ref = reference_logprobs(server, ids)
        assert lp.token_logprobs[1:-1] == pytest.approx([ref[i, ids[i + 1]].item() for i in range(len(ids) - 1)],
                                                        abs=1e-3)
        assert lp.token_logprobs[-1] == pytest.approx(ref[-1].max().item(), abs=1e-3)  # greedy: the argmax


def test_echo_with_stream_is_400(server):
    with pytest.raises(openai.BadRequestError, match="echo"):
        server.client().completions.create(model=MODEL_NAME, prompt="Hi", echo=True, stream=True)


# ---- structured output ------------------------------------------------------------------------------------
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0,
                         "maximum": 150}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}


def test_json_schema_output_validates_with_random_weights(server):
    client = server.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Who?"}], n=2,
                                       max_tokens=80, seed=3, temperature=1.0, response_format=fmt)
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    stream = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Who?"}],
                                            max_tokens=80, seed=3, temperature=1.0, response_format=fmt, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == r.choices[0].message.content  # n=2's first choice has seed 3, as the single stream
    assert server.metrics()["hemat_engine_grammar_states"] == 0


def test_json_object_regex_and_choice(server):
    client = server.client()
    user = [{"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model=MODEL_NAME, messages=user, max_tokens=120, seed=1,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        json.loads(r.choices[0].message.content)
    r = client.completions.create(model=MODEL_NAME, prompt="Date:", max_tokens=20, seed=2,
                                  extra_body={"guided_regex": r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"})
    assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]", r.choices[0].text)
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL_NAME, messages=user, max_tokens=10, seed=seed,
                                           extra_body={"guided_choice": ["yes", "no", "maybe so"]})
        assert r.choices[0].message.content in ("yes", "no", "maybe so")


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "response_format"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
])
def test_bad_constraints_are_400_naming_the_field(server, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=5, extra_body=extra)
    assert info.value.body["param"] == param, info.value.body
    assert server.metrics()["hemat_engine_grammar_states"] == 0


# ---- function calling -------------------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "days"],
                   "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1,
                                                                                "maximum": 7}}}}}
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 5}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def assert_valid_call(call, tools):
    (tool,) = [t for t in tools if t["function"]["name"] == call.function.name]
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "now"}}])
def test_forced_tool_calls_validate_streamed_and_not(server, choice):
    client, tools = server.client(), [WEATHER, CLOCK]
    r = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=tools, tool_choice=choice,
                                       max_tokens=80, seed=5)
    (c,) = r.choices
    assert c.finish_reason == "tool_calls" and c.message.content is None
    (call,) = c.message.tool_calls
    assert_valid_call(call, tools)
    if isinstance(choice, dict):
        assert call.function.name == "now"
    with client.chat.completions.stream(model=MODEL_NAME, messages=ASK, tools=tools, tool_choice=choice,
                                        max_tokens=80, seed=5) as stream:
        final = stream.get_final_completion()  # the openai client assembles delta.tool_calls
    (streamed,) = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls"
    assert (streamed.function.name, streamed.function.arguments) == (call.function.name, call.function.arguments)
    assert server.metrics()["hemat_engine_grammar_states"] == 0


def test_tool_history_renders_through_the_template_and_auto_text_is_content(server):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    r = server.client().chat.completions.create(model=MODEL_NAME, messages=history, tools=[WEATHER], max_tokens=8,
                                                seed=1, temperature=0)
    rendered = server.tokenizer.apply_chat_template(
        ASK + [{"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Paris", "days": 1}}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}], tools=[WEATHER])
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}</tool_call>' in rendered
    assert r.usage.prompt_tokens == len(server.tokenizer.encode(rendered))
    (c,) = r.choices  # a random model's text is not a call: it comes back as content
    assert c.message.tool_calls is None and isinstance(c.message.content, str) and c.finish_reason == "length"


@pytest.mark.parametrize("tools, choice, param", [
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}], "auto",
     "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}], "required",
     "tools[0].function.parameters"),
    ([WEATHER, WEATHER], "auto", "tools[1].function.name"),
])
def test_bad_tools_are_400(server, tools, choice, param):
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(model=MODEL_NAME, messages=ASK, tools=tools, tool_choice=choice,
                                                max_tokens=5)
    assert info.value.body["param"] == param, info.value.body


@pytest.mark.parametrize("family, text, calls, content", [
    ("hermes", 'Sure.<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', [("f", {"a": 1})], "Sure."),
    ("hermes", '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g", "arguments": '
               '"{\\"b\\": 2}"}</tool_call>', [("f", {}), ("g", {"b": 2})], ""),
    ("hermes", '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>', [], None),
    ("hermes", "<tool_call>not json</tool_call>", [], None),
    ("llama3", '<|python_tag|>{"name": "f", "parameters": {"a": "x"}}', [("f", {"a": "x"})], ""),
    ("llama3", '{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"b": 1}}', [("f", {}), ("g", {"b": 1})],
     ""),
    ("llama3", "{not a call} and prose", [], None),
    ("deepseek", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{\"a\": 1}\n```"
                 "<｜tool▁call▁end｜><｜tool▁calls▁end｜>", [("f", {"a": 1})], ""),
    ("deepseek", "<｜tool▁calls▁begin｜>garbage", [], None),
])
def test_call_parsing_per_template_family(family, text, calls, content):
    from hemat.serve.tools import ToolSyntax

    got_content, got = ToolSyntax(family).parse(text, {"f", "g"})
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert got_content == (text if content is None else content)


# ---- lm-evaluation-harness ----------------------------------------------------------------------------------
def test_lm_eval_local_completions_matches_hemat_choice_task(server, checkpoint, tmp_path):
    """lm-eval's local-completions model (token-id prompts in batches, echo + logprobs) against the live
    server scores a multiple-choice file as hemat's own choice: task does on the same checkpoint."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import hemat
    from hemat.eval.choice import evaluate_choice, load_choice_file

    questions = [("2+2?", ["3", "4"], 1), ("Sky color?", ["blue", "green"], 0),
                 ("A cat sat on the?", ["mat", "sun", "moon"], 0), ("Dogs run in the?", ["park", "code"], 1),
                 ("Hello there! How are you?", ["fine, thank you", "the river bank"], 0)]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in questions))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "hemat_served_mc.yaml").write_text(
        "task: hemat_served_mc\ndataset_path: json\ndataset_kwargs:\n"
        f"  data_files:\n    test: {data}\n  cache_dir: {tmp_path / 'cache'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: answer\ndoc_to_choice: choices\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    model_args = {"base_url": f"{server.url}/v1/completions", "model": MODEL_NAME, "tokenizer": str(checkpoint),
                  "tokenizer_backend": "huggingface", "add_bos_token": True, "num_concurrent": 1, "max_retries": 1}
    results = lm_eval.simple_evaluate(model="local-completions", model_args=model_args, tasks=["hemat_served_mc"],
                                      task_manager=manager, batch_size=4)
    expected, records = evaluate_choice(hemat.from_pretrained(checkpoint), hemat.load_tokenizer(checkpoint),
                                        load_choice_file(data), 512)
    assert results["results"]["hemat_served_mc"]["acc,none"] == pytest.approx(expected["acc"])
    samples = sorted(results["samples"]["hemat_served_mc"], key=lambda s: s["doc_id"])
    assert [[float(r[0][0]) for r in s["resps"]] for s in samples] == [pytest.approx(r["logprobs"], abs=1e-3)
                                                                        for r in records]


def test_disconnect_mid_call_frees_pages_and_grammar_states(server):
    body = {"model": MODEL_NAME, "messages": ASK, "tools": [WEATHER], "tool_choice": "required", "stream": True,
            "max_tokens": 200}
    schema = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
    long = {"model": MODEL_NAME, "messages": ASK, "stream": True, "max_tokens": 600,
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}
    for request in (body, long):
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=request, timeout=30) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the first chunk: then go away mid-call
        wait_for(lambda: server.metrics()["hemat_engine_grammar_states"] == 0, what="grammar states freed")
        wait_for(lambda: (m := server.metrics())["hemat_engine_pages_free"] == m["hemat_engine_pages_total"],
                 what="pages freed")


def test_tool_stream_releases_content_and_holds_back_calls():
    from hemat.serve.tools import ToolStream, ToolSyntax

    stream = ToolStream(ToolSyntax("hermes"), {"f"})
    pieces = ["Let me ", "check.<tool", '_call>{"name": "f", ', '"arguments": {"a": 1}}</tool_call>']
    released = [stream.feed(p) for p in pieces]
    assert released == ["Let me ", "check.", "", ""]  # "<tool" could start a call: held back
    rest, calls = stream.finish()
    assert rest == "" and [(c.name, c.arguments) for c in calls] == [("f", '{"a": 1}')]
    plain = ToolStream(ToolSyntax("hermes"), {"f"})
    assert plain.feed("a <tool") == "a " and plain.finish() == ("<tool", [])


def test_constrained_greedy_output_is_the_same_with_and_without_mtp_drafts(checkpoint):
    """Drafts are masked and verified against masked targets: greedy tokens cannot change."""
    import hemat
    from hemat.infer.constraints import Guide
    from hemat.infer.engine import Engine
    from hemat.infer.sampling import SamplingParams

    model, tokenizer = hemat.from_pretrained(checkpoint), hemat.load_tokenizer(checkpoint)
    params = [SamplingParams(temperature=0, max_tokens=120, guide=Guide("json_schema", PERSON)),
              SamplingParams(temperature=0, max_tokens=12, guide=Guide("regex", "[a-z ]+ (yes|no)")),
              SamplingParams(temperature=0, max_tokens=12)]
    prompts = ["Who are you?", "The quick brown fox", "Hello there"]
    outputs = {}
    for speculative in ("auto", "off"):
        engine = Engine(model, tokenizer, speculative=speculative)
        outputs[speculative] = [r.outputs[0].token_ids for r in engine.generate(prompts, params)]
        stats = engine.stats()
        assert stats["grammar_states"] == 0
        assert speculative == "off" or stats["spec_drafted"] > 0
    assert engine.spec_depth == 0 and outputs["auto"] == outputs["off"]
    jsonschema.validate(json.loads(tokenizer.decode(outputs["auto"][0], skip_special_tokens=True)), PERSON)
