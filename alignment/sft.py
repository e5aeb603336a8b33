"""Constitution-guided SFT on a Genesis export with TRL's SFTTrainer.

The 1B model on 2x RTX 4090 (FSDP, the pretraining hardware config):

    accelerate launch --config_file accelerate_configs/fsdp_2gpu_pcie.yaml alignment/sft.py \
        --config alignment/recipes/sft-genesis-1b.yaml --model_name_or_path runs/export/genesis-1b-40k

A tiny run on CPU (seconds):

    python alignment/sft.py --config alignment/recipes/sft-tiny.yaml --model_name_or_path MODEL_DIR

Defaults < recipe YAML < command line (TrlParser). Loss is on assistant turns only (the
tokenizer's ChatML template marks them with {% generation %}), sequences are packed, and the
saved folder's model card records the constitution (version and principles).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from alignment.constitution import DEFAULT_CONSTITUTION, load_constitution, record_in_model_card
from alignment.data import DataError, load_sft_dataset, resolve_path
from alignment.generate import require_chat_template, set_chat_stop_tokens

logger = logging.getLogger(__name__)

BUNDLED_SFT = Path(__file__).resolve().parent / "data" / "sft_conversations.jsonl"


@dataclass
class SFTScriptArguments:
    dataset_name: str = field(
        default=str(BUNDLED_SFT),
        metadata={"help": "Local jsonl/json/parquet file or Hub dataset id, loaded with datasets.load_dataset."},
    )
    dataset_adapter: str = field(
        default="messages",
        metadata={"help": "Row format: messages, openhermes, orca_agentinstruct, glaive, gorilla, hermes, xlam."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_mixture: str | None = field(
        default=None,
        metadata={"help": "YAML list of {source, adapter, split, name, max_samples}; replaces dataset_name."},
    )
    max_samples: int | None = field(default=None, metadata={"help": "Use at most this many rows (per source)."})
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Truncate prompts to this many tokens (counted in the log)."}
    )
    constitution: str = field(
        default=str(DEFAULT_CONSTITUTION), metadata={"help": "Constitution YAML recorded in the model card."}
    )


def load_mixture(script_args, tokenizer):
    """The SFT dataset: one source, or a YAML mixture of several adapted sources concatenated."""
    from datasets import concatenate_datasets

    if not script_args.dataset_mixture:
        return load_sft_dataset(
            script_args.dataset_name, script_args.dataset_adapter, script_args.dataset_split,
            script_args.dataset_config, script_args.max_samples, tokenizer, script_args.max_prompt_length,
        )
    path = resolve_path(script_args.dataset_mixture)
    entries = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: dataset_mixture must be a YAML list of {{source, adapter, ...}} entries")
    parts, stats = [], []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "source" not in e:
            raise DataError(f"{path}: entry {i} has no 'source'")
        unknown = set(e) - {"source", "adapter", "split", "name", "max_samples"}
        if unknown:
            raise DataError(f"{path}: entry {i} has unknown fields {sorted(unknown)}")
        ds, st = load_sft_dataset(
            e["source"], e.get("adapter", "messages"), e.get("split", "train"), e.get("name"),
            e.get("max_samples", script_args.max_samples), tokenizer, script_args.max_prompt_length,
        )
        parts.append(ds)
        stats.append(st)
    return concatenate_datasets(parts), {"mixture": str(path), "sources": stats,
                                         "rows": sum(s["rows"] for s in stats),
                                         "truncated": sum(s["truncated"] for s in stats)}


def save_final(trainer, tokenizer, output_dir: str) -> None:
    """Save a `from_pretrained` folder that stops generation on <|im_end|>, on every rank (FSDP needs all).

    The pretraining FSDP config keeps SHARDED_STATE_DICT (DCP) for checkpoints; the final model is
    one gather to a full state dict on rank 0 (CPU offload) so the folder loads anywhere.
    """
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    set_chat_stop_tokens(trainer.accelerator.unwrap_model(trainer.model), tokenizer)
    trainer.save_model(output_dir)


def main(script_args: SFTScriptArguments, training_args, model_args) -> dict:
    """Train, save (model, tokenizer, model card with the constitution) and return metrics."""
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    import genesis_hf  # noqa: F401  (registers "genesis" with AutoModelForCausalLM)

    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is required (a `genesis export` folder or Hub id)")
    constitution = load_constitution(script_args.constitution)
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=training_args.trust_remote_code
    )
    if training_args.chat_template_path is None:
        require_chat_template(tokenizer, f"tokenizer of {model_args.model_name_or_path}")
    dataset, data_stats = load_mixture(script_args, tokenizer)

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
    trainer = SFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    save_final(trainer, tokenizer, training_args.output_dir)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if trainer.accelerator.is_main_process:
        logger.info("SFT done: loss %.4f, saved to %s", result.training_loss, training_args.output_dir)
        record_in_model_card(
            training_args.output_dir, constitution, "sft",
            {"base_model": model_args.model_name_or_path, "data": data_stats, "train_loss": result.training_loss,
             "loss_first_last": [losses[0], losses[-1]] if losses else None, "steps": trainer.state.global_step},
        )
    if hasattr(trainer, "end"):
        trainer.end()
    return {"output_dir": training_args.output_dir, "train_loss": result.training_loss,
            "log_history": trainer.state.log_history, "data": data_stats}


def make_parser():
    from trl import ModelConfig, SFTConfig, TrlParser

    return TrlParser((SFTScriptArguments, SFTConfig, ModelConfig))


def parse(argv: list[str] | None = None):
    return make_parser().parse_args_and_config(args=argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(*parse())
