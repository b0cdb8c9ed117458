"""The embedded default end to end, at a size that runs in seconds."""

import json
import re

import pytest
import torch

import hemat
from hemat.cli import main


TINY = {"speedrun.problems": 400, "speedrun.vocab_size": 400, "speedrun.eval_problems": 6,
        "speedrun.eval_max_tokens": 24, "speedrun.traces": 2,
        "train.steps": 4, "train.seq_len": 64, "train.batch_tokens": 256, "train.micro_batch_size": 2,
        "train.eval_interval": 2, "train.eval_tokens": 128, "train.progress": "false",
        "sft.problems": 60, "sft.val_examples": 0, "sft.steps": 2, "sft.seq_len": 128, "sft.batch_tokens": 256,
        "sft.micro_batch_size": 2, "sft.warmup_steps": 0,
        "grpo.steps": 2, "grpo.problems": 20, "grpo.prompts_per_step": 2, "grpo.group_size": 2,
        "grpo.max_new_tokens": 8, "grpo.micro_batch_size": 4}


def test_speedrun_runs_every_stage_and_writes_the_report_card(tmp_path):
    out = tmp_path / "run"
    main(["speedrun", "--out", str(out), *[a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]])
    ledger = json.loads((out / "ledger.json").read_text())
    assert [s["stage"] for s in ledger["stages"]] == ["corpus", "tokenizer", "data", "pretrain", "sft", "grpo",
                                                       "eval (sft model)", "eval (grpo model)"]
    pretrain = ledger["stages"][3]
    assert pretrain["tokens"] == 4 * 256 and ledger["totals"]["dollars"] > 0
    assert all(s["wall_seconds"] > 0 for s in ledger["stages"][3:])
    records = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[-1]["val_bpb"] > 0
    for png in ("pretrain/loss.png", "sft/loss.png", "grpo/grpo.png", "accuracy.png"):
        assert (out / png).stat().st_size > 0, png

    report = (out / "report.md").read_text()
    for heading in ("## Summary", "## Model", "## Data", "## Pretraining", "## SFT", "## GRPO",
                    "## Held-out accuracy", "## Sample traces before and after GRPO", "## Cost per stage"):
        assert heading in report
    for name in ("sft", "grpo"):  # the report's numbers are the eval's
        results = json.loads((out / "eval" / name / "results.json").read_text())
        assert results["tasks"]["arith"]["n"] == 6
        assert f"| {name.upper()} | {results['tasks']['arith']['metrics']['accuracy']:.1%} |" in report
    assert "| MTP drafts accepted in the SFT eval | " in report  # the eval decodes with MTP drafts
    drafts_row = next(line for line in report.splitlines() if line.startswith("| MTP drafts accepted in the SFT"))
    assert re.search(r"batch-1 greedy decoding \d+\.\d\d× plain drafting every step, \d+\.\d\d× with speculative "
                     r"auto \([\d,]+, [\d,]+ vs [\d,]+ tokens/s\)", drafts_row)
    samples = [json.loads(line) for line in (out / "eval" / "sft" / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["question"] in report and samples[1]["question"] in report
    assert samples[2]["question"] not in report

    # the final checkpoint is the GRPO model: loadable with its tokenizer, MTP layers kept
    checkpoint = out / "grpo" / "checkpoints" / "step-2"
    model = hemat.from_pretrained(checkpoint)
    tokenizer = hemat.load_tokenizer(checkpoint)
    assert model.config.vocab_size == tokenizer.vocab_size and model.mtp_layers and tokenizer.chat_template
    ids = tokenizer.encode("Question: Ana has 3 apples.")
    assert model(torch.tensor([ids])).shape == (1, len(ids), tokenizer.vocab_size)


def test_speedrun_checks_every_stage_config_before_starting(tmp_path):
    with pytest.raises(SystemExit, match="grpo.group_size"):
        main(["speedrun", "--out", str(tmp_path / "run"), "--set", "grpo.group_size=1"])
    assert not (tmp_path / "run").exists()


def test_speedrun_refuses_to_overwrite_a_run(tmp_path):
    (tmp_path / "run" / "pretrain").mkdir(parents=True)
    with pytest.raises(SystemExit, match="already holds a speedrun"):
        main(["speedrun", "--out", str(tmp_path / "run")])
