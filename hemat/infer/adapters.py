"""Several LoRA adapters served at once over one base model (batched LoRA, as S-LoRA and Punica do): each
projection's base form runs once for the whole batch, and every row adds its own adapter's low-rank update,
picked by the row's adapter index (0: the base, no update).

The updates of all adapters run as two matmuls over their factors stacked side by side, x · [A_1; …; A_n]ᵀ
masked to each row's own rank columns, then · [B_1, …, B_n]ᵀ, rather than Punica's per-row gathers of A_i
and B_i and batched matmuls: on CPU, with a few adapters, three ops per projection instead of six ran
streams spread over the adapters at 0.74-0.83 of the same engine's base-only tokens/s, against 0.60 with
gathers (benchmarks/served_adapters.py: cpu-tiny, batch 8, 4 adapters of rank 16, one thread). The masked
work grows with adapters × rank, so this suits a handful of adapters, not hundreds.

`prepare_with_adapters(model, {name: dir}, ...)` loads each adapter onto the reference model in turn
(adapter_io checks names and shapes against the base and names the file), takes its factors, puts the
base back, and returns the model prepared for inference (quantize.py's forms; MLA with W_UK and W_UV
unfolded) with each adapted form wrapped. The prepared model's `adapters` (an AdapterRows) maps names to
indices and holds each batch row's index, which the engine sets before every forward.

Where an inference form joins projections, their updates join too: the fused gate/up projection and MLA's
joint down projection [q_a; kv_a] get A = [A_1; A_2] and B = [B_1, 0; 0, B_2]. kv_b_proj, which MLA applies
in the latent space (W_UK absorbed into the query, W_UV into the output), gets its update there
(MultiLoraMLA). Adapters of routed experts are refused: serve such an adapter merged (`hemat merge`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hemat.errors import HematError
from hemat.infer.quantize import FoldedMLA, FusedMLP, FusedQKVAttention, prepare_loaded
from hemat.model.adapter_io import load_adapter, remove_adapters
from hemat.model.dense import MLP, GQAttention
from hemat.model.lora import LoraExperts, LoraError, decoder_modules, adapter_modules
from hemat.model.mla import MLAttention

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name → (A [r, in], scaling · B [out, r])


class AdapterRows:
    """Adapter names → indices (from 1), and the index of each row of the batch about to run (None: every
    row is the base's, so no update is computed)."""

    def __init__(self, names: list[str], dtype: torch.dtype):
        self.index = {name: i + 1 for i, name in enumerate(names)}
        self.dtype = dtype
        self.ids: torch.Tensor | None = None
        self._masks: dict[int, torch.Tensor] = {}

    def select(self, indices: list[int], device) -> None:
        """Before a forward: row j of the batch runs adapter indices[j]."""
        self.ids = torch.tensor(indices, device=device) if any(indices) else None
        self._masks = {}

    def mask(self, rank: int) -> torch.Tensor | None:
        """[B, 1, adapters · rank]: ones on each row's own adapter's rank columns (made once per forward)."""
        if self.ids is None:
            return None
        if rank not in self._masks:
            own = torch.nn.functional.one_hot(self.ids, len(self.index) + 1)[:, 1:]
            self._masks[rank] = own.repeat_interleave(rank, dim=1)[:, None].to(self.dtype)
        return self._masks[rank]


class MultiLoraLinear(nn.Module):
    """A linear inference form plus per-row updates: y = base(x) + (x · A_iᵀ) · B_iᵀ for row's adapter i,
    over all adapters' factors at once, masked to the row's own."""

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, rows: AdapterRows):
        super().__init__()
        self.base, self.rows = base, rows
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank = a.shape[1]
        self.register_buffer("lora_a", a.flatten(0, 1).t().contiguous())  # [in, adapters · r]
        self.register_buffer("lora_b", b.permute(0, 2, 1).flatten(0, 1).contiguous())  # [adapters · r, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, mask = self.base(x), self.rows.mask(self.rank)
        if mask is None:
            return y
        rows = x.reshape(mask.shape[0], -1, x.shape[-1])  # [B, T, in] or the same tokens flattened [B·T, in]
        return y + ((rows @ self.lora_a) * mask @ self.lora_b).view(y.shape)


class MultiLoraMLA(FoldedMLA):
    """Unfolded MLA whose kv_b_proj has per-row updates B·A, applied where MLA uses W_UK and W_UV: the latent
    query gains (q_nope,h · B_h,nope) · A, the values (out_h · Aᵀ) · B_h,vᵀ (all adapters at once, masked)."""

    rows: AdapterRows
    rank: int

    def absorb_keys(self, q_nope: torch.Tensor) -> torch.Tensor:
        q_latent, mask = super().absorb_keys(q_nope), self.rows.mask(self.rank)
        if mask is None:
            return q_latent
        low = torch.einsum("bthn,hnr->bthr", q_nope, self.lora_b_keys) * mask[:, :, None]
        return q_latent + low @ self.lora_a

    def expand_values(self, out: torch.Tensor) -> torch.Tensor:
        values, mask = super().expand_values(out), self.rows.mask(self.rank)
        if mask is None:
            return values
        low = (out @ self.lora_a.t()) * mask[:, :, None]
        return values + torch.einsum("bthr,hvr->bthv", low, self.lora_b_values)


def prepare_with_adapters(model, adapters: dict[str, str | Path], quantize: str | None = None,
                          group_size: int = 128):
    """`model` (from from_pretrained) prepared for inference with every adapter servable per request; the
    result's `adapters` is the AdapterRows. Errors name the adapter file or the module it cannot serve."""
    factors = [adapter_factors(model, path) for path in adapters.values()]
    prepared = prepare_loaded(model, quantize, group_size, fold_mla=False)
    rows = AdapterRows(list(adapters), model.dtype)
    dtype, device = model.dtype, model.device
    served = set()
    for path, ref in decoder_modules(model):
        form = prepared.get_submodule(path) if isinstance(ref, (MLAttention, GQAttention, MLP)) else None
        if isinstance(form, FoldedMLA):
            joins = {"down": ["q_a_proj", "kv_a_proj_with_mqa"] if ref.q_rank else ["kv_a_proj_with_mqa"],
                     "q_proj": ["q_b_proj" if ref.q_rank else "q_proj"], "o_proj": ["o_proj"]}
            served |= _wrap_joined(prepared, model, path, joins, factors, rows, dtype)
            if any(f"{path}.kv_b_proj" in f for f in factors):
                _adapt_latent(form, ref, [f.get(f"{path}.kv_b_proj") for f in factors], rows, dtype)
                served.add(f"{path}.kv_b_proj")
        elif isinstance(form, FusedQKVAttention):
            joins = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "o_proj": ["o_proj"]}
            served |= _wrap_joined(prepared, model, path, joins, factors, rows, dtype)
        elif isinstance(form, FusedMLP):
            joins = {"gate_up": ["gate_proj", "up_proj"], "down": ["down_proj"]}
            served |= _wrap_joined(prepared, model, path, joins, factors, rows, dtype)
    for name in sorted({n for f in factors for n in f} - served):  # projections that stay linears
        parent, _, child = name.rpartition(".")
        if isinstance(prepared.get_submodule(parent), MLAttention):  # kept past quantize's copy budget
            raise LoraError(f"{name} stays in its reference form, which reads its weights directly and "
                            "cannot add per-request updates; serve with --quantize int8 or int4")
        _wrap_joined(prepared, model, parent, {child: [child]}, factors, rows, dtype)
    prepared.to(device)
    prepared.adapters = rows
    return prepared


def adapter_flags(values: list[str], base_name: str) -> dict[str, Path]:
    """--lora NAME=DIR flags → {name: directory}, refusing a malformed flag, a repeated name and the base's."""
    adapters = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise LoraError(f"--lora takes NAME=DIR (the model id to serve the adapter as, and its directory), "
                            f"got {value!r}")
        if name in adapters:
            raise LoraError(f"--lora: the name {name!r} is given twice")
        if name == base_name:
            raise LoraError(f"--lora: the name {name!r} is the base model's served name; choose another")
        adapters[name] = Path(path)
    return adapters


