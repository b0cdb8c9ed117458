"""What a run costs: FLOPs per token, device peaks, MFU, device-hours and dollars (DESIGN.md section 4),
the per-stage ledger every run writes (`ledger.json`), and `hemat cost` for planning a run or checking
a published one (e.g. DeepSeek-V3's 2,788K H800 hours = $5.576M)."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from hemat.errors import HematError
from hemat.model.config import ModelConfig
from hemat.model.params import count_parameters, human

# Dense bf16 tensor-core peak, TFLOP/s, from the vendors' datasheets (SXM parts; sparsity not counted).
DATASHEET_PEAK_TFLOPS = {
    "H100": 989, "H200": 989, "H800": 989, "A100": 312, "B200": 2250, "L40S": 362, "RTX 4090": 165,
}
# What a plain bf16 matmul reaches when measured (ANCHORS.md "Measured here": an H200 at 769).
MEASURED_PEAK_TFLOPS = {"H200": 769}

# Default price per device-hour in US dollars; override with --price-per-hour or cost.price_per_hour.
# H800 $2.00 is the DeepSeek-V3 paper's assumption (Table 1); the others are typical 2025 on-demand
# cloud rates. For CPU runs the device is one core (see devices_in_use): $0.02 per core-hour is about
# a spot or committed-use vCPU-hour on the large clouds.
PRICE_PER_DEVICE_HOUR = {
    "H800": 2.00, "H100": 2.50, "H200": 3.00, "A100": 1.50, "B200": 5.00, "L40S": 1.00, "RTX 4090": 0.40,
    "CPU": 0.02,
}

_SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12, "P": 1e15}


def parse_number(text: str | float, name: str = "value") -> float:
    """'14.8T', '2664K', '2,788K', '1.5e9' → float. `name` goes into the error message."""
    if isinstance(text, (int, float)):
        return float(text)
    s = text.strip().replace(",", "").replace("_", "")
    scale = _SUFFIX.get(s[-1:].upper(), 1.0) if s[-1:].isalpha() else 1.0
    if scale != 1.0:
        s = s[:-1]
    try:
        value = float(s) * scale
    except ValueError:
        raise HematError(f"{name}: {text!r} is not a number (examples: 14.8T, 2664K, 1.5e9)") from None
    if not math.isfinite(value):
        raise HematError(f"{name}: {text!r} is not a finite number")
    return value


# ---- devices -----------------------------------------------------------------------------------
def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def canonical_device(name: str) -> str:
    """'h800', 'rtx4090', 'NVIDIA H100 80GB HBM3', 'cpu' → the table's name; unknown → HematError."""
    key = _key(name)
    if key == "cpu":
        return "CPU"
    for known in sorted(DATASHEET_PEAK_TFLOPS, key=len, reverse=True):  # longest first: no prefix mix-ups
        if _key(known) in key:
            return known
    raise HematError(f"unknown device {name!r}; known: {', '.join([*DATASHEET_PEAK_TFLOPS, 'CPU'])}")


def detect_device() -> str:
    """The device this process trains on: a table name, the raw CUDA name when not in the table, or 'CPU'."""
    import torch

    if not torch.cuda.is_available():
        return "CPU"
    name = torch.cuda.get_device_name()
    try:
        return canonical_device(name)
    except HematError:
        return name


def devices_in_use(device: str, world_size: int = 1) -> int:
    """How many devices a run is billed for: GPUs = the world size; CPU = the threads torch uses,
    since a CPU run is priced and its peak measured per core."""
    if device == "CPU":
        import torch

        return torch.get_num_threads() * world_size
    return world_size


_cpu_flops_cache: dict[tuple, float] = {}


