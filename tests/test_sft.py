"""SFT: the loss mask against the rendered chat template, packing that keeps conversations apart
(positions restart and a block-diagonal mask: a packed conversation's hidden states equal those of
the conversation alone), the loss going down on the shared loop, resume, the ledger and bad input.
The helpers here (tokenizer, tiny checkpoint) are also used by test_grpo.py."""

import json
from pathlib import Path

import pytest
import torch

from hemat import cost
from hemat.data.synthetic import format_chat, format_pretrain_document, train_problems
from hemat.model.config import ModelConfig
from hemat.model.transformer import CausalLM
from hemat.tokenizer import load_tokenizer, train_tokenizer
from hemat.train.sft import (
    DocumentMask, RowLoader, SFTDataError, encode_chat, load_sft_config, pack, read_chats, run_sft, sft_loss,
)

TINY = dict(
    model_type="deepseek_v3", hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
    first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
    n_group=1, topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
    max_position_embeddings=512, num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1,
)
FAST = ["train.peak_tflops=1.0", "train.progress=false", "train.num_threads=2"]


def make_tokenizer(out: Path, vocab_size: int = 400):
    """A tokenizer trained on the arithmetic corpus, in pretraining and chat form."""
    out.mkdir(parents=True, exist_ok=True)
    problems = train_problems(300, seed=1)
    text = "\n".join(format_pretrain_document(p) for p in problems)
    text += "\n" + "\n".join("\n".join(p.steps) + f"\nThe answer is {p.answer}." for p in problems)
    (out / "corpus.txt").write_text(text, encoding="utf-8")
    tokenizer = train_tokenizer([out / "corpus.txt"], vocab_size, out, show_progress=False)
    (out / "corpus.txt").unlink()
    return tokenizer


def make_checkpoint(out: Path, seed: int = 0, **overrides) -> Path:
    """A random tiny DeepSeek-V3 checkpoint with its tokenizer beside it."""
    tokenizer = make_tokenizer(out)
    torch.manual_seed(seed)
    CausalLM(ModelConfig(**{**TINY, "vocab_size": tokenizer.vocab_size, **overrides})).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("sft") / "pre" / "checkpoints" / "step-1")


CONVERSATION = [
    {"role": "system", "content": "You solve word problems."},
    {"role": "user", "content": "Maya buys 3 pens at $2 each. How many dollars does Maya spend?"},
    {"role": "assistant", "reasoning_content": "The pens cost 3 * 2 = 6 dollars.", "content": "The answer is 6."},
    {"role": "user", "content": "And 4 pens?"},
    {"role": "assistant", "content": "The answer is 8."},
]


def spans(mask: list[int]) -> list[tuple[int, int]]:
    out, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def test_mask_is_exactly_the_assistant_turns(checkpoint):
    tokenizer = load_tokenizer(checkpoint)
    ids, mask = encode_chat(tokenizer, CONVERSATION)
    rendered = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    assert tokenizer.decode(ids) == rendered
    replies = [tokenizer.decode(ids[a:b]) for a, b in spans(mask)]
    assert replies == ["<think>\nThe pens cost 3 * 2 = 6 dollars.\n</think>\nThe answer is 6.<|end_of_text|>",
                       "The answer is 8.<|end_of_text|>"]
    # the context before each reply is exactly the generation prompt the engine will see
    first = spans(mask)[0][0]
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True)
    assert ids[:first] == tokenizer.encode(prompt)
    assert sum(mask) == sum(b - a for a, b in spans(mask)) and set(mask) == {0, 1}


def test_packing_keeps_conversations_apart(checkpoint):
    tokenizer = load_tokenizer(checkpoint)
    chats = [format_chat(p)["messages"] for p in train_problems(3, seed=5)]
    examples = [encode_chat(tokenizer, m) for m in chats]
    lengths = [len(ids) - 1 for ids, _ in examples]
    rows = pack(examples, seq_len=sum(lengths) + 7)
    assert len(rows) == 1  # all three in one row, then 7 padding positions
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    for d, (start, n) in enumerate(zip(starts, lengths)):
        assert rows.positions[0, start: start + n].tolist() == list(range(n))  # positions restart
        assert set(rows.documents[0, start: start + n].tolist()) == {d}
        assert rows.mask[0, start: start + n].tolist() == examples[d][1][1:]  # the mask of the shifted targets
    assert rows.mask[0, sum(lengths):].sum() == 0 and set(rows.documents[0, sum(lengths):].tolist()) == {3}
    # the packed row's hidden states equal each conversation's own, computed alone
    model = CausalLM(ModelConfig(**{**TINY, "vocab_size": tokenizer.vocab_size})).eval()
    inputs, targets, mask, positions, documents = rows.batch(torch.tensor([0]))
    with torch.no_grad():
        packed = model.model(inputs, positions, DocumentMask(documents))[0]
        for start, n, (ids, _) in zip(starts, lengths, examples):
            alone = model.model(torch.tensor([ids[:-1]]))[0]
            torch.testing.assert_close(packed[start: start + n], alone, atol=1e-4, rtol=1e-4)
    # without packing: one conversation per row
    assert len(pack(examples, seq_len=max(lengths), packing=False)) == 3


