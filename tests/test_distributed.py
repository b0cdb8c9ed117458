"""Two processes on CPU (gloo) through torchrun: DDP and FSDP2 give the losses of one process with
the same global batch, and a checkpoint saved by two ranks resumes on one."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_train import make_shards, write_config

STEPS = 6


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    return done.stdout


def pretrain_args(config: Path, shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["pretrain", "--config", str(config), "--data", str(shards), "--run-dir", str(run_dir), *extra]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    # global batch 8 sequences: 1 process × 2 micro-batches of 4, or 2 processes × 1 micro-batch of 4
    config = write_config(root / "run.yaml", steps=STEPS, batch_tokens=256, checkpoint_interval=3,
                          eval_interval=3, keep_checkpoints=3)
    shards = make_shards(root / "shards")
    single = root / "single"
    run([sys.executable, "-m", "hemat", *pretrain_args(config, shards, single)])
    return config, shards, single


def test_ddp_matches_one_process(tmp_path, setup):
    config, shards, single = setup
    ddp = tmp_path / "ddp"  # torchrun directly, as a user would launch it
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "hemat",
         *pretrain_args(config, shards, ddp)])
    expected, got = losses(single), losses(ddp)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step
    val = [json.loads(line).get("val_loss") for line in (ddp / "metrics.jsonl").read_text().splitlines()]
    val_single = [json.loads(line).get("val_loss") for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert val[2] == pytest.approx(val_single[2], abs=1e-5)  # the same validation sequences on 1 or 2 ranks
    ledger = json.loads((ddp / "ledger.json").read_text())["stages"][0]
    assert ledger["tokens"] == STEPS * 256 and ledger["device_count"] == 2  # 2 ranks × 1 thread


def test_fsdp_with_muon_matches_one_process_and_its_checkpoint_resumes_on_one(tmp_path, setup):
    """FSDP2 shards every matrix, so Muon must gather each one to orthogonalise it: the same losses
    as one process, and the 2-rank checkpoint (weights, Muon and AdamW state) continues on one."""
    config, shards, _ = setup
    muon = ["--set", "train.optimizer=muon"]
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    run([sys.executable, "-m", "hemat", *pretrain_args(config, shards, single, *muon)])
    run([sys.executable, "-m", "hemat", *pretrain_args(config, shards, fsdp, *muon, "--set", "train.parallel=fsdp",
                                                       "--nproc", "2")])
    expected, got = losses(single), losses(fsdp)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step
    state = json.loads((fsdp / "checkpoints" / "step-3" / "trainer_state" / "state.json").read_text())
    assert state["world_size"] == 2

    resumed = tmp_path / "resumed"  # the 2-rank checkpoint, continued by one process in a new run directory
    out = run([sys.executable, "-m", "hemat", *pretrain_args(config, shards, resumed, *muon, "--resume",
                                                             str(fsdp / "checkpoints" / "step-3"))])
    assert "at step 3" in out
    got = losses(resumed)
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step
