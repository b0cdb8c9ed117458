"""The skeleton every training stage shares: the run config from the command line, the process, the
starting checkpoint with its tokenizer (sft, grpo), the model and its LoRA adapters, the ledger, the
Trainer and the summary. `pretrain`, `sft` and `grpo` add only their data, batches and loss:

    with FineTune("sft", config, run_dir, model_dir, resume) as stage:
        model = stage.load_model()
        ...  # the stage's data and loss
        return stage.fit(model, loader, loss_fn=...)"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hemat.errors import HematError
from hemat.model.convert import TOKENIZER_FILES
from hemat.train.config import LoraSection, RunConfig, load_config

DEFAULT_CONFIG = "cpu-tiny"
SUMMARY = ("loss", "val_loss", "val_bpb", "reward", "accuracy", "eval_accuracy")  # the metrics a summary shows


# ---- the run config from the command line ---------------------------------------------------------------
def resolve_config(args: argparse.Namespace, flags: dict[str, str], schemas: dict | None = None) -> RunConfig:
    """--config (or, when resuming, the run's own config.yaml) + --set overrides + the plain flags, each
    given one an override of its config key (`flags`: argument name → SECTION.KEY)."""
    source = args.config
    if source is None:
        saved = Path(args.run) / "config.yaml"
        source = saved if args.resume and saved.is_file() else DEFAULT_CONFIG
    overrides = [*args.overrides, *(f"{key}={getattr(args, flag)}" for flag, key in flags.items()
                                    if getattr(args, flag, None) is not None)]
    return load_config(source, overrides, schemas=schemas)


def add_run_arguments(p: argparse.ArgumentParser, section: str, run_default: str) -> None:
    """The arguments of every training command: --config, --set, --run-dir, --steps and --resume."""
    p.add_argument("--config", default=None, help=f"preset name or YAML run config (default {DEFAULT_CONFIG}; "
                                                   "with --resume, the run's own config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help=f"override a config value, e.g. --set {section}.lr=1e-4 (repeatable)")
    p.add_argument("--run-dir", dest="run", default=run_default, metavar="DIR",
                   help=f"run directory (default {run_default})")
    p.add_argument("--steps", type=int, help=f"optimizer steps ({section}.steps)")
    p.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue from the run's newest checkpoint, or from CHECKPOINT (a step-N directory)")


def add_fine_tune_arguments(p: argparse.ArgumentParser, section: str, data_help: str) -> None:
    """The arguments of a stage that starts from a checkpoint: the run's, plus --model, --data and --lora."""
    p.add_argument("--model", metavar="DIR", help=f"checkpoint to start from, with its tokenizer: a directory or a "
                                                  f"Hub id org/name[@revision] ({section}.model)")
    p.add_argument("--data", metavar="FILE", help=data_help)
    add_run_arguments(p, section, f"runs/{section}")
    p.add_argument("--lora", type=int, nargs="?", const=16, metavar="RANK",
                   help="train LoRA adapters of rank RANK (default 16) on the frozen model instead of every weight "
                        "(lora.rank; more settings: --set lora.alpha=32, lora.targets=q_proj,v_proj, ...; QLoRA over "
                        "an int4 base: --set lora.quantize=int4)")


def fine_tune_flags(section: str) -> dict[str, str]:
    return {"model": f"{section}.model", "data": f"{section}.data", "steps": f"{section}.steps", "lora": "lora.rank"}


# ---- the run ----------------------------------------------------------------------------------------------
class Stage:
    """A stage's run in one process group (torn down on leaving the `with`), trained with the stage's
    TrainConfig (config.train_for(name)): fit() builds the Trainer, trains and prints the summary."""

    def __init__(self, name: str, config: RunConfig, run_dir: str | Path, resume: str | None = None):
        self.name, self.config, self.run_dir, self.resume = name, config, Path(run_dir), resume
        self.train = config.train_for(name)

    def __enter__(self) -> Stage:
        from hemat.train.loop import prepare_process

        self.env = prepare_process(self.train)
        return self

    def __exit__(self, *exc) -> None:
        from hemat.train import parallel

        parallel.teardown()

    def fit(self, model, source, *, train=None, stage: str | None = None, **trainer_args) -> dict:
        """Train `model` on `source` (Trainer keyword arguments pass through) → the last step's metrics, with the
        newest logged value of each SUMMARY metric, `checkpoint` and `stopped_by`; self.records: every step's."""
        from hemat.train.loop import Trainer

        trainer = Trainer(model, train or self.train, self.run_dir, source, stage=stage or self.name, env=self.env,
                          run_config=self.config.to_yaml(), **trainer_args)
        result = trainer.fit(self.resume)
        if self.env.is_main:
            self.records = trainer.metrics.records()
            for key in SUMMARY:  # GRPO's rewards come with rollouts, not every step
                result[key] = next((r[key] for r in reversed(self.records) if r.get(key) is not None), result.get(key))
            print(summary(self.name, result, trainer), flush=True)
        return result


class FineTune(Stage):
    """A stage that starts from a checkpoint (sft, grpo): a local directory or a Hub id (--model or
    SECTION.model), whose tokenizer, with its chat template, the stage renders its data with and ships in
    every checkpoint; the stages that made the checkpoint open this run's ledger."""

    def __init__(self, name: str, config: RunConfig, run_dir: str | Path, model_dir: str | Path | None = None,
                 resume: str | None = None):
        from hemat.tokenizer import load_tokenizer

        super().__init__(name, config, run_dir, resume)
        self.cfg = config.sections[name]
        self.model_dir = starting_checkpoint(model_dir or self.cfg.model, name)
        self.cfg.model = config.raw[name]["model"] = str(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        if not self.tokenizer.chat_template:
            raise HematError(f"{self.model_dir}: the tokenizer has no chat template, which {name} renders data with")

    def load_model(self):
        """The starting checkpoint with the lora: section's adapters, on the run's device. Under QLoRA
        (lora.quantize) it is read in bfloat16 and its base quantized layer by layer: never all in float32."""
        import torch

        from hemat.model.hf import from_pretrained

        if self.env.world_size > 1:
            raise HematError(f"{self.name} runs in one process; launch it without torchrun")
        lora = self.config.sections.get("lora") or LoraSection()
        model = from_pretrained(self.model_dir, dtype=torch.bfloat16 if lora.rank and lora.quantize else torch.float32)
        self.config.raw["model"] = model.config.to_hf_dict()
        apply_lora(model, lora, self.model_dir)
        return model.to(self.env.device)

    def fit(self, model, source, **trainer_args) -> dict:
        if not self.resume:
            inherit_ledger(self.model_dir, self.run_dir)
        return super().fit(model, source, stage=stage_name(self.name, self.run_dir, self.resume),
                           extra_files=tokenizer_files(self.model_dir), **trainer_args)


def summary(name: str, result: dict, trainer) -> str:
    lines = [f"stopped by {result['stopped_by']} at step {trainer.step}"] if result.get("stopped_by") else []
    values = ", ".join(f"{key} {result[key]:.4f}" for key in SUMMARY if result.get(key) is not None)
    lines += [f"{name} step {trainer.step}: {values or 'no metrics'}", trainer.ledger.format()]
    if result.get("checkpoint"):
        lines.append(f"checkpoint: {result['checkpoint']}")
    return "\n".join(lines)


# ---- the starting checkpoint ------------------------------------------------------------------------------
def starting_checkpoint(path: str | Path | None, stage: str) -> Path:
    """The directory of the checkpoint a stage starts from: a local one, or a Hub id's cached snapshot."""
    from hemat.model.hub import resolve_model_source

    source = resolve_model_source(path) if path else None
    if source is None or not source.is_dir():
        raise HematError(f"{stage}: give the checkpoint to start from (--model DIR|ORG/NAME or {stage}.model); "
                         f"got {path!r}")
    return source


def tokenizer_files(folder: str | Path) -> list[Path]:
    """The tokenizer files in `folder`, to ship inside every checkpoint of the run."""
    return [Path(folder) / name for name in TOKENIZER_FILES if (Path(folder) / name).is_file()]


def apply_lora(model, section: LoraSection, model_dir: str | Path) -> None:
    """The `lora:` section's adapters on the frozen `model` (nothing when lora.rank is 0)."""
    from hemat.model.lora import add_adapters

    adapter = section.adapter_config()
    if adapter is None:
        return
    base = ""
    if section.quantize:
        from hemat.model.qlora import quantize_base

        quantize_base(model, section.quantize, section.group_size)
        group = f" (group {section.group_size})" if section.quantize == "int4" else ""
        base = f" over an {section.quantize} base{group}"
    names = add_adapters(model, adapter, base_model=str(Path(model_dir).resolve()))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"lora: rank {adapter.rank} on {len(names)} modules{base}, {trainable:,} trainable parameters "
          f"({100 * trainable / total:.2f}% of {total:,} unquantized)", flush=True)


# ---- the ledger -------------------------------------------------------------------------------------------
def inherit_ledger(model_dir: str | Path, run_dir: str | Path) -> None:
    """Start this run's ledger with the stages that produced the starting checkpoint (its own ledger.json,
    or its run's, for RUN/checkpoints/step-N), so the totals cover the whole pipeline."""
    from hemat import cost

    model_dir = Path(model_dir).resolve()
    candidates = [model_dir / cost.Ledger.FILENAME]
    if model_dir.parent.name == "checkpoints":
        candidates.append(model_dir.parent.parent / cost.Ledger.FILENAME)
    source = next((c for c in candidates if c.is_file()), None)
    if source is None:
        return
    ledger = cost.Ledger.load_or_new(run_dir)
    ledger.inherit(cost.Ledger.load(source))
    ledger.save()


def stage_name(base: str, run_dir: str | Path, resume: str | None) -> str:
    """The ledger name of this run's stage: `base`, or `base-2`, ... when the stages inherited from the
    starting checkpoint already hold one (SFT on an SFT model); a resumed run keeps its checkpoint's."""
    from hemat import cost
    from hemat.train import checkpoint

    if resume:
        state = checkpoint.resolve_resume(run_dir, resume) / checkpoint.STATE_DIR / "state.json"
        return json.loads(state.read_text()).get("stage", base)
    taken = {s.stage for s in cost.Ledger.load_or_new(run_dir).stages}
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}-{k}"
    return name
