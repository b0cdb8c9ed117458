"""Distillation: the verifier on crafted responses (reasoning in a field or inline), and the whole path
against a live `hemat serve` on 127.0.0.1 whose tiny model is scripted to answer every question with
`<think>Six times seven</think>The answer is 42.`: a problem whose answer is 42 is kept, the others are
rejected, and a second run resumes instead of asking again."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hemat.cli import main
from hemat.model.transformer import CausalLM
from hemat.serve.app import ServeSettings
from hemat.tokenizer import train_tokenizer
from hemat.train.distill import (
    TeacherError, TeacherSettings, accept, distill, done_ids, reasoning_and_answer, rejected_path,
)
from hemat.train.rewards import Problem, load_problems
from hemat.train.sft import encode_chat, read_chats
from test_serve import LiveServer, tiny_config

REASONING, ANSWER = "Six times seven", "The answer is 42."
KEY = "teacher-key"


def build_teacher(out: Path) -> Path:
    """A tokenizer and a tiny DeepSeek-V3 whose weights make it a bigram chain: after <|assistant|> it
    writes <think>REASONING</think>ANSWER<eos> whatever the question (as test_serve's scripted model)."""
    out.mkdir(parents=True, exist_ok=True)
    corpus = f"What is 6 times 7? {REASONING}. {ANSWER}\nWhat is 3 plus 4? The sum is 7.\n" * 40
    (out / "corpus.txt").write_text(corpus, encoding="utf-8")
    tokenizer = train_tokenizer([out / "corpus.txt"], 300, out, show_progress=False)
    (out / "corpus.txt").unlink()
    torch.manual_seed(0)
    model = CausalLM(tiny_config(tokenizer.vocab_size))
    chain = ([tokenizer.token_to_id("<|assistant|>"), tokenizer.think_start_id] + tokenizer.encode(REASONING)
             + [tokenizer.think_end_id] + tokenizer.encode(ANSWER) + [tokenizer.eos_token_id])
    assert len(set(chain)) == len(chain), f"the scripted chain repeats a token: {chain}"
    with torch.no_grad():
        for layer in model.model.layers[: model.config.num_hidden_layers]:
            for name, param in layer.named_parameters():
                if name.endswith("o_proj.weight") or "down_proj" in name:
                    param.zero_()
        for i, (token, following) in enumerate(zip(chain, chain[1:])):
            model.model.embed_tokens.weight[token] = torch.nn.functional.one_hot(torch.tensor(i), model.config.hidden_size)
            model.lm_head.weight[following, i] = 10.0
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    checkpoint = build_teacher(tmp_path_factory.mktemp("distill") / "teacher")
    with LiveServer(checkpoint, ServeSettings(served_model_name="teacher", api_key=KEY)) as live:
        yield live


def message(content, **fields):
    return SimpleNamespace(content=content, **fields)


def test_verifier_on_crafted_responses():
    problem = Problem("p", "What is 6 times 7?", answer="42")
    # reasoning in a field (DeepSeek, hemat serve), in vLLM's field, or inline in the content
    assert reasoning_and_answer(message("The answer is 42.", reasoning_content="6 * 7 = 42")) == ("6 * 7 = 42", "The answer is 42.")
    assert reasoning_and_answer(message("The answer is 42.", reasoning="6 * 7")) == ("6 * 7", "The answer is 42.")
    assert reasoning_and_answer(message("<think>\n6 * 7 = 42\n</think>\nThe answer is 42.")) == ("6 * 7 = 42", "The answer is 42.")
    assert reasoning_and_answer(message("The answer is 42.")) == (None, "The answer is 42.")
    assert accept(problem, "6 * 7 = 42", "The answer is 42.")
    assert not accept(problem, "6 * 7 = 41", "The answer is 41.")  # wrong answer: rejected
    assert not accept(problem, "6 * 7 = 42", "I am not sure.")  # no final answer
    assert not accept(problem, "The answer is 42", "So, 41.")  # the answer counts, not the reasoning
    assert not accept(problem, None, "The answer is 42.")  # no reasoning: not a trace to learn from
    assert accept(problem, None, "The answer is 42.", require_reasoning=False)
    assert accept(Problem("q", "Half?", answer="0.5"), "1/2", "\\boxed{\\frac{1}{2}}")


def write_problems(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat_requests(server) -> float:
    return sum(v for k, v in server.metrics().items()
               if k.startswith("hemat_requests_total") and "chat/completions" in k)


def test_distill_against_a_live_server(teacher, tmp_path):
    problems = load_problems(write_problems(tmp_path / "problems.jsonl", [
        {"id": "six-sevens", "question": "What is 6 times 7?", "answer": "42"},
        {"id": "three-fours", "question": "What is 3 plus 4?", "answer": "3 + 4 = 7\n#### 7"},
        {"id": "forty-two", "question": "What is 40 plus 2?", "answer": 42},
    ]))
    settings = TeacherSettings(base_url=f"{teacher.url}/v1", model="teacher", api_key=KEY, temperature=0.0,
                               max_tokens=32, samples=2, keep=1, concurrency=2)
    out = tmp_path / "traces.jsonl"
    stats = distill(problems, out, settings, log=lambda *_: None)
    assert (stats["accepted"], stats["rejected"], stats["failed"], stats["skipped"]) == (2, 1, 0, 0)
    assert stats["completion_tokens"] > 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == ["forty-two", "six-sevens"]
    assistant = records[0]["messages"][-1]
    assert assistant == {"role": "assistant", "reasoning_content": REASONING, "content": ANSWER}
    assert records[0]["messages"][0]["role"] == "user" and records[0]["teacher"] == "teacher"
    rejected = [json.loads(line) for line in rejected_path(out).read_text().splitlines()]
    assert [r["id"] for r in rejected] == ["three-fours"] and len(rejected[0]["attempts"]) == 2
    # the output is SFT data as it stands
    tokenizer_dir = teacher.tokenizer
    for messages in read_chats(out):
        ids, mask = encode_chat(tokenizer_dir, messages)
        assert sum(mask) > 0
    # a second run asks nothing: every problem is in one file or the other
    before = chat_requests(teacher)
    assert before == 4  # one request per accepted problem, both attempts for the rejected one
    again = distill(problems, out, settings, log=lambda *_: None)
    assert (again["skipped"], again["accepted"], again["rejected"]) == (3, 0, 0)
    assert chat_requests(teacher) == before
    # a line cut short by a kill is dropped and its problem asked again; the CLI appends the rest
    with open(out, "a") as f:
        f.write('{"id": "half-writ')
    assert done_ids(out) == {"forty-two", "six-sevens"} and out.read_text().endswith("\n")
    more = write_problems(tmp_path / "more.jsonl", [{"id": "again-42", "question": "What is 21 times 2?", "answer": "42"}])
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--base-url", f"{teacher.url}/v1", "--teacher", "teacher", "--api-key", KEY,
              "--problems", str(more), "--out", str(out), "--temperature", "0", "--max-tokens", "32"])
    assert exit_info.value.code == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()][-1] == "again-42"


def test_a_bad_key_stops_the_run(teacher, tmp_path):
    settings = TeacherSettings(base_url=f"{teacher.url}/v1", model="teacher", api_key="wrong", max_tokens=8)
    with pytest.raises(TeacherError, match="refused model 'teacher'"):
        distill([Problem("p", "What is 6 times 7?", answer="42")], tmp_path / "t.jsonl", settings, log=lambda *_: None)
    with pytest.raises(TeacherError, match="cannot reach"):
        distill([Problem("p", "q", answer="1")], tmp_path / "t.jsonl",
                TeacherSettings(base_url="http://127.0.0.1:9/v1", model="x", max_retries=0), log=lambda *_: None)
