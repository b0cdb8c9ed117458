"""The one training loop that pretraining, SFT and GRPO share.

`Trainer(model, config, run_dir, source, loss_fn=...)` runs optimizer steps: each step takes
`accumulation_steps` micro-batches from `source` (anything with next_batch(), state_dict() and
load_state_dict(), e.g. hemat.data.loader.TokenLoader), calls `loss_fn(model, batch)` on each,
weights every micro-batch by its share of the global batch's tokens, clips, steps the optimizer and
the LR schedule, and updates the routers' correction biases from the experts' load (DeepSeek-V3's
auxiliary-loss-free balancing). A batch is (inputs, targets) or (inputs, targets, loss_mask).

It writes RUN/metrics.jsonl (one line per step), RUN/ledger.json (hemat.cost.Ledger), checkpoints
(checkpoint.py) and RUN/loss.png; resumes exactly from a checkpoint; stops cleanly on SIGTERM/SIGINT
with a checkpoint; skips a non-finite step and stops after `max_nonfinite` in a row."""

from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from tqdm import tqdm

from hemat import cost
from hemat.errors import HematError
from hemat.model import fp8
from hemat.model.adapter_io import WEIGHTS_NAME as ADAPTER_WEIGHTS
from hemat.model.adapter_io import load_adapter_state
from hemat.model.lora import has_adapters
from hemat.model.transformer import CausalLM
from hemat.train import checkpoint, parallel
from hemat.train.config import TrainConfig
from hemat.train.optim import build_optimizer, set_lr
from hemat.train.schedule import lr_factor

