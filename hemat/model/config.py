"""Model configuration: one dataclass for every architecture hemat runs, read from and written to
Hugging Face `config.json` field names so that checkpoints stay loadable by transformers, vLLM
and SGLang."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hemat.errors import HematError

MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "llama", "qwen2", "qwen3")
MLA_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")

ARCHITECTURES = {
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# DeepSeekMoE routing per architecture: V3 scores with a sigmoid and selects with the correction bias
# (noaux_tc); V2 scores with a softmax and selects greedily, over all experts or the best groups.
ROUTING = {
    "deepseek_v3": {"scoring_func": "sigmoid", "topk_methods": ("noaux_tc",), "norm_topk_prob": True},
    "deepseek_v2": {"scoring_func": "softmax", "topk_methods": ("greedy", "group_limited_greedy"),
                    "norm_topk_prob": False},
}
QWEN3_DEFAULT_HEAD_DIM = 128  # transformers' Qwen3Config default when config.json has no head_dim


class ConfigError(HematError):
    """A configuration that hemat cannot build a model from; the message names the field."""


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v3"
    vocab_size: int = 32768
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 12
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None  # llama/qwen2/qwen3; defaults to hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type": "yarn", "factor", "beta_fast", ...} or None
    hidden_act: str = "silu"
    attention_bias: bool = False  # llama's and qwen3's optional q/k/v/o bias; qwen2 always has q/k/v bias
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    # DeepSeek-V3 and V2: multi-head latent attention
    q_lora_rank: int | None = 512
    kv_lora_rank: int = 256
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    rope_interleave: bool = True
    # DeepSeek-V3 and V2: DeepSeekMoE (routing fields left None take the architecture's ROUTING)
    n_routed_experts: int | None = 32
    n_shared_experts: int | None = 2
    num_experts_per_tok: int | None = 4
    moe_intermediate_size: int = 512
    first_k_dense_replace: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool | None = None
    scoring_func: str | None = None
    topk_method: str | None = None
    # DeepSeek-V3: multi-token prediction modules stored after the main layers
    num_nextn_predict_layers: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # HF fields hemat does not use, kept on save

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        routing = ROUTING.get(self.model_type)
        if routing:
            self.scoring_func = self.scoring_func or routing["scoring_func"]
            self.topk_method = self.topk_method or routing["topk_methods"][0]
            self.norm_topk_prob = routing["norm_topk_prob"] if self.norm_topk_prob is None else self.norm_topk_prob
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def is_mla(self) -> bool:
        return self.model_type in MLA_MODEL_TYPES

    @property
    def qk_norm(self) -> bool:
        """Qwen3 RMS-normalises every query and key head before RoPE."""
        return self.model_type == "qwen3"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def dense_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.is_mla else self.dense_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.is_mla and bool(self.n_routed_experts) and layer_idx >= self.first_k_dense_replace

    @property
    def yarn(self) -> dict | None:
        if not self.rope_scaling:
            return None
        kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
        return self.rope_scaling if kind == "yarn" else None

    @property
    def softmax_scale(self) -> float:
        head = self.qk_head_dim if self.is_mla else self.dense_head_dim
        scale = head**-0.5
        yarn = self.yarn
        if self.is_mla and yarn and yarn.get("mscale_all_dim"):  # DeepSeek's; transformers' llama/qwen have none
            mscale = yarn_mscale(yarn["factor"], yarn["mscale_all_dim"])
            scale *= mscale * mscale
        return scale

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported; hemat runs {', '.join(MODEL_TYPES)}"
            )
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"]
        if self.is_mla:
            positive += ["kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "intermediate_size"]
        else:
            positive += ["intermediate_size", "num_key_value_heads"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if self.hidden_act != "silu":
            raise ConfigError(f"config field hidden_act: only 'silu' is supported, got {self.hidden_act!r}")
        if not self.is_mla:
            if self.num_attention_heads % self.num_key_value_heads:
                raise ConfigError(
                    f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                    f"num_key_value_heads ({self.num_key_value_heads})"
                )
            if self.dense_head_dim % 2:
                raise ConfigError(f"head_dim must be even for RoPE, got {self.dense_head_dim}")
        else:
            if self.qk_rope_head_dim % 2:
                raise ConfigError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
            if self.n_routed_experts:
                self._validate_routing()
                if self.n_routed_experts % self.n_group:
                    raise ConfigError(
                        f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})"
                    )
                if not 1 <= self.topk_group <= self.n_group:
                    raise ConfigError(f"topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}")
                per_group = self.n_routed_experts // self.n_group
                kept = self.topk_group * per_group if self.topk_method != "greedy" else self.n_routed_experts
                if not 1 <= self.num_experts_per_tok <= kept:
                    raise ConfigError(
                        f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and the experts in "
                        f"the kept groups ({kept})"
                    )
                if self.topk_method == "noaux_tc" and self.n_group > 1 and per_group < 2:
                    raise ConfigError("noaux_tc group-limited routing needs at least 2 experts per group")
        if self.model_type == "deepseek_v2" and not self.rope_interleave:
            raise ConfigError("rope_interleave: deepseek_v2 always rotates interleaved pairs")
        if self.model_type == "deepseek_v2" and self.num_nextn_predict_layers:
            raise ConfigError("num_nextn_predict_layers: multi-token prediction is a deepseek_v3 feature; use "
                              "model_type deepseek_v3 for MTP")
        yarn = self.yarn
        if self.rope_scaling and not yarn:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in (None, "default"):
                raise ConfigError(f"rope_scaling type {kind!r} is not supported (only 'yarn')")
        if yarn:
            for key in ("factor", "original_max_position_embeddings"):
                if key not in yarn:
                    raise ConfigError(f"rope_scaling (yarn) is missing the field {key!r}")

    def _validate_routing(self) -> None:
        routing = ROUTING[self.model_type]
        if self.scoring_func != routing["scoring_func"]:
            raise ConfigError(f"scoring_func: {self.model_type} routes with {routing['scoring_func']!r}, "
                              f"got {self.scoring_func!r}")
        if self.topk_method not in routing["topk_methods"]:
            raise ConfigError(f"topk_method: {self.model_type} supports {', '.join(routing['topk_methods'])}; "
                              f"got {self.topk_method!r}")
        if self.model_type == "deepseek_v2" and self.norm_topk_prob:
            # DeepSeek's V2 code then normalises and skips routed_scaling_factor, transformers ignores it: no
            # released V2 checkpoint sets it, and a checkpoint that did would compute differently elsewhere
            raise ConfigError("norm_topk_prob: deepseek_v2 supports only false (DeepSeek's V2 code and "
                              "transformers disagree on what true means); got true")

    # ---- Hugging Face config.json ----------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, data: dict, source: str = "config") -> "ModelConfig":
        data = dict(data)
        if "model_type" not in data:
            raise ConfigError(f"{source}: no 'model_type' field")
        if data["model_type"] not in MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {data['model_type']!r} is not supported; hemat runs {', '.join(MODEL_TYPES)}"
            )
        # transformers 5 writes rope_parameters = {rope_type, rope_theta, ...}; older files rope_theta + rope_scaling
        rope = data.pop("rope_parameters", None)
        if rope:
            rope = dict(rope)
            data.setdefault("rope_theta", rope.pop("rope_theta", 10000.0))
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind != "default" and not data.get("rope_scaling"):
                rope["type"] = kind
                rope.pop("rope_type", None)
                data["rope_scaling"] = rope
        if data.get("rope_scaling"):
            scaling = dict(data["rope_scaling"])
            kind = scaling.pop("rope_type", None) or scaling.get("type")
            scaling["type"] = kind
            data["rope_scaling"] = None if kind == "default" else scaling
        model_type = data["model_type"]
        if model_type in ("qwen2", "qwen3") and data.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported")
        if data.get("mlp_bias"):
            raise ConfigError(f"{source}: mlp_bias=true is not supported")
        if model_type in MLA_MODEL_TYPES and data.get("attention_bias"):
            raise ConfigError(f"{source}: attention_bias=true is not supported for {model_type}")
        if model_type in MLA_MODEL_TYPES:
            data.pop("head_dim", None)  # transformers stores qk_rope_head_dim there; MLA has its own sizes
        if model_type == "qwen3":
            data.setdefault("head_dim", QWEN3_DEFAULT_HEAD_DIM)
        if model_type == "deepseek_v2":
            if data.get("moe_layer_freq", 1) != 1:
                raise ConfigError(f"{source}: moe_layer_freq={data['moe_layer_freq']} is not supported (only 1)")
            data.setdefault("first_k_dense_replace", 0)  # transformers' DeepseekV2Config defaults
            for name in ("n_group", "topk_group"):
                if data.get(name) is None:
                    data[name] = 1
        if "num_mtp_layers" in data and "num_nextn_predict_layers" not in data:
            data["num_nextn_predict_layers"] = data.pop("num_mtp_layers")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        if model_type not in MLA_MODEL_TYPES:
            for k in _MLA_FIELDS:  # these names mean nothing to llama/qwen; keep our defaults out
                known.pop(k, None)
            known.update(n_routed_experts=None, n_shared_experts=None, num_experts_per_tok=None)
        extra = {k: v for k, v in data.items() if k not in names and k not in _DERIVED_HF_FIELDS}
        try:
            return cls(**known, extra=extra)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict:
        out = dict(self.extra)
        out["architectures"] = [ARCHITECTURES[self.model_type]]
        common = [
            "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
            "rope_theta", "rope_scaling", "hidden_act", "tie_word_embeddings", "initializer_range",
            "bos_token_id", "eos_token_id", "pad_token_id",
        ]
        for name in common:
            out[name] = getattr(self, name)
        if self.model_type in ("llama", "qwen3"):
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = False
        if not self.is_mla and (self.head_dim or self.model_type == "qwen3"):  # qwen3 without it means 128
            out["head_dim"] = self.dense_head_dim
        if self.model_type in ("qwen2", "qwen3"):
            out.setdefault("use_sliding_window", False)
        if self.is_mla:
            for name in _MLA_FIELDS:
                out[name] = getattr(self, name)
            out["attention_bias"] = False
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(data, source=str(path))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


_MLA_FIELDS = [
    "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rope_interleave",
    "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size",
    "first_k_dense_replace", "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob",
    "scoring_func", "topk_method", "num_nextn_predict_layers",
]

# Fields transformers derives or adds for its own bookkeeping; hemat recomputes or ignores them.
_DERIVED_HF_FIELDS = {
    "architectures", "transformers_version", "qk_head_dim", "dtype", "torch_dtype", "use_cache",
    "output_hidden_states", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "id2label",
    "label2id", "problem_type", "_name_or_path", "output_attentions", "output_router_logits",
    "pretraining_tp", "attention_dropout", "layer_types", "max_window_layers", "sliding_window",
    "use_sliding_window", "mlp_bias",
}


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 · mscale · ln(factor) + 1 (1.3689 for factor 40)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0
