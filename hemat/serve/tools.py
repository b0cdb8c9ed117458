"""Function calling in the OpenAI format over the checkpoint's own chat template.

Tools reach the template as Hugging Face passes them (`tools=[{"type": "function", "function": {...}}]`);
the model answers in its template family's call syntax, which `ToolSyntax` parses back into OpenAI
`tool_calls` and, for tool_choice "required" or a named function, writes as a grammar so that the output
is a call whose arguments match the function's schema:
  hermes     hemat's own template, Qwen2.5/Qwen3, Hermes: <tool_call>{"name": ..., "arguments": {...}}</tool_call>
  llama3     Llama 3.1+: {"name": ..., "parameters": {...}}, optionally after <|python_tag|>, ";"-separated
  deepseek   DeepSeek-V3/R1: <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
             ```json ARGS ```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
Text that does not parse as a call stays content."""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from hemat.infer.constraints import ConstraintError, check_schema, json_schema_ebnf
from hemat.serve.protocol import APIError

DS_CALLS_BEGIN, DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL_BEGIN, DS_CALL_END, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
_DS_CALL = re.compile(re.escape(DS_CALL_BEGIN) + r"\s*(?:function)?\s*" + re.escape(DS_SEP)
                      + r"\s*([^\n`]+?)\s*\n?```(?:json)?\s*\n?(.*?)\s*```\s*" + re.escape(DS_CALL_END), re.S)
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text

    def openai(self, index: int | None = None) -> dict:
        out = {"id": f"call_{secrets.token_hex(12)}", "type": "function",
               "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


class ToolSyntax:
    """One template family's call syntax: where calls start, how to parse them, their grammar."""

    def __init__(self, family: str):
        self.family = family
        self.start = {"hermes": "<tool_call>", "llama3": "{", "deepseek": DS_CALLS_BEGIN}[family]

    def call_start(self, text: str) -> int | None:
        """Where the first call begins in text (None: no call yet). Llama's calls are the whole answer."""
        if self.family == "llama3":
            stripped = text.lstrip()
            if stripped.startswith("<|python_tag|>") or stripped.startswith("{"):
                return 0
            return None
        i = text.find(self.start)
        return None if i < 0 else i

    def parse(self, text: str, names: set[str]) -> tuple[str, list[ParsedCall]]:
        """(content, calls); a call whose name is not a tool or whose arguments are not a JSON object
        leaves the whole text as content."""
        start = self.call_start(text)
        if start is None:
            return text, []
        content, body = text[:start], text[start:]
        if self.family == "hermes":
            found = [_call_from_json(m.group(1), "arguments") for m in _HERMES_CALL.finditer(body)]
            leftover = _HERMES_CALL.sub("", body)
        elif self.family == "deepseek":
            found = [_call(m.group(1), m.group(2)) for m in _DS_CALL.finditer(body)]
            leftover = _DS_CALL.sub("", body).replace(DS_CALLS_BEGIN, "").replace(DS_CALLS_END, "")
        else:
            found, leftover = _llama_calls(body.strip().removeprefix("<|python_tag|>"))
        if not found or any(c is None or c.name not in names for c in found) or leftover.strip():
            return text, []
        return content.strip(), found

    def grammar(self, functions: list[dict]) -> str:
        """EBNF for exactly one call of one of functions, its arguments held to the function's schema."""
        import xgrammar

        options = []
        for f in functions:
            name = f["name"]
            args = xgrammar.Grammar.from_ebnf(json_schema_ebnf(xgrammar, json.dumps(_schema_of(f))))
            if self.family == "hermes":
                prefix, suffix = '<tool_call>{"name": ' + json.dumps(name) + ', "arguments": ', "}</tool_call>"
            elif self.family == "llama3":
                prefix, suffix = '{"name": ' + json.dumps(name) + ', "parameters": ', "}"
            else:
                prefix = f"{DS_CALLS_BEGIN}{DS_CALL_BEGIN}function{DS_SEP}{name}\n```json\n"
                suffix = f"\n```{DS_CALL_END}{DS_CALLS_END}"
            options.append(xgrammar.Grammar.concat(_literal(xgrammar, prefix), args, _literal(xgrammar, suffix)))
        return str(xgrammar.Grammar.union(*options) if len(options) > 1 else options[0])


def syntax_for(chat_template: str | None) -> ToolSyntax:
    """The call syntax a chat template teaches its model."""
    template = chat_template or ""
    if DS_CALLS_BEGIN in template:
        return ToolSyntax("deepseek")
    if "<tool_call>" in template:
        return ToolSyntax("hermes")
    if "<|start_header_id|>" in template:
        return ToolSyntax("llama3")
    return ToolSyntax("hermes")


def _literal(xgrammar, text: str):
    return xgrammar.Grammar.from_ebnf("root ::= " + json.dumps(text))


def _schema_of(function: dict) -> dict:
    return function.get("parameters") or {"type": "object", "properties": {}}


def _call(name: str, arguments: str) -> ParsedCall | None:
    try:
        args = json.loads(arguments)
    except ValueError:
        return None
    return ParsedCall(name.strip(), json.dumps(args, ensure_ascii=False)) if isinstance(args, dict) else None


def _call_from_json(text: str, key: str) -> ParsedCall | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):
        return _call(obj["name"], args)
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False)) if isinstance(args, dict) else None


