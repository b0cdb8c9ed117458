"""The training loop in-process: losses, accumulation, expert balancing, schedules, Muon, the run
directory's files, checkpoint atomicity, non-finite steps and the config section. Tiny models only."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import hemat
from hemat.data.loader import TokenLoader
from hemat.data.shards import FORMAT, MANIFEST
from hemat.errors import HematError
from hemat.model.config import ModelConfig
from hemat.model.transformer import CausalLM
from hemat.train import checkpoint
from hemat.train.config import ConfigValueError, TrainConfig, load_config
from hemat.train.loop import IGNORE_INDEX, LinearCrossEntropy, Trainer, TrainingDiverged, token_cross_entropy
from hemat.train.optim import Muon, build_optimizer, is_muon_param, newton_schulz
from hemat.train.schedule import lr_factor

TINY_MODEL = dict(
    model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
    num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=4, n_shared_experts=1,
    num_experts_per_tok=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
    max_position_embeddings=64, num_nextn_predict_layers=1,
)
# fast settings for every test run: no CPU peak measurement, no progress bar
TINY_TRAIN = dict(seq_len=32, batch_tokens=128, micro_batch_size=4, steps=4, lr=0.01, warmup_steps=2,
                  eval_interval=0, checkpoint_interval=0, peak_tflops=1.0, progress=False, eval_tokens=256)


def make_shards(out: Path, n_train: int = 20000, n_val: int = 2000, vocab: int = 64, seed: int = 0) -> Path:
    """A repetitive corpus (runs of counting sequences ending in EOS) as token shards in the
    format `hemat data prepare` writes, without needing a trained tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards, splits = [], {}
    for split, n in (("train", n_train), ("val", n_val)):
        tokens = []
        while len(tokens) < n:
            start = int(rng.integers(2, vocab - 12))
            tokens += list(range(start, start + 10)) + [1]
        name = f"{split}_000000.bin"
        np.array(tokens[:n], dtype=np.uint16).tofile(out / name)
        shards.append({"file": name, "split": split, "tokens": n})
        splits[split] = {"tokens": n, "documents": n // 11, "bytes": 3 * n, "bytes_per_token": 3.0, "shards": 1}
    manifest = {"format": FORMAT, "version": 1, "dtype": "uint16", "vocab_size": vocab, "eos_token_id": 1,
                "tokenizer": {"path": "", "sha256": ""}, "splits": splits, "shards": shards,
                "total_tokens": n_train + n_val}
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def write_config(path: Path, **train) -> Path:
    path.write_text(yaml.safe_dump({"model": TINY_MODEL, "train": {**TINY_TRAIN, **train}}))
    return path


def tiny_trainer(tmp_path, shards, seed=0, **train) -> Trainer:
    config = TrainConfig(**{**TINY_TRAIN, **train})
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig(**TINY_MODEL))
    loader = TokenLoader(shards, "train", config.micro_batch_size, config.seq_len, seed=config.seed)
    return Trainer(model, config, tmp_path / "run", loader,
                   val_batches=lambda: loader.val_batches(config.eval_batches()), bytes_per_token=3.0)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


# ---- the loss ----------------------------------------------------------------------------------
def test_chunked_cross_entropy_matches_reference_with_gradients():
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[[3, 10, 11]] = IGNORE_INDEX
    loss = LinearCrossEntropy.apply(hidden, weight, targets, 8) / 34
    loss.backward()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    reference = F.cross_entropy(h2 @ w2.T, targets, ignore_index=IGNORE_INDEX)
    reference.backward()
    assert torch.allclose(loss, reference, atol=1e-5)
    assert torch.allclose(hidden.grad, h2.grad, atol=1e-5)
    assert torch.allclose(weight.grad, w2.grad, atol=1e-5)
    with torch.no_grad():  # the forward-only path used for validation
        assert torch.allclose(token_cross_entropy(hidden[None], weight, targets[None], 8), reference, atol=1e-5)


