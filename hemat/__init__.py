"""hemat: build, reason-train, evaluate and self-host DeepSeek-style language models frugally."""

__version__ = "0.1.0"
