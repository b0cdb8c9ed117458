"""GRPO: advantages for GRPO and Dr. GRPO, the clipped objective and the k3 KL against hand values, the
three loss aggregations through the trainer's micro-batch weighting, dynamic sampling, the variants'
defaults, a few steps end to end on a tiny DeepSeek-V3 and on a transformers-made Qwen2 checkpoint, and
the policy learning a toy reward."""

import json
import math
from pathlib import Path

import pytest
import torch

from hemat import cost
from hemat.model.hf import from_pretrained
from hemat.tokenizer import load_tokenizer
from hemat.train.config import ConfigValueError
from hemat.train.grpo import (
    AGGREGATIONS, GRPOConfig, RolloutSource, Sample, aggregation_weights, generate, group_advantages, grpo_loss,
    grpo_panels, informative_groups, k3_kl, load_grpo_config, prompt_ids, run_grpo, token_losses, token_objective,
)
from hemat.train.rewards import Problem, Verdict, embedded_problems, reward, verify
from hf_models import make_hf_model
from test_sft import FAST, make_checkpoint, make_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("grpo") / "sft", max_position_embeddings=256)


def settings(**changes) -> GRPOConfig:
    cfg = GRPOConfig(**changes).resolved()
    cfg.validate()
    return cfg


# ---- the math, by hand ----------------------------------------------------------------------------------
def test_group_advantages_grpo_and_dr_grpo():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 1.0, 1.0]])
    std0 = math.sqrt((4 * 0.25) / 3)  # Bessel-corrected std of [1, 0, 0, 1]
    std2 = math.sqrt((1 + 1 + 0 + 0) / 3)
    grpo = group_advantages(rewards, scale=True)
    torch.testing.assert_close(grpo[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std0 + 1e-4))
    torch.testing.assert_close(grpo[1], torch.zeros(4))  # all equal: no signal
    torch.testing.assert_close(grpo[2], torch.tensor([1.0, -1.0, 0.0, 0.0]) / (std2 + 1e-4))
    dr = group_advantages(rewards, scale=False)  # Dr. GRPO: centred, not scaled
    torch.testing.assert_close(dr, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [1.0, -1.0, 0.0, 0.0]]))
    assert informative_groups(rewards).tolist() == [True, False, True]


def test_clipped_objective_and_k3_against_hand_values():
    logp = torch.log(torch.tensor([0.5, 0.5, 0.28, 0.28, 0.4]))
    old = torch.log(torch.tensor([0.4, 0.4, 0.4, 0.4, 0.4]))  # ratios 1.25, 1.25, 0.7, 0.7, 1
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, 2.0])
    surrogate, clipped = token_objective(logp, old, adv, 0.2, 0.2)
    # min(ρA, clip(ρ)A): 1.25 → 1.2 for A > 0 (clipped); -1.25 stays for A < 0; 0.7 → 0.8 binds only for A < 0
    torch.testing.assert_close(surrogate, torch.tensor([1.2, -1.25, -0.8, 0.7, 2.0]))
    assert clipped.tolist() == [True, False, True, False, False]
    higher, clipped = token_objective(logp, old, adv, 0.2, 0.28)  # DAPO's clip-higher lets 1.25 through
    torch.testing.assert_close(higher, torch.tensor([1.25, -1.25, -0.8, 0.7, 2.0]))
    assert clipped.tolist() == [False, False, True, False, False]
    # k3 with π_ref/π = 0.5: 0.5 - ln 0.5 - 1; and 0 where the policies agree
    kl = k3_kl(torch.log(torch.tensor([0.5, 0.3])), torch.log(torch.tensor([0.25, 0.3])))
    torch.testing.assert_close(kl, torch.tensor([0.5 + math.log(2) - 1, 0.0]))
    # the per-token loss and its gradient on-policy: d/dlogp of -(ρA) + β·k3 is -A + β(1 - π_ref/π)
    lp = torch.log(torch.tensor([0.5, 0.2])).requires_grad_()
    ref = torch.log(torch.tensor([0.25, 0.4]))
    loss, kl, _ = token_losses(lp, lp.detach(), ref, torch.tensor([1.0, -2.0]), 0.2, 0.2, beta=0.1)
    torch.testing.assert_close(loss.detach(), torch.tensor([-1.0, 2.0]) + 0.1 * kl)
    loss.sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([-1.0 + 0.1 * (1 - 0.5), 2.0 + 0.1 * (1 - 2.0)]))


