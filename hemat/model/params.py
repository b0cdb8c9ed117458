"""Parameter counts: total, per-token active, embedding and MTP, computed from a config analytically
and from an instantiated model by parameter name; `hemat params` prints them and checks that the two
agree on a model built on the meta device (no memory allocated).

Conventions (DESIGN.md section 4): `active` excludes the input embedding (a lookup, not a matmul),
includes the output head (even when tied to the embedding: the V×H matmul still runs per token),
counts routed experts k of E and excludes MTP. `mtp` counts the MTP modules' own parameters; the
embedding and output head they share with the main model are added only in the `*_with_shared`
figures, which is how DeepSeek's README_WEIGHTS quotes them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hemat.errors import HematError
from hemat.model.config import ModelConfig

COMPONENTS = (
    "embedding", "lm_head", "final_norm", "attention", "norms", "dense_mlp", "router",
    "routed_experts", "shared_experts", "mtp",
)


@dataclass
class ParamCounts:
    total: int  # main + mtp (unique parameters of the module)
    main: int  # everything but the MTP modules
    mtp: int  # MTP modules without the shared embedding and head
    embedding: int
    lm_head: int  # 0 when tied to the embedding
    active: int  # per token, main model
    mtp_active: int  # per token, MTP modules' own parameters (routed experts k of E)
    routed_experts: int  # main model's routed experts, all E of them
    head_matrix: int  # vocab × hidden: the output projection's size whether tied or not
    breakdown: dict[str, int] = field(default_factory=dict)  # COMPONENTS → count; sums to total

    @property
    def mtp_with_shared(self) -> int:
        """The MTP modules as a checkpoint stores them, with their own copies of embedding and head."""
        return self.mtp + self.embedding + self.lm_head if self.mtp else 0

    @property
    def mtp_active_with_shared(self) -> int:
        return self.mtp_active + self.embedding + self.lm_head if self.mtp else 0

    @property
    def checkpoint_total(self) -> int:
        """Main model + MTP with shared copies: what DeepSeek's HF checkpoint holds (685B for V3)."""
        return self.main + self.mtp_with_shared


def _attention(c: ModelConfig) -> int:
    h, heads = c.hidden_size, c.num_attention_heads
    if c.is_mla:
        q_out = heads * c.qk_head_dim
        if c.q_lora_rank:
            q = h * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * q_out  # q_a_proj, q_a_layernorm, q_b_proj
        else:
            q = h * q_out
        kv = h * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank  # kv_a_proj_with_mqa, kv_a_layernorm
        kv += c.kv_lora_rank * heads * (c.qk_nope_head_dim + c.v_head_dim)  # kv_b_proj
        return q + kv + heads * c.v_head_dim * h  # o_proj
    d, kv_heads = c.dense_head_dim, c.num_key_value_heads
    n = h * heads * d + 2 * h * kv_heads * d + heads * d * h
    if c.model_type == "qwen2" or c.attention_bias:  # q/k/v biases
        n += heads * d + 2 * kv_heads * d
    if c.model_type in ("llama", "qwen3") and c.attention_bias:  # their attention_bias also covers o_proj
        n += h
    if c.qk_norm:  # qwen3's per-head q_norm and k_norm
        n += 2 * d
    return n


def _layer(c: ModelConfig, layer_idx: int) -> dict[str, int]:
    h = c.hidden_size
    out = dict.fromkeys(("attention", "norms", "dense_mlp", "router", "routed_experts", "shared_experts"), 0)
    out["attention"] = _attention(c)
    out["norms"] = 2 * h  # input_layernorm, post_attention_layernorm
    if c.is_moe_layer(layer_idx):
        expert = 3 * h * c.moe_intermediate_size  # SwiGLU gate, up, down
        out["router"] = c.n_routed_experts * h  # V3's e_score_correction_bias is a buffer, not a parameter
        out["routed_experts"] = c.n_routed_experts * expert
        out["shared_experts"] = (c.n_shared_experts or 0) * expert
    else:
        out["dense_mlp"] = 3 * h * c.intermediate_size
    return out


def _routed_inactive(c: ModelConfig, routed: int) -> int:
    """Routed-expert parameters a token does not touch: (E - k)/E of them."""
    if not routed:
        return 0
    return routed * (c.n_routed_experts - c.num_experts_per_tok) // c.n_routed_experts


def count_parameters(config: ModelConfig) -> ParamCounts:
    """Parameter counts from the config alone."""
    c = config
    h, head_matrix = c.hidden_size, c.vocab_size * c.hidden_size
    parts = dict.fromkeys(COMPONENTS, 0)
    parts["embedding"] = head_matrix
    parts["lm_head"] = 0 if c.tie_word_embeddings else head_matrix
    parts["final_norm"] = h
    for i in range(c.num_hidden_layers):
        for name, n in _layer(c, i).items():
            parts[name] += n
    mtp = mtp_routed = 0
    for i in range(c.num_nextn_predict_layers if c.is_mla else 0):  # llama/qwen have no MTP
        layer = _layer(c, c.num_hidden_layers + i)
        mtp += sum(layer.values()) + 3 * h + 2 * h * h  # enorm, hnorm, shared_head.norm; eh_proj [H, 2H]
        mtp_routed += layer["routed_experts"]
    parts["mtp"] = mtp
    return _counts(c, parts, mtp_routed)


