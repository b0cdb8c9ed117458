"""Tiny random Hugging Face models built and saved by transformers itself, the reference for parity."""

import copy

import torch

DEEPSEEK_BASE = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    n_group=4, topk_group=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=12, first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=256,
    initializer_range=0.1, num_nextn_predict_layers=0, bos_token_id=0, eos_token_id=1, pad_token_id=None,
)
DEEPSEEK_V2_BASE = {**{k: v for k, v in DEEPSEEK_BASE.items() if k != "num_nextn_predict_layers"},
                    "topk_method": "group_limited_greedy", "norm_topk_prob": False,
                    "topk_group": 1}  # 1 group of 2 kept for 2 experts per token: differs from greedy's choice
QWEN3_BASE = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=24, max_position_embeddings=256, initializer_range=0.1,
    tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
)
YARN = {"type": "yarn", "factor": 4.0, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 64}
# DeepSeek-V2's released YaRN (mscale = mscale_all_dim = 0.707: cos/sin unscaled, the softmax scale by
# mscale²) and a variant where the two differ, so that cos/sin are scaled too
YARN_V2 = {**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}
YARN_V2_UNEQUAL = {**YARN, "mscale": 1.0, "mscale_all_dim": 0.707}


def make_hf_model(kind: str, path, **overrides):
    """Build a random transformers model of `kind` (deepseek_v3, deepseek_v2, llama, qwen2, qwen3), save it
    to `path`."""
    import transformers

    overrides = copy.deepcopy(overrides)  # transformers' configs fill rope_scaling in place: keep YARN & co. intact
    torch.manual_seed(1)
    if kind == "deepseek_v3":
        config = transformers.DeepseekV3Config(**{**DEEPSEEK_BASE, **overrides})
        model = transformers.DeepseekV3ForCausalLM(config)
        with torch.no_grad():  # a non-zero correction bias, some of it negative, exercises selection
            for layer in model.model.layers:
                if hasattr(layer.mlp, "gate"):
                    layer.mlp.gate.e_score_correction_bias.uniform_(-0.3, 0.3)
    elif kind == "deepseek_v2":
        config = transformers.DeepseekV2Config(**{**DEEPSEEK_V2_BASE, **overrides})
        model = transformers.DeepseekV2ForCausalLM(config)
    elif kind == "qwen3":
        config = transformers.Qwen3Config(**{**QWEN3_BASE, **overrides})
        model = transformers.Qwen3ForCausalLM(config)
        with torch.no_grad():  # transformers initialises the norms to one; make the per-head norms count
            for layer in model.model.layers:
                for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                    norm.weight.uniform_(0.5, 1.5)
    elif kind == "llama":
        config = transformers.LlamaConfig(**{**dict(
            vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, bos_token_id=0,
            eos_token_id=1, rope_theta=10000.0), **overrides})
        model = transformers.LlamaForCausalLM(config)
    elif kind == "qwen2":
        config = transformers.Qwen2Config(**{**dict(
            vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=True,
            bos_token_id=0, eos_token_id=1), **overrides})
        model = transformers.Qwen2ForCausalLM(config)
        with torch.no_grad():  # transformers initialises biases to zero; make them count
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(std=0.1)
    else:
        raise ValueError(kind)
    model = model.float().eval()
    model.save_pretrained(path)
    return model
