"""The `train:` and `data:` sections of a run config: dataclasses with defaults, read from a preset or
YAML file (hemat.presets.load_run_config) and changed from the command line with
`--set section.key=value`. Every value is type-checked, and a bad one is reported with its key
(`train.lr: expected a number, got 'fast'`). A stage's section (sft:, grpo:) holds the stage's own settings
plus any train: key, which overrides train: for that stage (`sft.lr: 1.0e-4`)."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from hemat.errors import HematError
from hemat.model.config import ModelConfig
from hemat.presets import load_run_config


class ConfigValueError(HematError):
    """A run-config value of the wrong type or out of range; the message names the key."""


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    seq_len: int = 256
    batch_tokens: int = 8192  # global tokens per optimizer step (all ranks, all micro-steps)
    micro_batch_size: int = 8  # sequences per rank per forward/backward; accumulation makes up the rest
    optimizer: str = "adamw"  # adamw | muon (Muon for hidden 2-D matrices, AdamW for the rest)
    lr: float = 1e-3  # peak AdamW learning rate
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    schedule: str = "cosine"  # cosine | wsd | constant, after a linear warm-up
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # final LR as a share of the peak
    decay_fraction: float = 0.2  # wsd: the share of steps spent decaying at the end
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    mtp_weight: float = 0.3  # λ: weight of the multi-token-prediction loss
    bias_update_speed: float = 0.001  # γ: aux-loss-free balancing step for the router correction bias
    balance_loss_alpha: float = 0.0001  # α: sequence-wise balance loss weight (0 turns it off)
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16
    compile: bool = False  # torch.compile each decoder layer
    gradient_checkpointing: bool = False  # recompute each decoder layer in the backward pass (less memory)
    fp8: bool = False  # FP8 forward GEMMs with block-wise scaling for the big projections (CUDA sm90; model/fp8.py)
    parallel: str = "ddp"  # ddp | fsdp, when launched on several processes
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int = 0  # torch CPU threads per process; 0 = the cores this process may use / local ranks
    loss_chunk_tokens: int = 2048  # the cross-entropy runs over this many tokens at a time (fewer for big vocabularies)
    seed: int = 0
    eval_interval: int = 100  # steps between validation runs (0 = only at the end)
    eval_tokens: int = 65536  # validation tokens per evaluation (whole batches of micro_batch_size × seq_len × ranks)
    checkpoint_interval: int = 500  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 3  # the newest N checkpoints are kept
    max_nonfinite: int = 5  # stop after this many non-finite losses in a row
    ledger_interval: int = 50  # steps between ledger.json updates (also at checkpoints and the end)
    price_per_hour: float | None = None  # dollars per device-hour; default from hemat.cost's table
    peak_tflops: float | None = None  # peak per device for MFU; default: datasheet (GPU) or measured (CPU)
    progress: bool = True  # the tqdm progress bar
    # testing aid: at these steps the loss is replaced by NaN, to exercise the skip and stop logic
    inject_nan_steps: list[int] = field(default_factory=list)

    def validate(self, section: str = "train") -> None:
        choices = {"optimizer": ("adamw", "muon"), "schedule": ("cosine", "wsd", "constant"),
                   "dtype": ("auto", "float32", "bfloat16"), "parallel": ("ddp", "fsdp"),
                   "device": ("auto", "cpu", "cuda")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigValueError(f"{section}.{key}: expected one of {', '.join(allowed)}, "
                                       f"got {getattr(self, key)!r}")
        for key in ("steps", "seq_len", "batch_tokens", "micro_batch_size", "loss_chunk_tokens", "eval_tokens",
                    "keep_checkpoints", "max_nonfinite", "ledger_interval"):
            if getattr(self, key) <= 0:
                raise ConfigValueError(f"{section}.{key} must be positive, got {getattr(self, key)}")
        for key in ("warmup_steps", "eval_interval", "checkpoint_interval", "num_threads", "grad_clip",
                    "mtp_weight", "bias_update_speed", "balance_loss_alpha", "weight_decay"):
            if getattr(self, key) < 0:
                raise ConfigValueError(f"{section}.{key} must not be negative, got {getattr(self, key)}")
        if self.fp8 and self.device == "cpu":
            raise ConfigValueError(f"{section}.fp8: FP8 training needs a CUDA GPU (block-scaled torch._scaled_mm), "
                                   f"but {section}.device is 'cpu'")
        for key in ("lr", "muon_lr", "eps"):
            if getattr(self, key) <= 0:
                raise ConfigValueError(f"{section}.{key} must be positive, got {getattr(self, key)}")
        for key in ("min_lr_ratio", "decay_fraction", "beta1", "beta2", "muon_momentum"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigValueError(f"{section}.{key} must be in [0, 1], got {getattr(self, key)}")

    def accumulation_steps(self, world_size: int = 1) -> int:
        """Micro-steps per optimizer step so that all ranks together process batch_tokens."""
        per_micro = self.micro_batch_size * self.seq_len * world_size
        if self.batch_tokens % per_micro:
            raise ConfigValueError(
                f"train.batch_tokens ({self.batch_tokens}) must be a multiple of train.micro_batch_size × "
                f"train.seq_len × processes = {self.micro_batch_size} × {self.seq_len} × {world_size} = {per_micro}"
            )
        return self.batch_tokens // per_micro

    def eval_batches(self, world_size: int = 1) -> int:
        """Validation batches per rank: the same sequences whatever the number of ranks."""
        return max(1, self.eval_tokens // (self.micro_batch_size * self.seq_len * world_size))


@dataclass
class DataConfig:
    path: str | None = None  # token shard directory written by `hemat data prepare`
    train_split: str = "train"
    val_split: str = "val"  # "" for no validation

    def validate(self) -> None:
        if not self.train_split:
            raise ConfigValueError("data.train_split must not be empty")


@dataclass
class LoraSection:
    """The `lora:` section of a fine-tuning stage (sft, grpo): rank 0 trains every weight; rank > 0 trains
    LoRA adapters of that rank on the frozen base (hemat.model.lora), and checkpoints hold the adapter."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False  # scaling alpha / sqrt(rank) instead of alpha / rank
    targets: list[str] = field(default_factory=list)  # module-name patterns; empty: the architecture's defaults
    quantize: str = ""  # QLoRA: int8 | int4 base projections (hemat.model.qlora); empty: a full-precision base
    group_size: int = 64  # int4 only: inputs per scale and zero point (64: QLoRA's block size)

    def validate(self) -> None:
        if self.rank < 0:
            raise ConfigValueError(f"lora.rank must not be negative (0 turns LoRA off), got {self.rank}")
        if self.rank and not 0 <= self.dropout < 1:
            raise ConfigValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.quantize:
            from hemat.model.qlora import check_quantize_settings

            if not self.rank:
                raise ConfigValueError(f"lora.quantize={self.quantize} needs lora.rank > 0: a quantized base is "
                                       "trained through adapters only")
            check_quantize_settings(self.quantize, self.group_size)

    def adapter_config(self):
        """The LoraConfig to apply, or None for full fine-tuning."""
        from hemat.model.lora import LoraConfig

        if not self.rank:
            return None
        return LoraConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, rslora=self.rslora,
                          targets=tuple(self.targets) or None)


