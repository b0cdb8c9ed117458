"""Killing and resuming a real `python -m hemat pretrain` process: a SIGKILL after step k and a
--resume reproduce an uninterrupted run's losses bit for bit; SIGTERM saves a checkpoint and exits."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train import make_shards, write_config

STEPS = 16


def pretrain_cmd(config: Path, shards: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hemat", "pretrain", "--config", str(config), "--data", str(shards),
            "--run-dir", str(run), "--set", "train.num_threads=1", *extra]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)


def losses(run: Path) -> dict[int, tuple]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["mtp_loss"], r["grad_norm"]) for r in records}


def wait_for_step(process: subprocess.Popen, run: Path, step: int, timeout: float = 60) -> int:
    """Poll metrics.jsonl until it shows `step`; returns the last step seen."""
    deadline = time.monotonic() + timeout
    metrics = run / "metrics.jsonl"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the run exited (code {process.returncode}) before step {step}")
        if metrics.exists():
            lines = [line for line in metrics.read_text().splitlines() if line.endswith("}")]
            if lines and json.loads(lines[-1])["step"] >= step:
                return json.loads(lines[-1])["step"]
        time.sleep(0.005)
    pytest.fail(f"no step {step} within {timeout}s")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return make_shards(root / "shards"), write_config(root / "run.yaml", steps=STEPS, checkpoint_interval=1,
                                                      keep_checkpoints=2)


def test_sigkill_then_resume_reproduces_every_loss_exactly(tmp_path, setup):
    shards, config = setup
    reference = tmp_path / "reference"
    done = subprocess.run(pretrain_cmd(config, shards, reference), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr

    run = tmp_path / "killed"
    process = start(pretrain_cmd(config, shards, run), tmp_path / "killed.log")
    seen = wait_for_step(process, run, 5)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL and seen < STEPS

    # --resume alone: the run's own config.yaml (which records the data path and overrides) is used
    resume = [sys.executable, "-m", "hemat", "pretrain", "--run-dir", str(run), "--resume"]
    resumed = subprocess.run(resume, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout
    resumed_at = int(resumed.stdout.split(" at step ")[1].split()[0])
    assert 1 <= resumed_at < STEPS
    expected, got = losses(reference), losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == expected  # bit-identical: the same float for every step, before and after the kill
    ledger = json.loads((run / "ledger.json").read_text())["stages"][0]
    assert ledger["tokens"] >= STEPS * 128  # work lost after the last checkpoint is still paid for


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, setup):
    shards, config = setup
    run = tmp_path / "run"
    process = start(pretrain_cmd(config, shards, run, "--steps", "100000", "--set", "train.checkpoint_interval=0"),
                    tmp_path / "run.log")
    wait_for_step(process, run, 3)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, (tmp_path / "run.log").read_text()
    log = (tmp_path / "run.log").read_text()
    last = max(losses(run))
    assert f"stopped by SIGTERM at step {last}" in log
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == [f"step-{last}"]
    assert (run / "checkpoints" / f"step-{last}" / "trainer_state" / "state.json").is_file()
    assert (run / "loss.png").is_file() and (run / "ledger.json").is_file()
