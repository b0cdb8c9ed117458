"""Cost accounting: FLOPs formula terms, device table, MFU, the ledger file and `hemat cost`."""

import json

import pytest
import torch

from hemat import cost
from hemat.cli import main
from hemat.cost import (
    Ledger, canonical_device, detect_device, flops_breakdown, flops_per_token, measure_cpu_matmul_flops, mfu,
    parse_number, serving_cost_per_million, stage_cost,
)
from hemat.errors import HematError
from hemat.model.config import ModelConfig
from hemat.model.params import count_parameters
from hemat.presets import load_model_config

TINY_MLA = ModelConfig(
    model_type="deepseek_v3", vocab_size=100, hidden_size=16, intermediate_size=40, moe_intermediate_size=8,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=4, n_shared_experts=1,
    num_experts_per_tok=2, n_group=1, topk_group=1, q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=6,
    qk_rope_head_dim=4, v_head_dim=6, num_nextn_predict_layers=1,
)
TINY_LLAMA = ModelConfig(
    model_type="llama", vocab_size=100, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, n_routed_experts=None,
)


def test_flops_terms_by_hand_dense():
    T, n_active = 32, count_parameters(TINY_LLAMA).active
    # 6·N_active + 6·L·T·H·(d_qk + d_v)/2 with L=2, H=4, head_dim 4 for both q·k and v
    assert flops_breakdown(TINY_LLAMA, T) == {"params": 6 * n_active, "attention": 6 * 2 * T * 4 * 8 // 2, "mtp": 0}
    assert flops_per_token(TINY_LLAMA, T, training=False) == 2 * n_active + 2 * 2 * T * 4 * 8


def test_flops_terms_by_hand_mla_with_mtp():
    T, counts = 64, count_parameters(TINY_MLA)
    d_qk, d_v = 6 + 4, 6
    terms = flops_breakdown(TINY_MLA, T)
    assert terms["params"] == 6 * counts.active
    assert terms["attention"] == 6 * 3 * T * 2 * (d_qk + d_v) / 2
    # the MTP depth: its own active parameters and the shared 100×16 head again, plus one layer of attention
    assert terms["mtp"] == 6 * (counts.mtp_active + 100 * 16) + 6 * T * 2 * (d_qk + d_v) / 2
    assert flops_per_token(TINY_MLA, T, include_mtp=False) == terms["params"] + terms["attention"]
    assert flops_breakdown(TINY_MLA, T, training=False)["mtp"] == 0
    with pytest.raises(HematError, match="seq_len"):
        flops_per_token(TINY_MLA, 0)


def test_deepseek_v3_paper_arithmetic():
    """DeepSeek-V3 Table 1: 2,788K H800 hours at $2 = $5.576M; pre-training 2,664K hours for 14.8T tokens.
    With this module's formula at seq 4096 (260.6 GFLOPs per token incl. MTP, 3.858e24 FLOPs in all)
    against the 989 TFLOP/s bf16 datasheet peak, those hours imply an MFU of 40.7%."""
    assert 2.788e6 * cost.default_price("H800") == pytest.approx(5.576e6)
    total = flops_per_token(load_model_config("deepseek-v3-671b"), 4096) * 14.8e12
    implied = mfu(total / (2.664e6 * 3600), cost.peak_flops("H800"))
    assert 0.20 < implied < 0.60
    assert implied == pytest.approx(0.407, abs=0.002)


def test_cost_cli_reverse_and_dollars(capsys):
    main(["cost", "--config", "deepseek-v3-671b", "--tokens", "14.8T", "--device", "H800", "--devices", "2048",
          "--device-hours", "2,788K"])
    out = capsys.readouterr().out
    assert "$5,576,000" in out
    assert "implied MFU        38.9%" in out  # 2,788K hours include context extension and post-training
    main(["cost", "--config", "deepseek-v3-671b", "--tokens", "14.8T", "--device", "h800", "--device-hours", "2664K"])
    out = capsys.readouterr().out
    assert "implied MFU        40.7%" in out and "$5,328,000" in out


def test_cost_cli_forward(capsys):
    main(["cost", "--config", "deepseek-v3-671b", "--tokens", "1T", "--device", "H800", "--devices", "2048",
          "--mfu", "0.407", "--price", "2"])
    out = capsys.readouterr().out
    # ANCHORS: 180K GPU-hours per trillion tokens, 3.7 days on 2,048 H800s
    line = next(line for line in out.splitlines() if line.startswith("device-hours"))
    hours = float(line.split()[-1].replace(",", ""))
    assert hours == pytest.approx(180e3, rel=0.01)
    assert "3.66 days on 2048 devices" in out
    assert "2.606e+11 per token at seq 4096" in out


def test_cost_cli_serving_and_price_override(capsys):
    main(["cost", "--config", "cpu-tiny", "--device", "H100", "--price-per-hour", "3.6", "--tokens-per-second", "1000"])
    assert "$1 per million tokens" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "-5"], "--tokens must be positive"),
    (["--tokens", "lots"], "--tokens: 'lots' is not a number"),
    (["--tokens", "1T", "--device", "X100"], "unknown device 'X100'"),
    (["--tokens", "1T", "--mfu", "0"], "--mfu must be positive"),
])
def test_cost_cli_bad_input(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["cost", "--config", "cpu-tiny", *argv])


