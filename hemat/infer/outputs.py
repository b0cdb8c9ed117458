"""What the engine hands back: per-token logprobs, streamed events, and a finished request's output."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class StreamEvent:
    request_id: str
    index: int
    text: str = ""
    reasoning_text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"


@dataclass
class CompletionOutput:
    index: int
    text: str
    reasoning_text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    cached_tokens: int  # prompt tokens whose cache entries came from the prefix cache
    outputs: list[CompletionOutput]
    metrics: dict
    error: str | None = None
    # with SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (nothing predicts it)
    prompt_logprobs: list[TokenLogprob | None] | None = None
