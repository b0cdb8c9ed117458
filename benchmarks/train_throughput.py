"""Training throughput: hemat's training step against transformers' on the same checkpoint.

Builds a random model from a preset (default cpu-tiny), saves it, loads it in both hemat and
transformers, then alternates timed training steps of the two in one run, fp32, on the same batches:
- hemat: the Trainer's own step (hemat/train/loop.py: `lm_loss` with the fused chunked cross-entropy,
  balance loss, gradient clipping, the optimizer `build_optimizer` makes, router-bias update);
- transformers: `DeepseekV3ForCausalLM(input_ids, labels=...)`, backward and an AdamW step with the
  same hyperparameters (torch's fused AdamW, as hemat's).
transformers has no multi-token-prediction loss, so hemat's MTP loss is off by default (the same work on
both sides); `--mtp-weight` adds it to hemat's step. Prints wall-clock tokens/s (median step) for each,
the ratio, and the ratio of CPU time per step (less disturbed by other load on a shared machine).

    python benchmarks/train_throughput.py [--config cpu-tiny] [--steps 10] [--batch 4] [--seq 128] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import hemat
from hemat.model.transformer import CausalLM
from hemat.train.config import load_config
from hemat.train.loop import Trainer


class RandomBatches:
    """A fixed pool of random (inputs, targets) batches, served in turn (a Trainer batch source)."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens, self.index = tokens, 0  # [pool, batch, seq + 1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokens[self.index % len(self.tokens)]
        self.index += 1
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]


def timed(step) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="cpu-tiny", help="preset or YAML to build a random model from")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--batch", type=int, default=None,
                        help="sequences per step (default: the preset's micro-batch)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--mtp-weight", type=float, default=0.0,
                        help="hemat's MTP loss weight (0: the same work as transformers, which has no MTP loss)")
    parser.add_argument("--quick", action="store_true", help="a short run: 4 timed steps per side, 1 warm-up step")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup = 4, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()  # the MTP weights transformers does not load are expected
    run = load_config(args.config)
    batch = args.batch or run.train.micro_batch_size
    overrides = dict(seq_len=args.seq, micro_batch_size=batch, batch_tokens=batch * args.seq, dtype="float32",
                     device="cpu", mtp_weight=args.mtp_weight, progress=False, inject_nan_steps=[])
    train_config = run.train.__class__(**{**run.train.__dict__, **overrides})
    train_config.validate()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        torch.manual_seed(0)
        CausalLM(run.model).save_pretrained(path)
        model = hemat.from_pretrained(path)
        reference = transformers.AutoModelForCausalLM.from_pretrained(path).float()
        generator = torch.Generator().manual_seed(0)
        pool = torch.randint(0, run.model.vocab_size, (4, batch, args.seq + 1), generator=generator)
        trainer = Trainer(model, train_config, Path(tmp) / "run", RandomBatches(pool))
        trainer._start = time.perf_counter()  # fit() sets this clock; the step's cost record reads it

        reference.train()
        decay = [p for p in reference.parameters() if p.ndim >= 2]
        no_decay = [p for p in reference.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": train_config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=train_config.lr, betas=(train_config.beta1, train_config.beta2), eps=train_config.eps, fused=True)
        hf_source = RandomBatches(pool)

        def hf_step() -> None:
            inputs, _ = hf_source.next_batch()
            loss = reference(input_ids=inputs, labels=inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        config = run.model
        print(f"model: {config.model_type}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
              f"{config.num_hidden_layers} layers; threads {torch.get_num_threads()}; fp32")
        print(f"batch {batch} x {args.seq} tokens, {args.steps} timed steps per side (alternating), "
              f"hemat MTP weight {args.mtp_weight}, optimizer {train_config.optimizer}")
        for _ in range(args.warmup):
            hf_step()
            trainer._train_step()
        times = {"hf": [], "hemat": []}
        for i in range(args.steps):
            order = [("hf", hf_step), ("hemat", trainer._train_step)]
            for name, step in order if i % 2 == 0 else order[::-1]:
                times[name].append(timed(step))

    tokens = batch * args.seq
    wall = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    for name, label in (("hf", "transformers"), ("hemat", "hemat")):
        print(f"{label:>12}: {tokens / wall[name]:9.1f} tok/s  ({wall[name] * 1e3:7.1f} ms/step wall, "
              f"{cpu[name] * 1e3:7.1f} ms CPU)")
    print(f"ratio hemat / transformers: {wall['hf'] / wall['hemat']:.2f}x wall-clock, "
          f"{cpu['hf'] / cpu['hemat']:.2f}x CPU time")


if __name__ == "__main__":
    main()