def _llama_calls(text: str) -> tuple[list[ParsedCall | None], str]:
    decoder, calls, i = json.JSONDecoder(), [], 0
    while i < len(text):
        try:
            obj, end = decoder.raw_decode(text, i)
        except ValueError:
            return calls, text[i:]
        calls.append(_call_from_json(json.dumps(obj), "parameters"))
        i = end
        while i < len(text) and text[i] in " \n\t;":
            i += 1
    return calls, ""


# ---- requests ---------------------------------------------------------------------------------------------
def check_tools(tools: list[dict]) -> None:
    """400 for a tool whose parameters are not a schema hemat can enforce, or for duplicate names."""
    import xgrammar

    seen = set()
    for i, tool in enumerate(tools):
        function, where = tool["function"], f"tools[{i}].function.parameters"
        if function["name"] in seen:
            raise APIError(400, f"tools[{i}].function.name: duplicate function name {function['name']!r}",
                           param=f"tools[{i}].function.name")
        seen.add(function["name"])
        try:
            check_schema(_schema_of(function), where)
            json_schema_ebnf(xgrammar, json.dumps(_schema_of(function)))
        except ConstraintError as e:
            raise APIError(400, str(e), param=where) from None
        except Exception as e:  # xgrammar's converter: RuntimeError / ValueError with its message
            raise APIError(400, f"{where}: not a usable JSON schema: {str(e).strip().splitlines()[-1]}",
                           param=where) from None


def forced_functions(tools: list[dict], tool_choice) -> list[dict]:
    """The functions the output must call (tool_choice "required": any tool; named: that one), else []."""
    functions = [t["function"] for t in tools]
    if tool_choice == "required":
        if not functions:
            raise APIError(400, 'tool_choice: "required" needs at least one tool', param="tool_choice")
        return functions
    if tool_choice is None or isinstance(tool_choice, str):
        return []
    name = tool_choice.function.name
    named = [f for f in functions if f["name"] == name]
    if not named:
        raise APIError(400, f"tool_choice: no tool is named {name!r} (tools: "
                       f"{', '.join(f['name'] for f in functions) or 'none'})", param="tool_choice")
    return named


class ToolStream:
    """A streamed choice's text with tool calls held back: content is released up to where a call may
    start; at the end the held text is parsed into calls (or released as content)."""

    def __init__(self, syntax: ToolSyntax, names: set[str]):
        self.syntax, self.names = syntax, names
        self.text, self.released = "", 0

    def feed(self, piece: str) -> str:
        self.text += piece
        start = self.syntax.call_start(self.text)
        if start is None:  # hold back a tail that could be the start of a call marker
            start = len(self.text)
            marker = self.syntax.start
            for k in range(min(len(marker) - 1, len(self.text)), 0, -1):
                if self.text.endswith(marker[:k]):
                    start = len(self.text) - k
                    break
            if self.syntax.family == "llama3" and not self.text.strip():
                start = self.released
        out = self.text[self.released : max(start, self.released)]
        self.released = max(start, self.released)
        return out

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """(content not yet released, calls)."""
        _, calls = self.syntax.parse(self.text, self.names)
        if calls:
            return self.text[self.released : self.syntax.call_start(self.text)].rstrip(), calls
        return self.text[self.released :], []