def measure_cpu_matmul_flops(dtype=None, size: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of a square `size` matmul on this CPU with torch's current threads (cached per process)."""
    import torch

    dtype = dtype or torch.float32
    key = (dtype, size, torch.get_num_threads())
    if key not in _cpu_flops_cache:
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        torch.mm(a, b)  # warm-up: first call pays for allocation and kernel selection
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or count < 2:
            torch.mm(a, b)
            count += 1
        _cpu_flops_cache[key] = 2 * size**3 * count / elapsed
    return _cpu_flops_cache[key]


def peak_flops(device: str) -> float:
    """FLOP/s one device can do: the datasheet bf16 peak for a GPU, the measured fp32 matmul rate per
    core (thread) for 'CPU'."""
    device = canonical_device(device)
    if device == "CPU":
        import torch

        return measure_cpu_matmul_flops() / torch.get_num_threads()
    return DATASHEET_PEAK_TFLOPS[device] * 1e12


def measured_peak_flops(device: str) -> float | None:
    tflops = MEASURED_PEAK_TFLOPS.get(canonical_device(device))
    return tflops * 1e12 if tflops else None


def default_price(device: str) -> float:
    return PRICE_PER_DEVICE_HOUR[canonical_device(device)]


def mfu(achieved_flops_per_s: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved ÷ peak (both per device, or both for all devices)."""
    if peak <= 0:
        raise HematError(f"peak FLOP/s must be positive, got {peak}")
    return achieved_flops_per_s / peak


def serving_cost_per_million(price_per_hour: float, tokens_per_second: float) -> float:
    """Dollars per million generated tokens for a device (or node) billed at price_per_hour."""
    if tokens_per_second <= 0:
        raise HematError(f"tokens per second must be positive, got {tokens_per_second}")
    return price_per_hour / (tokens_per_second * 3600) * 1e6


# ---- FLOPs -------------------------------------------------------------------------------------
def flops_breakdown(config: ModelConfig, seq_len: int, training: bool = True, include_mtp: bool = True) -> dict:
    """FLOPs per token by term; `flops_per_token` is their sum.

    Training (forward + backward = 3 × forward, a forward matmul being 2 FLOPs per weight):
      params     6·N_active, N_active per DESIGN.md section 4 (routed experts k of E, lm_head in);
      attention  6·L·T·H·(d_qk + d_v)/2: scores q·k (2·d_qk per key) and the weighted sum of v (2·d_v),
                 over T keys, halved for the causal mask, ×3 for the backward pass; T = seq_len;
                 d_qk = qk_nope + qk_rope for MLA, head_dim otherwise; GQA shares K/V but not FLOPs;
      mtp        the MTP modules, when the config has them and include_mtp: 6·(their active parameters
                 + the shared output head, which runs again) + one more layer's attention per depth.
    Inference (one new token over T = seq_len cached positions, no causal halving, no backward):
      params     2·N_active;  attention  2·L·T·H·(d_qk + d_v).  MTP drafting is not counted."""
    if seq_len <= 0:
        raise HematError(f"seq_len must be positive, got {seq_len}")
    c, counts = config, count_parameters(config)
    d_qk, d_v = (c.qk_head_dim, c.v_head_dim) if c.is_mla else (c.dense_head_dim, c.dense_head_dim)
    per_layer_attention = seq_len * c.num_attention_heads * (d_qk + d_v)
    if not training:
        return {"params": 2 * counts.active, "attention": 2 * c.num_hidden_layers * per_layer_attention, "mtp": 0}
    out = {"params": 6 * counts.active, "attention": 3 * c.num_hidden_layers * per_layer_attention, "mtp": 0}
    depth = c.num_nextn_predict_layers if c.is_mla else 0
    if include_mtp and depth:
        out["mtp"] = 6 * (counts.mtp_active + depth * counts.head_matrix) + 3 * depth * per_layer_attention
    return out


def flops_per_token(config: ModelConfig, seq_len: int, training: bool = True, include_mtp: bool = True) -> float:
    return float(sum(flops_breakdown(config, seq_len, training, include_mtp).values()))


# ---- the ledger --------------------------------------------------------------------------------
@dataclass
class StageCost:
    stage: str
    tokens: int
    flops: float
    wall_seconds: float
    device: str
    device_count: int
    device_hours: float
    price_per_device_hour: float
    dollars: float
    mfu: float | None  # against the datasheet peak (the measured matmul rate for CPU)
    mfu_measured_peak: float | None  # against a measured GPU matmul peak, where one is known
    tokens_per_second: float


def stage_cost(stage: str, *, tokens: int, flops: float, wall_seconds: float, device: str, device_count: int = 1,
               price_per_device_hour: float | None = None, peak: float | None = None) -> StageCost:
    """A stage's cost from what the trainer measured. `peak` (per device) overrides the table."""
    for name, value in (("tokens", tokens), ("flops", flops), ("wall_seconds", wall_seconds)):
        if value < 0:
            raise HematError(f"stage {stage!r}: {name} must not be negative, got {value}")
    if device_count < 1:
        raise HematError(f"stage {stage!r}: device_count must be at least 1, got {device_count}")
    try:
        device = canonical_device(device)
        known = True
    except HematError:
        known = False  # a GPU missing from the table: record it, MFU unknown, price must be given
    if price_per_device_hour is None:
        if not known:
            raise HematError(f"stage {stage!r}: no default price for device {device!r}; set price_per_hour")
        price_per_device_hour = default_price(device)
    device_hours = wall_seconds * device_count / 3600
    if peak is None and known:
        peak = peak_flops(device)
    measured = measured_peak_flops(device) if known else None
    device_seconds = wall_seconds * device_count
    return StageCost(
        stage=stage, tokens=int(tokens), flops=float(flops), wall_seconds=float(wall_seconds), device=device,
        device_count=device_count, device_hours=device_hours, price_per_device_hour=float(price_per_device_hour),
        dollars=device_hours * price_per_device_hour,
        mfu=mfu(flops / device_seconds, peak) if peak and device_seconds else None,
        mfu_measured_peak=mfu(flops / device_seconds, measured) if measured and device_seconds else None,
        tokens_per_second=tokens / wall_seconds if wall_seconds else 0.0,
    )


class Ledger:
    """The stages of a run and what each cost, kept in `ledger.json` (rewritten atomically)."""

    FILENAME = "ledger.json"

    def __init__(self, path: str | Path):
        path = Path(path)
        self.path = path / self.FILENAME if path.is_dir() or not path.suffix else path
        self.stages: list[StageCost] = []

    @classmethod
    def load(cls, path: str | Path) -> "Ledger":
        """A ledger.json file, or a run / stage directory holding one."""
        ledger = cls(path)
        if not ledger.path.is_file():
            raise HematError(f"no ledger at {ledger.path}")
        try:
            data = json.loads(ledger.path.read_text())
            names = {f.name for f in fields(StageCost)}
            ledger.stages = [StageCost(**{k: v for k, v in s.items() if k in names}) for s in data["stages"]]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise HematError(f"{ledger.path}: not a hemat ledger ({type(e).__name__}: {e})") from None
        return ledger

    @classmethod
    def load_or_new(cls, path: str | Path) -> "Ledger":
        ledger = cls(path)
        return cls.load(ledger.path) if ledger.path.exists() else ledger

    def stage(self, name: str) -> StageCost | None:
        return next((s for s in self.stages if s.stage == name), None)

    def update_stage(self, name: str, **measured) -> StageCost:
        """Create or replace a stage from running totals (the trainer calls this every N steps and on
        checkpoint); arguments as for `stage_cost`. Call save() to write the file."""
        entry = stage_cost(name, **measured)
        old = self.stage(name)
        if old is None:
            self.stages.append(entry)
        else:
            self.stages[self.stages.index(old)] = entry
        return entry

    def add_stage(self, name: str, **measured) -> StageCost:
        if self.stage(name) is not None:
            raise HematError(f"{self.path}: stage {name!r} is already in the ledger")
        return self.update_stage(name, **measured)

    def inherit(self, previous: "Ledger") -> list[str]:
        """Carry the stages of an earlier run (e.g. the pretraining a fine-tune starts from) into this
        ledger, so its totals cover the whole pipeline. Returns the names added."""
        added = []
        for entry in previous.stages:
            mine = self.stage(entry.stage)
            if mine is None:
                self.stages.insert(len(added), entry)  # earlier stages first
                added.append(entry.stage)
            elif mine != entry:
                raise HematError(f"stage {entry.stage!r} differs between {previous.path} and {self.path}")
        return added

    def totals(self) -> dict:
        keys = ("tokens", "flops", "wall_seconds", "device_hours", "dollars")
        return {k: sum(getattr(s, k) for s in self.stages) for k in keys}

    @property
    def total_dollars(self) -> float:
        return self.totals()["dollars"]

    @property
    def total_device_hours(self) -> float:
        return self.totals()["device_hours"]

    def save(self) -> None:
        """Write to a temporary file in the same directory, fsync, then rename over the old file, so a
        crash leaves either the previous ledger or the new one, never half of one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"stages": [asdict(s) for s in self.stages], "totals": self.totals()}
        fd, tmp = tempfile.mkstemp(prefix=".ledger.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise

    def format(self) -> str:
        lines = [f"{'stage':<14}{'tokens':>10}{'FLOPs':>11}{'wall':>10}{'device':>14}{'dev-hours':>11}"
                 f"{'MFU':>7}{'dollars':>12}"]
        for s in self.stages:
            util = f"{s.mfu:.1%}" if s.mfu is not None else "-"
            lines.append(
                f"{s.stage:<14}{human(s.tokens):>10}{s.flops:>11.3g}{_duration(s.wall_seconds):>10}"
                f"{f'{s.device_count}×{s.device}':>14}{s.device_hours:>11.4g}{util:>7}{_dollars(s.dollars):>12}"
            )
        t = self.totals()
        lines.append(
            f"{'total':<14}{human(t['tokens']):>10}{t['flops']:>11.3g}{_duration(t['wall_seconds']):>10}"
            f"{'':>14}{t['device_hours']:>11.4g}{'':>7}{_dollars(t['dollars']):>12}"
        )
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _dollars(x: float) -> str:
    return f"${x:,.0f}" if x >= 100 else f"${x:,.4g}"


# ---- hemat cost --------------------------------------------------------------------------------
def _positive(args, flag: str) -> float | None:
    raw = getattr(args, flag.lstrip("-").replace("-", "_"))
    if raw is None:
        return None
    value = parse_number(raw, flag)
    if value <= 0:
        raise HematError(f"{flag} must be positive, got {raw}")
    return value


def run_cost(args) -> None:
    if args.ledger:
        ledger = Ledger.load(args.ledger)
        print(f"{ledger.path}\n{ledger.format()}")
        if not args.config:
            return
    if not args.config:
        raise HematError("give --config PRESET_OR_FILE (and --tokens), or --ledger PATH")
    from hemat.presets import load_model_config

    tokens, device_hours = _positive(args, "--tokens"), _positive(args, "--device-hours")
    seq_len, devices = int(_positive(args, "--seq-len")), int(_positive(args, "--devices"))
    util = _positive(args, "--mfu")
    tps = _positive(args, "--tokens-per-second")
    device = canonical_device(args.device)
    price = _positive(args, "--price") or default_price(device)
    config = load_model_config(args.config)
    counts = count_parameters(config)
    train = flops_breakdown(config, seq_len, include_mtp=not args.no_mtp)
    per_token = sum(train.values())
    infer = flops_per_token(config, seq_len, training=False)
    peak, measured = peak_flops(device), measured_peak_flops(device)
    unit = "core" if device == "CPU" else "device"

    print(f"model              {args.config}: {human(counts.main)} parameters, {human(counts.active)} active per token"
          + (f", MTP {human(counts.mtp)} ({human(counts.mtp_active)} active)" if counts.mtp else ""))
    terms = " + ".join(f"{v:.4g} {k}" for k, v in train.items() if v)
    print(f"training FLOPs     {per_token:.4g} per token at seq {seq_len} = {terms}")
    print(f"inference FLOPs    {infer:.4g} per token with {seq_len} cached positions")
    print(f"device             {devices} × {device}, peak {peak / 1e12:.4g} TFLOP/s per {unit}"
          + (" (measured fp32 matmul)" if device == "CPU" else " (bf16 datasheet)")
          + (f", {measured / 1e12:.4g} measured" if measured else ""))
    print(f"price              ${price:.4g} per {unit}-hour")
    if tokens:
        total = per_token * tokens
        print(f"tokens             {human(tokens)}")
        print(f"total FLOPs        {total:.4g}")
        if device_hours:  # reverse: published hours → the MFU they imply
            implied = total / (device_hours * 3600) / peak
            line = f"implied MFU        {implied:.1%} of the {peak / 1e12:.4g} TFLOP/s peak"
            print(line + (f" ({total / (device_hours * 3600) / measured:.1%} of measured)" if measured else ""))
        else:  # forward: assumed MFU → hours
            device_hours = total / (util * peak) / 3600
            print(f"MFU                {util:.1%} (assumed)")
        print(f"{unit}-hours{' ' * (13 - len(unit))}{device_hours:,.0f}")
        print(f"wall-clock         {device_hours / devices / 24:.2f} days on {devices} {unit}s")
        print(f"dollars            {_dollars(device_hours * price)}")
    elif device_hours:
        print(f"dollars            {_dollars(device_hours * price)} for {device_hours:,.0f} {unit}-hours")
    if tps:
        print(f"serving            ${serving_cost_per_million(price * devices, tps):.4g} per million tokens "
              f"at {tps:,.0f} tokens/s on {devices} {unit}s")


def add_command(subparsers) -> set[str]:
    p = subparsers.add_parser(
        "cost",
        help="training FLOPs, device-hours, days and dollars for a model and token count; implied MFU",
        description="Forward: --config and --tokens (+ --mfu, --devices, --device, --price) give FLOPs, "
        "device-hours, wall-clock days and dollars. Reverse: add --device-hours to get the MFU they imply. "
        "--ledger prints a run's ledger. Numbers accept suffixes: 14.8T, 2664K, 1.5e9.",
    )
    p.add_argument("--config", help="preset name, YAML run config, config.json or checkpoint dir")
    p.add_argument("--tokens", help="training tokens, e.g. 14.8T")
    p.add_argument("--seq-len", default="4096", help="training sequence length (default 4096)")
    p.add_argument("--mfu", default="0.4", help="assumed MFU for the forward estimate (default 0.4)")
    p.add_argument("--devices", default="1", help="devices (cores for CPU) running in parallel (default 1)")
    known = ", ".join([*DATASHEET_PEAK_TFLOPS, "CPU"])
    p.add_argument("--device", default="H100", help=f"one of {known} (default H100)")
    p.add_argument("--price", "--price-per-hour", dest="price", help="dollars per device-hour (default: the table)")
    p.add_argument("--device-hours", help="reverse mode: device-hours spent, e.g. 2664K → implied MFU")
    p.add_argument("--tokens-per-second", help="serving throughput of --devices devices → $ per million tokens")
    p.add_argument("--no-mtp", action="store_true", help="leave the MTP modules out of the training FLOPs")
    p.add_argument("--ledger", help="print the ledger of a run directory or ledger.json")
    p.set_defaults(func=run_cost)
    return {"cost"}