def test_cost_cli_needs_a_config():
    with pytest.raises(SystemExit, match="give --config"):
        main(["cost", "--tokens", "1T"])


def test_parse_number():
    assert parse_number("14.8T") == pytest.approx(14.8e12)
    assert parse_number("2664K") == 2.664e6
    assert parse_number("2,788k") == 2.788e6
    assert parse_number("1.5e9") == 1.5e9
    assert parse_number("3M") == 3e6
    for bad in ("", "1.5X", "inf", "T"):
        with pytest.raises(HematError):
            parse_number(bad, "--tokens")


def test_devices():
    assert canonical_device("NVIDIA H100 80GB HBM3") == "H100"
    assert canonical_device("NVIDIA GeForce RTX 4090") == "RTX 4090"
    assert canonical_device("NVIDIA A100-SXM4-80GB") == "A100"
    assert canonical_device("cpu") == "CPU"
    with pytest.raises(HematError, match="unknown device 'TPU v5'"):
        canonical_device("TPU v5")
    if not torch.cuda.is_available():
        assert detect_device() == "CPU"
    assert cost.peak_flops("H200") == 989e12 and cost.measured_peak_flops("H200") == 769e12
    assert cost.measured_peak_flops("A100") is None
    assert cost.devices_in_use("H100", world_size=8) == 8
    assert cost.devices_in_use("CPU") == torch.get_num_threads()  # a CPU run is billed per core


def test_cpu_matmul_measurement_is_cached():
    rate = measure_cpu_matmul_flops(size=64, seconds=0.02)
    assert rate > 0
    assert measure_cpu_matmul_flops(size=64, seconds=0.02) == rate


def test_mfu_and_serving_math():
    assert mfu(494.5e12, 989e12) == 0.5
    with pytest.raises(HematError):
        mfu(1.0, 0)
    assert serving_cost_per_million(2.0, 1000) == pytest.approx(2.0 / 3.6e6 * 1e6)
    with pytest.raises(HematError):
        serving_cost_per_million(2.0, 0)


def test_stage_cost_fields():
    # 8 H200s for an hour at 400 TFLOP/s each
    s = stage_cost("pretrain", tokens=10**9, flops=8 * 3600 * 400e12, wall_seconds=3600, device="h200", device_count=8)
    assert (s.device, s.device_hours, s.price_per_device_hour, s.dollars) == ("H200", 8.0, 3.0, 24.0)
    assert s.mfu == pytest.approx(400 / 989) and s.mfu_measured_peak == pytest.approx(400 / 769)
    assert s.tokens_per_second == pytest.approx(10**9 / 3600)
    # a GPU missing from the table: recorded with the given price, MFU unknown; no price → clear error
    odd = stage_cost("sft", tokens=1, flops=1.0, wall_seconds=1, device="NVIDIA T4", price_per_device_hour=0.5)
    assert odd.device == "NVIDIA T4" and odd.mfu is None
    with pytest.raises(HematError, match="no default price for device 'NVIDIA T4'"):
        stage_cost("sft", tokens=1, flops=1.0, wall_seconds=1, device="NVIDIA T4")
    with pytest.raises(HematError, match="tokens must not be negative"):
        stage_cost("sft", tokens=-1, flops=1.0, wall_seconds=1, device="H100")


