"""SFT and DPO data: one `datasets.load_dataset` path for local files and Hub ids, adapters, validation.

Every source becomes TRL's conversational format:
    SFT: {"messages": [{"role": ..., "content": ...}, ...]}            (ends on an assistant turn)
    DPO: {"prompt": [...messages ending on user...], "chosen": [assistant], "rejected": [assistant]}

Adapters turn the seed's instruction and function-calling sets into that format; tool calls are
written the Hermes way (`<tool_call>{json}</tool_call>` in the assistant content), tool results are
role "tool" with raw content (the Genesis template adds `<tool_response>`), and the tool list sits
in the system message, so rows render the same with or without a `tools` argument.

Bad rows raise `DataError("<source> row <i>: <problem>")`; prompts longer than `max_prompt_length`
tokens are truncated (oldest turns first, then the start of the last user message) and counted.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset, load_dataset

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
# Allowed successor roles: the alternation rule, with tool results between assistant turns.
_NEXT = {"user": {"assistant"}, "assistant": {"user", "tool"}, "tool": {"tool", "assistant"}, "system": {"user"}}
_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """A row or file that cannot be used; the message names the source and the row."""


# --- loading -------------------------------------------------------------------------------------


REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_path(path: str | Path) -> Path:
    """A relative path that does not exist here but does under the repository root (the bundled
    `alignment/data/...` and `alignment/recipes/...` files) resolves there, so recipes work from any folder."""
    path = Path(path)
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        return REPO_ROOT / path
    return path


def load_rows(source: str, split: str = "train", name: str | None = None) -> Dataset:
    """A local file/folder or a Hub dataset id -> `Dataset`, all through `datasets.load_dataset`."""
    path = resolve_path(source)
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix not in _LOCAL_FORMATS:
            raise DataError(f"{source}: unsupported file type {suffix!r}; use one of {sorted(_LOCAL_FORMATS)}")
        try:
            return load_dataset(_LOCAL_FORMATS[suffix], data_files=str(path), split="train")
        except Exception as e:  # datasets wraps parse errors in several exception types
            raise DataError(f"{source}: cannot be read as {_LOCAL_FORMATS[suffix]} ({type(e).__name__}: {e})") from e
    if suffix in _LOCAL_FORMATS or path.is_absolute() or source.startswith((".", "~")):
        raise DataError(f"{source}: file does not exist")
    return load_dataset(source, name=name, split=split)


# --- adapters: raw row -> {"messages": [...]} ------------------------------------------------------

_SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "tool": "tool", "function_response": "tool", "observation": "tool", "function_call": "assistant",
}


def tool_system_message(tools) -> dict:
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return {"role": "system", "content": f"You can call tools. <tools>{json.dumps(tools, ensure_ascii=False)}</tools>"}


def tool_call(name: str, arguments) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "\n</tool_call>"


def _strip_tool_response(text: str) -> str:
    """The chat template wraps tool turns in <tool_response>; Hermes data already has the tags."""
    text = text.strip()
    if text.startswith("<tool_response>") and text.endswith("</tool_response>"):
        text = text[len("<tool_response>") : -len("</tool_response>")].strip()
    return text


def _from_sharegpt(turns) -> list[dict]:
    turns = json.loads(turns) if isinstance(turns, str) else turns
    out = []
    for i, t in enumerate(turns):
        who = t.get("from")
        if who not in _SHAREGPT_ROLES:
            raise DataError(f"turn {i} has unknown or missing 'from' {who!r}")
        content = t.get("value")
        if _SHAREGPT_ROLES[who] == "tool" and isinstance(content, str):
            content = _strip_tool_response(content)
        out.append({"role": _SHAREGPT_ROLES[who], "content": content})
    return out


def adapt_messages(row: dict) -> dict:
    """Already TRL format (`messages` list or JSON string), or ShareGPT `conversations`."""
    if row.get("messages") is not None:
        msgs = row["messages"]
        return {"messages": json.loads(msgs) if isinstance(msgs, str) else msgs}
    if row.get("conversations") is not None:
        return {"messages": _from_sharegpt(row["conversations"])}
    raise DataError("has neither 'messages' nor 'conversations'")


def adapt_sharegpt(row: dict) -> dict:
    """OpenHermes-2.5 and Hermes function calling: `conversations` of {from, value}."""
    if row.get("conversations") is None:
        raise DataError("has no 'conversations' field (ShareGPT format)")
    return {"messages": _from_sharegpt(row["conversations"])}


def adapt_orca_agentinstruct(row: dict) -> dict:
    """Orca AgentInstruct: `messages` is a JSON string; its empty system messages are dropped."""
    msgs = adapt_messages(row)["messages"]
    return {"messages": [m for m in msgs if not (m.get("role") == "system" and not (m.get("content") or "").strip())]}


_GLAIVE_SPLIT = re.compile(r"(USER|ASSISTANT|FUNCTION RESPONSE):\s*")


def _glaive_call(text: str) -> str:
    body = text.replace("<functioncall>", "").strip()
    name = re.search(r'"name"\s*:\s*"([^"]+)"', body)
    args = re.search(r"\"arguments\"\s*:\s*'(.*)'\s*}\s*$", body, re.S)
    if name is None:
        return f"<tool_call>\n{body}\n</tool_call>"
    try:
        arguments = json.loads(args.group(1)) if args else json.loads(body).get("arguments", {})
    except (json.JSONDecodeError, AttributeError):
        arguments = args.group(1) if args else {}
    return tool_call(name.group(1), arguments)


def adapt_glaive(row: dict) -> dict:
    """Glaive function calling v2: `system` + a `chat` string of USER/ASSISTANT/FUNCTION RESPONSE blocks."""
    if not row.get("chat"):
        raise DataError("has no 'chat' field (Glaive format)")
    msgs = []
    system = (row.get("system") or "").removeprefix("SYSTEM:").strip()
    if system:
        msgs.append({"role": "system", "content": system})
    parts = _GLAIVE_SPLIT.split(row["chat"])[1:]  # [tag, text, tag, text, ...]
    for tag, text in zip(parts[0::2], parts[1::2]):
        text = text.replace("<|endoftext|>", "").strip()
        if tag == "USER":
            msgs.append({"role": "user", "content": text})
        elif tag == "ASSISTANT":
            msgs.append({"role": "assistant", "content": _glaive_call(text) if "<functioncall>" in text else text})
        else:
            msgs.append({"role": "tool", "content": text})
    return {"messages": msgs}


def adapt_gorilla(row: dict) -> dict:
    """Gorilla APIBench: `code` = "###Instruction: ... ###Output: ..." (or instruction/output fields)."""
    code = row.get("code")
    if code and "###Output:" in code:
        instruction, output = code.split("###Output:", 1)
        instruction = instruction.replace("###Instruction:", "").strip()
    else:
        instruction, output = row.get("instruction"), row.get("output") or row.get("api_call")
    if not instruction or not output:
        raise DataError("has no ###Instruction/###Output in 'code' and no instruction/output fields (Gorilla)")
    return {"messages": [{"role": "user", "content": instruction}, {"role": "assistant", "content": output.strip()}]}


def adapt_xlam(row: dict) -> dict:
    """xLAM function calling 60k: `query`, `tools` and `answers` (JSON strings)."""
    for key in ("query", "tools", "answers"):
        if not row.get(key):
            raise DataError(f"has no {key!r} field (xLAM format)")
    answers = json.loads(row["answers"]) if isinstance(row["answers"], str) else row["answers"]
    calls = "\n".join(tool_call(a["name"], a.get("arguments", {})) for a in answers)
    return {"messages": [tool_system_message(row["tools"]), {"role": "user", "content": row["query"]},
                         {"role": "assistant", "content": calls}]}


ADAPTERS: dict[str, Callable[[dict], dict]] = {
    "messages": adapt_messages,
    "openhermes": adapt_sharegpt,
    "hermes": adapt_sharegpt,
    "orca_agentinstruct": adapt_orca_agentinstruct,
    "glaive": adapt_glaive,
    "gorilla": adapt_gorilla,
    "xlam": adapt_xlam,
}


# --- validation and truncation -------------------------------------------------------------------


def validate_messages(messages, final_role: str = "assistant") -> None:
    """Raise DataError (without the row; the caller adds it) for missing roles, empty turns, bad order."""
    if not isinstance(messages, list) or not messages:
        raise DataError("has no messages")
    prev = None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not m.get("role"):
            raise DataError(f"message {i} has no role")
        role = m["role"]
        if role not in ROLES:
            raise DataError(f"message {i} has unknown role {role!r} (expected one of {ROLES})")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise DataError(f"message {i} ({role}) is empty")
        if role == "system" and i != 0:
            raise DataError(f"message {i} is a system message after the first turn")
        if prev is None and role not in ("system", "user"):
            raise DataError(f"starts with {role!r}; the first turn must be system or user")
        if prev is not None and role not in _NEXT[prev]:
            raise DataError(f"roles do not alternate: message {i} is {role!r} after {prev!r}")
        prev = role
    roles = {m["role"] for m in messages}
    if "user" not in roles:
        raise DataError("has no user turn")
    if final_role == "assistant" and "assistant" not in roles:
        raise DataError("has no assistant turn")
    if prev != final_role:
        raise DataError(f"ends with {prev!r}; expected a final {final_role!r} turn")


def _prompt_tokens(tokenizer, prompt: list[dict]) -> int:
    return len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"])


def truncate_prompt(prompt: list[dict], tokenizer, max_prompt_length: int) -> tuple[list[dict], bool]:
    """Fit a prompt (messages ending on user) into `max_prompt_length` tokens. Returns (prompt, truncated).

    Oldest exchanges go first (the system message and the last user turn stay); then the start of
    the last user message is cut, keeping its end, which usually holds the actual ask.
    """
    if _prompt_tokens(tokenizer, prompt) <= max_prompt_length:
        return prompt, False
    system = [m for m in prompt[:1] if m["role"] == "system"]
    body = prompt[len(system) :]
    user_starts = [i for i, m in enumerate(body) if m["role"] == "user"]
    for start in user_starts[1:]:
        if _prompt_tokens(tokenizer, system + body[start:]) <= max_prompt_length:
            return system + body[start:], True
    last = dict(body[user_starts[-1]])
    ids = tokenizer.encode(last["content"], add_special_tokens=False)
    overhead = _prompt_tokens(tokenizer, system + [{**last, "content": "x"}]) - 1
    keep = max_prompt_length - overhead
    if keep < 1:
        raise DataError(f"the system message alone is longer than max_prompt_length={max_prompt_length} tokens")
    last["content"] = tokenizer.decode(ids[-keep:])
    # Re-tokenising decoded text can merge differently; trim until it fits.
    while _prompt_tokens(tokenizer, system + [last]) > max_prompt_length and keep > 1:
        keep -= 1
        last["content"] = tokenizer.decode(ids[-keep:])
    return system + [last], True


def _log_truncation(source: str, n_truncated: int, n: int, max_prompt_length: int | None) -> None:
    if n_truncated:
        logger.warning("%s: truncated %d of %d prompts longer than %d tokens", source, n_truncated, n, max_prompt_length)
    else:
        logger.info("%s: %d rows, no prompt longer than %s tokens", source, n, max_prompt_length)


def load_sft_dataset(
    source: str,
    adapter: str = "messages",
    split: str = "train",
    name: str | None = None,
    max_samples: int | None = None,
    tokenizer=None,
    max_prompt_length: int | None = None,
) -> tuple[Dataset, dict]:
    """Load, adapt, validate and truncate an SFT source -> (Dataset with a `messages` column, stats)."""
    if adapter not in ADAPTERS:
        raise DataError(f"unknown adapter {adapter!r}; choose one of {sorted(ADAPTERS)}")
    rows = load_rows(source, split=split, name=name)
    if max_samples is not None:
        rows = rows.select(range(min(max_samples, len(rows))))
    adapt = ADAPTERS[adapter]

    def convert(row, idx):
        try:
            messages = adapt(row)["messages"]
            validate_messages(messages)
        except DataError as e:
            raise DataError(f"{source} row {idx}: {e}") from None
        truncated = False
        if tokenizer is not None and max_prompt_length is not None:
            cut = max(i for i, m in enumerate(messages) if m["role"] == "user") + 1
            prompt, truncated = truncate_prompt(messages[:cut], tokenizer, max_prompt_length)
            messages = prompt + messages[cut:]
        return {"messages": messages, "_truncated": truncated}

    ds = rows.map(convert, with_indices=True, remove_columns=rows.column_names)
    stats = {"source": source, "rows": len(ds), "truncated": int(sum(ds["_truncated"]))}
    _log_truncation(source, stats["truncated"], stats["rows"], max_prompt_length)
    return ds.remove_columns("_truncated"), stats


def _as_turns(value, role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return value


def adapt_preference(row: dict) -> dict:
    """TRL preference rows, conversational or plain strings, explicit or implicit prompt."""
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise DataError(f"has no {key!r} field (preference format: prompt, chosen, rejected)")
    chosen, rejected = row["chosen"], row["rejected"]
    if row.get("prompt") is None:
        # Implicit prompt: chosen and rejected are full conversations sharing every turn but the last.
        if isinstance(chosen, str) or len(chosen) < 2 or chosen[:-1] != rejected[:-1]:
            raise DataError("has no 'prompt' and chosen/rejected do not share a prompt prefix")
        return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}
    return {"prompt": _as_turns(row["prompt"], "user"), "chosen": _as_turns(chosen, "assistant"),
            "rejected": _as_turns(rejected, "assistant")}


def load_preference_dataset(
    source: str,
    split: str = "train",
    name: str | None = None,
    max_samples: int | None = None,
    tokenizer=None,
    max_prompt_length: int | None = None,
) -> tuple[Dataset, dict]:
    """Load and validate preference pairs in TRL's conversational format -> (Dataset, stats)."""
    rows = load_rows(source, split=split, name=name)
    if max_samples is not None:
        rows = rows.select(range(min(max_samples, len(rows))))

    def convert(row, idx):
        try:
            pair = adapt_preference(row)
            validate_messages(pair["prompt"], final_role="user")
            for key in ("chosen", "rejected"):
                if len(pair[key]) != 1 or pair[key][0].get("role") != "assistant":
                    raise DataError(f"{key} must be exactly one assistant message")
                if not (pair[key][0].get("content") or "").strip():
                    raise DataError(f"{key} is empty")
        except DataError as e:
            raise DataError(f"{source} row {idx}: {e}") from None
        truncated = False
        if tokenizer is not None and max_prompt_length is not None:
            pair["prompt"], truncated = truncate_prompt(pair["prompt"], tokenizer, max_prompt_length)
        return {**pair, "_truncated": truncated}

    ds = rows.map(convert, with_indices=True, remove_columns=rows.column_names)
    stats = {"source": source, "rows": len(ds), "truncated": int(sum(ds["_truncated"]))}
    _log_truncation(source, stats["truncated"], stats["rows"], max_prompt_length)
    return ds.remove_columns("_truncated"), stats


def read_prompts(path: str | Path) -> list[str]:
    """A prompts file: jsonl with a `prompt` string per line (or a `messages` list ending on user)."""
    path = resolve_path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompts file does not exist")
    prompts = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} row {i}: not valid JSON ({e.msg})") from None
        text = row.get("prompt") if isinstance(row, dict) else None
        if isinstance(text, list):
            text = next((m.get("content") for m in reversed(text) if m.get("role") == "user"), None)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path} row {i}: has no non-empty 'prompt'")
        prompts.append(text)
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts
