"""The OpenAI wire format: request schemas (pydantic, strict), error bodies, usage with cost, logprobs.

Requests are validated strictly, as OpenAI does: wrong types are errors rather than coerced ("0.5" is not a
temperature), unknown fields are errors that name the field. hemat accepts a few vLLM-style extensions
(top_k, min_p, repetition_penalty, ignore_eos) because the engine supports them."""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hemat.infer.constraints import Guide

MAX_N = 16  # choices per request; each is a full generation, so keep one request from filling the batch
MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 64  # prompts x n of one completions request
LOGPROB_FLOOR = -9999.0  # JSON has no -Infinity; OpenAI reports impossible tokens this way


class APIError(Exception):
    """An error the server answers with `{"error": {message, type, param, code}}` and an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": _printable(message), "type": type, "param": _printable(param), "code": code}}


def _printable(text: str | None) -> str | None:
    """Messages may quote the client's own field names, which can hold unpaired surrogates: UTF-8 them safely."""
    return None if text is None else text.encode("utf-8", "replace").decode("utf-8")


def describe_validation_error(errors: list[dict]) -> tuple[str, str | None]:
    """pydantic/FastAPI errors -> (message naming the field, param). Reports one error: for a union type
    pydantic lists one error per member, and the deepest one (e.g. inside a content part) says the most."""
    if not errors:
        return "invalid request", None
    head = tuple(errors[0].get("loc", ()))[:2]
    first = max((e for e in errors if tuple(e.get("loc", ()))[:2] == head), key=lambda e: len(e.get("loc", ())))
    loc = [part for part in first.get("loc", ()) if part != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
        where = f" at position {loc[0]}" if loc else ""
        return f"the request body is not valid JSON{where}: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    if kind == "missing" and not loc:
        return "the request body is missing: send a JSON object", None
    # drop union member tags such as 'str' or 'list[str]' that pydantic adds to the location
    loc = [part for part in loc if isinstance(part, int) or not _is_type_tag(part)]
    path = _format_loc(loc)
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "value_error":  # our own cross-field checks start with the field's name
        field, sep, _ = message.partition(":")
        if not path:
            return message, field if sep else None
        return f"{path}: {message}", path
    if not path:
        return f"the request body must be a JSON object: {message}", None
    if kind == "extra_forbidden":
        message = "unrecognized request argument"
    return f"{path}: {message}", path


def _is_type_tag(part: str) -> bool:
    return part in {"str", "int", "float", "bool", "list[str]", "list[int]", "list[list[int]]", "none"} or (
        part.startswith(("list[", "function-", "constrained-")) or part[:1].isupper()
    )


def _format_loc(loc: list) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# ---- requests -------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format: json_schema is required with type json_schema, and only then")
        return self


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None  # an earlier assistant turn's reasoning (DeepSeek's field name)
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers

    @model_validator(mode="after")
    def _content_present(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls: only assistant messages make tool calls, not {self.role}")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("tool_call_id: a tool message needs the id of the call it answers")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class _Sampling(_Strict):
    """Fields both endpoints share."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # extensions (vLLM's names)
    top_k: int | None = Field(None, ge=-1, le=1 << 20)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10)  # tinier values overflow the logits
    ignore_eos: bool = False
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None  # EBNF (xgrammar's dialect of GBNF)

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data):
        """JSON may carry unpaired UTF-16 surrogates ("\\ud800"), which no tokenizer or UTF-8 encoder takes."""
        bad = _surrogate_path(data, "")
        if bad is not None:
            raise ValueError(f"{bad or 'body'}: the text holds an unpaired UTF-16 surrogate (not valid Unicode)")
        return data

    @model_validator(mode="after")
    def _check_common(self):
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"stop: at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop: stop sequences must be non-empty strings")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    def guide(self) -> Guide | None:
        """The constraint on the output, from response_format or one of the guided_* fields."""
        given = [name for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
                 if getattr(self, name) is not None]
        fmt = self.response_format
        if fmt is not None and fmt.type != "text":
            given.append("response_format")
        if len(given) > 1:
            raise APIError(400, f"{given[1]}: give one output constraint, not {' and '.join(given)}", param=given[1])
        if not given:
            return None
        if given[0] == "response_format":
            if fmt.type == "json_object":
                return Guide("json_object")
            return Guide("json_schema", fmt.json_schema.json_schema or {"type": "object"},
                         "response_format.json_schema.schema")
        kind = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
                "guided_grammar": "grammar"}[given[0]]
        return Guide(kind, getattr(self, given[0]), given[0])

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_kwargs(self) -> dict[str, Any]:
        """SamplingParams fields common to both endpoints (max_tokens and logprobs are endpoint-specific)."""
        out: dict[str, Any] = {"n": self.n, "stop": self.stop_list(), "seed": self.seed, "ignore_eos": self.ignore_eos}
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                     "repetition_penalty"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.top_p is not None:
            # the sampler works in float32, where a top_p under ~1e-45 is 0 and removes every token; any
            # top_p below 1 / vocab_size keeps just the most likely token, so raising it to 1e-6 changes nothing
            out["top_p"] = max(self.top_p, 1e-6)
        return out


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict]:
        """Messages as chat templates expect them (Hugging Face's convention: call arguments as objects)."""
        out = []
        for m in self.messages:
            message = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.reasoning_content is not None:
                message["reasoning_content"] = m.reasoning_content
            if m.tool_calls:
                message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": _json_or_text(c.function.arguments)}}
                    for c in m.tool_calls]
            if m.role == "tool":
                message["tool_call_id"] = m.tool_call_id
                if m.name is not None:
                    message["name"] = m.name
            out.append(message)
        return out

    def active_tools(self) -> list[dict]:
        """The tools the model may call (none when tool_choice is "none"), as template dicts."""
        if not self.tools or self.tool_choice == "none":
            return []
        return [{"type": "function", "function": t.function.model_dump(exclude_none=True, by_alias=True)}
                for t in self.tools]


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for this endpoint; 0 with echo scores the prompt
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # top alternatives per token
    echo: bool = False  # the prompt comes back before the completion, with its logprobs when logprobs is set

    @model_validator(mode="after")
    def _check_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list):
            if not self.prompt:
                raise ValueError("prompt: must not be an empty list")
            if isinstance(self.prompt[0], list) and any(not p for p in self.prompt):
                raise ValueError("prompt: token id lists must not be empty")
        if self.echo and self.stream:
            raise ValueError("echo: not supported with stream (send stream false to get the prompt back)")
        if len(self.prompts()) * self.n > MAX_CHOICES:
            raise ValueError(f"prompt: {len(self.prompts())} prompts x n={self.n} is more than {MAX_CHOICES} choices")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _surrogate_path(value, path: str) -> str | None:
    if isinstance(value, str):
        return path if any("\ud800" <= c <= "\udfff" for c in value) else None
    if isinstance(value, dict):
        for k in value:
            if _surrogate_path(k, "") is not None:
                return path or "body"
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for sub, v in items:
        found = _surrogate_path(v, sub)
        if found is not None:
            return found
    return None


# ---- responses ------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int, reasoning_tokens: int,
          price_input: float, price_output: float) -> dict:
    """OpenAI's usage plus DeepSeek's cache fields and `cost`: the request's price in US dollars at the
    server's configured per-million-token prices (input_usd for the prompt, output_usd for the completion,
    reasoning included)."""
    input_usd = prompt_tokens * price_input / 1e6
    output_usd = completion_tokens * price_output / 1e6
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "prompt_cache_hit_tokens": cached_tokens,
        "prompt_cache_miss_tokens": prompt_tokens - cached_tokens,
        "cost": {"input_usd": _usd(input_usd), "output_usd": _usd(output_usd),
                 "total_usd": _usd(input_usd + output_usd)},
    }