def test_sft_loss_counts_only_assistant_targets(checkpoint):
    tokenizer = load_tokenizer(checkpoint)
    examples = [encode_chat(tokenizer, format_chat(p)["messages"]) for p in train_problems(4, seed=2)]
    rows = pack(examples, seq_len=256)
    model = CausalLM(ModelConfig(**{**TINY, "vocab_size": tokenizer.vocab_size})).eval()
    batch = rows.batch(torch.arange(len(rows)))
    loss, parts = sft_loss(model, batch)
    with torch.no_grad():
        logits = model(batch[0], batch[3], DocumentMask(batch[4]))
    selected = batch[2] != 0
    expected = torch.nn.functional.cross_entropy(logits[selected], batch[1][selected])
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert "lm_loss" in parts


def test_row_loader_resumes_in_place(checkpoint):
    tokenizer = load_tokenizer(checkpoint)
    rows = pack([encode_chat(tokenizer, format_chat(p)["messages"]) for p in train_problems(30, seed=4)], 128)
    a = RowLoader(rows, 4, seed=1)
    for _ in range(5):
        a.next_batch()
    b = RowLoader(rows, 4, seed=1)
    b.load_state_dict(a.state_dict())
    for _ in range(8):  # crosses an epoch boundary
        torch.testing.assert_close(a.next_batch(), b.next_batch())


def test_sft_trains_resumes_and_keeps_the_ledger(checkpoint, tmp_path):
    # the starting checkpoint's run has a ledger: SFT's starts with its stages
    pre_ledger = cost.Ledger(checkpoint.parent.parent)
    pre_ledger.update_stage("pretrain", tokens=1000, flops=1e9, wall_seconds=10.0, device="CPU", device_count=2,
                            price_per_device_hour=0.02, peak=1e9)
    pre_ledger.save()
    overrides = FAST + [f"sft.model={checkpoint}", "sft.problems=300", "sft.val_examples=20", "sft.steps=24",
                        "sft.seq_len=256", "sft.batch_tokens=1024", "sft.micro_batch_size=2", "sft.lr=5e-3",
                        "sft.warmup_steps=2", "sft.eval_interval=12", "sft.mtp_weight=0.3", "train.lr=1.0"]
    run = tmp_path / "run"
    result = run_sft(load_sft_config("cpu-tiny", overrides), run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 25))
    assert records[1]["lr"] == pytest.approx(5e-3)  # the peak after warm-up: sft.lr, not train.lr
    assert records[-1]["loss"] < 0.7 * records[0]["loss"]
    assert records[-1]["val_loss"] < records[11]["val_loss"] < 6.0 and "mtp_loss" in records[0]
    final = Path(result["checkpoint"])
    assert final.name == "step-24" and (final / "tokenizer.json").is_file() and (final / "tokenizer_config.json").is_file()
    assert (run / "loss.png").is_file()
    ledger = cost.Ledger.load(run)
    assert [s.stage for s in ledger.stages] == ["pretrain", "sft"] and ledger.stage("sft").tokens == 24 * 1024
    assert load_tokenizer(final).chat_template  # the checkpoint is ready for grpo, eval and serve
    # resume: four more steps continue the same run
    more = load_sft_config(run / "config.yaml", FAST + ["sft.steps=28"])
    run_sft(more, run, resume="latest")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 29))
    assert [s.stage for s in cost.Ledger.load(run).stages] == ["pretrain", "sft"]
    # SFT again on the SFT model: its stages come along and this one is counted apart
    again = load_sft_config("cpu-tiny", FAST + ["sft.problems=100", "sft.val_examples=0", "sft.steps=2",
                                                "sft.seq_len=256", "sft.batch_tokens=512", "sft.micro_batch_size=2"])
    run_sft(again, tmp_path / "again", model_dir=run / "checkpoints" / "step-28")
    assert [s.stage for s in cost.Ledger.load(tmp_path / "again").stages] == ["pretrain", "sft", "sft-2"]


def test_bad_chat_files_name_the_line(tmp_path):
    path = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(SFTDataError, match=r"chats.jsonl:2: no assistant message"):
        read_chats(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(SFTDataError, match=r"chats.jsonl:2: messages\[0\].role must be one of"):
        read_chats(path)
    path.write_text("{broken\n")
    with pytest.raises(SFTDataError, match=r"chats.jsonl:1: not valid JSON"):
        read_chats(path)
    assert read_chats(_write(tmp_path / "ok.jsonl", [good])) == [good["messages"]]


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
