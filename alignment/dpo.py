"""Curiosity-over-hedging DPO from the SFT model with TRL's DPOTrainer.

The 1B model on 2x RTX 4090 (FSDP, the pretraining hardware config):

    accelerate launch --config_file accelerate_configs/fsdp_2gpu_pcie.yaml alignment/dpo.py \
        --config alignment/recipes/dpo-genesis-1b.yaml --model_name_or_path runs/align/genesis-1b-sft \
        --dataset_name runs/align/pairs.jsonl

A tiny run on CPU (seconds):

    python alignment/dpo.py --config alignment/recipes/dpo-tiny.yaml --model_name_or_path SFT_DIR

Pairs come from `genesis align pairs` (sampled answers ranked by the constitution scorer) or any
preference dataset in TRL's format (prompt/chosen/rejected, conversational or plain, explicit or
implicit prompt). The reference model is the starting policy unless `ref_model_name_or_path` says
otherwise; TRL loads it from the same folder.

FSDP, precision and `torch_compile` follow alignment/sft.py: the refusal and the precision policy
apply before DPOTrainer wraps the reference model (in its __init__), and `torch_compile: true`
compiles the policy's decoder layers, not the reference model's (forward only, and run once per
batch), in place of the Trainer's whole-model compile.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from alignment.constitution import DEFAULT_CONSTITUTION, load_constitution, record_in_model_card
from alignment.data import load_preference_dataset
from alignment.generate import require_chat_template
from alignment.sft import (
    card_summary,
    compile_layers,
    end_run,
    fsdp_report,
    genesis_trainer,
    run_script,
    save_final,
    take_compile,
)

logger = logging.getLogger(__name__)

BUNDLED_PAIRS = Path(__file__).resolve().parent / "data" / "preference_seeds.jsonl"


@dataclass
class DPOScriptArguments:
    dataset_name: str = field(
        default=str(BUNDLED_PAIRS),
        metadata={"help": "Preference pairs: local jsonl/json/parquet or Hub id, in TRL's preference format."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    max_samples: int | None = field(default=None, metadata={"help": "Use at most this many pairs."})
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Truncate prompts to this many tokens (counted in the log)."}
    )
    ref_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Reference model folder; default: the starting policy itself."}
    )
    constitution: str = field(
        default=str(DEFAULT_CONSTITUTION), metadata={"help": "Constitution YAML recorded in the model card."}
    )


def main(script_args: DPOScriptArguments, training_args, model_args) -> dict:
    """Train, save (model, tokenizer, model card with the constitution) and return metrics."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    import genesis_hf  # noqa: F401  (registers "genesis" with AutoModelForCausalLM)

    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is required (the SFT model folder or Hub id)")
    constitution = load_constitution(script_args.constitution)
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=training_args.trust_remote_code
    )
    require_chat_template(tokenizer, f"tokenizer of {model_args.model_name_or_path}")
    dataset, data_stats = load_preference_dataset(
        script_args.dataset_name, script_args.dataset_split, script_args.dataset_config,
        script_args.max_samples, tokenizer, script_args.max_prompt_length,
    )

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
    ref_model = None
    if script_args.ref_model_name_or_path:
        ref_model = AutoModelForCausalLM.from_pretrained(
            script_args.ref_model_name_or_path, **training_args.model_init_kwargs
        )
    compile_kwargs = take_compile(training_args)
    trainer = genesis_trainer(DPOTrainer)(  # FSDP: the reference model is wrapped in here, under our policy
        model=model_args.model_name_or_path,
        ref_model=ref_model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    compiled = compile_layers(trainer.model, compile_kwargs) if compile_kwargs else 0  # the policy, not the reference
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    report = fsdp_report(trainer, compiled)

    save_final(trainer, tokenizer, training_args.output_dir)
    margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
    if trainer.accelerator.is_main_process:
        logger.info("DPO done: loss %.4f, saved to %s", result.training_loss, training_args.output_dir)
        record_in_model_card(
            training_args.output_dir, constitution, "dpo",
            {"sft_model": model_args.model_name_or_path, "data": data_stats, "train_loss": result.training_loss,
             "reward_margin_first_last": [margins[0], margins[-1]] if margins else None, "beta": training_args.beta,
             "steps": trainer.state.global_step, "distributed": card_summary(report)},
        )
    end_run(trainer)
    return {"output_dir": training_args.output_dir, "train_loss": result.training_loss, "reward_margins": margins,
            "log_history": trainer.state.log_history, "data": data_stats,
            "distributed": report}


def make_parser():
    from trl import DPOConfig, ModelConfig, TrlParser

    return TrlParser((DPOScriptArguments, DPOConfig, ModelConfig))


def parse(argv: list[str] | None = None):
    return make_parser().parse_args_and_config(args=argv)


if __name__ == "__main__":
    run_script(main, parse)
