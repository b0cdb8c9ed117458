"""GGUF in and out, through llama.cpp's own Python package (`gguf`): `GGUFReader` and its dequantisers to
load a .gguf file (or the first part of a split one) as a hemat model and tokenizer, `GGUFWriter` and its
quantisers to write one that llama.cpp runs (`hemat export-gguf`).

llama.cpp stores a model under its own tensor names (`blk.N.attn_q.weight`), with three layout changes
from Hugging Face checkpoints that are undone on reading and redone on writing:
- `llama` only: the rows of q_proj/k_proj (weights and biases) are permuted per head, so that llama.cpp's
  rotary embedding can rotate adjacent pairs instead of halves (qwen2/qwen3 use NeoX rope: no permutation);
- routed experts are stacked per layer (`ffn_{gate,up,down}_exps`, [experts, out, in]);
- `deepseek2`: the MLA up-projection kv_b_proj is split per head into k_b (transposed) and v_b, which is
  what llama.cpp's absorbed-MLA kernels read; older files keep the single `attn_kv_b`.
Norms and other 1-D tensors stay float32, as llama.cpp's converter writes them."""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
import torch

from hemat.model.config import MODEL_TYPES, ModelConfig
from hemat.model.hf import CheckpointError, meta_model, parse_dtype, to_empty
from hemat.model.transformer import CausalLM
from hemat.tokenizer import SPLIT_PATTERN, Tokenizer

_SPLIT_NAME = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.*)$")

# llama.cpp's names for the pre-tokenizer split of byte-level BPE vocabularies, and the regexes they stand for
LLAMA3_SPLIT = SPLIT_PATTERN  # hemat's own tokenizer splits as Llama 3's does
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
DEEPSEEK3_SPLITS = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "llama-bpe": (LLAMA3_SPLIT,),
    "qwen2": (QWEN2_SPLIT,),
    "deepseek-v3": DEEPSEEK3_SPLITS,
    "gpt2": (GPT2_SPLIT,),
}
PRE_ALIASES = {"llama3": "llama-bpe", "llama-v3": "llama-bpe", "smaug-bpe": "llama-bpe", "dbrx": "llama-bpe",
               "falcon3": "llama-bpe", "deepseek-r1-qwen": "qwen2", "default": "gpt2"}

EXPORT_TYPES = ("f16", "q8_0", "q4_0")
# hemat model_type -> GGUF architecture
GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "deepseek_v3": "deepseek2", "deepseek_v2": "deepseek2"}


class GGUFError(CheckpointError):
    """A GGUF file hemat cannot read or write; the message names the file and the key or tensor."""


# ---- reading ----------------------------------------------------------------------------------------


class GGUFFile:
    """Metadata of the first part and the tensors of every part of a (possibly split) GGUF file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        parts = _split_parts(self.path)
        readers = [_open_reader(p) for p in parts]
        self.fields = readers[0].fields
        count = self.get(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, 1)
        if count != len(readers):
            raise GGUFError(f"{self.path}: split.count is {count}, but {len(readers)} part(s) were found")
        self.tensors = {}
        for reader, part in zip(readers, parts):
            for t in reader.tensors:
                if t.data.nbytes != t.n_bytes:
                    raise GGUFError(f"{part}: tensor {t.name} runs past the end of the file (truncated download?)")
                self.tensors[t.name] = (t, part)
        self.arch = self.get(gguf.Keys.General.ARCHITECTURE)
        if self.arch is None:
            raise GGUFError(f"{self.path}: no general.architecture key")

    def get(self, key: str, default=None):
        """A metadata value (`{arch}` in the key filled in): a number, string, bool or list."""
        field = self.fields.get(key.format(arch=getattr(self, "arch", None)))
        return default if field is None else field.contents()

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise GGUFError(f"{self.path}: missing metadata key {key.format(arch=self.arch)}")
        return value

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape in PyTorch's (row-major, Hugging Face) order; GGUF lists dimensions innermost first."""
        if name not in self.tensors:
            raise GGUFError(f"{self.path}: missing tensor {name}")
        return tuple(reversed(self.tensors[name][0].shape.tolist()))

    def tensor(self, name: str, index: int | None = None) -> torch.Tensor:
        """One tensor (or its slice `index` along the first dimension) dequantised to float32."""
        self.shape(name)
        t, part = self.tensors[name]
        try:
            values = gguf.quants.dequantize(t.data if index is None else t.data[index], t.tensor_type)
        except NotImplementedError:
            raise GGUFError(f"{part}: tensor {name} has type {t.tensor_type.name}, which hemat cannot read") from None
        values = np.ascontiguousarray(values, dtype=np.float32)
        return torch.from_numpy(values if values.flags.writeable else values.copy())  # memmapped F32 is read-only


