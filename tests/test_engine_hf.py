"""Greedy generation through the engine equals transformers' `generate` on the same random checkpoint,
token for token, with prompts of different lengths batched together on hemat's side."""

import pytest
import torch

import hemat
from hemat.infer.engine import Engine
from hemat.infer.sampling import SamplingParams
from hf_models import YARN_V2, YARN_V2_UNEQUAL, make_hf_model

NEW_TOKENS = 32
CASES = {
    "deepseek_v3_q_lora_moe": ("deepseek_v3", {}),
    "deepseek_v3_no_q_lora_moe": ("deepseek_v3", {"q_lora_rank": None}),
    "deepseek_v2_q_lora_group_limited_yarn": ("deepseek_v2", {"rope_scaling": YARN_V2}),
    "deepseek_v2_no_q_lora_greedy_yarn": ("deepseek_v2", {"q_lora_rank": None, "topk_method": "greedy",
                                                          "rope_scaling": YARN_V2_UNEQUAL}),
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen3_untied_head_dim_24": ("qwen3", {}),
    "qwen3_tied": ("qwen3", {"tie_word_embeddings": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generation_matches_transformers_generate(tmp_path, case):
    kind, overrides = CASES[case]
    reference = make_hf_model(kind, tmp_path / "ckpt", **overrides)
    # no EOS on the transformers side either: both must produce exactly NEW_TOKENS tokens
    reference.generation_config.eos_token_id = None
    reference.generation_config.pad_token_id = 0
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 128, (n,), generator=gen).tolist() for n in (5, 19, 11)]
    expected = []
    with torch.no_grad():
        for p in prompts:
            out = reference.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False)
            expected.append(out[0, len(p) :].tolist())
    assert all(len(e) == NEW_TOKENS for e in expected)

    model = hemat.from_pretrained(tmp_path / "ckpt")
    engine = Engine(model, page_size=8, max_batch_size=len(prompts))
    results = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    assert [r.outputs[0].token_ids for r in results] == expected
