"""Model cards and Hub uploads for Genesis folders.

The token is never an argument here: `huggingface_hub` reads `HF_TOKEN` (or the
cached login) from the environment, so it cannot end up in a log, a config or a
checkpoint by way of our code.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"


def _params(config) -> int:
    """Parameter count from the config alone (tied head counted once)."""
    d, f, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
    head = 0 if config.tie_word_embeddings else config.vocab_size * d
    return config.vocab_size * d + L * per_layer + d + head


def model_card(config, details: dict[str, Any] | None = None) -> str:
    """Markdown card with YAML front matter: architecture table plus run `details` (step, tokens, ...)."""
    details = dict(details or {})
    rope_theta = (config.rope_parameters or {}).get("rope_theta")
    rows = [
        ("parameters", f"{_params(config):,}"),
        ("hidden size", config.hidden_size),
        ("layers", config.num_hidden_layers),
        ("attention heads (KV heads)", f"{config.num_attention_heads} ({config.num_key_value_heads}, GQA)"),
        ("FFN (SwiGLU)", config.intermediate_size),
        ("context length", config.max_position_embeddings),
        ("vocabulary", f"{config.vocab_size:,}"),
        ("RoPE theta", f"{rope_theta:,.0f}" if rope_theta else "n/a"),
        ("tied embeddings", config.tie_word_embeddings),
    ]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [genesis, llama, causal-lm]",
        "---",
        "",
        f"# {details.pop('title', 'Genesis')}",
        "",
        "A Llama-style decoder trained with the Genesis stack (Accelerate FSDP pretraining, TRL alignment).",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("<this repo>", trust_remote_code=True)',
        'tokenizer = AutoTokenizer.from_pretrained("<this repo>")',
        "```",
        "",
        "`trust_remote_code=True` runs the `modeling_genesis.py` shipped in this repo; with the Genesis",
        "project installed and `import genesis_hf` it is not needed. Every weight has its Llama name, so",
        "`genesis export . out --format llama` gives a stock `LlamaForCausalLM` folder.",
        "",
        "## Architecture",
        "",
        "| field | value |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in rows],
    ]
    if details:
        lines += ["", "## Training", "", "| field | value |", "| --- | --- |"]
        for key, value in details.items():
            if isinstance(value, (dict, list)):
                value = f"`{json.dumps(value, sort_keys=True)}`"
            lines.append(f"| {key} | {value} |")
    return "\n".join(lines) + "\n"


def write_model_card(folder: str | Path, config, details: dict[str, Any] | None = None) -> Path:
    path = Path(folder) / CARD_NAME
    path.write_text(model_card(config, details), encoding="utf-8")
    return path


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    commit_message: str = "Upload Genesis model",
    revision: str | None = None,
) -> str:
    """Create `repo_id` if needed and upload `folder` as one commit; returns the commit URL."""
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    info = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, revision=revision
    )
    logger.info("pushed %s to %s", folder, repo_id)
    return str(getattr(info, "commit_url", info))


__all__ = ["model_card", "push_folder", "write_model_card"]
