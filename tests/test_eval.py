import json
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from hemat.errors import HematError
from hemat.eval.answers import answers_match, extract_answer
from hemat.eval.choice import (
    ChoiceItem, bits_per_byte, evaluate_choice, load_choice_file, loglikelihoods, rolling_windows,
)
from hemat.eval.code import build_program, check_solution, load_humaneval, pass_at_k, score_humaneval
from hemat.eval.math import load_gsm8k, score_math
from hemat.eval.tasks import EvalContext, EvalSettings, parse_task_specs
from hemat.model.config import ModelConfig
from hemat.model.hf import from_pretrained
from hemat.model.transformer import CausalLM
from hemat.tokenizer import load_tokenizer, train_tokenizer

CORPUS = (
    "Question: Maya buys 3 pencils at $2 each. How many dollars does Maya spend?\n"
    "Solution: The pencils cost 3 * 2 = 6 dollars. The answer is 6.\n"
    "The cat sat on the mat. A dog ran in the park. Birds sing in the morning.\n"
    "def add(a, b):\n    return a + b\n"
) * 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    (root / "corpus.txt").write_text(CORPUS)
    tokenizer = train_tokenizer([root / "corpus.txt"], 320, root / "model", show_progress=False)
    config = ModelConfig(
        model_type="deepseek_v3", vocab_size=tokenizer.vocab_size, hidden_size=48, intermediate_size=64,
        moe_intermediate_size=24, num_hidden_layers=2, num_attention_heads=3, n_routed_experts=4,
        n_shared_experts=1, num_experts_per_tok=2, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, first_k_dense_replace=1, num_nextn_predict_layers=1,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    CausalLM(config).save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def loaded(model_dir):
    return from_pretrained(model_dir), load_tokenizer(model_dir)


def _direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log P(ids[i] | ids[:i]) for i >= 1, from one plain forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0].float()
    return F.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


def _greedy(model, tokenizer, prompt: str, max_tokens: int) -> list[int]:
    """Greedy decoding by plain forward passes over the whole sequence, after the BOS document start."""
    ids, out = [tokenizer.bos_token_id] + tokenizer.encode(prompt), []
    with torch.no_grad():
        while len(out) < max_tokens:
            out.append(int(model(torch.tensor([ids + out]))[0, -1].argmax()))
            if out[-1] in tokenizer.eos_token_ids:
                break
    return out


# ---- pass@k and answers ---------------------------------------------------------------------------------


def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # 1 - C(3,1)/C(5,1)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 6, 5) == 1.0  # fewer than k failures: every k-subset holds a pass
    exact = 1 - Fraction(math.comb(190, 100), math.comb(200, 100))  # numbers far past float range
    assert pass_at_k(200, 10, 100) == pytest.approx(float(exact), rel=1e-12)
    with pytest.raises(HematError, match="k=6"):
        pass_at_k(5, 1, 6)


@pytest.mark.parametrize("predicted, reference, expected", [
    ("42", "42", True), ("1,234", "1234", True), ("3.50", "3.5", True), ("1/2", "0.5", True),
    ("\\frac{1}{2}", "0.5", True), ("\\boxed{18}", "18", True), ("$18.", "18", True), ("-7", "-7.0", True),
    ("x+x", "2*x", True), ("(x+1)^2", "x^2 + 2x + 1", True), ("sqrt(8)", "2*sqrt(2)", True),
    ("41", "42", False), ("1000001", "1000000", False), ("0.33", "1/3", False), ("x+1", "x+2", False),
    ("garbage", "42", False), ("", "42", False), (None, "42", False), ("1/0", "1", False),
    ("__import__('os').system('true')", "0", False), ("9**9**9**9", "1", False),
])
def test_answers_match(predicted, reference, expected):
    assert answers_match(predicted, reference) is expected


def test_extract_answer_prefers_explicit_forms():
    assert extract_answer("3 * 4 = 12 so 12 + 1 = 13. The answer is 13. Check: 2") == "13"
    assert extract_answer("work 5 + 5\n#### 1,234") == "1,234"
    assert extract_answer("so x = \\boxed{\\frac{1}{2}} and 7 more") == "\\frac{1}{2}"
    assert extract_answer("first 3 then 4") == "4"
    assert extract_answer("no number here") is None