def _open_reader(path: Path):
    if not path.is_file():
        raise GGUFError(f"{path} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct and numpy errors on a corrupt header
        raise GGUFError(f"{path}: not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})") from None


def _split_parts(path: Path) -> list[Path]:
    """All parts of `name-0000K-of-0000N.gguf` (given any of them), or just the file."""
    m = _SPLIT_NAME.match(path.name)
    if not m:
        return [path]
    count = int(m.group("count"))
    parts = [path.with_name(f"{m.group('stem')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise GGUFError(f"{path}: split GGUF part(s) missing beside it: {', '.join(missing)}")
    return parts


def read_config(f: GGUFFile) -> ModelConfig:
    """The GGUF metadata as hemat's ModelConfig (Hugging Face field names)."""
    arch = f.arch
    k = gguf.Keys
    names = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "deepseek2": None}
    if arch not in names:
        raise GGUFError(f"{f.path}: GGUF architecture {arch!r} is not supported; hemat reads {', '.join(names)}")
    hf = {
        "vocab_size": f.get(k.LLM.VOCAB_SIZE) or f.shape("token_embd.weight")[0],
        "hidden_size": f.require(k.LLM.EMBEDDING_LENGTH),
        "intermediate_size": f.require(k.LLM.FEED_FORWARD_LENGTH),
        "num_hidden_layers": f.require(k.LLM.BLOCK_COUNT),
        "num_attention_heads": f.require(k.Attention.HEAD_COUNT),
        "num_key_value_heads": f.get(k.Attention.HEAD_COUNT_KV),
        "max_position_embeddings": f.get(k.LLM.CONTEXT_LENGTH, 4096),
        "rms_norm_eps": f.get(k.Attention.LAYERNORM_RMS_EPS, 1e-6),
        "rope_theta": f.get(k.Rope.FREQ_BASE, 10000.0),
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "bos_token_id": f.get(k.Tokenizer.BOS_ID),
        "eos_token_id": f.get(k.Tokenizer.EOS_ID),
        "pad_token_id": f.get(k.Tokenizer.PAD_ID),
    }
    if "rope_freqs.weight" in f.tensors:
        raise GGUFError(f"{f.path}: rope_freqs (Llama 3.1-style rope scaling) is not supported")
    scaling = f.get(k.Rope.SCALING_TYPE)
    if scaling == "yarn":
        hf["rope_scaling"] = {"type": "yarn", "factor": f.require(k.Rope.SCALING_FACTOR),
                              "original_max_position_embeddings": f.require(k.Rope.SCALING_ORIG_CTX_LEN),
                              "beta_fast": f.get(k.Rope.SCALING_YARN_BETA_FAST, 32.0),
                              "beta_slow": f.get(k.Rope.SCALING_YARN_BETA_SLOW, 1.0)}
        log_mul = f.get(k.Rope.SCALING_YARN_LOG_MUL)
        if log_mul:  # deepseek2 stores 0.1 * mscale_all_dim
            hf["rope_scaling"].update(mscale=log_mul / 0.1, mscale_all_dim=log_mul / 0.1)
    elif scaling not in (None, "none"):
        raise GGUFError(f"{f.path}: rope scaling type {scaling!r} is not supported (only yarn)")
    if arch == "deepseek2":
        hf.update(_deepseek_config(f))
    else:
        hf["model_type"] = names[arch]
        hf["head_dim"] = f.get(k.Attention.KEY_LENGTH)
        if arch in ("llama", "qwen3"):
            hf["attention_bias"] = "blk.0.attn_q.bias" in f.tensors
    if hf["model_type"] not in MODEL_TYPES:
        raise GGUFError(f"{f.path}: this version of hemat has no {hf['model_type']} model (GGUF architecture {arch!r})")
    keep_none = {"q_lora_rank"}  # None there means "no low-rank query projection", not "use the default"
    return ModelConfig.from_hf_dict({k: v for k, v in hf.items() if v is not None or k in keep_none}, source=str(f.path))


def _deepseek_config(f: GGUFFile) -> dict:
    k = gguf.Keys
    rope = f.require(k.Rope.DIMENSION_COUNT)
    # newer files: key_length = kv_lora_rank + rope (the absorbed MQA view), key_length_mla = the per-head size
    key = f.get(k.Attention.KEY_LENGTH_MLA) or f.require(k.Attention.KEY_LENGTH)
    value = f.get(k.Attention.VALUE_LENGTH_MLA) or f.require(k.Attention.VALUE_LENGTH)
    gating = f.get(k.LLM.EXPERT_GATING_FUNC)
    # llama.cpp reads files without the key (DeepSeek-V2 GGUFs) as softmax gating
    sigmoid = gating == int(gguf.ExpertGatingFuncType.SIGMOID)
    experts = f.get(k.LLM.EXPERT_COUNT)
    return {
        "model_type": "deepseek_v3" if sigmoid or not experts else "deepseek_v2",
        "num_key_value_heads": f.require(k.Attention.HEAD_COUNT),
        "q_lora_rank": f.get(k.Attention.Q_LORA_RANK),
        "kv_lora_rank": f.require(k.Attention.KV_LORA_RANK),
        "qk_rope_head_dim": rope,
        "qk_nope_head_dim": key - rope,
        "v_head_dim": value,
        "n_routed_experts": experts,
        "n_shared_experts": f.get(k.LLM.EXPERT_SHARED_COUNT, 0),
        "num_experts_per_tok": f.get(k.LLM.EXPERT_USED_COUNT),
        "moe_intermediate_size": f.get(k.LLM.EXPERT_FEED_FORWARD_LENGTH),
        "first_k_dense_replace": f.get(k.LLM.LEADING_DENSE_BLOCK_COUNT, 0),
        "n_group": f.get(k.LLM.EXPERT_GROUP_COUNT, 1),
        "topk_group": f.get(k.LLM.EXPERT_GROUP_USED_COUNT, 1),
        "routed_scaling_factor": f.get(k.LLM.EXPERT_WEIGHTS_SCALE, 1.0),
        "norm_topk_prob": bool(f.get(k.LLM.EXPERT_WEIGHTS_NORM, False)),
        "scoring_func": "sigmoid" if sigmoid else "softmax",
        "topk_method": "noaux_tc" if sigmoid else ("group_limited_greedy" if f.get(k.LLM.EXPERT_GROUP_COUNT, 1) > 1 else "greedy"),
        "num_nextn_predict_layers": 0,  # llama.cpp's converter drops the MTP layers
    }


def load_gguf_model(path: str | Path, device=None, dtype=None) -> CausalLM:
    """A .gguf file (or the first part of a split one) as a hemat model. Tensors are dequantised one at a
    time into a model already in `dtype`, so peak memory stays near the model's own size. dtype defaults to
    float32 for an all-F32 file, float16 for F16, and bfloat16 for BF16 or quantized files."""
    f = GGUFFile(path)
    config = read_config(f)
    dtype = parse_dtype(dtype) or _default_dtype(f)
    model = meta_model(config)
    model.to(dtype)
    for moe in model.moe_layers():
        moe.gate.float()
    to_empty(model, torch.device(device or "cpu"))
    state = model.state_dict()
    names = _gguf_names(config)
    expected = {name for key in state for name in names.get(key, [])}
    unexpected = sorted(set(f.tensors) - expected - _kv_b_alternatives(f, config))
    if unexpected:
        raise GGUFError(f"{f.path}: unexpected tensor(s) for this config: {', '.join(unexpected[:8])}")
    with torch.no_grad():
        for key, target in state.items():
            if key not in names:
                continue
            if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
                _copy_experts(f, key, names[key], target)
                continue
            tensor = _read_hemat_tensor(f, key, names[key], config)
            _check_shape(f, names[key][0], key, tuple(tensor.shape), tuple(target.shape))
            target.copy_(tensor)
    model.reset_buffers()
    return model.eval()


def _default_dtype(f: GGUFFile) -> torch.dtype:
    types = {t.tensor_type.name for t, _ in f.tensors.values()} - {"F32"}  # norms and routers are F32 anyway
    return torch.float32 if not types else torch.float16 if types == {"F16"} else torch.bfloat16


def _kv_b_alternatives(f: GGUFFile, config: ModelConfig) -> set[str]:
    """A deepseek2 file holds attn_kv_b or its split attn_k_b + attn_v_b (or both)."""
    if not config.is_mla:
        return set()
    return {n for n in f.tensors if re.match(r"^blk\.\d+\.attn_(kv_b|k_b|v_b)\.weight$", n)}


def _gguf_names(config: ModelConfig) -> dict[str, list[str]]:
    """hemat's state-dict key -> the GGUF tensor name(s) it is made of (MTP layers excluded)."""
    arch = gguf.MODEL_ARCH[GGUF_ARCH[config.model_type].upper()]
    tmap = gguf.TensorNameMap(arch, config.num_hidden_layers)
    keys = list(meta_model(config.replace(num_nextn_predict_layers=0)).state_dict())
    out = {}
    for key in keys:
        m = _LAYER_KEY.match(key)
        layer, rest = (int(m.group(1)), m.group(2)) if m else (None, key)
        if rest == "mlp.experts.gate_up_proj":
            out[key] = [f"blk.{layer}.ffn_gate_exps.weight", f"blk.{layer}.ffn_up_exps.weight"]
        elif rest == "mlp.experts.down_proj":
            out[key] = [f"blk.{layer}.ffn_down_exps.weight"]
        elif rest == "mlp.gate.e_score_correction_bias":
            out[key] = [f"blk.{layer}.exp_probs_b.bias"]
        elif rest == "self_attn.kv_b_proj.weight":
            out[key] = [f"blk.{layer}.attn_k_b.weight", f"blk.{layer}.attn_v_b.weight"]
        else:
            name = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise GGUFError(f"no GGUF name for hemat tensor {key}")
            out[key] = [name]
    return out


def _check_shape(f: GGUFFile, name: str, key: str, shape: tuple, expected: tuple) -> None:
    if shape != expected:
        raise GGUFError(f"{f.path}: tensor {name} has shape {shape} once mapped to {key}, the config expects {expected}")


def _copy_experts(f: GGUFFile, key: str, names: list[str], target: torch.Tensor) -> None:
    """Routed experts one expert at a time: a layer's stacked experts in float32 would need several times
    their share of the model's memory (DeepSeek-V3: 15 GB for one ffn_gate_exps)."""
    shapes = [f.shape(n) for n in names]  # gate and up [experts, inter, hidden] are concatenated on dim 1
    shape = (shapes[0][0], sum(s[1] for s in shapes), *shapes[0][2:])
    _check_shape(f, names[0], key, shape, tuple(target.shape))
    for j in range(target.shape[0]):
        target[j].copy_(torch.cat([f.tensor(n, j) for n in names], dim=0))


def _read_hemat_tensor(f: GGUFFile, key: str, names: list[str], config: ModelConfig) -> torch.Tensor:
    if key.endswith("self_attn.kv_b_proj.weight"):
        layer = _LAYER_KEY.match(key).group(1)
        if f"blk.{layer}.attn_kv_b.weight" in f.tensors:
            return f.tensor(f"blk.{layer}.attn_kv_b.weight")
        k_b, v_b = (f.tensor(n) for n in names)  # [heads, kv_lora, nope], [heads, v, kv_lora]
        return torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, k_b.shape[1])
    tensor = f.tensor(names[0])
    if config.model_type == "llama":
        tensor = _unpermute_qk(key, tensor, config)
    return tensor


def _qk_heads(key: str, config: ModelConfig) -> int | None:
    if key.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return config.num_attention_heads
    if key.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return config.num_key_value_heads
    return None


def _permute_qk(key: str, w: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """llama.cpp's llama layout: within each head, rows (2, d/2) become (d/2, 2)."""
    heads = _qk_heads(key, config)
    if heads is None:
        return w
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute_qk(key: str, w: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    heads = _qk_heads(key, config)
    if heads is None:
        return w
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- tokenizer --------------------------------------------------------------------------------------

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


def load_gguf_tokenizer(path: str | Path) -> Tokenizer:
    """The byte-level BPE tokenizer stored in a GGUF's metadata (llama.cpp's "gpt2" tokenizer model), with
    its special tokens, pre-tokenizer split (`tokenizer.ggml.pre`) and chat template."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as BackendTokenizer

    f = GGUFFile(path)
    k = gguf.Keys.Tokenizer
    kind = f.get(k.MODEL)
    if kind != "gpt2":
        raise GGUFError(f"{f.path}: tokenizer.ggml.model {kind!r} is not supported; hemat reads byte-level BPE ('gpt2')")
    tokens, merges = f.get(k.LIST), f.get(k.MERGES) or []
    types = f.get(k.TOKEN_TYPE) or [TOKEN_NORMAL] * len(tokens)
    pre = f.get(k.PRE, "default")
    pre = PRE_ALIASES.get(pre, pre)
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{f.path}: tokenizer.ggml.pre {pre!r} is not supported; hemat knows {', '.join(PRE_TOKENIZERS)}")
    vocab = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    backend = BackendTokenizer(models.BPE(
        vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], ignore_merges=pre == "llama-bpe"
    ))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, t in enumerate(types) if t == TOKEN_CONTROL])
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, t in enumerate(types) if t == TOKEN_USER_DEFINED])
    ids = {name: f.get(key) for name, key in (("bos", k.BOS_ID), ("eos", k.EOS_ID), ("pad", k.PAD_ID), ("unk", k.UNK_ID))}
    steps = [processors.ByteLevel(trim_offsets=False)]
    if f.get(k.ADD_BOS, False) and ids["bos"] is not None:
        bos = tokens[ids["bos"]]
        steps.append(processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                                   special_tokens=[(bos, ids["bos"])]))
    backend.post_processor = processors.Sequence(steps)
    config = {f"{name}_token": tokens[i] for name, i in ids.items() if i is not None and i < len(tokens)}
    template = f.get(k.CHAT_TEMPLATE)
    if template:
        config["chat_template"] = template
    eos = [i for i in (ids["eos"], f.get(k.EOT_ID), f.get(k.EOM_ID)) if i is not None]
    return Tokenizer(backend, config, {"bos_token_id": ids["bos"], "eos_token_id": eos, "pad_token_id": ids["pad"]})


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer, found from its split regexes."""
    splits = []
    for step in (pre or {}).get("pretokenizers", [pre] if pre else []):
        if step.get("type") == "Split":
            pattern = step.get("pattern", {})
            splits.append(pattern.get("Regex", pattern.get("String")))
        elif step.get("type") == "ByteLevel" and step.get("use_regex", True):
            splits.append(GPT2_SPLIT)
    for name, regexes in PRE_TOKENIZERS.items():
        if tuple(splits) == regexes:
            return name
    raise GGUFError(f"the tokenizer's pre-tokenizer split {splits} has no llama.cpp name (hemat knows "
                    f"{', '.join(PRE_TOKENIZERS)})")


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    data = json.loads(tokenizer.backend.to_str())
    if data["model"]["type"] != "BPE":
        raise GGUFError(f"GGUF export needs a byte-level BPE tokenizer, this one is {data['model']['type']}")
    if tokenizer.vocab_size > vocab_size:
        raise GGUFError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocab_size {vocab_size}")
    by_id = {i: t for t, i in tokenizer.backend.get_vocab(with_added_tokens=True).items()}
    added = {t["id"]: t["special"] for t in data.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(TOKEN_NORMAL if i not in added else TOKEN_CONTROL if added[i] else TOKEN_USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(data.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    probe = tokenizer.encode("a", add_special_tokens=True)
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


# ---- writing ----------------------------------------------------------------------------------------


def _add_metadata(writer, config: ModelConfig, qtype: str, name: str) -> None:
    writer.add_name(name)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                          "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.rope_dim)
    yarn = config.yarn
    if yarn:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(yarn["factor"])
        writer.add_rope_scaling_orig_ctx_len(yarn["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_beta_fast(yarn.get("beta_fast", 32.0))
        writer.add_rope_scaling_yarn_beta_slow(yarn.get("beta_slow", 1.0))
        if config.is_mla and yarn.get("mscale_all_dim"):
            writer.add_rope_scaling_yarn_log_mul(0.1 * yarn["mscale_all_dim"])
    if not config.is_mla:
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_key_length(config.dense_head_dim)
        writer.add_value_length(config.dense_head_dim)
        return
    writer.add_head_count_kv(1)  # llama.cpp runs MLA as multi-query attention over the latent
    if config.q_lora_rank:
        writer.add_q_lora_rank(config.q_lora_rank)
    writer.add_kv_lora_rank(config.kv_lora_rank)
    writer.add_key_length(config.kv_lora_rank + config.qk_rope_head_dim)
    writer.add_value_length(config.kv_lora_rank)
    writer.add_key_length_mla(config.qk_head_dim)
    writer.add_value_length_mla(config.v_head_dim)
    writer.add_leading_dense_block_count(config.first_k_dense_replace if config.n_routed_experts else config.num_hidden_layers)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if config.n_routed_experts:
        writer.add_expert_count(config.n_routed_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_shared_count(config.n_shared_experts or 0)
        writer.add_expert_weights_scale(config.routed_scaling_factor)
        writer.add_expert_weights_norm(config.norm_topk_prob)
        writer.add_expert_group_count(config.n_group)
        writer.add_expert_group_used_count(config.topk_group)
        gating = gguf.ExpertGatingFuncType.SIGMOID if config.scoring_func == "sigmoid" else gguf.ExpertGatingFuncType.SOFTMAX
        writer.add_expert_gating_func(gating)


def _export_tensors(model: CausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for every tensor llama.cpp reads; MTP layers are left out, as
    llama.cpp's converter does."""
    config = model.config
    names = _gguf_names(config)
    for key, tensor in model.state_dict().items():
        if key not in names:
            continue
        tensor = tensor.detach().cpu()  # still in the model's dtype: made float32 piece by piece when written
        if key.endswith("experts.gate_up_proj"):
            yield from zip(names[key], tensor.chunk(2, dim=1))
        elif key.endswith("self_attn.kv_b_proj.weight"):
            per_head = tensor.reshape(config.num_attention_heads, config.qk_nope_head_dim + config.v_head_dim, -1)
            k_b, v_b = per_head.split([config.qk_nope_head_dim, config.v_head_dim], dim=1)
            yield names[key][0], k_b.transpose(1, 2)
            yield names[key][1], v_b
        elif config.model_type == "llama":
            yield names[key][0], _permute_qk(key, tensor, config)
        else:
            yield names[key][0], tensor


def _tensor_type(name: str, shape: tuple[int, ...], qtype: str):
    """llama.cpp's choice: 1-D tensors and the router stay F32; a row that does not fill whole quant
    blocks falls back to F16."""
    if len(shape) <= 1 or name.endswith("ffn_gate_inp.weight"):
        return gguf.GGMLQuantizationType.F32
    wanted = gguf.GGMLQuantizationType[qtype.upper()]
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _quantize(tensor: torch.Tensor, ttype) -> np.ndarray:
    """Stacked experts one expert at a time, so float32 copies stay one expert large."""
    if tensor.ndim == 3:
        return np.stack([gguf.quants.quantize(t.float().numpy(), ttype) for t in tensor])
    return gguf.quants.quantize(tensor.float().numpy(), ttype)


def export_gguf(model: CausalLM, tokenizer, out: str | Path, qtype: str = "f16", name: str | None = None,
                progress: bool = True) -> Path:
    """Write `model` and `tokenizer` as one GGUF file llama.cpp runs. The file is written beside `out`
    under a temporary name, fsynced and renamed into place, so `out` is never half-written. Tensors are
    quantised one at a time while writing, so memory stays near the model's own size."""
    from tqdm import tqdm

    if qtype not in EXPORT_TYPES:
        raise GGUFError(f"GGUF type {qtype!r} is not supported; use one of {', '.join(EXPORT_TYPES)}")
    config = model.config
    if config.model_type not in GGUF_ARCH:
        raise GGUFError(f"model_type {config.model_type!r} has no GGUF architecture")
    if config.model_type == "qwen3" and config.attention_bias:
        raise GGUFError("llama.cpp's qwen3 has no attention biases; this model has attention_bias=true")
    if config.topk_method == "group_limited_greedy" and config.n_group > 1:
        # measured with llama-cpp-python 0.3.36: such a file routes some tokens to other experts than DeepSeek-V2 does
        raise GGUFError("llama.cpp ranks expert groups as DeepSeek-V3 does (sum of the top two scores), not by "
                        "DeepSeek-V2's group_limited_greedy maximum: this model would route differently there")
    yarn = config.yarn
    extras = {k: yarn[k] for k in ("attention_factor", "attn_factor") if yarn and yarn.get(k) is not None}
    if yarn and (extras or not yarn.get("truncate", True)):
        raise GGUFError(f"GGUF export writes plain YaRN only; this model's rope_scaling also has "
                        f"{extras or {'truncate': False}}")
    if config.is_mla and yarn and yarn.get("mscale", 1.0) != yarn.get("mscale_all_dim", 1.0):
        raise GGUFError(f"GGUF stores one YaRN mscale for deepseek2; this model has mscale {yarn.get('mscale')} "
                        f"and mscale_all_dim {yarn.get('mscale_all_dim')}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(None, GGUF_ARCH[config.model_type])
    _add_metadata(writer, config, qtype, name or out.stem)
    _add_tokenizer(writer, tokenizer, config.vocab_size)
    plan = []
    for gguf_name, tensor in _export_tensors(model):
        ttype = _tensor_type(gguf_name, tuple(tensor.shape), qtype)
        shape = tuple(tensor.shape)
        if ttype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if ttype == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(gguf_name, shape, np.dtype(dtype), tensor.numel() * np.dtype(dtype).itemsize)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, ttype)
            writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=ttype)
        plan.append((gguf_name, ttype))
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    try:
        writer.write_header_to_file(path=Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = tqdm(total=len(plan), desc=f"export-gguf {qtype}", unit="tensor", disable=not progress)
        for (gguf_name, ttype), (_, tensor) in zip(plan, _export_tensors(model)):
            writer.write_tensor_data(_quantize(tensor, ttype))
            bar.update()
        bar.close()
        writer.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


# ---- CLI --------------------------------------------------------------------------------------------


def add_command(subparsers) -> set[str]:
    parser = subparsers.add_parser(
        "export-gguf",
        help="write a model as a GGUF file that llama.cpp runs",
        description="Write a model (a checkpoint directory, or anything `--model` takes) and its tokenizer as one "
        "GGUF file for llama.cpp, Ollama and LM Studio: f16 (2 bytes/param), q8_0 (1.06) or q4_0 (0.56). Norms and "
        "other 1-D tensors stay float32; DeepSeek-V3 models are written as llama.cpp's deepseek2 architecture "
        "(MTP layers left out).",
    )
    parser.add_argument("--model", required=True, help="model to export: checkpoint directory or .gguf file")
    parser.add_argument("--type", default="f16", choices=EXPORT_TYPES, help="tensor type of the weight matrices")
    parser.add_argument("--out", required=True, metavar="FILE", help="output .gguf file")
    parser.add_argument("--name", default=None, help="general.name written into the file (default: the file's stem)")
    parser.set_defaults(func=_export_command)
    return {"export-gguf"}


def _export_command(args: argparse.Namespace) -> None:
    import hemat

    model = hemat.from_pretrained(args.model)
    tokenizer = hemat.load_tokenizer(args.model)
    out = export_gguf(model, tokenizer, args.out, args.type, args.name)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {args.type})")