IGNORE_INDEX = -100
Batch = tuple[torch.Tensor, ...]
LossFn = Callable[[CausalLM, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class BatchSource(Protocol):
    def next_batch(self) -> Batch: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class TrainingDiverged(HematError):
    pass


# ---- losses --------------------------------------------------------------------------------------
class LinearCrossEntropy(torch.autograd.Function):
    """Σ cross-entropy of softmax(hidden · weightᵀ) over the tokens whose target is not IGNORE_INDEX,
    computed `chunk` rows at a time. The gradients are computed in the same pass, so neither the
    [tokens, vocab] logits nor their softmax are ever stored whole: the biggest activation of a
    language model's training step is never materialised."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        grad_hidden = torch.empty_like(hidden)
        # a frozen output head (LoRA) needs no gradient: neither its [vocab, hidden] buffer nor its products
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start: start + chunk], targets[start: start + chunk]
            logits = F.linear(h, weight).float()
            valid = (t != IGNORE_INDEX).unsqueeze(1)
            index = t.clamp(min=0).unsqueeze(1)
            total -= (logits.log_softmax(dim=-1).gather(1, index) * valid).sum()
            grad = logits.softmax(dim=-1)  # recomputed: on CPU faster than exp() of the log-softmax
            grad.scatter_add_(1, index, torch.full_like(index, -1, dtype=grad.dtype)).mul_(valid)
            grad = grad.to(h.dtype)
            torch.mm(grad, weight.to(h.dtype), out=grad_hidden[start: start + chunk])
            if grad_weight is None:
                continue
            if grad_weight.dtype == h.dtype:
                grad_weight.addmm_(grad.T, h)
            else:
                grad_weight += grad.T @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_weight = None if grad_weight is None else (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden * grad_total, grad_weight, None, None


LOGITS_CHUNK_ELEMENTS = 1 << 25  # at most this many logits at a time (128 MiB in fp32): fewer rows for big vocabularies


def token_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean next-token cross-entropy of hidden [B, T, H] against targets [B, T] (IGNORE_INDEX skipped), over
    `chunk` tokens at a time, fewer when a chunk's logits would pass LOGITS_CHUNK_ELEMENTS."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    chunk = max(1, min(chunk, LOGITS_CHUNK_ELEMENTS // weight.shape[0]))
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    count = (targets != IGNORE_INDEX).sum().clamp(min=1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(hidden, weight, targets, chunk) / count
    total = sum(F.cross_entropy((hidden[i: i + chunk] @ weight.T).float(), targets[i: i + chunk],
                                ignore_index=IGNORE_INDEX, reduction="sum") for i in range(0, len(targets), chunk))
    return total / count  # no gradient wanted (validation): the forward pass alone, still chunked


def mtp_loss(model: CausalLM, hidden: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, chunk: int,
             positions: torch.Tensor | None = None, cache=None, documents: torch.Tensor | None = None) -> torch.Tensor:
    """The multi-token-prediction loss averaged over depths: depth k's row i predicts token i + k + 1
    (= targets[:, i + k]); targets set to IGNORE_INDEX do not count, nor, in packed rows (documents: the
    document id of each position), a target outside row i's own document."""
    losses = []
    for k, head in enumerate(model.mtp_heads(hidden, inputs, positions, cache), start=1):
        depth_targets = targets[:, k:]
        if documents is not None:
            depth_targets = depth_targets.masked_fill(documents[:, k:] != documents[:, :-k], IGNORE_INDEX)
        losses.append(token_cross_entropy(head, model.output_weight(), depth_targets, chunk))
    return torch.stack(losses).mean()


def lm_loss(model: CausalLM, batch: Batch, mtp_weight: float = 0.0, chunk: int = 2048) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy (+ λ · MTP loss + the MoE layers' sequence-wise balance losses while
    training). A loss_mask (third batch element) of 0 excludes a target from the loss. The trainer
    weighs each micro-batch by its count of main-loss targets, which is exact for the main loss; the
    MTP and balance terms, averaged over their own units, follow that weighting approximately."""
    inputs, targets = batch[0], batch[1]
    if len(batch) > 2:
        targets = targets.masked_fill(batch[2] == 0, IGNORE_INDEX)
    hidden = model.model(inputs)
    loss = token_cross_entropy(hidden, model.output_weight(), targets, chunk)
    parts = {"lm_loss": loss.detach()}
    if model.training and mtp_weight > 0 and model.mtp_layers:
        mtp = mtp_loss(model, hidden, inputs, targets, chunk)
        loss = loss + mtp_weight * mtp
        parts["mtp_loss"] = mtp.detach()
    return add_balance_loss(model, loss, parts)


def add_balance_loss(model: CausalLM, loss: torch.Tensor, parts: dict) -> tuple[torch.Tensor, dict]:
    """Add the MoE layers' sequence-wise balance losses of this forward (training only)."""
    if model.training:
        balance = [m.balance_loss for m in model.moe_layers() if m.balance_alpha > 0 and m.balance_loss is not None]
        if balance:
            total = torch.stack(balance).sum()
            loss = loss + total
            parts["balance_loss"] = total.detach()
    return loss, parts


def recompute_in_backward(layer: nn.Module) -> None:
    """Gradient checkpointing: the layer keeps only its inputs in the forward pass and runs again in the
    backward pass (torch.utils.checkpoint, non-reentrant; dropout's RNG state is replayed). The MoE
    layers' token counts see the recomputation too: every expert's load doubles, which the balancing
    (the sign of each load against the mean) and the logged imbalance (max / mean) ignore."""
    forward = layer.forward

    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    layer.forward = checkpointed


class LossModule(nn.Module):
    """The model and its loss as one module, so that DDP and FSDP see the whole step in forward()."""

    def __init__(self, model: CausalLM, loss_fn: LossFn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, *batch: torch.Tensor):
        return self.loss_fn(self.model, batch)


# ---- process setup -------------------------------------------------------------------------------
def prepare_process(config: TrainConfig) -> parallel.DistEnv:
    """Start the process group (under torchrun), pick the device, set threads and seeds."""
    env = parallel.setup(config.device)
    torch.set_num_threads(config.num_threads or parallel.default_threads(env.local_world_size))
    if env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(config.seed)
    return env


# ---- the trainer ---------------------------------------------------------------------------------
class Trainer:
    """Owns the optimizer, the parallel wrapper and the run directory. `loss_fn(model, batch)` returns
    (loss, {name: detached scalar}) with the loss averaged over the batch's counted targets (those whose
    loss_mask is not 0); the default is `lm_loss`. `run_config` (YAML text) is written to
    RUN/config.yaml; `extra_files` (e.g. the tokenizer) are copied into every checkpoint. Under DDP every parameter must get a gradient:
    with train.mtp_weight = 0 the MTP layers are frozen, so a loss_fn that skips them needs that.
    `step_metrics(step)`, called after every optimizer step, returns more values for that step's
    metrics record (e.g. GRPO's rollout rewards, or a periodic accuracy check)."""

    def __init__(self, model: CausalLM, config: TrainConfig, run_dir: str | Path, source: BatchSource, *,
                 loss_fn: LossFn | None = None, val_batches: Callable[[], Iterable[Batch]] | None = None,
                 bytes_per_token: float | None = None, stage: str = "pretrain", env: parallel.DistEnv | None = None,
                 extra_files: Iterable[Path] = (), run_config: str | None = None,
                 step_metrics: Callable[[int], dict] | None = None):
        self.config, self.source, self.stage, self.run_config = config, source, stage, run_config
        self.step_metrics = step_metrics
        self.run_dir = Path(run_dir)
        self.env = env or parallel.setup(config.device)
        self.val_batches, self.bytes_per_token = val_batches, bytes_per_token
        self.extra_files = [Path(f) for f in extra_files]
        self.accum = config.accumulation_steps(self.env.world_size)
        self.model = model.to(self.env.device)
        self.model.train()
        for moe in self.model.moe_layers():
            moe.balance_alpha = config.balance_loss_alpha
        self.lora = has_adapters(self.model)
        if self.lora and self.env.distributed and config.parallel == "fsdp":
            raise HematError("LoRA runs with train.parallel ddp (or in one process), not fsdp")
        if config.mtp_weight == 0:  # untrained MTP layers would be parameters without gradients
            for layer in self.model.mtp_layers:
                layer.requires_grad_(False)
        if config.fp8:  # before compiling: the compiled layers must see the FP8 modules
            fp8.check_fp8_device(self.env.device)
            fp8.convert_to_fp8(self.model)
        if config.gradient_checkpointing:
            for layer in self.model.model.layers:
                recompute_in_backward(layer)
        if config.compile:
            for layer in self.model.model.layers:
                layer.compile()
        loss_fn = loss_fn or (lambda m, b: lm_loss(m, b, config.mtp_weight, config.loss_chunk_tokens))
        self.wrapped = parallel.wrap(LossModule(self.model, loss_fn), self.model, config.parallel, self.env)
        self.optimizer = build_optimizer(list(self.model.named_parameters()), config)
        moes = set(self.model.moe_layers())  # by layer index, for logging: {"1": MoE, "2": MoE, ...}
        self.moe_names = {name.removeprefix("model.layers.").removesuffix(".mlp"): m
                          for name, m in self.model.named_modules() if m in moes}
        self.amp_dtype = {"auto": torch.bfloat16 if self.env.device.type == "cuda" else None,
                          "float32": None, "bfloat16": torch.bfloat16}[config.dtype]
        # cost accounting: FLOPs per token, the device, its peak and price
        with_mtp = config.mtp_weight > 0 and bool(self.model.mtp_layers)
        self.flops_per_token = cost.flops_per_token(self.model.config, config.seq_len, include_mtp=with_mtp)
        self.device_name = cost.detect_device()
        self.device_count = cost.devices_in_use(self.device_name, self.env.world_size)
        try:
            self.price = config.price_per_hour if config.price_per_hour is not None else cost.default_price(self.device_name)
            self.peak = config.peak_tflops * 1e12 if config.peak_tflops else cost.peak_flops(self.device_name)
        except (HematError, KeyError):
            raise HematError(f"device {self.device_name!r} is not in hemat's price/peak table; "
                             "set train.price_per_hour and train.peak_tflops") from None
        self.metrics = checkpoint.MetricsLog(self.run_dir / "metrics.jsonl")
        self.ledger = cost.Ledger(self.run_dir)
        self.spent = {"tokens": 0, "flops": 0.0, "wall_seconds": 0.0}  # before this process started
        self.step, self.tokens_seen, self.tokens_at_start, self.nonfinite = 0, 0, 0, 0
        self._signal: int | None = None

    # ---- the loop --------------------------------------------------------------------------------
    def fit(self, resume: str | None = None) -> dict:
        """Train to config.steps (or until a signal), and return the last step's metrics plus
        `checkpoint` (the last checkpoint written) and `stopped_by` (a signal name or None)."""
        if resume:
            resume_from = checkpoint.resolve_resume(self.run_dir, resume)
        elif self.metrics.records() or checkpoint.list_checkpoints(self.run_dir):
            raise HematError(f"{self.run_dir} already holds a run; pass --resume to continue it, or choose "
                             "another run directory")
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.run_config is not None:
                checkpoint.write_atomic(self.run_dir / "config.yaml", self.run_config)
        if resume:
            self._resume(resume_from)
        elif self.env.is_main:
            self.ledger = cost.Ledger.load_or_new(self.run_dir)  # may hold earlier stages (e.g. pretraining)
        cfg, last_ckpt, record = self.config, None, {}
        self._start = self._last_plot = time.perf_counter()
        previous = self._install_signal_handlers()
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True, desc=self.stage,
                   disable=not (self.env.is_main and cfg.progress))
        try:
            while self.step < cfg.steps:
                record = self._train_step()
                done = self.step == cfg.steps
                if self.val_batches and (done or (cfg.eval_interval and self.step % cfg.eval_interval == 0)):
                    record.update(self.evaluate())
                if self.env.is_main:
                    self.metrics.append(record)
                    bar.update(1)
                    if record.get("loss") is not None and math.isfinite(record["loss"]):
                        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}")
                if record.get("skipped") and self.nonfinite >= cfg.max_nonfinite:
                    self._save_ledger()
                    last = checkpoint.list_checkpoints(self.run_dir)
                    raise TrainingDiverged(
                        f"the loss was not finite for {self.nonfinite} steps in a row (step {self.step}); stopping. "
                        f"The last good checkpoint is {last[-1][1] if last else 'none (no checkpoint was written)'}")
                save = done or self._signal is not None or (cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0)
                if save and self.nonfinite == 0:  # never let a bad state push a good checkpoint out
                    last_ckpt = self.save_checkpoint()
                elif self.step % cfg.ledger_interval == 0:
                    self._save_ledger()
                if self._signal is not None:
                    break
        finally:
            bar.close()
            self._restore_signal_handlers(previous)
        self._save_ledger()
        if self.env.is_main:
            self.metrics.plot(self.run_dir / "loss.png")
        stopped = signal.Signals(self._signal).name if self._signal is not None else None
        return {**record, "checkpoint": str(last_ckpt) if last_ckpt else None, "stopped_by": stopped}

    def _train_step(self) -> dict:
        cfg, env = self.config, self.env
        started = time.perf_counter()
        step = self.step + 1
        lr = set_lr(self.optimizer, lr_factor(self.step, cfg.steps, cfg.warmup_steps, cfg.schedule,
                                              cfg.min_lr_ratio, cfg.decay_fraction))
        batches = [tuple(t.to(env.device, non_blocking=True) for t in self.source.next_batch()) for _ in range(self.accum)]
        counts, total = self._token_counts(batches)
        sums, names = None, None
        for i, batch in enumerate(batches):
            with parallel.grad_sync(self.wrapped, i == len(batches) - 1), self._autocast():
                loss, parts = self.wrapped(*batch)
            if step in cfg.inject_nan_steps:  # testing aid, see TrainConfig.inject_nan_steps
                loss, parts = loss * float("nan"), {k: v * float("nan") for k, v in parts.items()}
            (loss * (counts[i] * env.world_size / total)).backward()
            names = names or ["objective", *sorted(parts)]
            values = torch.stack([loss.detach().float()] + [parts[k].float() for k in names[1:]]) * counts[i]
            sums = values if sums is None else sums + values
        # one all-reduce for the losses and the stop flag (every rank stops at the same step), one for
        # the experts' loads; then a single host sync reads losses, grad norm and load imbalance
        flag = torch.tensor([float(self._signal is not None)], device=sums.device)
        reduced = parallel.all_reduce_sum(torch.cat([sums, flag]))
        loads = self._expert_loads()
        imbalance = (loads.max(dim=-1).values / loads.mean(dim=-1).clamp(min=1e-9)) if loads is not None else flag[:0]
        norm = self._clip_gradients()
        host = torch.cat([reduced[:-1] / total, reduced[-1:], norm.reshape(1).float(), imbalance.float()]).tolist()
        n = len(names)
        losses, stop, grad_norm = dict(zip(names, host[:n])), host[n] > 0, host[n + 1]
        if stop and self._signal is None:
            self._signal = signal.SIGTERM
        processed = sum(b[0].numel() for b in batches) * env.world_size
        self.step, self.tokens_seen = step, self.tokens_seen + processed
        record = {"step": step, "loss": losses.get("lm_loss", losses["objective"]),
                  **{k: v for k, v in losses.items() if k not in ("lm_loss", "objective")},
                  "lr": lr, "grad_norm": grad_norm}
        if math.isfinite(losses["objective"]) and math.isfinite(grad_norm):
            self.nonfinite = 0
            self.optimizer.step()
            if loads is not None:
                if not self.lora:  # the routers' biases belong to the frozen base
                    self._update_router_biases(loads)
                record["load_imbalance"] = {name: round(v, 4) for name, v in zip(self.moe_names, host[n + 2:])}
        else:
            self.nonfinite += 1
            record.update(skipped=True, nonfinite_in_a_row=self.nonfinite)
        self.optimizer.zero_grad(set_to_none=True)
        for moe in self.moe_names.values():
            moe.tokens_per_expert.zero_()
        tokens_per_s = processed / (time.perf_counter() - started)
        record.update(tokens=self.tokens_seen, tokens_per_s=tokens_per_s,
                      mfu=self.flops_per_token * tokens_per_s / (self.peak * self.device_count),
                      dollars=self._wall_seconds() * self.device_count / 3600 * self.price,
                      elapsed_s=self._wall_seconds())
        if self.step_metrics is not None:
            record.update(self.step_metrics(step))
        return record

    def _token_counts(self, batches: list[Batch]) -> tuple[list[float], float]:
        """Each micro-batch's counted targets and the global total (all micro-batches, all ranks)."""
        if len(batches[0]) > 2:
            local = torch.stack([(b[2] != 0).sum() for b in batches]).double()
            total = parallel.all_reduce_sum(local.sum().reshape(1)).item()
            return local.tolist(), max(total, 1.0)
        n = float(batches[0][1].numel())
        return [n] * len(batches), n * len(batches) * self.env.world_size

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.amp_dtype)

    def _clip_gradients(self) -> torch.Tensor:
        """Clip to train.grad_clip (if > 0); the total norm before clipping, as a tensor (no host sync)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.config.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor

    @torch.no_grad()
    def _expert_loads(self) -> torch.Tensor | None:
        """Tokens routed to each expert this step [MoE layers, experts], over micro-batches and ranks."""
        if not self.moe_names:
            return None
        return parallel.all_reduce_sum(torch.stack([m.tokens_per_expert for m in self.moe_names.values()]))

    @torch.no_grad()
    def _update_router_biases(self, loads: torch.Tensor) -> None:
        """Auxiliary-loss-free balancing: each router's correction bias moves by γ towards balance,
        down for experts that got more than the mean load this step and up for those that got less.
        Routers without a bias (DeepSeek-V2's) are balanced by the sequence-wise balance loss alone."""
        gamma = self.config.bias_update_speed
        if gamma == 0:
            return
        mean = loads.mean(dim=-1, keepdim=True)
        for moe, step in zip(self.moe_names.values(), torch.sign(mean - loads)):
            if moe.gate.e_score_correction_bias is not None:
                moe.gate.e_score_correction_bias.add_(step, alpha=gamma)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean validation loss (main next-token loss) over val_batches(), and bits per byte."""
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.env.device)
        for batch in self.val_batches():
            batch = tuple(t.to(self.env.device) for t in batch)
            with self._autocast():
                _, parts = self.wrapped(*batch)
            n = (batch[2] != 0).sum() if len(batch) > 2 else batch[1].numel()
            sums += torch.stack([parts["lm_loss"].double() * n, torch.as_tensor(n, dtype=torch.float64, device=sums.device)])
        self.model.train()
        loss_sum, count = parallel.all_reduce_sum(sums).tolist()
        if count == 0:
            return {}
        out = {"val_loss": loss_sum / count}
        if self.bytes_per_token:
            out["val_bpb"] = out["val_loss"] / math.log(2) / self.bytes_per_token
        return out

    # ---- checkpoints, resume, ledger -------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """All ranks gather the full state; rank 0 writes it. Returns the path on rank 0."""
        model = parallel.full_model(self.wrapped, self.model)
        optimizer_state = parallel.full_optimizer_state(self.wrapped, self.optimizer)
        path = None
        if self.env.is_main:
            totals = self._save_ledger()
            state = {"step": self.step, "stage": self.stage, "tokens_seen": self.tokens_seen,
                     "nonfinite_in_a_row": self.nonfinite, "world_size": self.env.world_size,
                     "config": self.config.__dict__, "data": self.source.state_dict(),
                     "rng": checkpoint.rng_state(), "ledger": totals}
            path = checkpoint.save_checkpoint(self.run_dir, self.step, model, optimizer_state, state,
                                              self.config.keep_checkpoints, self.extra_files)
            if time.perf_counter() - self._last_plot > 30:
                self.metrics.plot(self.run_dir / "loss.png")
                self._last_plot = time.perf_counter()
        return path

    def _resume(self, path: Path) -> None:
        model_state, optimizer_state, state = checkpoint.load_checkpoint(path)
        if self.lora:
            load_adapter_state(self.model, model_state, path / ADAPTER_WEIGHTS)
        else:
            parallel.load_model_state(self.wrapped, model_state)
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        parallel.load_optimizer_state(self.wrapped, self.optimizer, optimizer_state)
        for group, settings in zip(self.optimizer.param_groups, configured):
            group.update(settings)  # hyperparameters come from the current config
        self.source.load_state_dict(state["data"])
        checkpoint.set_rng_state(state["rng"])
        self.step, self.tokens_seen, self.tokens_at_start = state["step"], state["tokens_seen"], state["tokens_seen"]
        self.nonfinite = state["nonfinite_in_a_row"]
        if self.env.is_main:
            self.metrics.truncate(self.step)
            self.ledger = cost.Ledger.load_or_new(self.run_dir)
        # cost already spent: the ledger on disk (which counts work lost after the checkpoint) if it
        # has this stage, else the checkpoint's own totals (e.g. resuming into a new run directory)
        entry = self.ledger.stage(self.stage) if self.env.is_main else None
        spent = {k: getattr(entry, k) for k in self.spent} if entry else state["ledger"]
        self.spent = {k: spent[k] for k in self.spent}
        if self.env.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def _wall_seconds(self) -> float:
        return self.spent["wall_seconds"] + time.perf_counter() - self._start

    def _save_ledger(self) -> dict:
        done = self.tokens_seen - self.tokens_at_start
        totals = {"tokens": self.spent["tokens"] + done, "wall_seconds": self._wall_seconds()}
        totals["flops"] = self.spent["flops"] + done * self.flops_per_token
        if self.env.is_main:
            self.ledger.update_stage(self.stage, tokens=totals["tokens"], flops=totals["flops"],
                                     wall_seconds=totals["wall_seconds"], device=self.device_name,
                                     device_count=self.device_count, price_per_device_hour=self.price, peak=self.peak)
            self.ledger.save()
        return totals

    # ---- signals ---------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self._signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C stops at once
            self._signal = signum

        return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def _restore_signal_handlers(self, previous: dict) -> None:
        for s, h in previous.items():
            signal.signal(s, h)