def test_score_math_reads_the_answer_after_the_reasoning():
    from hemat.eval.math import MathProblem

    problems = [MathProblem("a", "q", "6"), MathProblem("b", "q", "7")]
    outputs = ["<think>3 * 2 = 6, maybe 7</think>\nThe answer is 6.", "<think>it is 7</think>\nThe answer is 8."]
    metrics, records = score_math(problems, outputs, chat=True)
    assert metrics["accuracy"] == 0.5
    assert [r["extracted"] for r in records] == ["6", "8"]


# ---- data files -----------------------------------------------------------------------------------------


def test_gsm8k_file_parsing_and_bad_line(tmp_path):
    good = {"question": "Tom has 3 apples and buys 1,000 more. How many?", "answer": "3 + 1000 = 1003\n#### 1,003"}
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
    problems = load_gsm8k(path)
    assert len(problems) == 2 and problems[0].answer == "1003"
    assert answers_match(extract_answer("The answer is 1,003."), problems[0].answer)
    assert len(load_gsm8k(path, limit=1)) == 1

    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n{not json\n")
    with pytest.raises(HematError, match=r"gsm\.jsonl:3: not valid JSON"):
        load_gsm8k(path)
    path.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(HematError, match=r"gsm\.jsonl:1: .*'####"):
        load_gsm8k(path)
    path.write_text(json.dumps({"answer": "#### 3"}) + "\n")
    with pytest.raises(HematError, match=r"gsm\.jsonl:1: field 'question'"):
        load_gsm8k(path)


def test_choice_file_shapes(tmp_path):
    lines = [
        {"question": "Sky color?", "choices": {"text": ["blue", "green"], "label": ["A", "B"]}, "answerKey": "A"},
        {"question": "2+2?", "choices": ["3", "4", "5"], "answer": 1},
        {"ctx": "A dog ran", "endings": ["in the park.", "on the moon.", "x", "y"], "label": "0"},
    ]
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    items = load_choice_file(path)
    assert [i.shape for i in items] == ["arc", "mmlu", "hellaswag"]
    assert [i.gold for i in items] == [0, 1, 0]
    assert items[0].context == "Question: Sky color?\nAnswer:" and items[0].choices == [" blue", " green"]
    assert items[2].context == "A dog ran" and items[2].choices[0] == " in the park."

    path.write_text(json.dumps(lines[0]) + "\n" + json.dumps({**lines[1], "answer": 7}) + "\n")
    with pytest.raises(HematError, match=r"mc\.jsonl:2: field answer must be an index below 3"):
        load_choice_file(path)
    path.write_text(json.dumps({**lines[0], "answerKey": "Z"}) + "\n")
    with pytest.raises(HematError, match=r"mc\.jsonl:1: answerKey 'Z'"):
        load_choice_file(path)


# ---- log-likelihood scoring -----------------------------------------------------------------------------


def test_choice_scoring_picks_the_higher_likelihood_option(loaded):
    model, tokenizer = loaded
    context, options = "The cat sat on the", [" mat.", " park in the morning."]
    eos = tokenizer.bos_token_id  # the document start
    direct = []
    for option in options:
        context_ids = tokenizer.encode(context)
        ids = [eos] + tokenizer.encode(context + option)
        direct.append(float(_direct_logprobs(model, ids)[len(context_ids):].sum()))
    scored = [lp for lp, _ in loglikelihoods(model, tokenizer, [(context, o) for o in options], 512)]
    assert scored == pytest.approx(direct, abs=1e-4)

    best = max(range(2), key=direct.__getitem__)
    items = [ChoiceItem(context, options, best, "arc"), ChoiceItem(context, options, 1 - best, "arc")]
    metrics, records = evaluate_choice(model, tokenizer, items, 512, batch_size=3)
    assert metrics["acc"] == 0.5
    assert [r["extracted"] for r in records] == [best, best]
    per_char = [lp / len(o) for lp, o in zip(direct, options)]
    assert records[0]["extracted_norm"] == max(range(2), key=per_char.__getitem__)


def test_bits_per_byte_equals_a_direct_computation(loaded):
    model, tokenizer = loaded
    text = "The cat sat on the mat. A dog ran in the park."
    ids = [tokenizer.bos_token_id] + tokenizer.encode(text)
    nll = -float(_direct_logprobs(model, ids).sum())
    result = bits_per_byte(model, tokenizer, text, max_length=512)
    assert result["tokens"] == len(ids) - 1 and result["bytes"] == len(text.encode())
    assert result["bpb"] == pytest.approx(nll / (math.log(2) * len(text.encode())), rel=1e-5)

    # past the context: with stride 1 every token is predicted from exactly the 8 tokens before it
    window = 8
    expected = 0.0
    for i in range(1, len(ids)):
        context = ids[max(0, i - window) : i + 1]
        expected -= float(_direct_logprobs(model, context)[-1])
    windowed = bits_per_byte(model, tokenizer, text, max_length=window, stride=1, batch_size=7)
    assert windowed["nll_nats"] == pytest.approx(expected, rel=1e-5)
    assert abs(windowed["nll_nats"] - nll) > 1e-3  # less context really was used


@pytest.mark.parametrize("n, max_length, stride", [(2, 4, 4), (10, 4, 4), (10, 4, 2), (37, 8, 3), (5, 16, 8)])
def test_rolling_windows_predict_every_token_once(n, max_length, stride):
    predicted = []
    for start, end, scored in rolling_windows(n, max_length, stride):
        assert end - start - 1 <= max_length and 1 <= scored < end - start
        predicted += range(end - scored, end)
    assert predicted == list(range(1, n))


# ---- HumanEval ------------------------------------------------------------------------------------------


def test_humaneval_canonical_solution_passes_and_wrong_one_fails():
    problems = load_humaneval(limit=2)
    assert [p["task_id"] for p in problems] == ["HumanEval/0", "HumanEval/1"]
    problem = problems[0]
    assert check_solution(problem, build_program(problem, problem["canonical_solution"], chat=False)).ok
    assert not check_solution(problem, build_program(problem, "    return False\n", chat=False)).ok
    chat_answer = f"Here it is:\n```python\n{problem['prompt']}{problem['canonical_solution']}```\n"
    assert check_solution(problem, build_program(problem, chat_answer, chat=True)).ok

    completions = [[problems[0]["canonical_solution"], "    return None\n"], ["    return None\n"] * 2]
    metrics, records = score_humaneval(problems, completions, chat=False, ks=[1, 2, 10], workers=2)
    assert metrics == {"pass@1": pytest.approx(0.25), "pass@2": pytest.approx(0.5)}
    assert [r["correct"] for r in records] == [True, False, False, False]


# ---- generation and the CLI -----------------------------------------------------------------------------


def test_base_prompts_generate_greedily_after_the_document_start(loaded):
    model, tokenizer = loaded
    ctx = EvalContext(model, tokenizer, EvalSettings(max_tokens=5))
    ctx.chat = False
    out = ctx.generate(["Question: Maya buys"])[0][0]
    assert out.token_ids == _greedy(model, tokenizer, "Question: Maya buys", 5)
    too_long = ctx.generate(["word " * 600])[0][0]
    assert too_long.finish_reason == "too_long" and too_long.text == ""


def test_task_spec_errors(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    specs = parse_task_specs(f"arith, bpb:{tmp_path / 'a.txt'}")
    assert [(s.name, s.key) for s in specs] == [("arith", "arith"), ("bpb", f"bpb:{tmp_path / 'a.txt'}")]
    for bad, message in [("nope", "unknown task 'nope'"), ("gsm8k", "needs a file"), ("arith:x", "takes no"),
                         (f"choice:{tmp_path / 'missing.jsonl'}", "does not exist"), ("arith,arith", "twice")]:
        with pytest.raises(HematError, match=message):
            parse_task_specs(bad)


def _run_cli(argv: list[str]):
    """`hemat eval ARGV` through this module's own parser (the other subcommands play no part)."""
    import argparse

    from hemat.eval.tasks import add_command

    parser = argparse.ArgumentParser(prog="hemat")
    assert add_command(parser.add_subparsers(dest="command")) == {"eval"}
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_writes_json_and_markdown(model_dir, tmp_path, capsys):
    gsm, mc, val = tmp_path / "gsm.jsonl", tmp_path / "mc.jsonl", tmp_path / "val.txt"
    gsm.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}) + "\n")
    mc.write_text(json.dumps({"question": "2+2?", "choices": ["3", "4"], "answer": 1}) + "\n")
    val.write_text("A dog ran in the park.\n")
    tasks = f"arith,gsm8k:{gsm},choice:{mc},bpb:{val},humaneval"
    out = tmp_path / "out"
    _run_cli(["eval", "--model", str(model_dir), "--tasks", tasks, "--limit", "2", "--max-tokens", "4",
              "--out", str(out), "--timeout", "5"])
    summary = json.loads((out / "results.json").read_text())
    assert summary["model"] == str(model_dir.resolve())
    assert set(summary["tasks"]) == set(tasks.split(","))
    assert summary["tasks"]["arith"]["n"] == 2 and 0 <= summary["tasks"]["arith"]["metrics"]["accuracy"] <= 1
    assert summary["tasks"][f"gsm8k:{gsm}"]["n"] == 1 and summary["tasks"]["arith"]["prompts_too_long"] == 0
    assert set(summary["tasks"][f"choice:{mc}"]["metrics"]) == {"acc", "acc_norm"}
    assert summary["tasks"][f"bpb:{val}"]["metrics"]["bpb"] > 0
    assert set(summary["tasks"]["humaneval"]["metrics"]) == {"pass@1"}
    assert summary["timing"]["total_s"] > 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    arith = [s for s in samples if s["task"] == "arith"]
    assert len(arith) == 2 and {"prompt", "output", "extracted", "correct"} <= set(arith[0])
    assert arith[0]["prompt"].startswith("<|begin_of_text|><|user|>")  # the tokenizer has a chat template
    assert len([s for s in samples if s["task"] == "humaneval"]) == 2
    table = (out / "results.md").read_text()
    assert "| arith | accuracy |" in table and "| humaneval | pass@1 |" in table
    assert table in capsys.readouterr().out