# ---- the loop ----------------------------------------------------------------------------------
def test_loss_decreases_and_metrics_have_every_field(tmp_path, shards):
    trainer = tiny_trainer(tmp_path, shards, steps=30, eval_interval=15)
    result = trainer.fit()
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 31))
    first, last = records[0]["loss"], records[-1]["loss"]
    assert first > math.log(64) - 0.3 and last < first - 1.5, (first, last)
    for key in ("step", "loss", "mtp_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "load_imbalance",
                "dollars", "elapsed_s"):
        assert key in records[5], key
    assert records[5]["tokens"] == 6 * 128 and set(records[5]["load_imbalance"]) == {"1", "2"}  # layer 2 = MTP
    assert all(v >= 1.0 for v in records[5]["load_imbalance"].values())
    assert records[-1]["dollars"] > records[0]["dollars"] > 0
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [15, 30] and val[1]["val_loss"] < val[0]["val_loss"]
    assert val[1]["val_bpb"] == pytest.approx(val[1]["val_loss"] / math.log(2) / 3.0)
    assert result["checkpoint"].endswith("step-30") and result["stopped_by"] is None
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    stage = ledger["stages"][0]
    assert stage["stage"] == "pretrain" and stage["tokens"] == 30 * 128 and stage["device"] == "CPU"
    assert stage["flops"] == pytest.approx(30 * 128 * trainer.flops_per_token) and stage["dollars"] > 0
    png = (tmp_path / "run" / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_bfloat16_autocast_on_cpu_trains(tmp_path, shards):
    trainer = tiny_trainer(tmp_path, shards, steps=6, dtype="bfloat16")
    trainer.fit()
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5
    assert trainer.model.dtype == torch.float32  # master weights stay fp32


class MaskedSource:
    """A loader whose batches carry a loss mask that counts a different number of targets per row,
    as SFT batches do (only the answer's tokens count)."""

    def __init__(self, loader: TokenLoader):
        self.loader = loader

    def next_batch(self):
        inputs, targets = self.loader.next_batch()
        return inputs, targets, (inputs % 3 != 0).long()

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


@pytest.mark.parametrize("masked", [False, True])
def test_accumulation_gives_the_same_update(tmp_path, shards, masked):
    """One micro-batch of 4 sequences and four of 1 make the same step (loss, weights, router bias);
    with a loss mask, each micro-batch weighs by the targets it counts (the MTP and balance terms
    are weighted by the main loss's count, so they are left out of the masked comparison)."""
    aux = dict(mtp_weight=0.0, balance_loss_alpha=0.0) if masked else {}
    whole = tiny_trainer(tmp_path / "a", shards, steps=1, micro_batch_size=4, **aux)
    split = tiny_trainer(tmp_path / "b", shards, steps=1, micro_batch_size=1, **aux)
    if masked:
        whole.source, split.source = MaskedSource(whole.source), MaskedSource(split.source)
    assert (whole.accum, split.accum) == (1, 4)
    a, b = whole.fit(), split.fit()
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    sa, sb = whole.model.state_dict(), split.model.state_dict()
    for name in sa:
        assert torch.allclose(sa[name], sb[name], atol=1e-5), name  # the Adam step itself is 5e-3


def test_overloaded_expert_bias_goes_down(tmp_path, shards):
    trainer = tiny_trainer(tmp_path, shards, steps=1, bias_update_speed=0.01)
    moe = trainer.model.moe_layers()[0]
    with torch.no_grad():
        moe.gate.e_score_correction_bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))  # expert 0 always chosen
    record = trainer.fit()
    bias = moe.gate.e_score_correction_bias
    assert bias[0].item() == pytest.approx(1.0 - 0.01)
    assert record["load_imbalance"]["1"] == pytest.approx(2.0)  # every token chose expert 0: twice the mean
    assert torch.allclose(bias[1:].abs(), torch.full((3,), 0.01)) and (bias[1:] > 0).sum() >= 2
    assert all(m.tokens_per_expert.sum() == 0 for m in trainer.model.moe_layers())  # read and reset


def test_lr_schedules():
    cos = [lr_factor(s, 100, 10, "cosine", 0.1) for s in range(100)]
    assert cos[0] == pytest.approx(0.1) and cos[9] == 1.0 and cos[-1] == pytest.approx(0.1)
    assert all(x < y for x, y in zip(cos[:10], cos[1:10])) and all(x >= y for x, y in zip(cos[10:], cos[11:]))
    wsd = [lr_factor(s, 100, 10, "wsd", 0.0, decay_fraction=0.2) for s in range(100)]
    assert wsd[10:80] == [1.0] * 70 and wsd[-1] == 0.0 and all(x > y for x, y in zip(wsd[80:], wsd[81:]))
    assert [lr_factor(s, 100, 0, "constant") for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    with pytest.raises(HematError, match="linear"):
        lr_factor(0, 10, 0, "linear")


def test_muon_orthogonalises_and_trains(tmp_path, shards):
    g = torch.randn(3, 24, 40)
    singular = torch.linalg.svdvals(newton_schulz(g))
    assert singular.min() > 0.5 and singular.max() < 1.3
    config = TrainConfig(**{**TINY_TRAIN, "optimizer": "muon"})
    model = CausalLM(ModelConfig(**TINY_MODEL))
    optimizer = build_optimizer(list(model.named_parameters()), config)
    assert isinstance(optimizer, Muon)
    muon = {n for n, p in model.named_parameters() if is_muon_param(n, p)}
    assert "model.layers.1.mlp.experts.gate_up_proj" in muon and "model.layers.0.self_attn.o_proj.weight" in muon
    assert "model.layers.2.eh_proj.weight" in muon
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.0.input_layernorm.weight"):
        assert name not in muon
    trainer = tiny_trainer(tmp_path, shards, steps=20, optimizer="muon", muon_lr=0.02, lr=0.01)
    trainer.fit()
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert losses[-1] < losses[0] - 1.0, losses


# ---- checkpoints -------------------------------------------------------------------------------
def test_checkpoint_keeps_last_n_and_a_failed_save_keeps_the_previous(tmp_path, shards, monkeypatch):
    trainer = tiny_trainer(tmp_path, shards, steps=4, checkpoint_interval=1, keep_checkpoints=2)
    trainer.fit()
    run = tmp_path / "run"
    assert [s for s, _ in checkpoint.list_checkpoints(run)] == [3, 4]
    ckpt = run / "checkpoints" / "step-4"
    assert {p.name for p in ckpt.iterdir()} >= {"config.json", "model.safetensors", "generation_config.json",
                                                "trainer_state"}
    assert {p.name for p in (ckpt / "trainer_state").iterdir()} == {"optimizer.safetensors", "state.json"}
    state = json.loads((ckpt / "trainer_state" / "state.json").read_text())
    assert state["step"] == 4 and state["data"]["position"] > 0 and state["rng"]["torch"]
    before = (ckpt / "model.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_write_trainer_state", broken)
    trainer.step = 5
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    assert [s for s, _ in checkpoint.list_checkpoints(run)] == [3, 4]
    assert (ckpt / "model.safetensors").read_bytes() == before
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    model_state, optimizer_state, state = checkpoint.load_checkpoint(ckpt)
    assert state["step"] == 4 and optimizer_state["state"]


def test_nonfinite_step_is_skipped(tmp_path, shards):
    trainer = tiny_trainer(tmp_path, shards, steps=4, inject_nan_steps=[2])
    trainer.fit()
    records = read_metrics(tmp_path / "run")
    assert records[1]["skipped"] is True and records[1]["loss"] is None
    assert not records[2].get("skipped") and math.isfinite(records[3]["loss"])


def test_repeated_nonfinite_losses_stop_with_the_last_good_checkpoint(tmp_path, shards):
    trainer = tiny_trainer(tmp_path, shards, steps=8, checkpoint_interval=1, inject_nan_steps=[3, 4, 5, 6],
                           max_nonfinite=3)
    with pytest.raises(TrainingDiverged, match="3 steps in a row.*step-2"):
        trainer.fit()
    run = tmp_path / "run"
    assert [s for s, _ in checkpoint.list_checkpoints(run)] == [1, 2]
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]
    assert json.loads((run / "ledger.json").read_text())["stages"][0]["tokens"] == 5 * 128


def test_pretrain_command_writes_the_run_and_guards_it(tmp_path, shards, capsys):
    from hemat.cli import main

    config, run = write_config(tmp_path / "run.yaml"), tmp_path / "run"
    main(["pretrain", "--config", str(config), "--data", str(shards), "--run-dir", str(run), "--steps", "2"])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["steps"] == 2 and saved["data"]["path"] == str(shards) and saved["model"]["hidden_size"] == 32
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.jsonl", "ledger.json", "loss.png", "checkpoints"}
    assert "step 2: loss" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="already holds a run"):
        main(["pretrain", "--config", str(config), "--data", str(shards), "--run-dir", str(run), "--steps", "3"])
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 2  # left as it was
    main(["pretrain", "--run-dir", str(run), "--resume", "--steps", "3"])
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]