def test_ledger_round_trip_update_and_totals(tmp_path):
    ledger = Ledger(tmp_path)
    assert ledger.path == tmp_path / "ledger.json"
    ledger.update_stage("pretrain", tokens=1000, flops=1e15, wall_seconds=60, device="H100", device_count=2)
    ledger.save()
    ledger.update_stage("pretrain", tokens=2000, flops=2e15, wall_seconds=7200, device="H100", device_count=2)
    ledger.add_stage("sft", tokens=500, flops=5e14, wall_seconds=3600, device="A100", price_per_device_hour=1.0)
    ledger.save()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]  # no temporary file left behind

    loaded = Ledger.load(tmp_path / "ledger.json")
    assert loaded.stages == ledger.stages
    assert [s.stage for s in loaded.stages] == ["pretrain", "sft"]
    assert loaded.total_device_hours == pytest.approx(4.0 + 1.0)
    assert loaded.total_dollars == pytest.approx(4.0 * 2.5 + 1.0)
    assert loaded.totals()["tokens"] == 2500
    assert json.loads((tmp_path / "ledger.json").read_text())["totals"]["dollars"] == pytest.approx(11.0)
    with pytest.raises(HematError, match="'sft' is already in the ledger"):
        loaded.add_stage("sft", tokens=1, flops=1.0, wall_seconds=1, device="A100")


def test_ledger_save_is_atomic(tmp_path):
    ledger = Ledger(tmp_path / "ledger.json")
    ledger.update_stage("pretrain", tokens=1, flops=1.0, wall_seconds=1, device="H100")
    ledger.save()
    before = (tmp_path / "ledger.json").read_text()
    ledger.stages[0].stage = object()  # not JSON-serialisable: the write fails halfway
    with pytest.raises(TypeError):
        ledger.save()
    assert (tmp_path / "ledger.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]


def test_ledger_inherits_previous_stage_dir(tmp_path):
    pre = Ledger(tmp_path / "pretrain")
    pre.update_stage("pretrain", tokens=100, flops=1e12, wall_seconds=3600, device="H800", device_count=4)
    pre.save()
    sft = Ledger.load_or_new(tmp_path / "sft")
    assert sft.stages == []
    sft.update_stage("sft", tokens=10, flops=1e11, wall_seconds=1800, device="H800", device_count=4)
    assert sft.inherit(Ledger.load(tmp_path / "pretrain")) == ["pretrain"]
    assert sft.inherit(Ledger.load(tmp_path / "pretrain")) == []  # already there: nothing twice
    assert [s.stage for s in sft.stages] == ["pretrain", "sft"]
    assert sft.total_dollars == pytest.approx((4 + 2) * 2.0)
    changed = Ledger(tmp_path / "other")
    changed.update_stage("pretrain", tokens=5, flops=1.0, wall_seconds=1, device="H800")
    with pytest.raises(HematError, match="stage 'pretrain' differs"):
        sft.inherit(changed)


def test_ledger_bad_files(tmp_path):
    with pytest.raises(HematError, match="no ledger at"):
        Ledger.load(tmp_path)
    (tmp_path / "ledger.json").write_text("{not json")
    with pytest.raises(HematError, match="ledger.json: not a hemat ledger"):
        Ledger.load(tmp_path)


def test_cost_cli_prints_ledger(tmp_path, capsys):
    ledger = Ledger(tmp_path)
    ledger.update_stage("pretrain", tokens=3_000_000, flops=1e15, wall_seconds=7200, device="H100", device_count=1)
    ledger.save()
    main(["cost", "--ledger", str(tmp_path)])
    out = capsys.readouterr().out
    assert "pretrain" in out and "1×H100" in out and "$5" in out and "3.00M" in out