# ---- lm-evaluation-harness ------------------------------------------------------------------------------


def test_lm_eval_adapter_methods(loaded):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from hemat.eval.lm_eval_adapter import HematLM

    assert get_model("hemat") is HematLM and get_model("dummy").__name__ == "DummyLM"
    model, tokenizer = loaded
    lm = HematLM(model, tokenizer=tokenizer, batch_size="auto")

    def instance(kind, args, i=0):
        return Instance(request_type=kind, doc={}, arguments=args, idx=i)

    pairs = [("The cat sat on the", " mat."), ("", "A dog ran.")]
    got = lm.loglikelihood([instance("loglikelihood", p) for p in pairs])
    expected = loglikelihoods(model, tokenizer, pairs, 512)
    assert [g[0] for g in got] == pytest.approx([e[0] for e in expected], abs=1e-5)
    assert all(isinstance(g[1], bool) for g in got)

    text = "Birds sing in the morning."
    ids = [tokenizer.bos_token_id] + tokenizer.encode(text)
    (rolling,) = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (text,))])
    assert rolling == pytest.approx(float(_direct_logprobs(model, ids).sum()), abs=1e-4)

    requests = [instance("generate_until", ("Question: Maya buys", {"until": ["\n"], "max_gen_toks": 6})),
                instance("generate_until", ("The cat", {"until": ["zzz"], "max_gen_toks": 3}), 1)]
    texts = lm.generate_until(requests)
    assert len(texts) == 2 and all(isinstance(t, str) and "\n" not in t for t in texts)
    assert texts[1] == tokenizer.decode(_greedy(model, tokenizer, "The cat", 3), skip_special_tokens=True)


