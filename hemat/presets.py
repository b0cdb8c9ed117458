"""Presets and run configs: YAML files with a `model:` section in HF config.json field names and
sections for the stages (`train:`, `data:`, ...). Built-in presets live in hemat/configs/."""

from __future__ import annotations

from pathlib import Path

import yaml

from hemat.model.config import ConfigError, ModelConfig

PRESET_DIR = Path(__file__).parent / "configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_run_config(name_or_path: str | Path) -> dict:
    """A preset name (`cpu-tiny`) or a YAML file path → the config as a dict."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(f"no preset {str(name_or_path)!r}; presets: {', '.join(preset_names())}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """A checkpoint directory, a config.json, a YAML run config or a preset name → ModelConfig."""
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ConfigError(f"{path} has no config.json")
        return ModelConfig.from_file(path / "config.json")
    if path.suffix == ".json":
        return ModelConfig.from_file(path)
    data = load_run_config(name_or_path)
    if "model" not in data:
        raise ConfigError(f"{name_or_path}: no 'model' section")
    return ModelConfig.from_hf_dict(data["model"], source=f"{name_or_path}: model")
