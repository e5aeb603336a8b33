"""A reward model from our preference pairs: TRL's RewardTrainer on a GenesisForSequenceClassification.

The model is any Genesis folder (an export or the SFT model): its backbone loads into
`GenesisForSequenceClassification` (one label, the reward) and the `score` head starts fresh.
RewardTrainer (TRL 1.16) applies the chat template to prompt + chosen and prompt + rejected and
trains -log sigmoid(r_chosen - r_rejected) on the reward of each row's last non-pad token.

    python alignment/reward.py --config alignment/recipes/reward-tiny.yaml \
        --model_name_or_path runs/align/sft --dataset_name runs/align/pairs.jsonl --output_dir runs/align/reward

The saved folder (model + tokenizer) then ranks sampled answers beside the rule and judge scorers:

    genesis align pairs --model runs/align/sft --prompts alignment/data/pair_prompts.jsonl \
        --scorer reward:runs/align/reward --output runs/align/pairs-rm.jsonl
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

BUNDLED_PAIRS = Path(__file__).resolve().parent / "data" / "preference_seeds.jsonl"


@dataclass
class RewardScriptArguments:
    model_name_or_path: str = field(default="", metadata={"help": "Genesis model folder (export or SFT output)."})
    dataset_name: str = field(
        default=str(BUNDLED_PAIRS),
        metadata={"help": "Preference pairs: local jsonl/json/parquet or Hub id, in TRL's preference format."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    max_samples: int | None = field(default=None, metadata={"help": "Use at most this many pairs."})


def load_reward_model(path: str, **kwargs):
    """A one-label GenesisForSequenceClassification from a Genesis folder, and its tokenizer.

    The tokenizer's pad token is the config's: the head reads the reward at the last non-pad token."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import genesis_hf  # noqa: F401  (registers "genesis" with the Auto classes)

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no pad token; the reward head needs one to find each row's end")
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, pad_token_id=tokenizer.pad_token_id, **kwargs
    )
    return model, tokenizer


def main(script_args: RewardScriptArguments, training_args) -> Path:
    """Train and save the reward model (model + tokenizer) in `training_args.output_dir`."""
    from trl import RewardTrainer

    from alignment.data import load_preference_dataset

    if not script_args.model_name_or_path:
        raise ValueError("--model_name_or_path is required: a Genesis model folder")
    model, tokenizer = load_reward_model(script_args.model_name_or_path)
    dataset, stats = load_preference_dataset(
        script_args.dataset_name, split=script_args.dataset_split, max_samples=script_args.max_samples
    )
    logger.info("reward model: %d pairs from %s (%s)", len(dataset), script_args.dataset_name, stats)
    trainer = RewardTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(training_args.output_dir)
    tokenizer.save_pretrained(training_args.output_dir)
    return Path(training_args.output_dir)


def parse(argv: list[str] | None = None):
    from trl import RewardConfig, TrlParser

    return TrlParser((RewardScriptArguments, RewardConfig)).parse_args_and_config(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(*parse())