def _usd(x: float) -> float:
    return round(x, 12)


def _logprob(x: float) -> float:
    return LOGPROB_FLOOR if math.isnan(x) or x < LOGPROB_FLOOR else float(x)


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="surrogatepass"))


def chat_logprobs(entries: list) -> list[dict]:
    """Engine TokenLogprobs -> entries of OpenAI's chat `logprobs.content`."""
    return [
        {
            "token": e.token,
            "logprob": _logprob(e.logprob),
            "bytes": _bytes(e.token),
            "top_logprobs": [{"token": t, "logprob": _logprob(lp), "bytes": _bytes(t)} for _, t, lp in e.top],
        }
        for e in entries
    ]


def completion_logprobs(entries: list, text_offset: int, first_token: str | None = None) -> dict:
    """Engine TokenLogprobs -> the legacy completions `logprobs` object; offsets count from text_offset.
    first_token: an echoed prompt's first token, which has no logprob (null, as OpenAI reports it)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    if first_token is not None:
        for key, value in zip(out, (first_token, None, None, text_offset)):
            out[key].append(value)
        text_offset += len(first_token)
    for e in entries:
        out["tokens"].append(e.token)
        out["token_logprobs"].append(_logprob(e.logprob))
        top: dict[str, float] = {}
        for _, t, lp in e.top:  # most likely first: where two ids print alike, the likelier one's logprob stays
            top.setdefault(t, _logprob(lp))
        out["top_logprobs"].append(top)
        out["text_offset"].append(text_offset)
        text_offset += len(e.token)
    return out


# ---- OpenAPI ----------------------------------------------------------------------------------------------
ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}
_ERRORS = {
    "400": "invalid request: the message names the field",
    "401": "missing or wrong API key",
    "404": "unknown model",
    "413": "request body too large",
    "429": "the admission queue is full; retry after Retry-After seconds",
    "503": "the server is shutting down or not ready",
}


def document_errors(schema: dict, auth: bool) -> dict:
    """FastAPI's schema, corrected to what the server answers: errors are 400 (not 422) in OpenAI's error
    format, the generation routes stream text/event-stream when stream is true, /metrics is text."""
    schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    for name in ("HTTPValidationError", "ValidationError"):
        schema["components"]["schemas"].pop(name, None)
    ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for path, operations in schema.get("paths", {}).items():
        for method, op in operations.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            codes = []
            if auth and path != "/health":
                codes.append("401")
            if method == "post":
                codes += ["400", "404", "413", "429", "503"]
                responses["200"]["content"]["text/event-stream"] = {"schema": {"type": "string"}}
            elif "{" in path:
                codes.append("404")
            if path == "/health":
                codes.append("503")
            if path == "/metrics":
                responses["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
            for code in codes:
                responses[code] = {"description": _ERRORS[code], **ref}
    return schema
