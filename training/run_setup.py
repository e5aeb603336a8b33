"""Set-up and resume for training/pretrain.py: data, model, optimizer, run meta, restore.

Everything here runs once per launch; the per-step code stays in pretrain.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from training.args import ConfigError, PretrainArguments
from training.metrics import (
    flops_per_token,
    host_pinned_gb,
    matmul_params,
    mfu,
    peak_flops,
    peak_memory_gb,
    scrub,
)
from training.schedule import LRSchedule, set_schedule

logger = logging.getLogger("training.pretrain")

# Model fields a recipe may set; None in the recipe means "the config's value".
MODEL_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings")
SCHEDULE_FIELDS = ("max_lr", "min_lr", "warmup_steps", "kind", "decay_ratio")


@dataclass
class StepResult:
    loss: float  # mean over every rank's micro-batches (fp32)
    grad_norm: float  # global L2 norm BEFORE clipping
    lr: float  # the LR this step used
    problem: str | None = None  # why the optimizer step was not taken
    nonfinite: bool = False  # the problem is a non-finite loss or gradient


def all_reduce_sum(t: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Sum over ranks (a no-op in one process). Moves to `device` first (NCCL needs CUDA)."""
    if device is not None:
        t = t.to(device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# cuBLAS is deterministic only with one of these workspace settings (CUDA >= 10.2; torch raises on a
# cuBLAS call under deterministic algorithms otherwise). Read when the first cuBLAS handle is made.
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")


def apply_determinism(args: PretrainArguments) -> str:
    """Turn on deterministic kernels when args.deterministic; returns the start-up log line.

    Call before anything runs on the GPU. CUDA's default kernels are not all deterministic: SDPA's
    flash-attention backward accumulates dQ with atomics in an order that varies from run to run,
    so two runs from the same state agree only to rounding after their first backward. With
    deterministic algorithms on, torch passes `deterministic=True` to the flash backward
    (aten/src/ATen/native/transformers/cuda/attention_backward.cu), picks the deterministic kernel
    wherever an op has two, and raises on an op that has none."""
    if args.deterministic:
        if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in CUBLAS_DETERMINISTIC:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_DETERMINISTIC[0]
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    line = (f"deterministic: {args.deterministic} (torch.are_deterministic_algorithms_enabled()="
            f"{torch.are_deterministic_algorithms_enabled()}, CUBLAS_WORKSPACE_CONFIG="
            f"{os.environ.get('CUBLAS_WORKSPACE_CONFIG', 'unset')}, cudnn.deterministic="
            f"{torch.backends.cudnn.deterministic})")
    logger.info("%s", line)
    return line


def load_data(args: PretrainArguments, accelerator):
    """(tokenizer, fingerprint, PackedLoader for this rank, validation batches per source)."""
    from transformers import AutoTokenizer

    from genesis_hf.tokenizer import tokenizer_fingerprint
    from training.data.loader import PackedLoader, validation_batches

    if args.embedded_data:
        from training.data.prepare import ensure_embedded_data

        # Rank 0 builds tokenizer + shards once; the others then only verify the manifest.
        with accelerator.main_process_first():
            tok_dir, data_dir = ensure_embedded_data(args.embedded_data, vocab_size=args.embedded_vocab_size)
    else:
        tok_dir, data_dir = Path(args.tokenizer_dir), Path(args.data_dir)
        for name, path in (("tokenizer_dir", tok_dir), ("data_dir", data_dir)):
            if not path.is_dir():
                raise ConfigError(f"{name}: {path} does not exist (see the recipe's header for how to make it)")
    args.tokenizer_dir, args.data_dir = str(tok_dir), str(data_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    fingerprint = tokenizer_fingerprint(tok_dir)
    loader = PackedLoader(data_dir, seq_len=args.seq_len, micro_batch_size=args.per_device_train_batch_size,
                          rank=accelerator.process_index, world_size=accelerator.num_processes, seed=args.seed,
                          expected_fingerprint=fingerprint)
    val = {}
    if args.eval_steps:
        val = validation_batches(data_dir, seq_len=args.seq_len, micro_batch_size=args.per_device_train_batch_size,
                                 max_batches=args.eval_batches, expected_fingerprint=fingerprint)
    return tokenizer, fingerprint, loader, val


def build_model(args: PretrainArguments, tokenizer):
    """A randomly initialised GenesisForCausalLM from defaults < model_config file < recipe fields."""
    from genesis_hf import GenesisConfig, GenesisForCausalLM

    base = GenesisConfig.from_pretrained(args.model_config).to_dict() if args.model_config else {}
    given = {f: getattr(args, f) for f in MODEL_FIELDS if getattr(args, f) is not None}
    given.setdefault("vocab_size", base.get("vocab_size", len(tokenizer)))
    if {"hidden_size", "num_attention_heads"} & given.keys():
        base.pop("head_dim", None)  # derived again from the new sizes
    if args.rope_theta is not None:
        given["rope_parameters"] = {"rope_type": "default", "rope_theta": float(args.rope_theta)}
    if given["vocab_size"] < len(tokenizer):
        raise ConfigError(f"vocab_size {given['vocab_size']} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    if args.seq_len > given.get("max_position_embeddings", base.get("max_position_embeddings", 2048)):
        raise ConfigError(f"seq_len {args.seq_len} exceeds max_position_embeddings")
    base.update(given, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = GenesisConfig.from_dict(base)
    return GenesisForCausalLM(config)


def build_optimizer(model: torch.nn.Module, args: PretrainArguments) -> torch.optim.AdamW:
    """AdamW with weight decay on every >= 2-D weight (attention/MLP matrices and the tied
    embedding = LM head, counted once) and none on 1-D parameters (RMSNorm gains): decaying a
    norm gain pulls it to 0 and rescales the residual stream; matrices are what decay regularises."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # de-duplicates the tied embedding/head
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_epsilon)


def build_meta(args: PretrainArguments, accelerator, model, fingerprint: str) -> dict:
    """Run facts saved in every checkpoint; the RESUME fields are compared on resume.
    Call BEFORE accelerator.prepare (parameter counts of the unsharded model)."""
    world = accelerator.num_processes
    n_matmul = matmul_params(model)
    peak, peak_note = peak_flops(accelerator.device)
    return {
        "world_size": world,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "seq_len": args.seq_len,
        "tokens_per_step": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.seq_len * world,
        "tokenizer_fingerprint": fingerprint,
        "tokenizer_dir": str(Path(args.tokenizer_dir).resolve()),
        "data_dir": str(Path(args.data_dir).resolve()),
        "mixture": args.mixture,
        "model_config": json.loads(model.config.to_json_string()),
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_matmul_params": n_matmul,
        "flops_per_token": flops_per_token(model.config, args.seq_len, n_matmul),
        "peak_flops": peak,
        "peak_flops_note": peak_note,
        "distributed_type": str(accelerator.distributed_type),
        "mixed_precision": str(accelerator.mixed_precision),
        "recipe": scrub(dataclasses.asdict(args)),
    }


def speed_metrics(meta: dict, tokens: int, seconds: float, accelerator) -> dict:
    tok_s = tokens / seconds if seconds > 0 else 0.0
    per_device = tok_s / accelerator.num_processes
    out = {"tok_s": tok_s, "tok_s_per_device": per_device,
           "mfu": mfu(per_device, meta["flops_per_token"], meta["peak_flops"]),
           "peak_mem_gb": peak_memory_gb(accelerator.device)}
    if accelerator.device.type == "cuda":  # this rank's pinned staging (the GPU check reports it)
        out["host_pinned_gb"] = host_pinned_gb(accelerator.device)
    return out


def _resolve_schedule(saved: LRSchedule, args: PretrainArguments, step: int, override: bool) -> tuple[LRSchedule, str]:
    """The schedule after a resume, and what happened to it (the extension rule: schedule.py)."""
    wanted = LRSchedule.from_args(args)
    same_shape = all(getattr(saved, f) == getattr(wanted, f) for f in SCHEDULE_FIELDS)
    if same_shape and args.max_steps == saved.max_steps and args.extension_lr is None:
        return saved, "restored unchanged"
    if same_shape and args.max_steps > saved.max_steps:
        new = saved.extended(step, args.max_steps, args.extension_lr)
        how = (f"EXTENDED: max_steps {saved.max_steps} -> {args.max_steps} at step {step}; "
               + (f"decay re-laid from LR {new.anchor_lr:.6g}" if new.anchor_step == step else "same shape, stretched"))
        return new, how
    if not override:
        diffs = [f"{f}: {getattr(saved, f)!r} -> {getattr(wanted, f)!r}"
                 for f in (*SCHEDULE_FIELDS, "max_steps") if getattr(saved, f) != getattr(wanted, f)]
        if args.extension_lr is not None and not diffs:
            diffs = ["extension_lr given but max_steps did not grow"]
        raise ConfigError("cannot resume: the LR schedule differs from the checkpoint's (" + "; ".join(diffs)
                          + "). Only growing max_steps is an extension; pass --overrides lr_schedule to "
                          "replace the schedule deliberately")
    logger.warning("resume override: LR schedule replaced by the recipe's at step %d (--overrides lr_schedule)", step)
    return wanted, "REPLACED by the recipe's (--overrides lr_schedule)"


def restore(args, accelerator, model, optimizer, scheduler, loader, meta, ckpt_root: Path, resume: str | None = None):
    """Resume per args.resume: refuse on any mismatch, restore everything, return (train_state, audit).
    None for a fresh start. Nothing has trained when this raises. `hub:owner/name@step-XXXXXXXX` is
    downloaded first (training/hub_resume.py) and then resumed like any local checkpoint."""
    from training.checkpoint import (
        CheckpointError,
        check_resume_compatible,
        load_checkpoint,
        read_meta,
        resolve_resume,
    )

    requested = resume = args.resume if resume is None else resume  # a rollback names its checkpoint
    if resume and str(resume).startswith("hub:"):  # downloaded into the run folder, then the local path
        from training.hub_resume import resolve_hub_resume

        resume = resolve_hub_resume(resume, args.output_dir, accelerator,
                                    floor_minutes=args.hub_download_timeout_minutes)
    path = resolve_resume(resume, ckpt_root)
    if path is None:
        if args.resume:
            logger.info("--resume %s: no committed checkpoint under %s, starting fresh", args.resume, ckpt_root)
        return None
    overrides = args.override_set()
    schedule_override = "lr_schedule" in overrides
    overrides.discard("lr_schedule")
    used = check_resume_compatible(read_meta(path), meta, overrides)
    if args.reset_optimizer:
        logger.warning("--reset_optimizer: AdamW moments are NOT restored from %s (deliberate)", path)
    # Another world size (a GPU died): DCP reshards model and optimizer, the loader state is merged
    # from every saved rank, and each rank's RNG is re-derived from (seed, step, rank), all logged.
    out = load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler,
                          reset_optimizer=args.reset_optimizer, verify=args.checkpoint_verify,
                          timeout_s=args.save_timeout_minutes * 60, reshard="world_size" in used, rng_seed=args.seed)
    train_state = out["train_state"]
    step = train_state["step"]
    # Positions in the loader state are global, so another micro-batch split or world size is exact (logged).
    loader.load_state_dict(out["data_state"],
                           allow_resharding=bool({"per_device_train_batch_size", "world_size"} & set(used)))
    if scheduler.last_epoch != step and not args.reset_optimizer:
        raise CheckpointError(f"scheduler state of {path} is at step {scheduler.last_epoch}, train state at {step}")
    saved = LRSchedule.from_dict(train_state["lr_schedule"])
    schedule, how = _resolve_schedule(saved, args, step, schedule_override)
    if schedule != saved or args.reset_optimizer:
        set_schedule(scheduler, schedule, step)
    lr = optimizer.param_groups[0]["lr"]
    if not math.isclose(lr, schedule.lr(step), rel_tol=1e-9, abs_tol=1e-15):
        raise CheckpointError(f"restored LR {lr} for step {step + 1} differs from the schedule's {schedule.lr(step)}")
    train_state["lr_schedule"] = schedule.to_dict()
    train_state["parent_checkpoint"] = str(path)
    audit = dict(out.get("audit") or {})
    audit.update(checkpoint=str(path), step=step, tokens_seen=train_state["tokens_seen"], next_lr=lr, lr_schedule=how,
                 overrides_used=used + (["lr_schedule"] if schedule_override else []),
                 reset_optimizer=args.reset_optimizer,
                 data_state=f"{audit.get('data_state', 'restored')}: {_data_summary(out['data_state'])}")
    if resume != requested:
        audit["downloaded_from"] = requested
    return train_state, audit


def _data_summary(state: dict) -> str:
    """'batches=12, consumed python-code=26, python-docs=24' for the loader's state (any other: its fields)."""
    if isinstance(state.get("sources"), dict):
        consumed = ", ".join(f"{n}={s.get('consumed')}" for n, s in sorted(state["sources"].items()))
        return f"batches={state.get('batches')}, windows consumed {consumed}"
    keys = [k for k in ("epoch", "cursor", "position", "tokens_consumed") if k in state]
    return ", ".join(f"{k}={state[k]}" for k in keys) or f"{len(state)} fields"


def log_audit(audit: dict, main_proc: bool) -> None:
    """The resume audit, one block on the main process's stdout (and in the log)."""
    if not main_proc:
        return
    lines = ["resume audit:"] + [f"  {k}: {v}" for k, v in audit.items()]
    print("\n".join(lines), flush=True)