def adapter_factors(model, path: str | Path) -> Factors:
    """The factors of the adapter in `path`, read through load_adapter (which checks it against `model`);
    the model is left without adapters."""
    load_adapter(model, path)
    try:
        modules = adapter_modules(model)
        experts = [n for n, m in modules.items() if isinstance(m, LoraExperts)]
        if experts:
            raise LoraError(f"{path} adapts routed experts ({experts[0]}): serving several adapters at once "
                            "supports linear projections only; merge this one into the base (hemat merge)")
        return {n: (m.lora_A.weight.detach().clone(), m.lora_B.weight.detach() * m.scaling)
                for n, m in modules.items()}
    finally:
        remove_adapters(model)


def _wrap_joined(prepared, reference, path: str, joins: dict[str, list[str]], factors: list[Factors],
                 rows: AdapterRows, dtype) -> set[str]:
    """Wrap each form `path.child` whose output joins the reference projections `path.part` (in order)
    when an adapter adapts one of them; → the reference names served."""
    served = set()
    for child, parts in joins.items():
        names = [f"{path}.{p}" for p in parts]
        if not any(n in f for f in factors for n in names):
            continue
        outs = [reference.get_submodule(n).out_features for n in names]
        form = prepared.get_submodule(f"{path}.{child}")
        a, b = _stack([[f.get(n) for n in names] for f in factors], form.in_features, outs, dtype)
        setattr(prepared.get_submodule(path), child, MultiLoraLinear(form, a, b, rows))
        served.update(n for n in names if any(n in f for f in factors))
    return served


def _stack(per_adapter: list[list[tuple | None]], in_features: int, outs: list[int], dtype):
    """Each adapter's factors of the joined parts → A [n, R, in] and B [n, Σout, R] (block-diagonal across
    parts, zero-padded to the largest total rank R; zero for an adapter that adapts none of them)."""
    ranks = [sum(p[0].shape[0] for p in parts if p is not None) for parts in per_adapter]
    a = torch.zeros(len(per_adapter), max(ranks), in_features, dtype=dtype)
    b = torch.zeros(len(per_adapter), sum(outs), max(ranks), dtype=dtype)
    for k, parts in enumerate(per_adapter):
        r0 = o0 = 0
        for part, out in zip(parts, outs):
            if part is not None:
                r = part[0].shape[0]
                a[k, r0 : r0 + r] = part[0]
                b[k, o0 : o0 + out, r0 : r0 + r] = part[1]
                r0 += r
            o0 += out
    return a, b


def _adapt_latent(form: FoldedMLA, ref: MLAttention, per_adapter: list[tuple | None], rows: AdapterRows,
                  dtype) -> None:
    """Make `form` a MultiLoraMLA carrying each adapter's kv_b_proj factors, B split per head into its
    key (nope) and value rows."""
    if form.w_uk is None:
        raise HematError("kv_b_proj adapters need MLA prepared with fold_mla=False")
    a, b = _stack([[p] for p in per_adapter], ref.kv_rank, [ref.kv_b_proj.out_features], dtype)
    rank = a.shape[1]
    b = b.view(len(a), ref.n_heads, ref.nope_dim + ref.v_dim, rank).permute(1, 2, 0, 3).flatten(2)
    form.__class__ = MultiLoraMLA  # the form was built for this prepared model alone
    form.rows, form.rank = rows, rank
    form.register_buffer("lora_a", a.flatten(0, 1).contiguous())  # [adapters · r, kv_rank]
    form.register_buffer("lora_b_keys", b[:, : ref.nope_dim].contiguous())  # [H, nope, adapters · r]
    form.register_buffer("lora_b_values", b[:, ref.nope_dim :].contiguous())  # [H, v, adapters · r]