@dataclass
class StageSection:
    """The base of a fine-tuning stage's section (sft:, grpo:): the stage's own settings, and any train: key but
    FIXED ones, which overrides train: for this stage. TRAIN_DEFAULTS are the stage's own values for train: keys
    (a fine-tune wants another LR and length than pretraining), so the section only names what differs."""

    TRAIN_DEFAULTS: ClassVar[dict[str, Any]] = {}
    FIXED: ClassVar[tuple[str, ...]] = ()  # train: keys the stage sets itself

    model: str | None = None  # checkpoint to start from, with its tokenizer: a directory or a Hub id
    data: str | None = None  # the stage's data file; null: the embedded arithmetic problems


SECTIONS: dict[str, type] = {"train": TrainConfig, "data": DataConfig}


@dataclass
class RunConfig:
    model: ModelConfig
    train: TrainConfig
    data: DataConfig
    sections: dict[str, Any]  # every section built from a schema, by name (train, data, and any extra)
    raw: dict  # the resolved config as a mapping: what `RUN/config.yaml` holds
    stage_train: dict[str, TrainConfig] = field(default_factory=dict)  # per stage section: train: with its values

    def train_for(self, stage: str) -> TrainConfig:
        """What `stage` trains with: train: itself (pretrain), or with a stage section's values on top (sft, grpo)."""
        return self.stage_train.get(stage, self.train)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)