TINY_DEEPSEEK_V2 = {**{k: v for k, v in TINY_MODEL.items() if k != "num_nextn_predict_layers"},
                    "model_type": "deepseek_v2", "topk_method": "greedy", "routed_scaling_factor": 1.0}
TINY_QWEN3 = dict(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=64,
                  tie_word_embeddings=True)


@pytest.mark.parametrize("model", [TINY_DEEPSEEK_V2, TINY_QWEN3], ids=["deepseek_v2", "qwen3"])
def test_pretrain_command_trains_deepseek_v2_and_qwen3(tmp_path, shards, model):
    """A `model:` section of either type trains, and the checkpoint is one transformers loads. DeepSeek-V2's
    routers have no correction bias: they are balanced by the sequence-wise balance loss alone."""
    import transformers

    from hemat.cli import main

    config, run = tmp_path / "run.yaml", tmp_path / "run"
    config.write_text(yaml.safe_dump({"model": model, "train": {**TINY_TRAIN, "steps": 6, "balance_loss_alpha": 0.01}}))
    main(["pretrain", "--config", str(config), "--data", str(shards), "--run-dir", str(run)])
    records = read_metrics(run)
    assert records[-1]["loss"] < records[0]["loss"] - 0.4, (records[0]["loss"], records[-1]["loss"])
    if model["model_type"] == "deepseek_v2":
        assert records[-1]["balance_loss"] > 0 and set(records[-1]["load_imbalance"]) == {"1"}
    ckpt = checkpoint.list_checkpoints(run)[-1][1]
    trained = hemat.from_pretrained(ckpt)
    reference = transformers.AutoModelForCausalLM.from_pretrained(ckpt).float().eval()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (reference(ids).logits - trained(ids)).abs().max() <= 1e-4


# ---- the config section ------------------------------------------------------------------------
def test_config_overrides_are_type_checked(tmp_path):
    path = write_config(tmp_path / "run.yaml", lr="3e-4")  # YAML reads 3e-4 as a string
    config = load_config(path, ["train.steps=7", "train.lr=2e-3", "train.compile=true", "data.path=/x",
                                "model.hidden_size=48", "train.inject_nan_steps=1,2", "train.price_per_hour=null"])
    assert config.train.steps == 7 and config.train.lr == 2e-3 and config.train.compile is True
    assert config.data.path == "/x" and config.model.hidden_size == 48 and config.train.inject_nan_steps == [1, 2]
    assert load_config(path).train.lr == 3e-4
    assert yaml.safe_load(config.to_yaml())["train"]["steps"] == 7
    for bad, message in [("train.lr=fast", "train.lr: expected a number, got 'fast'"),
                         ("train.steps=2.5", "train.steps: expected an integer"),
                         ("train.lrr=1", "train has no key 'lrr'"),
                         ("optim.lr=1", "unknown section 'optim'"),
                         ("train.lr", "expected SECTION.KEY=VALUE"),
                         ("train.optimizer=sgd", "train.optimizer: expected one of adamw, muon"),
                         ("train.steps=0", "train.steps must be positive"),
                         ("train.seq_len=128", "exceeds model.max_position_embeddings")]:
        with pytest.raises(ConfigValueError, match=message.replace("(", r"\(")):
            load_config(path, [bad])
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({"model": TINY_MODEL, "train": {"stepz": 3}}))
    with pytest.raises(ConfigValueError, match="unknown key.*stepz"):
        load_config(tmp_path / "typo.yaml")
    with pytest.raises(ConfigValueError, match="train.batch_tokens \\(100\\) must be a multiple"):
        TrainConfig(batch_tokens=100, micro_batch_size=2, seq_len=32).accumulation_steps(2)


def test_presets_have_valid_train_sections():
    for name in ("cpu-tiny", "gpu-reference"):
        config = load_config(name)
        assert config.train.accumulation_steps(1) >= 1
