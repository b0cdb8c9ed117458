"""LoRA on the training stages: `hemat sft --lora` killed with SIGKILL and resumed reproduces an uninterrupted
run's losses exactly, its checkpoints hold only the adapter (PEFT's files) and load as base + adapter; GRPO's
reference is the base with its adapters off; gradient checkpointing leaves the gradients unchanged."""

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hemat.model.hf import from_pretrained
from hemat.model.lora import LoraConfig, add_adapters
from hemat.train.grpo import load_grpo_config, run_grpo
from hemat.train.loop import lm_loss, recompute_in_backward
from test_resume import start, wait_for_step
from test_sft import FAST, make_checkpoint

STEPS = 8
SFT = ["sft.problems=200", "sft.val_examples=0", f"sft.steps={STEPS}", "sft.seq_len=128", "sft.batch_tokens=256",
       "sft.micro_batch_size=2", "sft.lr=1e-2", "sft.warmup_steps=0", "sft.checkpoint_interval=1",
       "sft.keep_checkpoints=2", "train.gradient_checkpointing=true", "train.num_threads=1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("lora") / "base")


def sft_cmd(checkpoint: Path, run: Path) -> list[str]:
    overrides = [x for item in FAST + SFT for x in ("--set", item)]
    return [sys.executable, "-m", "hemat", "sft", "--model", str(checkpoint), "--run-dir", str(run),
            "--lora", "4", "--set", "lora.alpha=8", *overrides]


def losses(run: Path) -> dict[int, tuple]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in records}


def killed_and_resumed(command, tmp_path: Path) -> tuple[Path, str, str]:
    """Run `command(run_dir)` through, and again killed with SIGKILL after step 3 and resumed; assert both
    runs log bit-identical losses that fall → (the uninterrupted run's directory, its stdout, the resume's)."""
    reference = tmp_path / "reference"
    done = subprocess.run(command(reference), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    run = tmp_path / "killed"
    process = start(command(run), tmp_path / "killed.log")
    seen = wait_for_step(process, run, 3, timeout=120)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL and seen < STEPS
    resumed = subprocess.run([sys.executable, "-m", "hemat", "sft", "--run-dir", str(run), "--resume"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout
    assert losses(run) == losses(reference)  # bit-identical, step by step
    assert losses(reference)[STEPS][0] < losses(reference)[1][0]  # the adapters learn
    return reference, done.stdout, resumed.stdout


def test_lora_sft_killed_and_resumed_reproduces_every_loss(checkpoint, tmp_path):
    reference, stdout, _ = killed_and_resumed(lambda run: sft_cmd(checkpoint, run), tmp_path)
    assert "lora: rank 4 on" in stdout

    final = reference / "checkpoints" / f"step-{STEPS}"
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    assert (final / "trainer_state" / "state.json").is_file() and (final / "tokenizer.json").is_file()
    adapter = load_file(final / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.model.layers.") and ".lora_" in k for k in adapter)
    # the checkpoint loads wherever a checkpoint does: as its base with the adapter merged in
    base, merged = from_pretrained(checkpoint), from_pretrained(final)
    tokens = torch.tensor([[3, 5, 7, 11, 13]])
    with torch.no_grad():
        assert (base(tokens) - merged(tokens)).abs().max() > 1e-3
    for name, p in base.state_dict().items():
        if "self_attn" not in name and "mlp" not in name or name.endswith(("norm.weight", "gate.weight")):
            assert torch.equal(p, merged.state_dict()[name]), name  # only adapted projections change
    # generation: base + --lora is the merged checkpoint, token for token
    def generate(*model_args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "hemat", "generate", *model_args, "--max-tokens", "6",
                               "--temperature", "0", "--ignore-eos", "--prompt", "Maya has"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert generate("--model", str(checkpoint), "--lora", str(final)) == generate("--model", str(final))


def test_gradient_checkpointing_gives_the_same_gradients(checkpoint):
    model = from_pretrained(checkpoint)
    add_adapters(model, LoraConfig(rank=4))
    model.train()
    tokens = torch.randint(0, model.config.vocab_size, (2, 24))
    batch = (tokens[:, :-1], tokens[:, 1:])

    def grads():
        model.zero_grad()
        lm_loss(model, batch, mtp_weight=0.3)[0].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    for layer in model.model.layers:
        recompute_in_backward(layer)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name, g in plain.items():
        assert torch.allclose(g, checkpointed[name], atol=1e-6), name


def test_lora_grpo_reference_is_the_base_with_adapters_off(checkpoint, tmp_path):
    overrides = FAST + [f"grpo.model={checkpoint}", "grpo.problems=20", "grpo.prompts_per_step=2",
                        "grpo.group_size=4", "grpo.max_new_tokens=8", "grpo.micro_batch_size=4", "grpo.lr=1e-2",
                        "grpo.warmup_steps=0", "grpo.temperature=1.0", "grpo.eval_problems=0", "grpo.steps=2",
                        "grpo.minibatches=1", "lora.rank=4"]

    def score(problem, completion_ids, text):  # parity of the first token: groups with mixed rewards
        from hemat.train.rewards import verify

        return verify(problem, text), float(completion_ids[0] % 2)

    run = tmp_path / "run"
    run_grpo(load_grpo_config("cpu-tiny", overrides), run, score_fn=score)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["kl"] == 0.0  # a fresh adapter (B = 0) is the base: no distance to the reference
    # step 2's rollout scores the reference after step 1 moved the adapters: were the reference the adapted
    # model (adapters on), the on-policy KL would be 0 again
    assert math.isfinite(records[1]["kl"]) and records[1]["kl"] > 0
    assert (run / "checkpoints" / "step-2" / "adapter_model.safetensors").is_file()


def test_chunked_cross_entropy_with_a_frozen_head_matches_torch():
    """LoRA freezes the output head: the chunked loss then skips its gradient, and the hidden states' is exact."""
    from hemat.train.loop import token_cross_entropy

    hidden = torch.randn(2, 10, 16, requires_grad=True)
    head, targets = torch.randn(50, 16), torch.randint(0, 50, (2, 10))
    token_cross_entropy(hidden, head, targets, chunk=4).backward()
    reference = hidden.detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy((reference @ head.T).flatten(0, 1), targets.flatten()).backward()
    assert torch.allclose(hidden.grad, reference.grad, atol=1e-6)