def test_aggregation_weights():
    assert aggregation_weights([2, 4], "sequence", 8) == [1 / 4, 1 / 8]  # 1 / (N |o_i|)
    assert aggregation_weights([2, 4], "token", 8) == [1 / 6, 1 / 6]  # 1 / Σ|o|
    assert aggregation_weights([2, 4], "constant", 8) == [1 / 16, 1 / 16]  # 1 / (N · max_new_tokens)


def test_variants_fill_their_defaults():
    grpo = settings()
    assert (grpo.beta, grpo.epsilon_high, grpo.scale_rewards, grpo.loss_aggregation, grpo.dynamic_sampling,
            grpo.overlong_buffer) == (0.001, 0.2, True, "sequence", False, 0)
    dr = settings(variant="dr_grpo")
    assert (dr.beta, dr.scale_rewards, dr.loss_aggregation) == (0.0, False, "constant")
    dapo = settings(variant="dapo", max_new_tokens=100)
    assert (dapo.epsilon, dapo.epsilon_high, dapo.beta, dapo.loss_aggregation, dapo.dynamic_sampling,
            dapo.overlong_buffer) == (0.2, 0.28, 0.0, "token", True, 25)
    assert settings(variant="dapo", beta=0.01, dynamic_sampling=False).dynamic_sampling is False  # explicit wins
    with pytest.raises(ConfigValueError, match="grpo.variant"):
        settings(variant="ppo")
    with pytest.raises(ConfigValueError, match="grpo.group_size"):
        settings(group_size=1)


# ---- the objective through the trainer's micro-batch weighting -------------------------------------------
def test_micro_batches_give_each_aggregation_exactly(checkpoint):
    """Σ over micro-batches of (their share of completion tokens) × grpo_loss — what the trainer does —
    equals each aggregation computed by hand from plain forwards, KL term included."""
    tokenizer = load_tokenizer(checkpoint)
    model = from_pretrained(checkpoint).eval()
    reference = from_pretrained(checkpoint).eval()
    with torch.no_grad():
        reference.lm_head.weight.add_(0.5 * torch.randn_like(reference.lm_head.weight))
    problems = embedded_problems(5, seed=9)
    gen = torch.Generator().manual_seed(0)
    samples = []
    for i, p in enumerate(problems):
        completion = torch.randint(10, tokenizer.vocab_size, (i + 1,), generator=gen).tolist()
        samples.append(Sample(prompt_ids(tokenizer, p), completion, "", "stop", Verdict(False, False), 0.0,
                              advantage=[1.0, -0.5, 2.0, -1.5, 0.25][i]))
    beta, max_new = 0.5, 8
    for temperature in (1.0, 0.7):  # the policy is softmax(logits / T), the distribution rollouts sample
        by_hand = []  # per sample: the token losses -A + β k3 (on-policy, ρ = 1)
        with torch.no_grad():
            for s in samples:
                ids = torch.tensor([s.prompt_ids + s.completion_ids])
                at = torch.arange(len(s.prompt_ids) - 1, ids.shape[1] - 1)
                targets = ids[0, at + 1]
                lp = torch.log_softmax(model(ids[:, :-1])[0, at] / temperature, -1).gather(1, targets[:, None])[:, 0]
                rlp = torch.log_softmax(reference(ids[:, :-1])[0, at] / temperature, -1).gather(1, targets[:, None])[:, 0]
                by_hand.append(-s.advantage + beta * k3_kl(lp, rlp))
        n, tokens = len(samples), sum(len(t) for t in by_hand)
        expected = {"sequence": sum(t.mean() for t in by_hand) / n, "token": sum(t.sum() for t in by_hand) / tokens,
                    "constant": sum(t.sum() for t in by_hand) / (n * max_new)}
        for mode in AGGREGATIONS:
            cfg = settings(loss_aggregation=mode, beta=beta, max_new_tokens=max_new, temperature=temperature)
            source = RolloutSource(model, reference, tokenizer, problems, cfg, accum=3, device=torch.device("cpu"))
            micro = source._micro_batches(samples)
            counts = [(mb[2] != 0).sum() for mb in micro]
            assert len(micro) == 3 and sum(counts) == tokens
            got = sum(c / tokens * grpo_loss(model, mb, 0.2, 0.2, beta, True, temperature)[0]
                      for c, mb in zip(counts, micro))
            torch.testing.assert_close(got, expected[mode], atol=1e-5, rtol=1e-5)
    # more micro-batches than sequences: empty ones add nothing
    empty = RolloutSource(model, None, tokenizer, problems, settings(beta=0.0), accum=7, device=torch.device("cpu"))
    micro = empty._micro_batches(samples)
    assert len(micro) == 7 and sum(int((mb[2] != 0).sum()) for mb in micro) == tokens
    loss, parts = grpo_loss(model, micro[-1], 0.2, 0.2, 0.0, on_policy=True)
    assert (micro[-1][2] != 0).sum() == 0 and loss.item() == 0.0 and "kl" not in parts


