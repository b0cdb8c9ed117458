"""The embedded default end to end, at a size that runs in seconds."""

import json

import pytest

import hemat
from hemat.cli import main


def test_speedrun_writes_a_loadable_checkpoint_and_a_report_card(tmp_path):
    out = tmp_path / "run"
    main(["speedrun", "--out", str(out), "--set", "speedrun.problems=400", "--set", "speedrun.vocab_size=400",
          "--set", "train.steps=4", "--set", "train.seq_len=64", "--set", "train.batch_tokens=256",
          "--set", "train.micro_batch_size=2", "--set", "train.eval_interval=2", "--set", "train.eval_tokens=128",
          "--set", "train.progress=false"])
    report = (out / "report.md").read_text()
    for heading in ("## Summary", "## Model", "## Data", "## Pretraining", "## Cost per stage"):
        assert heading in report
    ledger = json.loads((out / "ledger.json").read_text())
    assert [s["stage"] for s in ledger["stages"]] == ["corpus", "tokenizer", "data", "pretrain"]
    assert ledger["stages"][-1]["tokens"] == 4 * 256 and ledger["totals"]["dollars"] > 0
    records = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[-1]["val_bpb"] > 0
    assert (out / "pretrain" / "loss.png").stat().st_size > 0
    checkpoint = out / "pretrain" / "checkpoints" / "step-4"
    model = hemat.from_pretrained(checkpoint)
    tokenizer = hemat.load_tokenizer(checkpoint)
    assert model.config.vocab_size == tokenizer.vocab_size and model.mtp_layers
    ids = tokenizer.encode("Question: Ana has 3 apples.")
    assert model(__import__("torch").tensor([ids])).shape == (1, len(ids), tokenizer.vocab_size)


def test_speedrun_refuses_to_overwrite_a_run(tmp_path):
    (tmp_path / "run" / "pretrain").mkdir(parents=True)
    with pytest.raises(SystemExit, match="already holds a speedrun"):
        main(["speedrun", "--out", str(tmp_path / "run")])