def _counts(c: ModelConfig, parts: dict[str, int], mtp_routed: int) -> ParamCounts:
    head_matrix = c.vocab_size * c.hidden_size
    main = sum(n for k, n in parts.items() if k != "mtp")
    active = main - parts["embedding"] - _routed_inactive(c, parts["routed_experts"])
    if c.tie_word_embeddings:
        active += head_matrix
    return ParamCounts(
        total=main + parts["mtp"], main=main, mtp=parts["mtp"], embedding=parts["embedding"],
        lm_head=parts["lm_head"], active=active, mtp_active=parts["mtp"] - _routed_inactive(c, mtp_routed),
        routed_experts=parts["routed_experts"], head_matrix=head_matrix, breakdown=parts,
    )


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_BY_SUFFIX = [  # (pattern on the name inside a layer, component); first match wins
    (re.compile(r"self_attn\."), "attention"),
    (re.compile(r"(input|post_attention)_layernorm\."), "norms"),
    (re.compile(r"mlp\.experts\."), "routed_experts"),
    (re.compile(r"mlp\.shared_experts\."), "shared_experts"),
    (re.compile(r"mlp\.gate\.weight$"), "router"),
    (re.compile(r"mlp\.(gate|up|down)_proj\."), "dense_mlp"),
]
_MTP_OWN = re.compile(r"(enorm|hnorm|eh_proj|shared_head\.norm)\.")
_TOP = {"model.embed_tokens.weight": "embedding", "lm_head.weight": "lm_head", "model.norm.weight": "final_norm"}


def classify(name: str, num_hidden_layers: int) -> tuple[str, bool]:
    """A parameter name → (component, belongs to an MTP module). Unknown names are an error, so a new
    parameter cannot slip past the counts unnoticed."""
    if name in _TOP:
        return _TOP[name], False
    m = _LAYER.fullmatch(name)
    if m:
        is_mtp, rest = int(m.group(1)) >= num_hidden_layers, m.group(2)
        if is_mtp and _MTP_OWN.match(rest):
            return "mtp", True
        for pattern, component in _BY_SUFFIX:
            if pattern.match(rest):
                return component, is_mtp
    raise HematError(f"parameter {name!r} does not match any known component; update hemat/model/params.py")


def count_module_parameters(model, config: ModelConfig | None = None) -> ParamCounts:
    """Counts from an instantiated model's named parameters (meta tensors are fine)."""
    c = config or model.config
    parts = dict.fromkeys(COMPONENTS, 0)
    mtp_routed = 0
    for name, p in model.named_parameters():
        component, is_mtp = classify(name, c.num_hidden_layers)
        if is_mtp:
            parts["mtp"] += p.numel()
            mtp_routed += p.numel() if component == "routed_experts" else 0
        else:
            parts[component] += p.numel()
    return _counts(c, parts, mtp_routed)


def build_meta_model(config: ModelConfig):
    """The model on the meta device, or None while hemat.model.transformer is not available."""
    try:
        from hemat.model.hf import meta_model
    except ModuleNotFoundError as e:
        if e.name != "hemat.model.transformer":
            raise
        return None
    return meta_model(config)


def human(n: float, digits: int = 2) -> str:
    """1.234e9 → '1.23B'; the unit that keeps the number between 1 and 1000."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f}{unit}"
    return f"{n:.0f}"


def format_counts(counts: ParamCounts) -> str:
    rows = [
        ("main model", counts.main),
        ("active per token", counts.active),
        ("embedding", counts.embedding),
        ("lm_head", counts.lm_head),
        ("routed experts (all)", counts.routed_experts),
    ]
    if counts.mtp:
        rows += [
            ("MTP unique", counts.mtp),
            ("MTP incl. shared embedding+head", counts.mtp_with_shared),
            ("MTP active unique", counts.mtp_active),
            ("MTP active incl. shared", counts.mtp_active_with_shared),
            ("checkpoint (main + MTP incl. shared)", counts.checkpoint_total),
        ]
    rows.append(("total (main + MTP unique)", counts.total))
    rows.append(("", None))
    rows += [(f"  {k}", v) for k, v in counts.breakdown.items() if v]
    width = max(len(label) for label, _ in rows)
    lines = []
    for label, n in rows:
        lines.append("" if n is None else f"{label:<{width}}  {human(n):>9}  {n:>16,}")
    return "\n".join(lines)


def run_params(args) -> int | None:
    from hemat.presets import load_model_config

    config = load_model_config(args.config)
    counts = count_parameters(config)
    print(f"{args.config} ({config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size})")
    print(format_counts(counts))
    if args.no_build:
        return None
    model = build_meta_model(config)
    if model is None:
        print("\n(hemat.model.transformer not available: analytic count only)")
        return None
    built = count_module_parameters(model, config)
    if built != counts:
        print("\nMISMATCH: the model built on the meta device counts differently:")
        print(format_counts(built))
        return 1
    print("\nmatches the model built on the meta device")
    return None


def add_command(subparsers) -> set[str]:
    p = subparsers.add_parser(
        "params",
        help="count total, active, embedding and MTP parameters of a config",
        description="Count parameters analytically from a preset, YAML run config, config.json or checkpoint "
        "directory, and cross-check against the model built on the meta device.",
    )
    p.add_argument(
        "config", metavar="CONFIG_OR_DIR", help="preset name (deepseek-v3-671b), YAML, config.json or checkpoint dir"
    )
    p.add_argument("--no-build", action="store_true", help="skip building the model on the meta device")
    p.set_defaults(func=run_params)
    return {"params"}
