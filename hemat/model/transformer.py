"""The decoder stack shared by DeepSeek-V3, DeepSeek-V2, Llama, Qwen2 and Qwen3, and the causal LM around it.

Module and parameter names follow Hugging Face checkpoints (`model.layers.N.self_attn.q_a_proj`, ...),
so hf.py maps a state dict to and from disk with little more than the routed experts' stacking.

`CausalLM(input_ids)` returns logits [batch, seq, vocab]. Optional arguments:
- `positions` [batch, seq]: token positions (default 0..seq-1); the engine passes them with a cache.
- `cache`: an object with `attend(layer_idx, attention, q, new, scale) -> [batch, seq, heads, dv]` that
  stores the new tokens' cache entries of one layer (`new`: (latent, k_pe) from MLA layers, (k, v) from
  GQA layers) and attends q to every cached entry of each sequence: `attention(q, *entries, mask, scale)`
  with the entries padded to [batch, S, ...] and a mask [batch, seq, S] (True = attend), or a kernel
  that computes the same over the cache's own storage.
- `return_mtp=True`: also return the multi-token-prediction logits, a list with one tensor per MTP
  depth k = 1..D of shape [batch, seq - k, vocab], where position i predicts token i + k + 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hemat.model.config import ModelConfig
from hemat.model.dense import MLP, GQAttention, RMSNorm
from hemat.model.mla import MLAttention
from hemat.model.moe import MoE
from hemat.model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLAttention(config, layer_idx) if config.is_mla else GQAttention(config, layer_idx)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class SharedHead(nn.Module):
    """The MTP module's output norm; the output head itself is the main model's lm_head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """One multi-token-prediction depth (DeepSeek-V3 §2.2): combines the previous depth's hidden state
    h_i with the embedding of token i + k, then runs a full decoder layer. The concatenation order
    [emb ; h] is the one DeepSeek-V3's released eh_proj weights use."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)

    def forward(self, hidden, token_embeds, rope, cache=None) -> torch.Tensor:
        x = self.eh_proj(torch.cat((self.enorm(token_embeds), self.hnorm(hidden)), dim=-1))
        return super().forward(x, rope, cache)


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        n, depth = config.num_hidden_layers, config.num_nextn_predict_layers if config.is_mla else 0
        self.layers = nn.ModuleList(
            [DecoderLayer(config, i) for i in range(n)] + [MTPLayer(config, n + d) for d in range(depth)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """→ final normalised hidden states [batch, seq, hidden]."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        rope = self.rotary_emb(positions)
        x = self.embed_tokens(input_ids)
        for layer in self.layers[: self.config.num_hidden_layers]:
            x = layer(x, rope, cache)
        return self.norm(x)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.quantization: dict | None = None  # {"format", "group_size"} of an int8/int4 checkpoint (hf.py)
        self.init_weights()

    @property
    def mtp_layers(self) -> list[MTPLayer]:
        return list(self.model.layers)[self.config.num_hidden_layers :]  # slicing a ModuleList builds one: slow

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.model.embed_tokens.weight) if self.lm_head is None else self.lm_head(hidden)

    def forward(self, input_ids, positions=None, cache=None, return_mtp: bool = False):
        hidden = self.model(input_ids, positions, cache)
        logits = self.logits(hidden)
        if not return_mtp:
            return logits
        return logits, self.mtp_logits(hidden, input_ids, positions)

    def mtp_logits(self, hidden: torch.Tensor, input_ids: torch.Tensor, positions=None) -> list[torch.Tensor]:
        """Training-time MTP over a whole sequence: depth k sees h^{k-1}_i and token i + k."""
        return [self.logits(head) for head in self.mtp_heads(hidden, input_ids, positions)]

    def mtp_heads(self, hidden: torch.Tensor, input_ids: torch.Tensor, positions=None, cache=None):
        """The MTP depths over a whole sequence (the training forward): yields, for k = 1..D, depth k's
        normalised output [B, T - k, H], whose row i predicts token i + k + 1. cache: as for the main
        model (a training mask object); it sees each depth's shorter query length."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        for k in range(1, len(self.mtp_layers) + 1):
            t = input_ids.shape[1] - k
            if t <= 0:
                return
            hidden = self.mtp_depth(k - 1, hidden[:, :t], input_ids[:, k:], self.model.rotary_emb(positions[:, :t]), cache)
            yield self.mtp_layers[k - 1].shared_head.norm(hidden)

    def mtp_depth(self, depth_idx: int, hidden, token_ids, rope, cache=None) -> torch.Tensor:
        """One MTP depth: (previous hidden [B, T, H], the tokens one ahead [B, T]) → its hidden [B, T, H]
        (before the shared head's norm). The one MTP computation: training and drafting both call it."""
        return self.mtp_layers[depth_idx](hidden, self.model.embed_tokens(token_ids), rope, cache)

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, MoE):
                nn.init.normal_(module.gate.weight, std=std)
                nn.init.normal_(module.experts.gate_up_proj, std=std)
                nn.init.normal_(module.experts.down_proj, std=std)
                if module.gate.e_score_correction_bias is not None:
                    module.gate.e_score_correction_bias.zero_()
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """(Re)compute the buffers that checkpoints do not store."""
        self.model.rotary_emb.reset_parameters()
        for moe in self.moe_layers():
            moe.tokens_per_expert.zero_()

    def save_pretrained(self, path, **kwargs) -> None:
        from hemat.model.hf import save_pretrained

        save_pretrained(self, path, **kwargs)

    @property  # the final norm's: an inference form may store the embedding in another (quantized) form
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype
