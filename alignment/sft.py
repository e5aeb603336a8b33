"""Constitution-guided SFT on a Genesis export with TRL's SFTTrainer.

The 1B model on 2x RTX 4090 (FSDP, the pretraining hardware config):

    accelerate launch --config_file accelerate_configs/fsdp_2gpu_pcie.yaml alignment/sft.py \
        --config alignment/recipes/sft-genesis-1b.yaml --model_name_or_path runs/export/genesis-1b-40k

A tiny run on CPU (seconds):

    python alignment/sft.py --config alignment/recipes/sft-tiny.yaml --model_name_or_path MODEL_DIR

Under FSDP (training/fsdp.py, the same rules as pretraining): a config that asks for FSDP where
Accelerate does not give it is refused before anything trains; Genesis's precision policy (bf16
compute, fp32 gradient reduction and accumulation, fp32 loss) replaces Accelerate's all-bf16
default the moment the Trainer's Accelerator exists, before any model is wrapped; the final save
gathers a full state dict (`save_final`). `torch_compile: true` compiles each decoder layer in
place (`compile_decoder_layers`) and turns the Trainer's own whole-model compile off:
`torch_compile_backend` / `torch_compile_mode` go to the per-layer compile.

Defaults < recipe YAML < command line (TrlParser). Loss is on assistant turns only (the
tokenizer's ChatML template marks them with {% generation %}), sequences are packed, and the
saved folder's model card records the constitution (version and principles).
"""

from __future__ import annotations

# First, before anything imports torch: the launch environment pretraining gets (expandable_segments;
# on consumer cards NCCL_P2P_DISABLE and NCCL_IB_DISABLE). Logged by `main`; values you export win.
from training.lifecycle import die_with_launcher  # a launched worker never outlives its launcher
from training.reliability import launch_env, set_launch_env

_DEATH_NOTE = die_with_launcher()
LAUNCH_NOTES = set_launch_env() + ([_DEATH_NOTE] if _DEATH_NOTE else [])

import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

from alignment.constitution import DEFAULT_CONSTITUTION, load_constitution, record_in_model_card  # noqa: E402
from alignment.data import DataError, load_sft_dataset, resolve_path  # noqa: E402
from alignment.generate import require_chat_template, set_chat_stop_tokens  # noqa: E402
from training.fsdp import (  # noqa: E402
    compile_decoder_layers,
    describe_policy,
    fsdp_policies,
    require_granted_fsdp,
    use_genesis_policy,
)
from training.lifecycle import RunFolderBusy  # noqa: E402
from training.plan.preflight import PlanRefused  # noqa: E402

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
    ignore_plan: bool = field(
        default=False,
        metadata={"help": "On CUDA, go ahead even when `genesis plan` predicts this launch does not fit the GPUs."},
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


def genesis_trainer(trainer_cls, stage: str | None = None, ignore_plan: bool = False):
    """`trainer_cls` (SFTTrainer, DPOTrainer) applying Genesis's FSDP rules as soon as its Accelerator
    exists: refuse a config that asked for FSDP and did not get it, then install the precision policy.
    Not later: DPOTrainer wraps its reference model with `fully_shard` inside its own __init__.

    Rank 0 then locks <output_dir>/run.lock (training/lifecycle.py `take_run_lock`): a second launch
    into a live run's folder is refused on every rank (`RunFolderBusy`, exit 2); `end_run` releases it.

    With `stage` ("sft", "dpo"), on CUDA: the `genesis plan` preflight for this launch, before any
    model is wrapped or moved (training/plan/preflight.py): its line is logged, a launch predicted
    not to fit is refused (`PlanRefused`, exit 2) unless `ignore_plan`; the plan is kept on the
    trainer as `genesis_plan` for `PlanCheck`."""

    class Trainer(trainer_cls):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            require_granted_fsdp(self.accelerator)
            use_genesis_policy(self.accelerator)
            # one run per output_dir, as pretrain.py: refused on every rank before anything is written
            from training.lifecycle import take_run_lock

            self.genesis_lock = take_run_lock(self.args.output_dir, self.accelerator)
            self.genesis_plan = None
            if stage is not None:
                from types import SimpleNamespace

                from training.plan.preflight import preflight

                self.genesis_plan = preflight(SimpleNamespace(ignore_plan=ignore_plan), self.accelerator,
                                              argv=list(PARSED_ARGV) or None, align=stage)

    Trainer.__name__ = Trainer.__qualname__ = f"Genesis{trainer_cls.__name__}"
    return Trainer


def plan_check(trainer, output_dir: str) -> None:
    """After 10 optimizer steps, log `genesis plan`'s prediction beside what this run measured (peak
    allocated / reserved memory, step time and tokens/s) and write it to <output_dir>/plan_vs_measured.json
    (main process). Only when the preflight made a plan (CUDA, a known card)."""
    from transformers import TrainerCallback

    plan = getattr(trainer, "genesis_plan", None)
    if plan is None:
        return

    class PlanCheck(TrainerCallback):
        start = None  # (time, TRL's token count) at the end of step 1: compile and warm-up excluded

        def on_step_end(self, args, state, control, **kwargs):
            import time

            from training.plan.preflight import compare_line

            now, tokens = time.perf_counter(), getattr(trainer, "_total_train_tokens", None)
            if state.global_step == 1:
                self.start = (now, tokens)
            elif self.start is not None and state.global_step >= 11 and not plan.get("compared"):
                plan["compared"] = True
                t0, n0 = self.start
                steps, dt = state.global_step - 1, now - t0
                tok_s = (tokens - n0) / dt if tokens is not None and n0 is not None and dt > 0 else None
                rec = compare_line(plan, {"step": state.global_step, "tok_s": tok_s}, trainer.accelerator.device)
                rec |= {"measured_step_s": dt / steps, "predicted_step_s": plan["time"].get("step_s"),
                        "stage": plan.get("setting", {}).get("workload"),
                        "note": "measured tokens are TRL's count of real tokens; the plan's rows are max_length long"}
                if trainer.accelerator.is_main_process:
                    Path(output_dir).mkdir(parents=True, exist_ok=True)
                    (Path(output_dir) / "plan_vs_measured.json").write_text(json.dumps(rec, indent=2) + "\n")

    trainer.add_callback(PlanCheck())


def log_launch_env() -> None:
    for note in LAUNCH_NOTES:
        logger.info("launch environment: %s", note)


def model_init_kwargs(model_args, training_args) -> dict:
    """`from_pretrained` kwargs for the policy (and DPO's reference model), set on the args for TRL.

    Several processes load on CPU (`device_map=None`): TRL asks for `device_map="auto"` on CUDA
    unless the run is MULTI_GPU or DeepSpeed (trl/trainer/utils.py `create_model_from_path`), so
    under FSDP every rank would spread a full copy over every visible GPU (transformers balances
    "auto" across all of them) and keep a CUDA context and cached blocks on its neighbour's card.
    `fully_shard` moves each rank's shards to its own GPU."""
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kwargs["device_map"] = None
    return {**kwargs, **(training_args.model_init_kwargs or {})}


def take_compile(training_args) -> dict | None:
    """torch.compile kwargs for `compile_layers` if the config asked for `torch_compile`, which is then
    turned off on the args: the Trainer would otherwise compile the whole (FSDP-wrapped) model."""
    if not training_args.torch_compile:
        return None
    kwargs = {"backend": training_args.torch_compile_backend or "inductor"}
    if training_args.torch_compile_mode:
        kwargs["mode"] = training_args.torch_compile_mode
    # The Trainer builds its TorchDynamoPlugin from the backend: clear it too.
    training_args.torch_compile, training_args.torch_compile_backend, training_args.torch_compile_mode = False, None, None
    return kwargs


def compile_layers(model, compile_kwargs: dict) -> int:
    """Per-decoder-layer compile, in place, before the Trainer's `prepare` wraps the model."""
    layer_cls = sorted(getattr(model, "_no_split_modules", None) or ["GenesisDecoderLayer"])[0]
    n = compile_decoder_layers(model, layer_cls, **compile_kwargs)
    logger.info("torch_compile: %d %s layers compiled (%s)", n, layer_cls, compile_kwargs)
    return n


def fsdp_report(trainer, compiled_layers: int = 0, extra: dict | None = None) -> dict:
    """How this rank ran: the distributed type, the MixedPrecisionPolicy of every module that
    `fully_shard` wrapped (the policy and, for DPO, the reference model) and the launch environment
    this process saw. Logged by every rank."""
    policies = {}
    for tag in ("model", "ref_model"):
        model = getattr(trainer, tag, None)
        if model is not None:
            policies |= {f"{tag}.{name}": describe_policy(p) for name, p in fsdp_policies(model).items()}
    report = {"rank": trainer.accelerator.process_index, "processes": trainer.accelerator.num_processes,
              "distributed_type": str(trainer.accelerator.distributed_type).split(".")[-1],
              "mixed_precision": trainer.accelerator.mixed_precision, "compiled_layers": compiled_layers,
              # "NO" unless the Trainer compiled the whole model (take_compile turns that off)
              "whole_model_compile": str(trainer.accelerator.state.dynamo_plugin.backend).split(".")[-1],
              "fsdp_policies": policies, "launch_env": launch_env(), **(extra or {})}
    logger.info("distributed report: %s", json.dumps(report, sort_keys=True))
    return report


def card_summary(report: dict) -> dict:
    """The model card's (and lineage's) view of `fsdp_report`: no per-module list."""
    return {"processes": report["processes"], "distributed_type": report["distributed_type"],
            "mixed_precision": report["mixed_precision"], "compiled_layers": report["compiled_layers"],
            "fsdp_precision": sorted(set(report["fsdp_policies"].values())),
            "fsdp_wrapped_modules": len(report["fsdp_policies"])}


def save_final(trainer, tokenizer, output_dir: str) -> None:
    """Save a `from_pretrained` folder that stops generation on <|im_end|>, on every rank (FSDP needs all).

    The pretraining FSDP config keeps SHARDED_STATE_DICT (DCP) for checkpoints; the final model is
    one gather to a full state dict on rank 0 (CPU offload) so the folder loads anywhere. It is
    written through an empty (meta) instance of the model's own class: `fully_shard` swaps the live
    model's class for a generated `FSDP<Class>` whose module is torch's, and saving that would copy
    torch's FSDP sources into the folder and point config.json's auto_map at them.
    """
    import torch

    model = trainer.accelerator.unwrap_model(trainer.model)
    set_chat_stop_tokens(model, tokenizer)
    if not trainer.is_fsdp_enabled:
        trainer.save_model(output_dir)
        return
    trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    state_dict = trainer.accelerator.get_state_dict(trainer.model)  # a collective: every rank; full on rank 0
    if trainer.accelerator.is_main_process:
        from torch.distributed.fsdp import FSDPModule

        plain_cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
        if model.config.get_text_config().tie_word_embeddings:  # gathered copies of one tensor: keep one
            for tied, source in (getattr(plain_cls, "_tied_weights_keys", None) or {}).items():
                if tied in state_dict and source in state_dict and torch.equal(state_dict[tied], state_dict[source]):
                    del state_dict[tied]
        with torch.device("meta"):
            shell = plain_cls(model.config)
        shell.generation_config = model.generation_config
        shell.save_pretrained(output_dir, state_dict=state_dict)
        tokenizer.save_pretrained(output_dir)
        torch.save(trainer.args, Path(output_dir) / "training_args.bin")  # as Trainer.save_model does
    trainer.accelerator.wait_for_everyone()


_KEEP_ALIVE: list = []  # a multi-process run's trainer, alive until os._exit (end_run)


def end_run(trainer) -> None:
    """The end of a run. One process: `trainer.end()`. Several: finish wandb, and keep the trainer
    (model, DDP reducer, process group) alive for `run_script`'s os._exit, with no teardown at all.

    Why: a gloo worker thread can still hold the last reference to the final all-gather's work (its
    Python tensors: the decref needs the GIL) when the main thread, holding the GIL, frees the
    trainer -> DDP's reducer -> the process group -> joins that worker: a deadlock. Under CPU load
    (the worker thread not scheduled for a while) 2-rank launches stalled this way after training
    (py-spy: main thread in ~ProcessGroupGloo -> std::thread::join under `main(*parse())` returning;
    worker in ~AsyncAllgatherWork waiting for the GIL). `trainer.end()` (destroy_process_group) can
    drop the last reference the same way, so it is not called either; the OS closes the sockets."""
    lock = getattr(trainer, "genesis_lock", None)
    if lock is not None:
        lock.release()
    if trainer.accelerator.num_processes == 1:
        trainer.end()
        return
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()  # its atexit hook will not run
    _KEEP_ALIVE.append(trainer)


REFUSALS = (PlanRefused, RunFolderBusy)  # a launch refused before training: one line, exit 2


def run_script(main, parse) -> None:
    """`python alignment/<stage>.py ...` / `accelerate launch ... alignment/<stage>.py ...`: run
    `main`; a refusal (`REFUSALS`) is one line and exit 2. When several processes ran, flush and
    `os._exit` (success or failure) instead of tearing down the interpreter (see `end_run`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1
    rc = 0
    try:
        main(*parse())
    except REFUSALS as e:  # one line, as pretrain.py refuses
        logger.error("%s", e)
        print(f"genesis: {e}", file=sys.stderr)
        rc = 2
    except Exception:  # noqa: BLE001  (printed, then a non-zero exit that no destructor can block)
        if single:
            raise
        traceback.print_exc()
        rc = 1
    if single:
        if rc:
            sys.exit(rc)
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def main(script_args: SFTScriptArguments, training_args, model_args) -> dict:
    """Train, save (model, tokenizer, model card with the constitution) and return metrics."""
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    import genesis_hf  # noqa: F401  (registers "genesis" with AutoModelForCausalLM)

    log_launch_env()
    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is required (a `genesis export` folder or Hub id)")
    constitution = load_constitution(script_args.constitution)
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=training_args.trust_remote_code
    )
    if training_args.chat_template_path is None:
        require_chat_template(tokenizer, f"tokenizer of {model_args.model_name_or_path}")
    dataset, data_stats = load_mixture(script_args, tokenizer)

    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    compile_kwargs = take_compile(training_args)
    trainer = genesis_trainer(SFTTrainer, stage="sft", ignore_plan=script_args.ignore_plan)(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    plan_check(trainer, training_args.output_dir)
    compiled = compile_layers(trainer.model, compile_kwargs) if compile_kwargs else 0
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    report = fsdp_report(trainer, compiled)

    save_final(trainer, tokenizer, training_args.output_dir)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if trainer.accelerator.is_main_process:
        logger.info("SFT done: loss %.4f, saved to %s", result.training_loss, training_args.output_dir)
        record_in_model_card(
            training_args.output_dir, constitution, "sft",
            {"base_model": model_args.model_name_or_path, "data": data_stats, "train_loss": result.training_loss,
             "loss_first_last": [losses[0], losses[-1]] if losses else None, "steps": trainer.state.global_step,
             "distributed": card_summary(report)},
        )
    end_run(trainer)
    return {"output_dir": training_args.output_dir, "train_loss": result.training_loss,
            "log_history": trainer.state.log_history, "data": data_stats, "distributed": report}


def make_parser():
    from trl import ModelConfig, SFTConfig, TrlParser

    return TrlParser((SFTScriptArguments, SFTConfig, ModelConfig))


# The arguments of the last `parse`: the preflight plans this launch with them (a cycle runs SFT and DPO
# in its own process, where sys.argv is the cycle's).
PARSED_ARGV: list[str] = []


def parse_with(parser, argv: list[str] | None = None):
    """`parser.parse_args_and_config(argv)`, remembering the arguments for the preflight (`PARSED_ARGV`)."""
    PARSED_ARGV[:] = list(sys.argv[1:] if argv is None else argv)
    return parser.parse_args_and_config(args=argv)


def parse(argv: list[str] | None = None):
    return parse_with(make_parser(), argv)


if __name__ == "__main__":
    run_script(main, parse)