def load_config(name_or_path: str | Path, overrides: list[str] = (), schemas: dict[str, type] | None = None) -> RunConfig:
    """A preset name or YAML file plus `section.key=value` overrides → RunConfig. `schemas` adds
    sections for other stages (e.g. {"sft": SFTConfig}, a StageSection whose train: values land in
    RunConfig.stage_train); sections without a schema pass through."""
    schemas = {**SECTIONS, **(schemas or {})}
    raw = load_run_config(name_or_path)
    source = str(name_or_path)
    if "model" not in raw or not isinstance(raw["model"], dict):
        raise ConfigValueError(f"{source}: no 'model' section")
    for name in schemas:
        value = raw.get(name)
        if value is None:
            raw[name] = {}
        elif not isinstance(value, dict):
            raise ConfigValueError(f"{source}: section {name!r} must be a mapping, got {type(value).__name__}")
    for item in overrides:
        apply_override(raw, item, schemas)
    try:
        model = ModelConfig.from_hf_dict(raw["model"], source=f"{source}: model")
    except HematError as e:
        raise ConfigValueError(str(e)) from None
    sections = {name: build_section(cls, raw[name], name, source) for name, cls in schemas.items()}
    train = sections["train"]
    if train.seq_len > model.max_position_embeddings:
        raise ConfigValueError(f"train.seq_len ({train.seq_len}) exceeds model.max_position_embeddings "
                               f"({model.max_position_embeddings})")
    stage_train, stage_raw = {}, {}
    for name, cls in schemas.items():
        if issubclass(cls, StageSection):  # the section's train: keys over the stage's defaults over train:
            keys, own = section_keys(cls), {f.name for f in dataclasses.fields(cls)}
            values = {**cls.TRAIN_DEFAULTS,
                      **{k: coerce(v, keys[k], f"{name}.{k}") for k, v in raw[name].items() if k not in own}}
            stage_train[name] = dataclasses.replace(train, **values)
            stage_train[name].validate(name)
            # RUN/config.yaml records the stage's train: values, so a resumed run trains with the same ones
            stage_raw[name] = {k: v for k, v in values.items() if k not in cls.FIXED}
    raw.update({name: {**dataclasses.asdict(value), **stage_raw.get(name, {})} for name, value in sections.items()})
    return RunConfig(model=model, train=train, data=sections["data"], sections=sections, raw=raw,
                     stage_train=stage_train)


def apply_override(raw: dict, item: str, schemas: dict[str, type]) -> None:
    """`section.key=value` → raw[section][key] = value, with the key checked against the section."""
    key, sep, text = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise ConfigValueError(f"override {item!r}: expected SECTION.KEY=VALUE, e.g. train.lr=3e-4")
    if section != "model" and section not in schemas:
        raise ConfigValueError(f"override {item!r}: unknown section {section!r}; "
                               f"sections: {', '.join(['model', *schemas])}")
    hints = section_keys(schemas.get(section, ModelConfig))
    hints.pop("extra", None)  # ModelConfig's bag of unrecognised HF fields, not a key
    if name not in hints:
        raise ConfigValueError(f"override {item!r}: {section} has no key {name!r}; keys: {', '.join(sorted(hints))}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    raw.setdefault(section, {})
    if not isinstance(raw[section], dict):
        raise ConfigValueError(f"override {item!r}: section {section!r} is not a mapping")
    raw[section][name] = coerce(value, hints[name], f"{section}.{name}")


def build_section(cls: type, data: dict, section: str, source: str = "config"):
    """A section mapping → its dataclass, every value coerced to the field's type (a stage section's train: keys
    are load_config's); unknown keys are errors. A `resolved()` method (derived defaults) runs before `validate()`."""
    hints = section_keys(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ConfigValueError(f"{source}: unknown key(s) in section {section!r}: {', '.join(unknown)}; "
                               f"known: {', '.join(sorted(hints))}")
    names = {f.name for f in dataclasses.fields(cls)}
    out = cls(**{k: coerce(v, hints[k], f"{section}.{k}") for k, v in data.items() if k in names})
    if hasattr(out, "resolved"):
        out = out.resolved()
    if hasattr(out, "validate"):
        out.validate()
    return out


def section_keys(cls: type) -> dict[str, Any]:
    """The keys a section takes, with their types: its fields, and a stage section's train: keys."""
    hints = typing.get_type_hints(cls)
    keys = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    if issubclass(cls, StageSection):
        keys.update({k: v for k, v in typing.get_type_hints(TrainConfig).items() if k not in cls.FIXED})
    return keys


def coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` as type `hint` (int, float, bool, str, list[...], dict, unions with None), or an error
    naming `key`. Strings are parsed where a number is expected, since YAML reads 3e-4 as a string."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ConfigValueError:
                continue
        names = " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in args)
        raise ConfigValueError(f"{key}: expected {names}, got {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigValueError(f"{key}: expected a list, got {value!r}")
        return [coerce(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigValueError(f"{key}: expected a mapping, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.strip().lower() in ("true", "yes", "1")
        raise ConfigValueError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigValueError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, int):
            return value
        raise ConfigValueError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise ConfigValueError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigValueError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigValueError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value