def test_dynamic_sampling_drops_groups_with_equal_rewards(checkpoint):
    tokenizer = load_tokenizer(checkpoint)
    model = from_pretrained(checkpoint)
    problems = [Problem(f"{kind}{i}", f"Question {i}: how many?", answer="1") for i in range(6) for kind in "ab"]
    calls = {"n": 0}

    def score(problem, completion_ids, text):  # "a" problems: always 1 (no signal); "b": alternating
        calls["n"] += 1
        value = 1.0 if problem.id.startswith("a") else float(calls["n"] % 2)
        return Verdict(bool(value), False), value

    common = dict(prompts_per_step=4, group_size=4, max_new_tokens=3, beta=0.0, log_kl=False)
    for dynamic in (True, False):
        cfg = settings(dynamic_sampling=dynamic, max_sampling_rounds=4, **common)
        source = RolloutSource(model, None, tokenizer, problems, cfg, accum=2, device=torch.device("cpu"), score_fn=score)
        micro = [source.next_batch() for _ in range(2)]
        metrics = source.take_metrics()
        advantages = torch.cat([mb[3][mb[2] != 0] for mb in micro])
        if dynamic:  # every group kept has a signal: no completion token with a zero advantage
            assert (advantages != 0).all() and 1 <= metrics["groups_used"] <= 4
            assert metrics["sampling_rounds"] >= 2 and metrics["groups_mixed"] < 1
        else:
            assert (advantages == 0).any() and metrics["groups_used"] == 4 and metrics["sampling_rounds"] == 1


# ---- end to end -------------------------------------------------------------------------------------------
def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


GRPO_FAST = FAST + ["grpo.problems=50", "grpo.prompts_per_step=2", "grpo.group_size=4", "grpo.max_new_tokens=12",
                    "grpo.micro_batch_size=4", "grpo.lr=1e-3", "grpo.warmup_steps=0", "grpo.temperature=1.0",
                    "grpo.eval_problems=4"]


def check_run(run: Path, steps: int, result: dict) -> None:
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    rollouts = [r for r in records if "rollout" in r]
    for key in ("reward", "accuracy", "format", "response_length"):
        assert rollouts and all(math.isfinite(r[key]) for r in rollouts), key
    for key in ("kl", "clip_frac", "entropy", "loss"):
        assert all(math.isfinite(r[key]) for r in records), key
    assert all(0 < r["response_length"] <= 12 for r in rollouts) and all(r["entropy"] > 0 for r in records)
    assert records[-1]["eval_accuracy"] is not None
    assert (run / "grpo.png").stat().st_size > 10_000 and (run / "loss.png").is_file()
    final = Path(result["checkpoint"])
    assert (final / "tokenizer.json").is_file() and load_tokenizer(final).chat_template
    assert cost.Ledger.load(run).stage("grpo") is not None


