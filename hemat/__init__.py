"""hemat: build, reason-train, evaluate and self-host DeepSeek-style language models frugally.

Python API: `from_pretrained(path_or_hub_id, device=None, dtype=None)`, `model.save_pretrained(path,
format=None|"bf16"|"fp32"|"fp8"|"int8"|"int4")`, `load_tokenizer(path_or_hub_id)`,
`prepare_for_inference(model, weights=None|"int8"|"int4", group_size=128)`, `load_for_inference(path_or_hub_id,
quantize=None|"int8"|"int4", group_size=128)` (quantized while it loads), `Engine(model, tokenizer, ...)`."""

__version__ = "0.1.0"

_LAZY = {
    "from_pretrained": "hemat.model.hf",
    "CausalLM": "hemat.model.transformer",
    "ModelConfig": "hemat.model.config",
    "load_tokenizer": "hemat.tokenizer",
    "Engine": "hemat.infer.engine",
    "prepare_for_inference": "hemat.infer.quantize",
    "load_for_inference": "hemat.infer.quantize",
}


def __getattr__(name: str):
    # imported on first use so that `import hemat` (and `hemat --help`) stays light
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hemat' has no attribute {name!r}")
