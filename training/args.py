"""The pretraining arguments: one flat dataclass, read as defaults < YAML recipe < command line.

Names follow transformers' TrainingArguments where they mean the same thing (output_dir,
max_steps, save_steps, logging_steps, seed, learning_rate, per_device_train_batch_size,
gradient_accumulation_steps, warmup_steps, weight_decay, adam_beta1/2, max_grad_norm,
lr_scheduler_type, report_to); the rest are ours. Hardware (number of GPUs, FSDP, mixed
precision) is not here: it lives in accelerate_configs/.

    args = parse_args(["--config", "training/recipes/debug.yaml", "--max_steps", "20"])
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from transformers import HfArgumentParser


class ConfigError(ValueError):
    """A recipe or command line that cannot be used; the message names the file and key."""


@dataclass
class PretrainArguments:
    # ---- run -------------------------------------------------------------------------
    output_dir: str = field(default="runs/genesis", metadata={"help": "Run folder: checkpoints/, metrics.jsonl, export/."})
    run_name: str | None = field(default=None, metadata={"help": "Name for wandb; default: the output_dir's name."})
    seed: int = field(default=42, metadata={"help": "Seeds model init and the data order."})
    deterministic: bool = field(
        default=False,
        metadata={"help": "Deterministic kernels (torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG=:4096:8, "
                  "cudnn.deterministic): a GPU resume then repeats the uninterrupted run bit for bit; slower "
                  "(the GPU check measures by how much). Off: later steps agree only to rounding."},
    )
    report_to: Literal["none", "wandb"] = field(default="none", metadata={"help": "wandb: online with WANDB_API_KEY, else offline."})
    wandb_project: str = field(default="genesis", metadata={"help": "wandb project name."})
    logging_steps: int = field(default=10, metadata={"help": "Log metrics every N optimizer steps."})
    eval_steps: int = field(default=0, metadata={"help": "Validation loss per source every N steps (0: off)."})
    eval_batches: int = field(default=8, metadata={"help": "Held-out micro-batches per source per evaluation."})
    progress_bar: bool = field(default=True, metadata={"help": "tqdm progress bar on the main process."})

    # ---- data ------------------------------------------------------------------------
    data_dir: str | None = field(default=None, metadata={"help": "Prepared shards (genesis data prepare --output)."})
    tokenizer_dir: str | None = field(default=None, metadata={"help": "Tokenizer folder the shards were made with."})
    mixture: str | None = field(default=None, metadata={"help": "Mixture recipe the data came from (recorded in the model card)."})
    embedded_data: str | None = field(
        default=None,
        metadata={"help": "Folder for the embedded corpus: tokenizer + shards are built there on first use "
                  "(overrides data_dir/tokenizer_dir)."},
    )
    embedded_vocab_size: int = field(default=4096, metadata={"help": "Vocabulary of the embedded-corpus tokenizer."})

    # ---- model -----------------------------------------------------------------------
    model_config: str | None = field(default=None, metadata={"help": "config.json (or its folder); the fields below override it."})
    vocab_size: int | None = field(default=None, metadata={"help": "Default: the tokenizer's length."})
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    max_position_embeddings: int | None = None
    rope_theta: float | None = None
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute each decoder layer in backward (FSDP configs do it themselves)."}
    )
    torch_compile: bool = field(
        default=False,
        metadata={"help": "torch.compile each decoder layer (in place, before FSDP wraps it); the first steps compile."},
    )

    # ---- batch and optimiser -------------------------------------------------------------
    max_steps: int = field(default=1000, metadata={"help": "Optimizer steps of the whole run."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Sequences per micro-batch per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    seq_len: int = field(default=2048, metadata={"help": "Tokens per sequence (the loader serves seq_len + 1)."})
    learning_rate: float = field(default=1.0e-4, metadata={"help": "Peak LR, reached after warmup."})
    min_lr: float = field(default=1.0e-5, metadata={"help": "LR floor at the end of the decay."})
    warmup_steps: int = field(default=1000, metadata={"help": "Linear warmup from 0 to learning_rate."})
    lr_scheduler_type: Literal["cosine", "wsd"] = field(
        default="cosine", metadata={"help": "cosine: warmup then cosine to min_lr; wsd: warmup, stable, decay."}
    )
    decay_ratio: float = field(default=0.2, metadata={"help": "wsd: fraction of max_steps spent decaying."})
    extension_lr: float | None = field(
        default=None,
        metadata={"help": "When max_steps grows on resume, restart the re-laid cosine from this LR "
                  "instead of the LR the run had (a deliberate re-warm; logged)."},
    )
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay on 2-D weights only (see docs)."})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1.0e-8
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the global grad norm (0: report, never clip)."})

    # ---- checkpoints -----------------------------------------------------------------
    save_steps: int = field(default=0, metadata={"help": "Save every N steps (0: by time only)."})
    save_minutes: float = field(default=10.0, metadata={"help": "Save when this much wall time passed since the last save (0: off)."})
    keep_last: int = field(default=2, metadata={"help": "Committed checkpoints kept (>= 2)."})
    resume: str | None = field(default=None, metadata={"help": "'auto' (newest committed, or a fresh start) or a checkpoint path."})
    overrides: str = field(
        default="",
        metadata={"help": "Comma list of what may differ on resume: world_size, per_device_train_batch_size, "
                  "gradient_accumulation_steps, tokens_per_step, seq_len, tokenizer_fingerprint (checkpoint meta "
                  "fields), lr_schedule."},
    )
    reset_optimizer: bool = field(default=False, metadata={"help": "Resume without AdamW state (deliberate; logged)."})
    checkpoint_verify: Literal["sha256", "size"] = field(default="sha256", metadata={"help": "How a resume checks files."})
    save_timeout_minutes: float = field(default=30.0, metadata={"help": "Watchdog on one save or load."})
    save_mode: Literal["sync", "async"] = field(
        default="sync",
        metadata={"help": "async: training waits only while the state is copied to host memory; writing, "
                  "fsync, manifest and commit run in the background (one save in flight at most)."},
    )

    # ---- Hub (transformers' TrainingArguments names) -----------------------------------
    push_to_hub: bool = field(default=False, metadata={"help": "Upload each committed checkpoint's export to the Hub (needs HF_TOKEN)."})
    hub_model_id: str | None = field(default=None, metadata={"help": "owner/name of the Hub model repo."})
    hub_strategy: Literal["every_save", "checkpoint", "end"] = field(
        default="every_save",
        metadata={"help": "every_save: each commit's export (branch step-XXXXXXXX, main follows); checkpoint: "
                  "also the sharded training checkpoint, for --resume from the Hub; end: the last one only."},
    )
    hub_private_repo: bool | None = field(default=None, metadata={"help": "Create the repo private."})
    hub_revision: str | None = field(default=None, metadata={"help": "Branch that follows the newest upload (default main)."})
    hub_download_timeout_minutes: float = field(
        default=60.0,
        metadata={"help": "--resume hub:...: the other ranks wait this long at least for rank 0's download "
                  "(longer for a big checkpoint: its size at 1 MB/s)."},
    )
    hub_exit_timeout_minutes: float = field(default=30.0, metadata={"help": "At exit, wait at most this long for uploads in flight."})
    hub_upload_attempts: int = field(default=6, metadata={"help": "Tries per checkpoint upload before it is given up (training goes on)."})
    hub_backoff_seconds: float = field(default=30.0, metadata={"help": "Wait after the first failed upload; doubles per retry, at most 10 minutes."})

    # ---- reliability -----------------------------------------------------------------
    spike_policy: Literal["stop", "skip", "rollback"] = field(
        default="stop",
        metadata={"help": "On a non-finite loss/gradient or a spike: stop the run (exit 3), skip the optimizer step, "
                  "or rollback: after rollback_after spikes within rollback_window steps (or any non-finite "
                  "loss) restore the last checkpoint from before them and skip the data they consumed."},
    )
    spike_factor: float = field(default=10.0, metadata={"help": "Loss (and, under rollback, grad norm) > factor x running median is a spike (0: off)."})
    spike_window: int = field(default=50, metadata={"help": "Finite losses in the running median."})
    max_consecutive_skips: int = field(default=10, metadata={"help": "Stop after this many skipped steps in a row."})
    rollback_after: int = field(default=2, metadata={"help": "rollback: spikes within rollback_window that trigger it."})
    rollback_window: int = field(default=50, metadata={"help": "rollback: steps over which spikes are counted (and rollbacks bounded)."})
    rollback_skip_margin: int = field(default=20, metadata={"help": "rollback: steps' worth of data skipped past the last spike."})
    max_rollbacks: int = field(default=3, metadata={"help": "rollback: after this many rollbacks within rollback_window, stop (exit 3)."})
    skip_data: str | None = field(
        default=None,
        metadata={"help": "JSON file {source: [[lo, hi], ...]} of global window positions never to read "
                  "(what a rollback records; `genesis spikes RUN --json` prints them)."},
    )
    ignore_plan: bool = field(
        default=False,
        metadata={"help": "Train even when `genesis plan` predicts this setting does not fit the GPU (CUDA preflight)."},
    )
    stop_signal: str = field(
        default="SIGUSR1",
        metadata={"help": "The scheduler's early-warning signal (Slurm: --signal=USR1@120): like SIGTERM and SIGINT, "
                  "it stops the run after the current step with a committed checkpoint (exit 75); '' for none."},
    )
    pg_timeout_minutes: float = field(default=30.0, metadata={"help": "Process-group (collective) timeout."})
    startup_check_timeout_s: float = field(default=120.0, metadata={"help": "Deadline for the start-up all-reduce."})

    def override_set(self) -> set[str]:
        return {o.strip() for o in self.overrides.split(",") if o.strip()}


def _allowed_types(tp) -> tuple[type, ...]:
    """Python types a YAML value may have for a field annotated `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for a in typing.get_args(tp) for t in _allowed_types(a))
    if origin is Literal:
        return (str,)
    if tp is float:
        return (float, int)
    if tp is type(None):
        return (type(None),)
    return (tp,)


def _check_recipe(path: Path, recipe: dict) -> None:
    fields = {f.name: f for f in dataclasses.fields(PretrainArguments)}
    hints = typing.get_type_hints(PretrainArguments)
    for key, value in recipe.items():
        if key not in fields:
            raise ConfigError(f"{path}: unknown key {key!r} (known keys: see `training/pretrain.py --help`)")
        allowed = _allowed_types(hints[key])
        # bool is an int subclass: `max_steps: true` must not pass as an int.
        bad_bool = isinstance(value, bool) and bool not in allowed
        if bad_bool or not isinstance(value, allowed):
            names = "/".join(sorted({t.__name__ for t in allowed}))
            hint = " (write floats with a dot: 1.0e-4)" if isinstance(value, str) and float in allowed else ""
            raise ConfigError(f"{path}: key {key!r} must be {names}, got {value!r}{hint}")
        if typing.get_origin(hints[key]) is Literal and value not in typing.get_args(hints[key]):
            raise ConfigError(f"{path}: key {key!r} must be one of {typing.get_args(hints[key])}, got {value!r}")


def load_recipe(path: str | Path) -> dict:
    """Read and check a flat YAML recipe; every problem is one ConfigError naming the file and key."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        recipe = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {str(e).splitlines()[0]}") from None
    if recipe is None:
        raise ConfigError(f"{path}: empty recipe")
    if not isinstance(recipe, dict):
        raise ConfigError(f"{path}: a recipe is a flat mapping of key: value, got {type(recipe).__name__}")
    _check_recipe(path, recipe)
    return recipe


def validate(args: PretrainArguments) -> PretrainArguments:
    for name in ("embedded_data", "resume", "data_dir", "tokenizer_dir", "model_config", "mixture", "skip_data"):
        if getattr(args, name) == "":  # `--resume ""` on the command line clears a recipe's value
            setattr(args, name, None)
    positive = ["max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "seq_len", "logging_steps"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(args, name)}")
    if args.keep_last < 2:
        raise ConfigError(f"keep_last must be >= 2 so a complete checkpoint always exists, got {args.keep_last}")
    if not 0 <= args.min_lr <= args.learning_rate:
        raise ConfigError(f"min_lr must be in [0, learning_rate={args.learning_rate}], got {args.min_lr}")
    if args.warmup_steps < 0 or args.save_steps < 0 or args.eval_steps < 0:
        raise ConfigError("warmup_steps, save_steps and eval_steps must be >= 0")
    for name in ("rollback_after", "rollback_window", "rollback_skip_margin", "max_rollbacks"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(args, name)}")
    if args.embedded_data is None and (args.data_dir is None or args.tokenizer_dir is None):
        raise ConfigError("set data_dir and tokenizer_dir (genesis data prepare), or embedded_data")
    return args


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser(PretrainArguments, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML recipe; its keys are defaults the command line overrides.")
    return parser


def parse_args(argv: list[str] | None = None) -> PretrainArguments:
    """defaults < YAML (--config) < command line. Raises ConfigError naming the file/key."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    parser = build_parser()
    if known.config:
        parser.set_defaults(**load_recipe(known.config))
    # Returns (our dataclass, a namespace holding --config, leftover strings).
    args, _config_ns, extra = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if extra:
        raise ConfigError(f"unknown command-line arguments: {' '.join(extra)}")
    return validate(args)
