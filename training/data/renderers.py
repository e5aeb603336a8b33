"""One small renderer per source schema: a dataset record -> the text we pretrain on.

Plain text passes through. Conversations and function calls are turned into messages
(``role``/``content``/``tool_calls``) plus an optional tool list and rendered with the Genesis
ChatML format, so pretraining already sees the exact special tokens that alignment uses.
`render_chat` is the Python twin of `genesis_hf.tokenizer.CHAT_TEMPLATE`; a test proves they
agree, which lets us render without a tokenizer (the tokenizer is trained on this text).

Schemas (``schema:`` in a mixture recipe; ``fields:`` renames the columns read):

| schema   | default fields                       | real sources |
| ---      | ---                                  | ---          |
| text     | text (+ optional title)              | FineWeb-Edu, DCLM, FineMath, Wikipedia, CulturaX, Cosmopedia, StarCoderData (text: content) |
| sharegpt | conversations [{from, value}]        | OpenHermes-2.5, Hermes function calling v1 |
| messages | messages [{role, content}] or JSON   | Orca AgentInstruct |
| glaive   | system, chat (USER:/ASSISTANT:/FUNCTION RESPONSE:) | Glaive function calling v2 |
| gorilla  | code ("###Instruction: ... ###Output: ...") | Gorilla APIBench |
| xlam     | query, tools (JSON), answers (JSON)  | xLAM function calling 60k |
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


class MissingField(KeyError):
    """A record lacks a field its schema needs; prepare turns it into an error naming file and field."""

    def __init__(self, field: str, present: list[str]):
        super().__init__(field)
        self.field, self.present = field, present

    def __str__(self) -> str:
        return f"missing field {self.field!r} (record has {self.present})"


def _get(record: dict, fields: dict, key: str, *, optional: bool = False):
    name = fields.get(key, key)
    if name not in record:
        if optional:
            return None
        raise MissingField(name, sorted(record))
    return record[name]


def _tojson(obj) -> str:
    # Same as transformers' `tojson` filter in chat templates.
    return json.dumps(obj, ensure_ascii=False)


def _maybe_json(value):
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


# ----------------------------------------------------------------------------- ChatML


def render_chat(messages: list[dict], tools: list[dict] | None = None) -> str:
    """ChatML text identical to `CHAT_TEMPLATE` (without a generation prompt)."""
    out = []
    first_system = bool(messages) and messages[0]["role"] == "system"
    if tools:
        head = messages[0]["content"] + "\n\n" if first_system else ""
        listing = "".join(_tojson(t.get("function", t)) + "\n" for t in tools)
        out.append(
            f"{IM_START}system\n{head}# Tools\n\nYou may call one or more functions. Function signatures are "
            f"inside <tools></tools>:\n<tools>\n{listing}</tools>\n\nFor each call, return a JSON object with "
            f"the function name and arguments inside <tool_call></tool_call> tags.{IM_END}\n"
        )
    elif first_system:
        out.append(f"{IM_START}system\n{messages[0]['content']}{IM_END}\n")
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system" and i == 0:
            continue
        if role == "assistant":
            body = m.get("content") or ""
            for j, call in enumerate(m.get("tool_calls") or []):
                fn = call.get("function", call)
                sep = "\n" if (m.get("content") or j > 0) else ""
                body += sep + "<tool_call>\n" + _tojson({"name": fn["name"], "arguments": fn["arguments"]}) + "\n</tool_call>"
            out.append(f"{IM_START}assistant\n{body}{IM_END}\n")
        elif role == "tool":
            out.append(f"{IM_START}tool\n<tool_response>\n{m['content']}\n</tool_response>{IM_END}\n")
        else:
            out.append(f"{IM_START}{role}\n{m['content']}{IM_END}\n")
    return "".join(out)


# ----------------------------------------------------------------------------- schemas


def render_text(record: dict, fields: dict) -> str | None:
    text = _get(record, fields, "text")
    title = _get(record, fields, "title", optional=True) if "title" in fields else None
    if not isinstance(text, str):
        return None
    return f"{title}\n\n{text}" if title and text.strip() else text


_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
    "function_response": "tool",
    "observation": "tool",
}
_TOOL_RESPONSE = re.compile(r"^\s*<tool_response>\s*\n?(.*?)\n?\s*</tool_response>\s*$", re.S)


def render_sharegpt(record: dict, fields: dict) -> str | None:
    turns = _maybe_json(_get(record, fields, "conversations"))
    if not turns:
        return None
    messages = []
    for t in turns:
        role = _SHAREGPT_ROLES.get(str(t.get("from", "")).lower())
        if role is None:
            raise ValueError(f"unknown sharegpt speaker {t.get('from')!r} (known: {sorted(_SHAREGPT_ROLES)})")
        value = t.get("value") or ""
        if role == "tool":  # Hermes wraps tool output itself; the template adds the wrapper
            match = _TOOL_RESPONSE.match(value)
            value = match.group(1) if match else value
        messages.append({"role": role, "content": value})
    return render_chat(messages)


def render_messages(record: dict, fields: dict) -> str | None:
    messages = _maybe_json(_get(record, fields, "messages"))
    if not messages:
        return None
    tools = _maybe_json(_get(record, fields, "tools", optional=True)) if "tools" in fields else None
    clean = []
    for m in messages:
        if "role" not in m:
            raise MissingField("messages[].role", sorted(m))
        if m["role"] == "system" and not (m.get("content") or "").strip():
            continue  # AgentInstruct opens many conversations with an empty system turn
        msg = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("tool_calls"):
            msg["tool_calls"] = m["tool_calls"]
        clean.append(msg)
    return render_chat(clean, tools or None)


_GLAIVE_TURN = re.compile(r"(USER|ASSISTANT|FUNCTION RESPONSE):\s?")
_GLAIVE_CALL = re.compile(r"<functioncall>\s*(\{.*\})\s*$", re.S)


def _json_objects(text: str) -> list[dict]:
    """Consecutive JSON objects in free text (Glaive lists one function definition after another)."""
    dec, objs, i = json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) != -1:
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            i += 1
            continue
        objs.append(obj)
        i = end
    return objs


def _glaive_call(raw: str) -> dict | None:
    # {"name": "f", "arguments": '{"a": 1}'}: the arguments are a single-quoted JSON string.
    name = re.search(r'"name"\s*:\s*"([^"]+)"', raw)
    args = re.search(r"\"arguments\"\s*:\s*'(.*)'\s*}\s*$", raw, re.S)
    if not name:
        return None
    arguments = _maybe_json(args.group(1)) if args else {}
    return {"name": name.group(1), "arguments": arguments}


def render_glaive(record: dict, fields: dict) -> str | None:
    system = (_get(record, fields, "system") or "").strip()
    chat = _get(record, fields, "chat") or ""
    if not chat.strip():
        return None
    tools = None
    if system.startswith("SYSTEM:"):
        system = system[len("SYSTEM:") :].strip()
    if "{" in system:
        head, _, rest = system.partition("{")
        tools = _json_objects("{" + rest) or None
        system = head.rstrip(" -\n") if tools else system
    messages = [{"role": "system", "content": system}] if system else []
    parts = _GLAIVE_TURN.split(chat)
    for speaker, text in zip(parts[1::2], parts[2::2]):
        text = text.replace("<|endoftext|>", "").strip()
        if speaker == "USER":
            messages.append({"role": "user", "content": text})
        elif speaker == "FUNCTION RESPONSE":
            messages.append({"role": "tool", "content": text})
        else:
            call = _GLAIVE_CALL.search(text)
            parsed = _glaive_call(call.group(1)) if call else None
            if parsed:
                content = text[: call.start()].strip()
                messages.append({"role": "assistant", "content": content, "tool_calls": [parsed]})
            else:
                messages.append({"role": "assistant", "content": text})
    return render_chat(messages, tools) if len(messages) > 1 else None


_GORILLA = re.compile(r"###\s*Instruction:\s*(.*?)\s*###\s*Output:\s*(.*)", re.S)


def render_gorilla(record: dict, fields: dict) -> str | None:
    code = _get(record, fields, "code")
    if not isinstance(code, str):
        return None
    match = _GORILLA.search(code)
    if not match:
        return code  # not in instruction/output form: keep the text as is
    return render_chat([{"role": "user", "content": match.group(1)}, {"role": "assistant", "content": match.group(2)}])


def render_xlam(record: dict, fields: dict) -> str | None:
    query = _get(record, fields, "query")
    tools = _maybe_json(_get(record, fields, "tools"))
    answers = _maybe_json(_get(record, fields, "answers"))
    if not query:
        return None
    calls = [{"name": a["name"], "arguments": _maybe_json(a.get("arguments", {}))} for a in answers or []]
    messages = [{"role": "user", "content": query}, {"role": "assistant", "content": "", "tool_calls": calls}]
    return render_chat(messages, tools or None)


SCHEMAS: dict[str, Callable[[dict, dict], str | None]] = {
    "text": render_text,
    "sharegpt": render_sharegpt,
    "messages": render_messages,
    "glaive": render_glaive,
    "gorilla": render_gorilla,
    "xlam": render_xlam,
}
# Schemas whose text carries control tokens on purpose; for all others a literal
# "<|endoftext|>" in web text is encoded as plain characters, never as a special token.
CHAT_SCHEMAS = frozenset({"sharegpt", "messages", "glaive", "gorilla", "xlam"})


def get_renderer(schema: str) -> Callable[[dict, dict], str | None]:
    if schema not in SCHEMAS:
        raise ValueError(f"unknown schema {schema!r} (known: {sorted(SCHEMAS)})")
    return SCHEMAS[schema]
