"""Loading a model folder and sampling chat replies: shared by revise, pairs and evaluate.

Replies are generated through the tokenizer's own chat template with `add_generation_prompt=True`,
the exact prefix SFT trains on (tests/test_alignment_sft.py checks the ids match), and stop on
`<|im_end|>` as well as the model's eos.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

END_OF_TURN = "<|im_end|>"


class ChatTemplateError(ValueError):
    """The tokenizer cannot render conversations."""


def require_chat_template(tokenizer, where: str = "tokenizer") -> None:
    """Raise one clear error when the tokenizer has no chat template (SFT, DPO and generation need it)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"{where} has no chat_template: Genesis alignment renders every conversation with the ChatML "
            "template that `genesis tokenizer` writes (with {% generation %} markers). Re-export the model "
            "with that tokenizer, or set `chat_template_path` to a .jinja file."
        )


def load_model_and_tokenizer(path: str | Path, device: str | None = None, dtype: str | torch.dtype = "auto"):
    """A model folder (or Hub id) -> (model in eval mode, tokenizer). Registers Genesis with the Auto classes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import genesis_hf  # noqa: F401  (registers model_type "genesis" with AutoModelForCausalLM)

    path = str(path)
    if (Path(path).is_absolute() or path.startswith(".")) and not Path(path).exists():
        raise FileNotFoundError(f"model folder {path} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids generation stops on: end of turn first, then the tokenizer's eos."""
    ids = []
    for tok in (END_OF_TURN, tokenizer.eos_token):
        if tok is not None:
            tid = tokenizer.convert_tokens_to_ids(tok)
            if tid is not None and tid != tokenizer.unk_token_id and tid not in ids:
                ids.append(tid)
    return ids


def set_chat_stop_tokens(model, tokenizer) -> None:
    """Make `model.generate` stop on `<|im_end|>` (and eos) by default, e.g. before `save_pretrained`."""
    ids = stop_token_ids(tokenizer)
    if ids and model.generation_config is not None:
        model.generation_config.eos_token_id = ids
        if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


@torch.no_grad()
def generate_replies(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int = 128,
    num_return_sequences: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    seed: int | None = None,
) -> list[list[str]]:
    """For each conversation (ending on a user turn) return `num_return_sequences` assistant replies."""
    require_chat_template(tokenizer)
    if seed is not None:
        torch.manual_seed(seed)
    stops = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    out: list[list[str]] = []
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start : start + batch_size]
        prompts = [
            tokenizer.apply_chat_template(c, add_generation_prompt=True, return_dict=True)["input_ids"] for c in batch
        ]
        # Left padding so every prompt ends at the same position and generation starts together.
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p)
            attention_mask[i, width - len(p) :] = 1
        # Greedy means greedy: an export's generation_config may ask for sampling, and {} would follow it.
        kwargs = (dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample
                  else dict(do_sample=False, temperature=None, top_p=None, top_k=None))
        generated = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_return_sequences,
            eos_token_id=stops,
            pad_token_id=pad_id,
            **kwargs,
        )  # (B * n, width + new)
        texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        for i in range(len(batch)):
            out.append([t.strip() for t in texts[i * num_return_sequences : (i + 1) * num_return_sequences]])
    return out