def test_grpo_end_to_end_on_deepseek_v3_with_resume(checkpoint, tmp_path):
    def score(problem, completion_ids, text):  # the rules, plus the first token's parity, so that a random
        verdict = verify(problem, text)       # model's groups have mixed rewards and the policy moves
        return verdict, reward(verdict, 0.1) + completion_ids[0] % 2

    run = tmp_path / "run"
    overrides = GRPO_FAST + [f"grpo.model={checkpoint}", "grpo.steps=3", "grpo.minibatches=2"]
    result = run_grpo(load_grpo_config("cpu-tiny", overrides), run, score_fn=score)
    check_run(run, 3, result)
    records = read_metrics(run)
    assert "reward" in records[0] and "reward" not in records[1] and "reward" in records[2]  # a rollout per 2 steps
    assert records[1]["kl"] > 0  # the second minibatch runs on a policy that has moved
    run_grpo(load_grpo_config(run / "config.yaml", FAST + ["grpo.steps=4"]), run, resume="latest", score_fn=score)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]


def test_plot_shows_only_panels_that_can_move():
    records = [{"step": 1, "reward": 0.5, "accuracy": 0.1, "response_length": 9, "kl": 0.0, "clip_frac": 0.0,
                "entropy": 2.0, "loss": 0.1, "eval_accuracy": None}]
    on_policy = [key for key, _ in grpo_panels(records, off_policy=False)]
    assert "clip_frac" not in on_policy and "eval_accuracy" not in on_policy and "reward" in on_policy
    records.append({"step": 2, "clip_frac": 0.0, "eval_accuracy": 0.25})
    assert {"clip_frac", "eval_accuracy"} <= {key for key, _ in grpo_panels(records, off_policy=True)}


def test_grpo_end_to_end_on_an_imported_qwen2(tmp_path):
    qwen = tmp_path / "qwen2"
    tokenizer = make_tokenizer(qwen)  # the tokenizer directory saved beside transformers' checkpoint
    make_hf_model("qwen2", qwen, vocab_size=tokenizer.vocab_size)
    run = tmp_path / "run"
    result = run_grpo(load_grpo_config("cpu-tiny", GRPO_FAST + ["grpo.steps=2", "grpo.variant=dapo"]), run,
                      model_dir=qwen)
    for record in read_metrics(run):
        assert "reward" in record  # dapo: dynamic sampling still yields a rollout per step
    check_run(run, 2, {**result, "checkpoint": result["checkpoint"]})
    assert from_pretrained(result["checkpoint"]).config.model_type == "qwen2"


def test_policy_learns_a_toy_reward(checkpoint, tmp_path):
    """Reward: the completion contains one of 40 chosen tokens. A handful of steps raise the share of
    rewarded completions well above where it started (measured on the same prompts and seeds)."""
    tokenizer = load_tokenizer(checkpoint)
    chosen = set(range(100, 140))

    def score(problem, completion_ids, text):
        hit = bool(chosen & set(completion_ids))
        return Verdict(hit, False), float(hit)

    def rewarded_share(model) -> float:
        prompts = [prompt_ids(tokenizer, p) for p in embedded_problems(8, seed=42)]
        outputs = generate(model, tokenizer, prompts, 4, n=32, seeds=list(range(0, 800, 100)))
        return sum(score(None, c.token_ids, "")[1] for out in outputs for c in out.outputs) / (8 * 32)

    before = rewarded_share(from_pretrained(checkpoint))
    overrides = FAST + [f"grpo.model={checkpoint}", "grpo.steps=10", "grpo.prompts_per_step=8", "grpo.group_size=8",
                        "grpo.max_new_tokens=4", "grpo.micro_batch_size=64", "grpo.lr=1e-2", "grpo.beta=0.0",
                        "grpo.log_kl=false", "grpo.temperature=1.0", "grpo.warmup_steps=0"]
    result = run_grpo(load_grpo_config("cpu-tiny", overrides), tmp_path / "run", score_fn=score)
    after = rewarded_share(from_pretrained(result["checkpoint"]))
    rewards = [r["reward"] for r in read_metrics(tmp_path / "run")]
    assert 0.15 < before < 0.6
    assert after > before + 0.25, (before, after, rewards)
    assert rewards[-1] > rewards[0]
