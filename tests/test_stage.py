"""Stage sections (sft:, grpo:): their train: keys override train: for that stage only, are type-checked
and reported under the stage's name, and survive RUN/config.yaml; GRPO's variant defaults are resolved
apart from validate(), which only checks."""

import dataclasses

import pytest
import yaml

from hemat.speedrun import _schemas
from hemat.train.config import ConfigValueError, load_config
from hemat.train.grpo import GRPOConfig, load_grpo_config
from hemat.train.sft import load_sft_config


def test_a_stage_key_overrides_train_for_that_stage_only():
    config = load_config("cpu-tiny", ["sft.lr=1e-4", "train.beta2=0.9", "grpo.steps=5"], schemas=_schemas())
    sft, grpo = config.train_for("sft"), config.train_for("grpo")
    assert (sft.lr, sft.steps, sft.seq_len, config.train.lr) == (1e-4, 100, 256, 3e-3)  # cpu-tiny's sft: values
    assert sft.beta2 == grpo.beta2 == 0.9  # a key no stage sets comes from train:
    assert sft.keep_checkpoints == 2 and config.train.keep_checkpoints == 2  # the stage's own default
    assert (grpo.steps, grpo.mtp_weight, grpo.bias_update_speed, grpo.balance_loss_alpha) == (5, 0.0, 0.0, 0.0)
    assert config.train_for("pretrain") is config.train


def test_stage_keys_are_checked_under_the_stage_name(tmp_path):
    with pytest.raises(ConfigValueError, match="sft.lr: expected a number, got 'fast'"):
        load_sft_config("cpu-tiny", ["sft.lr=fast"])
    raw = yaml.safe_load(load_sft_config("cpu-tiny").to_yaml())
    raw["sft"]["warmup_steps"] = "soon"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigValueError, match="sft.warmup_steps: expected an integer, got 'soon'"):
        load_sft_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigValueError, match="sft.steps must be positive, got 0"):
        load_sft_config("cpu-tiny", ["sft.steps=0"])
    with pytest.raises(ConfigValueError, match="sft has no key 'bogus'"):
        load_sft_config("cpu-tiny", ["sft.bogus=1"])
    raw = yaml.safe_load(load_sft_config("cpu-tiny").to_yaml())
    raw["sft"]["bogus"] = 1
    (tmp_path / "unknown.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigValueError, match="unknown key.* in section 'sft': bogus"):
        load_sft_config(tmp_path / "unknown.yaml")
    with pytest.raises(ConfigValueError, match="grpo has no key 'seq_len'"):  # the rollouts set it
        load_grpo_config("cpu-tiny", ["grpo.seq_len=64"])


def test_run_config_yaml_reproduces_every_stage(tmp_path):
    config = load_config("cpu-tiny", ["sft.lr=1e-4", "grpo.variant=grpo", "grpo.beta=null"], schemas=_schemas())
    assert config.sections["grpo"].beta == 0.001  # the variant's default, resolved when loading
    (tmp_path / "config.yaml").write_text(config.to_yaml())
    again = load_config(tmp_path / "config.yaml", schemas=_schemas())
    assert again.stage_train == config.stage_train and again.sections == config.sections


def test_grpo_validate_only_checks():
    cfg = GRPOConfig(variant="dapo", max_new_tokens=100)
    resolved = cfg.resolved()
    assert (cfg.beta, cfg.epsilon_high, cfg.overlong_buffer) == (None, None, None)  # resolved() makes a copy
    assert (resolved.beta, resolved.epsilon_high, resolved.overlong_buffer, resolved.dynamic_sampling) == (
        0.0, 0.28, 25, True)
    before = dataclasses.asdict(resolved)
    resolved.validate()
    assert dataclasses.asdict(resolved) == before
    with pytest.raises(ConfigValueError, match="grpo.variant"):
        GRPOConfig(variant="ppo").resolved().validate()
