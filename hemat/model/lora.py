"""LoRA (Hu et al., 2021) applied from outside as a module swap, as PEFT does: `add_adapters(model, config)`
wraps each targeted nn.Linear in a LoraLinear and each targeted stack of routed experts in a LoraExperts,
freezes every base parameter and leaves only the adapters trainable. The output of a wrapped layer is
base(x) + scaling · B(A(dropout(x))), scaling = alpha / rank (alpha / √rank with rsLoRA, Kalajdzievski 2023).

Module and parameter names are PEFT's (`q_proj.base_layer`, `q_proj.lora_A.weight`, ...; experts as PEFT's
`target_parameters` wrappers), so adapter_io.py writes PEFT's files with little more than a name prefix.

`adapters_disabled(model)` switches every adapter off: GRPO's reference policy is the base model this way,
without a second copy. Inference paths that read a projection's `.weight` directly (MLA's absorbed and folded
attention, the CPU fast paths) see the effective weight W + scaling · B·A while the adapter is on."""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from hemat.errors import HematError
from hemat.model.moe import RoutedExperts

# the modules adapted by default: every projection of attention (MLA's or GQA's), dense MLPs, shared
# experts and routed experts; never the router, embeddings or output head
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                   "kv_b_proj", "gate_proj", "up_proj", "down_proj", "experts")


class LoraError(HematError):
    pass


@dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha, dropout on the adapter's input (linear layers only, as in PEFT), rsLoRA scaling, and
    targets: module-name patterns (a name matches when it ends with `.pattern` or fully matches the regex
    `pattern`); None means DEFAULT_TARGETS that the model has. Only the decoder layers are adapted (not MTP)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    targets: tuple[str, ...] | None = None

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank

    def validate(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise LoraError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if self.targets is not None and not self.targets:
            raise LoraError("lora.targets is empty; omit it for the defaults of the architecture")


class LoraLinear(nn.Module):
    """An nn.Linear (`base_layer`, frozen) plus a trainable low-rank update. The adapter's parameters are
    float32 whatever the base dtype (as PEFT's autocast_adapter_dtype), so that AdamW's small updates are
    not lost; they are computed with in the activations' dtype."""

    def __init__(self, base: nn.Linear, config: LoraConfig):
        super().__init__()
        self.base_layer = base
        device = next(iter([*base.parameters(), *base.buffers()])).device  # a quantized base's weight is computed
        self.lora_A = nn.Linear(base.in_features, config.rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(config.rank, base.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.scaling = config.scaling
        self.enabled = True
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's initialisation: B = 0, so a
        nn.init.zeros_(self.lora_B.weight)  # fresh adapter leaves the model unchanged

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight W + ΔW (what merging writes and inference forms are built from)."""
        base = self.base_layer.weight
        return base + self.delta_weight().to(base.dtype) if self.enabled else base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.enabled:
            return out
        # in the activations' dtype: the factors are cast (small), not the input, so a bf16 model keeps
        # no fp32 copy of every adapted layer's input for the backward pass (peft keeps one)
        a, b = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
        return out + F.linear(F.linear(self.lora_dropout(x), a), b) * self.scaling


class ExpertLora(nn.Module):
    """Per-expert A_e [r, in] and B_e [out, r] of one stacked expert weight [E, out, in], in PEFT's layout for
    a 3-d `target_parameters` entry: lora_A.weight [r·E, in] (expert-major rows), lora_B.weight [out, r·E]
    (rank-major columns)."""

    def __init__(self, n_experts: int, out_features: int, in_features: int, config: LoraConfig, device):
        super().__init__()
        self.n_experts, self.rank = n_experts, config.rank
        rows = config.rank * n_experts
        self.lora_A = nn.Linear(in_features, rows, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rows, out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta(self, scaling: float) -> torch.Tensor:
        """scaling · B_e · A_e for every expert → [E, out, in]."""
        a = self.lora_A.weight.view(self.n_experts, self.rank, -1)
        b = self.lora_B.weight.view(-1, self.rank, self.n_experts).permute(2, 0, 1)
        return torch.bmm(b, a) * scaling

    def term(self, x: torch.Tensor, expert: int, scaling: float) -> torch.Tensor:
        """scaling · x · (B_e · A_e)ᵀ for one expert's tokens, through the rank-r factors (in x's dtype)."""
        a = self.lora_A.weight.view(self.n_experts, self.rank, -1)[expert]
        b = self.lora_B.weight.view(-1, self.rank, self.n_experts)[:, :, expert]
        return F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * scaling


class LoraExperts(nn.Module):
    """Routed experts (`base_layer`, frozen) with one ExpertLora per stacked weight. The experts run their
    own forward over W + ΔW (torch.func.functional_call), as PEFT's ParamWrapper does; PEFT nests one wrapper
    per parameter, so its names are `experts.base_layer.lora_*` (gate_up_proj) and `experts.lora_*` (down_proj),
    which adapter_io maps to these modules. Over QLoRA's quantized experts the update is not merged: each
    expert's matmul adds its low-rank term (`low_rank`), so no full-precision stack is formed."""

    def __init__(self, base: RoutedExperts, config: LoraConfig):
        super().__init__()
        self.base_layer = base
        e, h, i = base.n_experts, base.hidden_size, base.intermediate_size
        device = next(iter([*base.parameters(), *base.buffers()])).device
        self.gate_up_lora = ExpertLora(e, 2 * i, h, config, device)
        self.down_lora = ExpertLora(e, h, i, config, device)
        self.scaling = config.scaling
        self.enabled = True

    def effective_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        base = (self.base_layer.gate_up_proj, self.base_layer.down_proj)
        if not self.enabled:
            return base
        return tuple(w + lora.delta(self.scaling).to(w.dtype)
                     for w, lora in zip(base, (self.gate_up_lora, self.down_lora)))

    def low_rank(self, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        lora = self.gate_up_lora if name == "gate_up_proj" else self.down_lora
        return lora.term(x, expert, self.scaling)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        if not self.enabled:
            return self.base_layer(*args, **kwargs)
        if type(self.base_layer) is not RoutedExperts:  # QLoRA's FrozenQuantizedExperts
            return self.base_layer(*args, **kwargs, adapter=self.low_rank)
        gate_up, down = self.effective_weights()
        return functional_call(self.base_layer, {"gate_up_proj": gate_up, "down_proj": down}, args, kwargs)


ADAPTER_TYPES = (LoraLinear, LoraExperts)


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name) is not None


def _linear_types() -> tuple[type, ...]:
    """The layers LoraLinear wraps: nn.Linear, and QLoRA's frozen quantized linear (imported here, lazily:
    qlora.py imports the quantizers, whose module imports this one)."""
    from hemat.model.qlora import FrozenQuantizedLinear

    return nn.Linear, FrozenQuantizedLinear


def decoder_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Candidates for adapters: the modules inside the decoder layers (MTP layers excluded), routed experts
    as a whole (not the per-expert modules of QLoRA's quantized experts)."""
    n = model.config.num_hidden_layers
    layer = re.compile(r"^model\.layers\.(\d+)\.")
    modules = [(name, m) for name, m in model.named_modules() if (hit := layer.match(name)) and int(hit.group(1)) < n]
    experts = tuple(f"{name}." for name, m in modules if isinstance(m, RoutedExperts))
    return [(name, m) for name, m in modules if not name.startswith(experts)]


def resolve_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """The names of the modules `config` adapts: errors name a pattern that matches nothing, a matched
    module that is neither a linear layer nor routed experts, and a rank larger than a layer."""
    modules = decoder_modules(model)
    linear = _linear_types()
    adaptable = [(n, m) for n, m in modules if type(m) in linear or isinstance(m, RoutedExperts)]
    if config.targets is None:
        patterns = [p for p in DEFAULT_TARGETS if any(_matches(n, p) for n, _ in adaptable)]
    else:
        patterns = list(config.targets)
    chosen = []
    for pattern in patterns:
        hits = [(n, m) for n, m in modules if _matches(n, pattern)]
        if not hits:
            names = sorted({n.rsplit(".", 1)[-1] for n, _ in adaptable})
            raise LoraError(f"lora target {pattern!r} matches no module of the decoder layers; "
                            f"adaptable module names: {', '.join(names)}")
        for name, module in hits:
            if not isinstance(module, (*linear, RoutedExperts)):
                raise LoraError(f"lora target {pattern!r} matches {name} ({type(module).__name__}), which is "
                                "neither a linear layer nor routed experts")
            _check_rank(name, module, config.rank)
            chosen.append(name)
    return sorted(set(chosen), key=[n for n, _ in modules].index)


def _check_rank(name: str, module: nn.Module, rank: int) -> None:
    if isinstance(module, RoutedExperts):
        smallest = min(module.hidden_size, module.intermediate_size)
    else:
        smallest = min(module.in_features, module.out_features)
    if rank > smallest:
        raise LoraError(f"lora.rank {rank} is larger than {name}, whose smallest dimension is {smallest}")


def add_adapters(model: nn.Module, config: LoraConfig, names: list[str] | None = None,
                 base_model: str | None = None) -> list[str]:
    """Wrap the modules `config` targets (or exactly `names`) with fresh adapters; freeze the rest of the
    model. Returns the names wrapped. The config is kept as `model.lora_config`, and `base_model` (the
    checkpoint adapted, written into adapter files) as `model.lora_base`."""
    config.validate()
    if any(isinstance(m, ADAPTER_TYPES) for m in model.modules()):
        raise LoraError("the model already has LoRA adapters")
    names = resolve_targets(model, config) if names is None else names
    if config.dropout and any(isinstance(model.get_submodule(n), RoutedExperts) for n in names):
        raise LoraError("lora.dropout must be 0 when routed experts are adapted (their update is merged into "
                        "the expert weights, where input dropout cannot apply; PEFT refuses it too)")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        module = model.get_submodule(name)
        wrapper = LoraExperts(module, config) if isinstance(module, RoutedExperts) else LoraLinear(module, config)
        wrapper.train(module.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, wrapper)
    model.lora_config, model.lora_base = config, base_model
    return names


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ADAPTER_TYPES)}


def has_adapters(model: nn.Module) -> bool:
    return bool(adapter_modules(model))


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model: every adapter switched off inside the block (GRPO's reference policy)."""
    modules = list(adapter_modules(model).values())
    states = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, state in zip(modules, states):
            m.enabled = state


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' parameters under their names in the model."""
    return {name: p for name, p in model.named_parameters() if ".lora_" in name}


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the base modules back (in place). Refused over a
    quantized base: the merged weight would have to be requantized, losing the update."""
    for name, wrapper in adapter_modules(model).items():
        base = wrapper.base_layer
        weights = (base.gate_up_proj, base.down_proj) if isinstance(wrapper, LoraExperts) else (base.weight,)
        quantized = any(type(w) is not nn.Parameter or w.dtype not in (torch.float32, torch.bfloat16, torch.float16)
                        for w in weights)  # a low-bit dtype, or a tensor subclass (torchao's quantized weights)
        if quantized:
            raise LoraError(f"cannot merge the adapter of {name} into its quantized base "
                            f"({type(base).__name__}, {weights[0].dtype}); merge into an unquantized checkpoint")
    with torch.no_grad():
        for name, wrapper in adapter_modules(model).items():
            wrapper.enabled = True
            if isinstance(wrapper, LoraExperts):
                merged = wrapper.effective_weights()
                wrapper.base_layer.gate_up_proj.copy_(merged[0])
                wrapper.base_layer.down_proj.copy_(merged[1])
            else:
                wrapper.base_layer.weight.copy_(wrapper.weight)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, wrapper.base_layer)
    model.__dict__.pop("lora_config", None)
    model.__dict__.pop("lora_base", None)
    return model