def test_lm_eval_simple_evaluate_drives_a_hemat_checkpoint(model_dir, loaded, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    import hemat.eval.lm_eval_adapter  # noqa: F401  registers "hemat"

    questions = [("2+2?", ["3", "4"], 1), ("Sky color?", ["blue", "green"], 0),
                 ("A cat sat on the?", ["mat", "sun"], 0), ("Dogs run in the?", ["park", "code"], 1)]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in questions))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "hemat_tiny_mc.yaml").write_text(
        "task: hemat_tiny_mc\ndataset_path: json\ndataset_kwargs:\n"
        f"  data_files:\n    test: {data}\n  cache_dir: {tmp_path / 'cache'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: answer\ndoc_to_choice: choices\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    results = lm_eval.simple_evaluate(model="hemat", model_args={"pretrained": str(model_dir)},
                                      tasks=["hemat_tiny_mc"], task_manager=manager, batch_size=4)
    model, tokenizer = loaded
    expected, records = evaluate_choice(model, tokenizer, load_choice_file(data), 512)
    assert results["results"]["hemat_tiny_mc"]["acc,none"] == pytest.approx(expected["acc"])
    samples = sorted(results["samples"]["hemat_tiny_mc"], key=lambda s: s["doc_id"])
    harness = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    assert harness == [pytest.approx(r["logprobs"], abs=1e-4) for r in records]
