"""LoRA adapters against peft on the transformers models: hemat's adapter files loaded by peft give the same
logits as hemat, and peft's adapter files loaded by hemat too; switching adapters off gives the base back;
merging; bad input."""

import json
import subprocess
import sys

import pytest
import torch

from hemat.model.adapter_io import load_adapter, merge, save_adapter
from hemat.model.hf import from_pretrained
from hemat.model.lora import LoraConfig, LoraError, adapters_disabled, add_adapters, merge_adapters
from tests.hf_models import make_hf_model

peft = pytest.importorskip("peft")

MLA_TARGETS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
TOKENS = torch.tensor([[3, 17, 42, 5, 99, 23, 7, 64, 11, 2]])


def randomize_adapters(model) -> None:
    """Non-zero B (a fresh adapter is the identity) so that every adapter shows in the logits."""
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(std=0.2)


def check_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max() <= 1e-4 * b.abs().max(), (a - b).abs().max()


@pytest.fixture(scope="module", params=["llama", "qwen2", "deepseek_v3"])
def base(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(request.param, path)
    return request.param, path, hf


def test_hemat_adapter_loads_in_peft_with_the_same_logits(base, tmp_path):
    kind, path, hf = base
    model = from_pretrained(path)
    # peft (0.21) on transformers 5 reads "gate_proj"/"up_proj"/"down_proj" in a DeepSeek adapter as the pre-v5
    # per-expert names and rewrites them into the fused experts: DeepSeek's dense MLPs stay out of this check
    targets = MLA_TARGETS + ("experts",) if kind == "deepseek_v3" else None
    names = add_adapters(model, LoraConfig(rank=4, alpha=8, rslora=kind == "qwen2", targets=targets),
                         base_model=str(path))
    if kind == "deepseek_v3":
        assert "model.layers.1.mlp.experts" in names and "model.layers.1.self_attn.kv_b_proj" in names
    randomize_adapters(model)
    with torch.no_grad():
        ours = model(TOKENS)
        with adapters_disabled(model):
            base_logits = model(TOKENS)
    save_adapter(model, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter")
    with torch.no_grad():
        theirs = peft_model(TOKENS).logits
        with peft_model.disable_adapter():
            check_same(base_logits, peft_model(TOKENS).logits)
    assert (ours - base_logits).abs().max() > 1e-2  # the adapter changes the output
    check_same(ours, theirs)
    peft_model.unload()


def test_peft_adapter_loads_in_hemat_with_the_same_logits(base, tmp_path):
    kind, path, hf = base
    targets = ["q_proj", "v_proj", "down_proj"] if kind != "deepseek_v3" else ["q_a_proj", "kv_b_proj", "o_proj"]
    extra = {"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]} if kind == "deepseek_v3" else {}
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, **extra))
    randomize_adapters(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        theirs = peft_model(TOKENS).logits
    peft_model.unload()
    model = from_pretrained(path)
    load_adapter(model, tmp_path / "peft")
    with torch.no_grad():
        check_same(model(TOKENS), theirs)
        model.train()
        with torch.enable_grad():  # the training path (adapter as x·A·B, experts through autograd) too
            check_same(model(TOKENS).detach(), theirs)


def test_training_moves_only_the_adapters_and_merge_keeps_the_logits(tmp_path):
    make_hf_model("deepseek_v3", tmp_path / "base")
    model = from_pretrained(tmp_path / "base")
    before = {n: p.clone() for n, p in model.named_parameters()}
    add_adapters(model, LoraConfig(rank=4, alpha=8))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        logits = model(TOKENS[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), TOKENS[0, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    for name, p in model.named_parameters():
        base_name = name.replace(".base_layer", "")
        if ".lora_" not in name:
            assert not p.requires_grad and torch.equal(p, before[base_name]), name
    experts = model.model.layers[1].mlp.experts
    assert experts.gate_up_lora.lora_B.weight.abs().max() > 0  # the expert adapters were trained
    with torch.no_grad():
        adapted = model(TOKENS)
        save_adapter(model, tmp_path / "adapter")
        merge_adapters(model)
        check_same(model(TOKENS), adapted)
    # the CLI: base + adapter → a full checkpoint that loads with the same logits
    subprocess.run([sys.executable, "-m", "hemat", "merge", "--model", str(tmp_path / "base"),
                    "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")], check=True)
    with torch.no_grad():
        check_same(from_pretrained(tmp_path / "merged")(TOKENS), adapted)


def test_cached_generation_sees_the_adapter(tmp_path):
    """MLA's cached attention reads kv_b_proj's weight directly: it must be the adapted one."""
    from hemat.infer.engine import Engine
    from hemat.infer.sampling import SamplingParams

    make_hf_model("deepseek_v3", tmp_path)
    model = from_pretrained(tmp_path)
    add_adapters(model, LoraConfig(rank=4, alpha=8))
    randomize_adapters(model)
    prompt, expected = TOKENS[0].tolist(), []
    with torch.no_grad():  # greedy by full uncached forwards: the reference
        for _ in range(6):
            expected.append(int(model(torch.tensor([prompt + expected]))[0, -1].argmax()))
    out = Engine(model, page_size=4).generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert out[0].outputs[0].token_ids == expected


def test_bad_input_is_named(tmp_path):
    make_hf_model("llama", tmp_path / "llama")
    make_hf_model("qwen2", tmp_path / "qwen2", hidden_size=32, intermediate_size=48)
    model = from_pretrained(tmp_path / "llama")
    with pytest.raises(LoraError, match="'wq_proj' matches no module"):
        add_adapters(model, LoraConfig(targets=("wq_proj",)))
    with pytest.raises(LoraError, match="rank must be a positive integer"):
        add_adapters(model, LoraConfig(rank=0))
    with pytest.raises(LoraError, match=r"rank 65 is larger than model\.layers\.0\.self_attn\.q_proj"):
        add_adapters(model, LoraConfig(rank=65, targets=("q_proj",)))
    with pytest.raises(LoraError, match=r"model\.layers\.0\.input_layernorm \(RMSNorm\)"):
        add_adapters(model, LoraConfig(targets=("input_layernorm",)))
    add_adapters(model, LoraConfig(rank=4))
    save_adapter(model, tmp_path / "adapter")
    other = from_pretrained(tmp_path / "qwen2")
    with pytest.raises(LoraError, match="adapter_model.safetensors: .*q_proj.lora_A.weight has shape .* "
                                        "another base model"):
        load_adapter(other, tmp_path / "adapter")
    assert not any(".lora_" in n for n, _ in other.named_parameters())  # a failed load leaves no adapters
    deepseek = make_hf_model("deepseek_v3", tmp_path / "ds") and from_pretrained(tmp_path / "ds")
    with pytest.raises(LoraError, match="adapts modules this model does not have"):
        load_adapter(deepseek, tmp_path / "adapter")
    # merging into a quantized checkpoint is refused
    from_pretrained(tmp_path / "llama").save_pretrained(tmp_path / "llama-fp8", format="fp8")
    with pytest.raises(LoraError, match="llama-fp8 is a quantized checkpoint"):
        merge(tmp_path / "llama-fp8", tmp_path / "adapter", tmp_path / "merged")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(LoraError, match="use_dora = True is not supported"):
        load_adapter(from_pretrained(tmp_path / "llama"), tmp_path / "adapter")
