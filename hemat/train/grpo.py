"""`hemat grpo`: reinforcement learning with verifiable rewards, GRPO as in DeepSeekMath and DeepSeek-R1,
with the Dr. GRPO and DAPO variants, on the shared training loop.

Each rollout takes the next `prompts_per_step` problems and samples G completions of each through the
inference engine (continuous batching over the paged KV cache; the G samples of a prompt share its
cache pages), then scores them with rules (rewards.py). Advantages are group-normalised:
A_i = (r_i - mean(r)) / (std(r) + 1e-4) (GRPO, DAPO; std with Bessel's correction, as TRL) or
A_i = r_i - mean(r) (Dr. GRPO). The policy maximises, for completion token t of sample i,

    min(ρ_t A_i, clip(ρ_t, 1 - ε, 1 + ε_high) A_i) - β KL_t,     ρ_t = π_θ(o_t) / π_old(o_t)
    KL_t = π_ref(o_t) / π_θ(o_t) - log(π_ref(o_t) / π_θ(o_t)) - 1     (k3, against the frozen start)

summed over tokens with one of three normalisers: GRPO's mean over samples of each sample's token
mean ("sequence"), DAPO's mean over all tokens ("token"), or Dr. GRPO's sum / (samples × max_new_tokens)
("constant"). π is the distribution the rollouts sample, softmax(logits / temperature). One rollout
feeds `minibatches` optimizer steps: the first is on-policy (ρ = 1, the clip idle), the later ones are
off-policy and the clip bounds them. DAPO's dynamic sampling drops groups whose rewards are all equal
(they carry no signal) and samples more prompts, up to max_sampling_rounds, to refill the batch. With
β > 0 every group, even one of equal rewards, still pulls the policy back toward the reference.

Variants fill the knobs left null:
    grpo     ε_high = ε, β = 0.001, std scaling, "sequence"                                  (R1)
    dr_grpo  ε_high = ε, β = 0, no std scaling, "constant"
    dapo     ε_high = 0.28, β = 0, std scaling, "token", dynamic sampling, overlong shaping
             over the last quarter of max_new_tokens

    hemat grpo --model runs/sft/checkpoints/step-300 --run-dir runs/grpo
    hemat grpo --model DIR --data problems.jsonl --set grpo.variant=dapo --steps 200

Logged per step (metrics.jsonl, plotted in grpo.png): reward, accuracy, format rate, response length,
KL, clip fraction, entropy, the objective; eval_accuracy (greedy, held out) every eval_interval steps
when grpo.eval_problems > 0."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import random
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from hemat.errors import HematError
from hemat.model.lora import adapters_disabled, has_adapters
from hemat.train.config import ConfigValueError, LoraSection, RunConfig, StageSection, load_config
from hemat.train.rewards import (
    Problem, Verdict, embedded_problems, load_problems, overlong_penalty, reward, verify,
)
from hemat.train.stage import DEFAULT_CONFIG, FineTune, add_fine_tune_arguments, fine_tune_flags, resolve_config

VARIANTS = {
    "grpo": dict(beta=0.001, scale_rewards=True, loss_aggregation="sequence", dynamic_sampling=False),
    "dr_grpo": dict(beta=0.0, scale_rewards=False, loss_aggregation="constant", dynamic_sampling=False),
    "dapo": dict(epsilon_high=0.28, beta=0.0, scale_rewards=True, loss_aggregation="token", dynamic_sampling=True),
}
AGGREGATIONS = ("sequence", "token", "constant")
STD_EPS = 1e-4


@dataclass
class GRPOConfig(StageSection):
    """The grpo: section (data: problems JSONL, see rewards.load_problems). Its train: keys override train: for
    GRPO: micro_batch_size is sequences per forward/backward, eval_interval the steps between held-out checks
    (0: only at the end). The rollouts set seq_len and batch_tokens, and the policy moves by the policy gradient
    alone: no MTP loss, no balance loss, and no aux-loss-free bias steps, which would shift the routing (and so
    the policy) by a rule blind to the reward."""

    TRAIN_DEFAULTS: ClassVar[dict[str, Any]] = dict(
        steps=60, micro_batch_size=32, lr=1e-5, warmup_steps=0, schedule="constant", min_lr_ratio=0.1,
        weight_decay=0.0, grad_clip=1.0, eval_interval=0, checkpoint_interval=0, keep_checkpoints=2, seed=0,
        mtp_weight=0.0, balance_loss_alpha=0.0, bias_update_speed=0.0)
    FIXED: ClassVar[tuple[str, ...]] = ("seq_len", "batch_tokens", "mtp_weight", "balance_loss_alpha",
                                        "bias_update_speed")
    problems: int = 5000  # embedded: training-side problems in the pool
    problem_seed: int = 1  # embedded: the generator's seed (SFT's default is 0: GRPO sees other problems)
    difficulty: int | list[int] | None = None  # embedded: a level 1-3, a list of levels sharing the pool, null: mixed
    prompts_per_step: int = 16  # groups per rollout
    group_size: int = 8  # G: samples per prompt
    minibatches: int = 1  # optimizer steps per rollout
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    variant: str = "grpo"  # grpo | dr_grpo | dapo: defaults for the knobs below left null
    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float | None = None  # KL weight
    scale_rewards: bool | None = None  # divide advantages by the group's std
    loss_aggregation: str | None = None  # sequence | token | constant
    dynamic_sampling: bool | None = None
    max_sampling_rounds: int = 3  # dynamic sampling: rollouts of fresh prompts per step at most
    overlong_buffer: int | None = None  # tokens before max_new_tokens where the length penalty ramps (0: off)
    overlong_penalty: float = 1.0
    format_reward: float = 0.1  # added for <think>…</think> then an answer; the answer itself scores 1
    log_kl: bool = True  # keep the frozen reference to log the KL even when beta is 0
    eval_problems: int = 0  # greedy accuracy on this many held-out problems (0: off)
    eval_data: str | None = None  # problems JSONL for that check; null: embedded held-out problems
    eval_max_tokens: int = 256  # tokens per greedy answer in those checks
    speculative: str = "off"  # MTP drafts in the rollouts: off | auto
    code_timeout: float = 5.0  # seconds per sandboxed program (code problems)
    reward_workers: int = 2  # sandboxed programs run at once

    def resolved(self) -> GRPOConfig:
        """A copy with the knobs left null set by the variant (VARIANTS; ε_high = ε, and dapo's overlong buffer,
        a quarter of max_new_tokens)."""
        overlong = self.max_new_tokens // 4 if self.variant == "dapo" else 0
        defaults = {"epsilon_high": self.epsilon, "overlong_buffer": overlong, **VARIANTS.get(self.variant, {})}
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def validate(self) -> None:
        """Checks a resolved() config."""
        if self.variant not in VARIANTS:
            raise ConfigValueError(f"grpo.variant: expected one of {', '.join(VARIANTS)}, got {self.variant!r}")
        for key in ("prompts_per_step", "minibatches", "max_new_tokens", "max_sampling_rounds", "problems",
                    "reward_workers", "eval_max_tokens"):
            if getattr(self, key) <= 0:
                raise ConfigValueError(f"grpo.{key} must be positive, got {getattr(self, key)}")
        if self.group_size < 2:
            raise ConfigValueError(f"grpo.group_size must be at least 2 (advantages compare samples), got {self.group_size}")
        for key in ("beta", "eval_problems", "overlong_buffer", "overlong_penalty", "format_reward"):
            if getattr(self, key) < 0:
                raise ConfigValueError(f"grpo.{key} must not be negative, got {getattr(self, key)}")
        if not 0 < self.epsilon < 1 or not 0 < self.epsilon_high:
            raise ConfigValueError(f"grpo.epsilon must be in (0, 1) and epsilon_high positive, got "
                                   f"{self.epsilon}, {self.epsilon_high}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.code_timeout <= 0:
            raise ConfigValueError("grpo.temperature and grpo.code_timeout must be positive and grpo.top_p in (0, 1]; "
                                   f"got {self.temperature}, {self.code_timeout}, {self.top_p}")
        if self.loss_aggregation not in AGGREGATIONS:
            raise ConfigValueError(f"grpo.loss_aggregation: expected one of {', '.join(AGGREGATIONS)}, "
                                   f"got {self.loss_aggregation!r}")
        if self.overlong_buffer > self.max_new_tokens:
            raise ConfigValueError(f"grpo.overlong_buffer ({self.overlong_buffer}) exceeds grpo.max_new_tokens "
                                   f"({self.max_new_tokens})")
        if self.speculative not in ("off", "auto"):
            raise ConfigValueError(f"grpo.speculative: expected off or auto, got {self.speculative!r}")
        levels = self.difficulty if isinstance(self.difficulty, list) else [self.difficulty or 1]
        if not levels or any(level not in (1, 2, 3) for level in levels):
            raise ConfigValueError(f"grpo.difficulty must be 1, 2, 3, a list of them or null, got {self.difficulty}")


SCHEMAS = {"grpo": GRPOConfig, "lora": LoraSection}


# ---- the objective ----------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = STD_EPS) -> torch.Tensor:
    """rewards [groups, G] → advantages: each reward minus its group's mean, divided by the group's
    standard deviation (+ eps) when scale (GRPO), not divided (Dr. GRPO)."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, keepdim=True) + eps) if scale else centred


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[groups, G] → [groups] bool: the groups whose rewards are not all equal (DAPO's dynamic sampling)."""
    return rewards.amax(dim=1) > rewards.amin(dim=1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ ‖ π_ref): r - log r - 1 with r = π_ref / π_θ (unbiased, >= 0)."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def token_objective(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float,
                    eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token, min(ρA, clip(ρ, 1-ε_low, 1+ε_high)A), and where the clip binds."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
    return torch.minimum(unclipped, clipped), clipped < unclipped


def token_losses(logp, old_logp, ref_logp, advantages, eps_low: float, eps_high: float, beta: float):
    """The per-token loss -(surrogate - β KL), and the per-token KL (None without a reference) and
    clip indicator for logging."""
    surrogate, clipped = token_objective(logp, old_logp, advantages, eps_low, eps_high)
    loss = -surrogate
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else None
    if beta > 0:
        loss = loss + beta * kl
    return loss, kl, clipped


def aggregation_weights(lengths: list[int], mode: str, max_new_tokens: int) -> list[float]:
    """Each sequence's per-token weight, so that Σ weight × token loss over a minibatch of N sequences is
    the chosen aggregate: 1/(N·|o_i|) (sequence), 1/Σ|o| (token) or 1/(N·max_new_tokens) (constant)."""
    n, total = len(lengths), sum(lengths)
    if mode == "sequence":
        return [1 / (n * length) for length in lengths]
    if mode == "token":
        return [1 / total] * n
    return [1 / (n * max_new_tokens)] * n


def grpo_loss(model, batch, eps_low: float, eps_high: float, beta: float, on_policy: bool, temperature: float = 1.0):
    """The trainer's loss_fn. batch = (inputs, targets, weights, advantages, old_logp, ref_logp), [B, T]
    each; weights are non-zero exactly on completion tokens and hold the aggregation weight times the
    minibatch's completion-token count, because the trainer scales each micro-batch's mean by its share
    of those tokens. on_policy: old_logp is the current policy's own (detached) log-probability. The
    policy is the one the rollouts sampled from: softmax(logits / temperature)."""
    inputs, targets, weights, advantages, old_logp, ref_logp = batch
    selected = weights != 0
    count = selected.sum().clamp(min=1)
    hidden = model.model(inputs)[selected]
    logp_all = torch.log_softmax(model.logits(hidden).float() / temperature, dim=-1)
    logp = logp_all.gather(1, targets[selected].unsqueeze(1)).squeeze(1)
    old = logp.detach() if on_policy else old_logp[selected]
    ref = ref_logp[selected] if ref_logp.numel() else None
    losses, kl, clipped = token_losses(logp, old, ref, advantages[selected], eps_low, eps_high, beta)
    loss = (losses * weights[selected]).sum() / count
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
        parts = {"clip_frac": clipped.float().sum() / count, "entropy": entropy.sum() / count}
        if kl is not None:
            parts["kl"] = kl.detach().sum() / count
    return loss, parts


# ---- rollouts ---------------------------------------------------------------------------------------------
@dataclass
class Sample:
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    finish_reason: str
    verdict: Verdict
    reward: float
    advantage: float = 0.0


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, n: int = 1, temperature: float = 1.0,
             top_p: float = 1.0, seeds: list[int] | None = None, speculative: str = "off", max_batch_size: int = 256):
    """n samples of each prompt (token ids) through a fresh engine, so no cache entry outlives the
    weights it was computed with. → RequestOutputs, in order."""
    from hemat.infer.engine import Engine
    from hemat.infer.sampling import SamplingParams

    batch = max(n, min(len(prompts) * n, max_batch_size))
    pages = math.ceil((max(len(p) for p in prompts) + max_new_tokens + 1) / 16) + 1
    engine = Engine(model, tokenizer, max_batch_size=batch, cache_tokens=batch * pages * 16, page_size=16,
                    speculative=speculative)
    context = model.config.max_position_embeddings
    if max(len(p) for p in prompts) >= context:
        raise HematError(f"a prompt of {max(len(p) for p in prompts)} tokens does not fit the context ({context})")
    params = [SamplingParams(temperature=temperature, top_p=top_p, max_tokens=min(max_new_tokens, context - len(p)),
                             n=n, seed=None if seeds is None else seeds[i]) for i, p in enumerate(prompts)]
    outputs = engine.generate(prompts, params)
    for out in outputs:
        if out.error:
            raise HematError(f"rollout generation failed: {out.error}")
    return outputs


class RolloutSource:
    """The trainer's batch source. The first micro-batch of a rollout samples G completions for each of
    the next prompts, scores them, computes the advantages (and, off-policy or with a reference, the
    log-probabilities to compare against), and queues minibatches × accum micro-batches."""

    def __init__(self, model, reference, tokenizer, problems: list[Problem], cfg: GRPOConfig, accum: int, device,
                 score_fn=None, seed: int = 0):
        self.model, self.reference, self.tokenizer, self.problems = model, reference, tokenizer, problems
        self.cfg, self.accum, self.device, self.seed = cfg, accum, device, seed
        self.score_fn = score_fn or self._score
        self.prompt_ids = [prompt_ids(tokenizer, p) for p in problems]
        self.pad_id = tokenizer.pad_token_id or 0
        self.cursor, self.rollouts = 0, 0  # prompts drawn so far, rollouts done
        self.pending: deque = deque()
        self.metrics: dict = {}
        self._orders: dict[int, list[int]] = {}
        self._pool = ThreadPoolExecutor(cfg.reward_workers) if any(p.tests for p in problems) else None

    # the BatchSource protocol
    def next_batch(self):
        if not self.pending:
            self._rollout()
        return self.pending.popleft()

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "rollouts": self.rollouts, "problems": len(self.problems)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("problems") != len(self.problems):
            raise HematError(f"cannot resume: {len(self.problems)} problems now, {state.get('problems')} in the "
                             "checkpoint (did grpo.data or grpo.problems change?)")
        self.cursor, self.rollouts = state["cursor"], state["rollouts"]
        self.pending.clear()  # a rollout cut by the checkpoint is sampled afresh

    def take_metrics(self) -> dict:
        out, self.metrics = self.metrics, {}
        return out

    # sampling and scoring
    def _next_prompts(self, k: int) -> list[int]:
        picked = []
        for _ in range(k):
            epoch, at = divmod(self.cursor, len(self.problems))
            if epoch not in self._orders:
                order = list(range(len(self.problems)))
                random.Random(f"hemat-grpo:{self.seed}:{epoch}").shuffle(order)
                self._orders = {epoch: order}
            picked.append(self._orders[epoch][at])
            self.cursor += 1
        return picked

    def _score(self, problem: Problem, completion_ids: list[int], text: str) -> tuple[Verdict, float]:
        cfg = self.cfg
        verdict = verify(problem, text, cfg.code_timeout)
        shaped = overlong_penalty(len(completion_ids), cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
        return verdict, reward(verdict, cfg.format_reward) + shaped

    def _sample(self, indices: list[int]) -> list[list[Sample]]:
        cfg, G = self.cfg, self.cfg.group_size
        first = self.cursor - len(indices)
        seeds = [(self.seed * 1_000_003 + first + j) * G for j in range(len(indices))]
        outputs = generate(self.model, self.tokenizer, [self.prompt_ids[i] for i in indices], cfg.max_new_tokens,
                           G, cfg.temperature, cfg.top_p, seeds, cfg.speculative)
        jobs = [(self.problems[i], out.prompt_token_ids, c) for i, out in zip(indices, outputs) for c in out.outputs]
        run = lambda job: self.score_fn(job[0], job[2].token_ids, job[2].text)  # noqa: E731
        scores = list(self._pool.map(run, jobs)) if self._pool else [run(job) for job in jobs]
        samples = [Sample(list(prompt), list(c.token_ids), c.text, c.finish_reason, verdict, r)
                   for (_, prompt, c), (verdict, r) in zip(jobs, scores)]
        return [samples[j * G: (j + 1) * G] for j in range(len(indices))]

    def _rollout(self) -> None:
        cfg = self.cfg
        started = time.perf_counter()
        sampled, kept, rounds, last = [], [], 0, []
        while len(kept) < cfg.prompts_per_step and rounds < (cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
            last = self._sample(self._next_prompts(cfg.prompts_per_step - len(kept)))
            sampled += last
            rounds += 1
            if cfg.dynamic_sampling:
                rewards = torch.tensor([[s.reward for s in g] for g in last])
                last_kept = [g for g, keep in zip(last, informative_groups(rewards).tolist()) if keep]
                kept += last_kept
            else:
                kept += last
        if not kept:  # nothing to learn from: zero advantages, only the KL term acts
            kept = last
        rewards = torch.tensor([[s.reward for s in g] for g in kept], dtype=torch.float64)
        for group, advantages in zip(kept, group_advantages(rewards, cfg.scale_rewards).tolist()):
            for s, a in zip(group, advantages):
                s.advantage = a
        samples = [s for g in kept for s in g]
        random.Random(f"hemat-grpo-mb:{self.seed}:{self.rollouts}").shuffle(samples)
        for part in range(cfg.minibatches):
            self.pending.extend(self._micro_batches(samples[part::cfg.minibatches]))
        self.rollouts += 1
        flat = [s for g in sampled for s in g]
        mixed = informative_groups(torch.tensor([[s.reward for s in g] for g in sampled])).float().mean().item()
        self.metrics = {
            "rollout": self.rollouts, "reward": _mean([s.reward for s in flat]),
            "accuracy": _mean([s.verdict.correct for s in flat]), "format": _mean([s.verdict.formatted for s in flat]),
            "response_length": _mean([len(s.completion_ids) for s in flat]),
            "truncated": _mean([s.finish_reason == "length" for s in flat]),
            "groups_mixed": mixed, "groups_used": len(kept), "sampling_rounds": rounds,
            "rollout_s": time.perf_counter() - started,
        }

    def _micro_batches(self, samples: list[Sample]) -> list[tuple[torch.Tensor, ...]]:
        """Sequences sorted by length (less padding), split into accum micro-batches (padded with an
        empty row where there are fewer sequences), with the log-probabilities the loss compares against."""
        cfg = self.cfg
        lengths = [len(s.completion_ids) for s in samples]
        per_token = aggregation_weights(lengths, cfg.loss_aggregation, cfg.max_new_tokens) if samples else []
        total = sum(lengths)
        ordered = sorted(zip(samples, per_token), key=lambda x: len(x[0].prompt_ids) + len(x[0].completion_ids))
        size, extra = divmod(len(ordered), self.accum)
        out, at = [], 0
        for i in range(self.accum):
            chunk = ordered[at: at + size + (i < extra)]
            at += len(chunk)
            out.append(self._tensors(chunk, total))
        return out

    def _tensors(self, chunk: list[tuple[Sample, float]], total: int) -> tuple[torch.Tensor, ...]:
        width = max([len(s.prompt_ids) + len(s.completion_ids) - 1 for s, _ in chunk] or [1])
        rows = max(len(chunk), 1)
        inputs = torch.full((rows, width), self.pad_id, dtype=torch.long)
        targets = torch.full((rows, width), self.pad_id, dtype=torch.long)
        weights = torch.zeros(rows, width)
        advantages = torch.zeros(rows, width)
        for r, (s, w) in enumerate(chunk):
            ids = s.prompt_ids + s.completion_ids
            n, start = len(ids) - 1, len(s.prompt_ids) - 1
            inputs[r, :n] = torch.tensor(ids[:-1])
            targets[r, :n] = torch.tensor(ids[1:])
            weights[r, start:n] = w * total
            advantages[r, start:n] = s.advantage
        batch = [t.to(self.device) for t in (inputs, targets, weights, advantages)]
        t = self.cfg.temperature
        old = (token_logprobs(self.model, *batch[:3], t) if self.cfg.minibatches > 1
               else torch.zeros(rows, width, device=self.device))
        ref = torch.zeros(0, device=self.device)
        if self.reference is not None:
            with adapters_disabled(self.reference):  # a no-op for a separate reference model
                ref = token_logprobs(self.reference, *batch[:3], t)
        return (*batch, old, ref)


def _mean(values) -> float:
    values = list(values)
    return float(sum(values)) / len(values) if values else 0.0


@torch.no_grad()
def token_logprobs(model, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """log π(target) under softmax(logits / temperature) at the positions with a non-zero weight (0
    elsewhere), in eval mode (a training forward would count tokens toward the MoE balance)."""
    training = model.training
    model.eval()
    try:
        selected = weights != 0
        out = torch.zeros(inputs.shape, dtype=torch.float32, device=inputs.device)
        hidden = model.model(inputs)[selected]
        logp = torch.log_softmax(model.logits(hidden).float() / temperature, dim=-1)
        out[selected] = logp.gather(1, targets[selected].unsqueeze(1)).squeeze(1)
        return out
    finally:
        model.train(training)


def prompt_ids(tokenizer, problem: Problem) -> list[int]:
    """The chat prompt as the engine (and SFT) tokenise it: the generation prompt rendered, then encoded."""
    return tokenizer.encode(tokenizer.apply_chat_template(problem.messages, add_generation_prompt=True))


def greedy_accuracy(model, tokenizer, problems: list[Problem], max_new_tokens: int, batch_size: int = 64) -> float:
    """The share of problems whose greedy answer is correct (what `hemat eval` measures on arith)."""
    prompts = [prompt_ids(tokenizer, p) for p in problems]
    outputs = generate(model, tokenizer, prompts, max_new_tokens, temperature=0.0, max_batch_size=batch_size)
    return _mean(verify(p, out.outputs[0].text).correct for p, out in zip(problems, outputs))


# ---- the plot ---------------------------------------------------------------------------------------------
PLOTTED = [("reward", "reward"), ("accuracy", "accuracy (samples)"), ("eval_accuracy", "accuracy (greedy, held out)"),
           ("response_length", "response length (tokens)"), ("kl", "KL to the reference (k3)"),
           ("clip_frac", "clip fraction"), ("entropy", "entropy (nats/token)"), ("loss", "objective")]


def grpo_panels(records: list[dict], off_policy: bool) -> list[tuple[str, str]]:
    """The panels of PLOTTED that have values: the held-out accuracy only when grpo.eval_problems asked for
    it, the clip fraction only off-policy (grpo.minibatches > 1): with one update per rollout the ratio is
    exactly 1 and nothing is ever clipped."""
    return [(key, title) for key, title in PLOTTED if (key != "clip_frac" or off_policy)
            and any(r.get(key) is not None for r in records)]


def plot_grpo(records: list[dict], png: str | Path, off_policy: bool) -> None:
    import matplotlib

    from hemat.report import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = grpo_panels(records, off_policy)
    cols = 4
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(14, 3 * rows), dpi=100, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (key, title) in zip(axes.flat, panels):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        ax.plot(*zip(*points), "o-" if len(points) < 20 else "-", ms=3, lw=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    save_figure(fig, png)


# ---- the stage --------------------------------------------------------------------------------------------
def load_grpo_config(source: str | Path = DEFAULT_CONFIG, overrides: list[str] = ()) -> RunConfig:
    return load_config(source, overrides, schemas=SCHEMAS)


def load_stage_problems(cfg: GRPOConfig) -> list[Problem]:
    return load_problems(cfg.data) if cfg.data else embedded_problems(cfg.problems, cfg.problem_seed, cfg.difficulty)


def eval_set(cfg: GRPOConfig) -> list[Problem]:
    if not cfg.eval_problems:
        return []
    if cfg.eval_data:
        return load_problems(cfg.eval_data, cfg.eval_problems)
    from hemat.data.synthetic import eval_problems

    return [Problem(p.id, p.question, answer=str(p.answer)) for p in eval_problems(cfg.eval_problems)]


def run_grpo(config: RunConfig, run_dir: str | Path, *, model_dir: str | Path | None = None,
             resume: str | None = None, score_fn=None) -> dict:
    """Train config.sections["grpo"].model (or model_dir) with GRPO into RUN/checkpoints/step-N/; returns the
    last step's metrics plus `checkpoint`. score_fn(problem, completion_ids, text) -> (Verdict, reward)
    replaces the rule-based rewards (tests, custom tasks)."""
    with FineTune("grpo", config, run_dir, model_dir, resume) as stage:
        cfg, tokenizer = stage.cfg, stage.tokenizer
        model = stage.load_model()
        context = model.config.max_position_embeddings
        problems = [p for p in load_stage_problems(cfg)
                    if len(prompt_ids(tokenizer, p)) + cfg.max_new_tokens <= context]
        if not problems:
            raise HematError(f"grpo: no problem's prompt fits the context ({context}) with max_new_tokens "
                             f"{cfg.max_new_tokens}")
        longest = max(len(prompt_ids(tokenizer, p)) for p in problems[:1000])
        micro_batch_size = stage.train.micro_batch_size
        accum = math.ceil(math.ceil(cfg.prompts_per_step * cfg.group_size / cfg.minibatches) / micro_batch_size)
        seq_len = min(longest + cfg.max_new_tokens, context)
        train = dataclasses.replace(stage.train, seq_len=seq_len, batch_tokens=micro_batch_size * seq_len * accum)
        reference = None
        if cfg.beta > 0 or cfg.log_kl:  # with LoRA, the model itself with its adapters off: no second copy
            reference = model if has_adapters(model) else copy.deepcopy(model).eval().requires_grad_(False)
        source = RolloutSource(model, reference, tokenizer, problems, cfg, accum, stage.env.device, score_fn,
                               train.seed)
        held_out = eval_set(cfg)

        def step_metrics(step: int) -> dict:
            out = source.take_metrics()
            if held_out and (step == train.steps or (train.eval_interval and step % train.eval_interval == 0)):
                out["eval_accuracy"] = greedy_accuracy(model, tokenizer, held_out, cfg.eval_max_tokens)
            return out

        on_policy = cfg.minibatches == 1
        print(f"grpo ({cfg.variant}): {len(problems)} problems, {cfg.prompts_per_step} prompts × {cfg.group_size} "
              f"samples per rollout, {cfg.minibatches} step(s) per rollout, {train.steps} steps", flush=True)
        result = stage.fit(model, source, train=train, step_metrics=step_metrics,
                           loss_fn=lambda m, b: grpo_loss(m, b, cfg.epsilon, cfg.epsilon_high, cfg.beta, on_policy,
                                                          cfg.temperature))
        plot_grpo(stage.records, Path(run_dir) / "grpo.png", off_policy=not on_policy)
        return result


# ---- CLI --------------------------------------------------------------------------------------------------
def _grpo_command(args: argparse.Namespace) -> None:
    config = resolve_config(args, {**fine_tune_flags("grpo"), "variant": "grpo.variant"}, SCHEMAS)
    run_grpo(config, args.run, resume=args.resume)


def add_command(subparsers) -> set[str]:
    p = subparsers.add_parser(
        "grpo", help="reinforcement learning with verifiable rewards: GRPO, Dr. GRPO, DAPO",
        description="Train a checkpoint (usually an SFT model) with GRPO on problems whose answers a rule can "
                    "check: JSONL with {\"question\", \"answer\"} (GSM8K's \"... #### 18\" too) or code with "
                    "{\"question\", \"tests\", \"entry_point\"}, or hemat's embedded arithmetic problems when no "
                    "--data is given. Rollouts run through hemat's engine; the reward is the answer (1) plus "
                    "grpo.format_reward for <think>…</think> then an answer. Writes RUN/metrics.jsonl (reward, "
                    "accuracy, response length, KL, clip fraction, entropy per step), grpo.png, loss.png, "
                    "ledger.json and checkpoints/step-N/ with the tokenizer.")
    add_fine_tune_arguments(p, "grpo", "problems JSONL (grpo.data; default: the embedded arithmetic problems)")
    p.add_argument("--variant", choices=tuple(VARIANTS), help="grpo (R1), dr_grpo or dapo (grpo.variant)")
    p.set_defaults(func=_grpo_command)
    return {"grpo"}
