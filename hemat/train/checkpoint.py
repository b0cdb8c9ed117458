"""Checkpoints and the run directory's record.

`RUN/checkpoints/step-N/` is a Hugging Face checkpoint (config.json, model.safetensors, ...), or in a LoRA
run the adapter in PEFT's format (adapter_config.json, adapter_model.safetensors), plus
`trainer_state/`: `optimizer.safetensors` (optimizer tensors by parameter name) and `state.json`
(step, hyperparameters, data position, RNG states, ledger totals). No pickle anywhere: tensors go to
safetensors, everything else to JSON. A checkpoint is written into a temporary directory, fsynced
and renamed into place, so a crash leaves the previous checkpoints complete; the newest N are kept.

`metrics.jsonl` gets one JSON object per step; `loss.png` plots it."""

from __future__ import annotations

import base64
import json
import math
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hemat.errors import HematError
from hemat.model import adapter_io
from hemat.model.adapter_io import write_adapter_files
from hemat.model.hf import from_pretrained, publish_dir
from hemat.model.lora import has_adapters
from hemat.model.transformer import CausalLM

STATE_DIR = "trainer_state"
STATE_FORMAT = "hemat-trainer-state"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(HematError):
    pass


# ---- where checkpoints are -------------------------------------------------------------------
def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def resolve_resume(run_dir: str | Path, resume: str) -> Path:
    """`latest` (the run's newest checkpoint), a checkpoint directory, or another run's directory."""
    target = Path(run_dir) if resume == "latest" else Path(resume)
    if (target / STATE_DIR / "state.json").is_file():
        return target
    found = list_checkpoints(target)
    if not found:
        raise CheckpointError(f"--resume {resume}: no checkpoint in {target} (expected {target}/checkpoints/step-N/ "
                              f"or a step-N directory with {STATE_DIR}/state.json)")
    return found[-1][1]


# ---- saving ----------------------------------------------------------------------------------
def save_checkpoint(run_dir: str | Path, step: int, model: CausalLM, optimizer_state: dict, trainer_state: dict,
                    keep: int, extra_files: list[Path] = ()) -> Path:
    """Write RUN/checkpoints/step-N atomically and delete all but the newest `keep` checkpoints."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.iterdir():  # temporary or set-aside directories of an interrupted save
        if leftover.name.startswith("."):
            shutil.rmtree(leftover, ignore_errors=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp-{os.getpid()}"
    try:
        if has_adapters(model):  # a LoRA run: the adapter (PEFT's files), the base stays where it is
            tmp.mkdir()
            write_adapter_files(model, tmp)
        else:
            model.save_pretrained(tmp)
        for f in extra_files:
            shutil.copy2(f, tmp / Path(f).name)
        _write_trainer_state(tmp / STATE_DIR, optimizer_state, trainer_state)
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def _write_trainer_state(path: Path, optimizer_state: dict, trainer_state: dict) -> None:
    path.mkdir()
    tensors, values = {}, {}
    for name, entries in optimizer_state.get("state", {}).items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}:{key}"] = value.detach().cpu().contiguous()
            else:
                values.setdefault(name, {})[key] = value
    save_file(tensors, str(path / "optimizer.safetensors"), metadata={"format": "pt"})
    state = {"format": STATE_FORMAT, "version": 1, **trainer_state,
             "optimizer": {"param_groups": optimizer_state.get("param_groups", []), "values": values}}
    (path / "state.json").write_text(json.dumps(state, default=_jsonable) + "\n")


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's state.json")


# ---- loading ---------------------------------------------------------------------------------
def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """→ (model state dict, optimizer state dict keyed by parameter name, trainer state). A LoRA run's
    checkpoint gives the adapter's tensors under PEFT's names (adapter_io.load_adapter_state reads them)."""
    path = Path(path)
    state_file = path / STATE_DIR / "state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{path}: not a training checkpoint (no {STATE_DIR}/state.json)")
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{state_file}: not valid JSON ({e})") from None
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{state_file}: not a hemat trainer state (format is not {STATE_FORMAT!r})")
    if (path / adapter_io.CONFIG_NAME).is_file():
        model_state = adapter_io.read_adapter_tensors(path)
    else:
        model_state = from_pretrained(path, dtype=torch.float32).state_dict()
    optimizer_meta = state.pop("optimizer")
    entries: dict[str, dict] = {name: dict(values) for name, values in optimizer_meta["values"].items()}
    try:
        with safe_open(str(path / STATE_DIR / "optimizer.safetensors"), framework="pt") as f:
            for key in f.keys():
                name, _, field = key.rpartition(":")
                entries.setdefault(name, {})[field] = f.get_tensor(key)
    except Exception as e:  # safetensors raises its own error types for missing or corrupt files
        raise CheckpointError(f"{path / STATE_DIR / 'optimizer.safetensors'}: unreadable ({e})") from None
    return model_state, {"state": entries, "param_groups": optimizer_meta["param_groups"]}, state


# ---- RNG states as JSON ----------------------------------------------------------------------
def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- metrics.jsonl and loss.png --------------------------------------------------------------
class MetricsLog:
    """Appends one JSON object per line; non-finite numbers are written as null."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(_finite(record)) + "\n")

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
        return out

    def truncate(self, step: int) -> None:
        """Drop records after `step` (written by a run that died after its last checkpoint)."""
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def plot(self, png: str | Path) -> None:
        from hemat.report import plot_series

        plot_series(self.records(), ["loss", "val_loss"], png, "loss", ylabel="cross-entropy (nats/token)")


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
