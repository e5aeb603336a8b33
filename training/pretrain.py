"""Pretrain Genesis with Accelerate: FSDP2 on GPUs, DDP-like gloo on CPU, one process anywhere.

Launch (hardware in the accelerate config, hyperparameters in the recipe, overrides on the CLI):

    # the seed's run: 2x RTX 4090 over PCIe, FSDP2, bf16, activation checkpointing
    accelerate launch --config_file accelerate_configs/fsdp_2gpu_pcie.yaml \
        training/pretrain.py --config training/recipes/genesis-1b.yaml
    # one GPU
    accelerate launch --config_file accelerate_configs/single_gpu.yaml \
        training/pretrain.py --config training/recipes/genesis-1b.yaml --gradient_accumulation_steps 64
    # 2 CPU processes (what the tests run), or a single process
    OMP_NUM_THREADS=1 accelerate launch --config_file accelerate_configs/cpu.yaml \
        training/pretrain.py --config training/recipes/debug.yaml
    python training/pretrain.py --config training/recipes/debug.yaml --max_steps 5
    # extend a finished 20k run to 40k (LR rule in training/schedule.py)
    accelerate launch ... training/pretrain.py --config ... --resume auto --max_steps 40000

`--resume auto` continues from the newest committed checkpoint in <output_dir>/checkpoints (a
fresh start if there is none), so a restart loop is safe. Outputs: <output_dir>/metrics.jsonl,
<output_dir>/checkpoints/step-XXXXXXXX/, wandb (offline without WANDB_API_KEY).
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python training/pretrain.py` / `accelerate launch training/pretrain.py`
    # The script's folder (training/) must not shadow stdlib or top-level modules: swap it for the repo root.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

from training.lifecycle import die_with_launcher  # noqa: E402  (first: a worker never outlives its launcher)

_DEATH_NOTE = die_with_launcher()

from training.reliability import set_launch_env  # noqa: E402  (must run before CUDA starts)

_LAUNCH_NOTES = set_launch_env() + ([_DEATH_NOTE] if _DEATH_NOTE else [])

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from accelerate import Accelerator, InitProcessGroupKwargs  # noqa: E402
from accelerate.utils import DistributedType, set_seed  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from training.args import ConfigError, PretrainArguments, parse_args  # noqa: E402
from training.checkpoint import CheckpointError  # noqa: E402
from training.checkpoint.async_save import Checkpointer, plan_mode  # noqa: E402
from training.checkpoint.layout import step_dirname  # noqa: E402
from training.evaluation import token_byte_lengths, validation_metrics  # noqa: E402
from training.fault_injection import TestFaults  # noqa: E402  (a test hook; off unless its env is set)
from training.fsdp import (  # noqa: E402
    compile_decoder_layers,
    fsdp_summary,
    require_granted_fsdp,
    use_genesis_policy,
)
from training.hub_sync import HubSync  # noqa: E402
from training.lifecycle import EXIT_STOPPED, StopRequest, take_run_lock  # noqa: E402
from training.metrics import MetricsLogger, scrub  # noqa: E402
from training.recovery import Recovery, read_skip_file, roll_back  # noqa: E402
from training.reliability import SpikeGuard, startup_check  # noqa: E402
from training.run_setup import (  # noqa: E402
    StepResult,
    all_reduce_sum,
    apply_determinism,
    build_meta,
    build_model,
    build_optimizer,
    load_data,
    log_audit,
    restore,
    speed_metrics,
)
from training.schedule import LRSchedule, make_scheduler  # noqa: E402

logger = logging.getLogger("training.pretrain")

_KEEP_ALIVE: list = []  # see the end of train()
EXIT_NONFINITE = 3  # the run stopped on a non-finite loss/gradient or a spike (policy stop)


def check_batch(batch: torch.Tensor, vocab_size: int) -> None:
    """Refuse token ids outside the vocabulary, on the host, before the batch reaches the device
    (on CUDA an out-of-range id is a device-side assert). The model checks its inputs only at
    inference: in training the check would be a host sync per micro-batch inside the forward."""
    lo, hi = int(batch.min()), int(batch.max())  # (B, T+1) on CPU: microseconds, no device sync
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"data: token id {lo if lo < 0 else hi} is outside the model's vocabulary [0, {vocab_size}); "
                         "were the shards made with another tokenizer?")


def forward_backward(model, accelerator, batch: torch.Tensor, *, sync: bool, scale: float, faults, step):
    """One micro-batch. batch: (B, T+1) int64 from the loader; returns the detached mean loss.

    Inputs are tokens 0..T-1 of the window and `shift_labels` tokens 1..T, so all T positions
    train. Every micro-batch has B*T targets, so the mean of the micro-batch means is the token
    mean over the whole step. No host sync in here: the loss stays on the device until the step ends.
    """
    batch = batch.to(accelerator.device, non_blocking=True)
    x, y = batch[:, :-1], batch[:, 1:]  # (B, T) each
    # no_sync on all but the last micro-batch: gradients are reduced once per optimizer step.
    ctx = contextlib.nullcontext() if sync else accelerator.no_sync(model)
    with ctx:
        loss = model(input_ids=x, shift_labels=y).loss  # () fp32, mean over B*T
        loss = faults.scale_loss(loss, step)
        accelerator.backward(loss * scale)
    return loss.detach().float()


def train_step(model, optimizer, scheduler, loader, accelerator, args, guard, faults, step, vocab_size,
               recovery=None) -> StepResult:
    """Accumulate, clip, check, step. `step` is the 1-based number of the step being made."""
    accum = args.gradient_accumulation_steps
    loss_sum = torch.zeros((), device=accelerator.device)
    if recovery is not None:
        recovery.begin_step(step)  # this step's windows are kept until the next, for a spike's attribution
    for micro in range(accum):
        batch = loader.next_batch()
        check_batch(batch, vocab_size)
        faults.log_batch(step, micro, batch, loader.last_refs)
        micro_loss = forward_backward(model, accelerator, batch, sync=micro == accum - 1, scale=1.0 / accum,
                                      faults=faults, step=step)
        if recovery is not None:
            recovery.saw(micro, loader.last_refs, micro_loss)  # the loss is read (a host sync) only on a spike
        loss_sum += micro_loss
    max_norm = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)  # pre-clip global norm
    # One collective per step: the loss of every rank (NaN/inf on any rank poisons the sum).
    loss_sum, = all_reduce_sum(torch.stack([loss_sum / accum]), accelerator.device)  # CPU-GPU sync point
    loss = loss_sum.item() / accelerator.num_processes
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # DTensor
    lr = optimizer.param_groups[0]["lr"]
    problem, nonfinite = None, not (math.isfinite(loss) and math.isfinite(grad_norm))
    if nonfinite:
        problem = "non-finite loss or gradients"
    else:
        spike, median = guard.is_spike(loss)
        if spike:
            problem = f"loss spike ({loss:.4g} > {guard.factor:g} x running median {median:.4g})"
        elif args.spike_policy == "rollback" and (gspike := guard.is_grad_spike(grad_norm))[0]:
            problem = f"gradient-norm spike ({grad_norm:.4g} > {guard.factor:g} x running median {gspike[1]:.4g})"
    if problem is None:
        optimizer.step()
        guard.accept(loss, grad_norm)
    optimizer.zero_grad(set_to_none=True)  # poisoned gradients are dropped here, never applied
    if problem is None or args.spike_policy != "stop":
        scheduler.step()  # LR stays a function of the step number, skipped steps included
    return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, problem=problem, nonfinite=nonfinite)


def train(args: PretrainArguments) -> int:
    kwargs = InitProcessGroupKwargs(timeout=timedelta(minutes=args.pg_timeout_minutes))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # Several processes and no accelerator: gloo on CPU. `accelerate launch` starts the processes
    # (torchrun) but does not pass use_cpu on to them, so we say it here.
    accelerator = Accelerator(kwargs_handlers=[kwargs], cpu=launched > 1 and not torch.accelerator.is_available())
    rank, world, main_proc = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    if world != launched:  # every process would think it is rank 0 and write the same files
        raise RuntimeError(f"{launched} processes were launched but Accelerate set up {world} "
                           f"({accelerator.distributed_type}); refusing to train")
    logging.basicConfig(level=logging.INFO if main_proc else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", force=True)
    for note in _LAUNCH_NOTES:
        logger.info("launch environment: %s", note)
    lock = take_run_lock(args.output_dir, accelerator)  # before anything writes into the run folder
    stop = StopRequest(args.stop_signal or None)  # SIGTERM/SIGINT/early warning: finish the step, save, exit 75
    apply_determinism(args)  # before any cuBLAS call: CUBLAS_WORKSPACE_CONFIG is read at the first handle
    require_granted_fsdp(accelerator)  # never train unsharded when the config asked for FSDP
    # genesis plan (CUDA only): log the prediction, refuse a setting predicted not to fit
    # (--ignore_plan goes ahead); after step 10 it is logged against the measurement.
    from training.plan.preflight import compare_line, preflight
    planned = preflight(args, accelerator)
    hub = HubSync.from_args(args, is_main=main_proc)  # push_to_hub flags refused here, before any work
    latency = startup_check(accelerator, args.startup_check_timeout_s)
    logger.info("start-up all-reduce over %d process(es): %.3fs (%s)", world, latency, accelerator.distributed_type)

    set_seed(args.seed)  # same init on every rank; the loader's order has its own seed
    tokenizer, fingerprint, loader, val = load_data(args, accelerator)
    model = build_model(args, tokenizer)
    vocab_size = model.config.vocab_size  # check_batch's bound
    byte_lengths = token_byte_lengths(tokenizer)  # for bits per byte in evaluate()
    fsdp_ckpt = accelerator.distributed_type == DistributedType.FSDP and getattr(
        accelerator.state.fsdp_plugin, "activation_checkpointing", False)
    if args.gradient_checkpointing and not fsdp_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    meta = build_meta(args, accelerator, model, fingerprint)  # before sharding: full parameter counts
    logger.info("model: %s parameters, %.3g FLOPs/token; %s", f"{meta['n_params']:,}", meta["flops_per_token"],
                meta["peak_flops_note"])
    if args.torch_compile:  # per decoder layer, in place: parameter names and FSDP's auto-wrap unchanged
        logger.info("torch_compile: %d decoder layers compiled (inductor)", compile_decoder_layers(model))
    optimizer = build_optimizer(model, args)
    use_genesis_policy(accelerator)  # bf16 compute, fp32 gradient reduction/accumulation and loss
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.distributed_type == DistributedType.FSDP:
        logger.info("FSDP2: %s", fsdp_summary(model, accelerator))
    schedule = LRSchedule.from_args(args)
    scheduler = make_scheduler(optimizer, schedule)

    ckpt_root = Path(args.output_dir) / "checkpoints"
    # Before step 1: async needs each rank's shards in host memory (else sync), and the disk must hold
    # the checkpoints that exist at once (else refuse: exit 2).
    save_mode, save_plan = plan_mode(args.save_mode, model, ckpt_root, keep_last=args.keep_last)
    if save_mode != args.save_mode:
        logger.warning("save_mode %s -> %s: %s", args.save_mode, save_mode, save_plan["reason"])
    summaries: dict[int, dict] = {}  # step -> what the Hub card says of it, until its commit

    def on_commit(path: Path, saved_step: int) -> None:  # the training thread (sync) or the save's (async)
        logger.info("step %d: checkpoint committed at %s", saved_step, path)
        if hub is not None:
            hub.submit(path, saved_step, summaries.pop(saved_step, {}))

    checkpointer = Checkpointer(ckpt_root, mode=save_mode, keep_last=args.keep_last,
                                timeout_s=args.save_timeout_minutes * 60, on_commit=on_commit)
    train_state = {"step": 0, "tokens_seen": 0, "lr_schedule": schedule.to_dict(), "skipped_steps": 0,
                   "loss_history": [], "last_loss": None, "parent_checkpoint": None}
    resumed = restore(args, accelerator, model, optimizer, scheduler, loader, meta, ckpt_root)
    if resumed is not None:
        train_state, audit = resumed
        log_audit(audit, main_proc)
    step = train_state["step"]
    guard = SpikeGuard(args.spike_factor, args.spike_window, train_state["loss_history"],
                       train_state.get("grad_norm_history"))
    recovery = Recovery(args, train_state, rank)  # spike_policy rollback; spikes are attributed under any policy
    loader.set_skips(recovery.skips(extra=read_skip_file(args.skip_data)))
    faults = TestFaults(rank)
    faults.generation = len(recovery.rollbacks)
    metrics = MetricsLogger(args.output_dir, enabled=main_proc, report_to=args.report_to,
                            project=args.wandb_project, run_name=args.run_name,
                            config=scrub(dataclasses.asdict(args) | {"model": meta["model_config"]}))
    metrics.log(save_plan)
    tokens_per_step = meta["tokens_per_step"]
    bar = tqdm(total=args.max_steps, initial=step, disable=not (main_proc and args.progress_bar),
               desc="pretrain", unit="step", dynamic_ncols=True)
    logger.info("training steps %d -> %d, %s tokens/step, %d process(es)", step, args.max_steps,
                f"{tokens_per_step:,}", world)

    last_save, consecutive_skips, window_t, window_steps = time.monotonic(), 0, 0.0, 0
    last_saved_step = step if resumed is not None else -1
    last_eval: dict = {}
    exit_code = 0
    with close_on_error(checkpointer):  # a failing run still lets the save in flight commit
        while step < args.max_steps:
            t0 = time.monotonic()
            res = train_step(model, optimizer, scheduler, loader, accelerator, args, guard, faults, step + 1, vocab_size,
                             recovery)
            window_t += time.monotonic() - t0
            window_steps += 1
            if res.problem is not None:
                consecutive_skips += 1
                train_state["skipped_steps"] += 1
                msg = (f"step {step + 1}: {res.problem} (loss {res.loss}, grad_norm {res.grad_norm}); optimizer step "
                       f"NOT taken; policy {args.spike_policy}")
                windows = recovery.attribution(loader)  # collective: every rank knows of the spike
                metrics.log({"event": "spike", "step": step + 1, "loss": res.loss, "grad_norm": res.grad_norm,
                             "problem": res.problem, "windows": windows})
                verdict = "stop" if args.spike_policy == "stop" else "skip"
                if args.spike_policy == "rollback":
                    verdict = recovery.judge(step + 1, res.nonfinite)
                    if verdict == "rollback":
                        back = roll_back(args, accelerator, recovery, checkpointer, model, optimizer, scheduler,
                                         loader, meta, ckpt_root, step + 1)
                        if back is not None:
                            train_state, record = back
                            step = train_state["step"]
                            guard = SpikeGuard(args.spike_factor, args.spike_window, train_state["loss_history"],
                                               train_state.get("grad_norm_history"))
                            faults.generation = len(recovery.rollbacks)
                            consecutive_skips, window_t, window_steps = 0, 0.0, 0
                            bar.n = step
                            metrics.log({"event": "rollback", "step": record["trigger_step"], **record})
                            continue
                        verdict = "stop"
                        why = (f"no committed checkpoint from before step {recovery.pending[0]['step']} under "
                               f"{ckpt_root}: falling back to stop")
                        logger.error("rollback impossible: %s", why)
                        metrics.log({"event": "rollback_impossible", "step": step + 1, "reason": why})
                    elif verdict == "stop":
                        logger.error("%d rollbacks within %d steps (the last at steps %s, skipping %s): max_rollbacks "
                                     "reached", len(recovery.rollbacks), args.rollback_window,
                                     [rb["spikes"] for rb in recovery.rollbacks[-args.max_rollbacks:]],
                                     [rb["skip"] for rb in recovery.rollbacks[-args.max_rollbacks:]])
                if verdict == "stop" or consecutive_skips > args.max_consecutive_skips:
                    logger.error("%s -> stopping; no checkpoint of this state is written (last: step %s)",
                                 msg, last_saved_step if last_saved_step >= 0 else "none")
                    metrics.log({"step": step + 1, "loss": res.loss, "grad_norm": res.grad_norm, "lr": res.lr,
                                 "event": "stopped", "problem": res.problem, "policy": args.spike_policy})
                    exit_code = EXIT_NONFINITE
                    break
                logger.warning("%s -> skipped (%d in a row)", msg, consecutive_skips)
            else:
                consecutive_skips = 0
                recovery.clean_step(step + 1)
            step += 1
            train_state.update(step=step, tokens_seen=train_state["tokens_seen"] + tokens_per_step,
                               loss_history=list(guard.history), grad_norm_history=list(guard.grad_history),
                               last_loss=res.loss, pending_spikes=list(recovery.pending),
                               rollbacks=recovery.rollbacks)
            bar.update(1)

            if step % args.logging_steps == 0 or step == args.max_steps or res.problem:
                record = {"step": step, "loss": res.loss, "grad_norm": res.grad_norm, "lr": res.lr,
                          "tokens": train_state["tokens_seen"], "tokens_by_source": tokens_by_source(loader, accelerator)}
                record |= speed_metrics(meta, window_steps * tokens_per_step, window_t, accelerator)
                if any(loader.skipped_tokens_by_source.values()):
                    record["skipped_tokens_by_source"] = dict(loader.skipped_tokens_by_source)  # global already
                if res.problem:
                    record |= {"skipped": True, "problem": res.problem, "policy": args.spike_policy}
                window_t, window_steps = 0.0, 0
                if args.eval_steps and (step % args.eval_steps == 0 or step == args.max_steps):
                    record |= evaluate(model, val, byte_lengths)
                    last_eval = {"step": step, "val_bpb": record.get("val_bpb")}
                metrics.log(record)
                if planned is not None and step >= 10 and not planned.get("compared"):  # genesis plan vs this run
                    planned["compared"] = True
                    metrics.log(compare_line(planned, record, accelerator.device))
                for event in hub.events() if hub is not None else ():
                    metrics.log(event)
                bar.set_postfix(loss=f"{res.loss:.4f}", lr=f"{res.lr:.2e}", tok_s=f"{record['tok_s']:.0f}")

            # Save decision: by steps, by wall time (rank 0's clock, agreed by every rank), at the end,
            # and on a stop signal seen by any rank (every rank then stops after this same step).
            time_due = args.save_minutes > 0 and time.monotonic() - last_save >= args.save_minutes * 60
            # While a spike is pending (rollback), nothing is saved: the state to return to is never
            # pruned, and no save of a suspect state can commit.
            due = ((args.save_steps and step % args.save_steps == 0 and recovery.saving_allowed)
                   or step == args.max_steps)
            time_due = time_due and recovery.saving_allowed
            flags = torch.tensor([float(due or (time_due and main_proc)), float(stop.requested and step < args.max_steps)])
            save_due, stopping = (all_reduce_sum(flags, accelerator.device) > 0).tolist()  # CPU-GPU sync point
            if save_due or stopping:
                summaries[step] = {"loss": res.loss, "tokens": train_state["tokens_seen"]}
                if last_eval.get("step") == step:  # the card shows the step's validation bits per byte
                    summaries[step]["val_bpb"] = last_eval["val_bpb"]
                save(args, checkpointer, step, model, optimizer, scheduler, loader, train_state, meta)
                last_save, last_saved_step = time.monotonic(), step
            for event in checkpointer.records():
                metrics.log(event)
            faults.after_step(step)
            if stopping:
                checkpointer.wait(reason="before stopping")  # the stop's checkpoint is committed on exit
                for event in checkpointer.records():
                    metrics.log(event)
                logger.warning("stopping at step %d on %s: checkpoint %s committed; exit code %d; the same "
                               "command resumes", step, stop.signal_name or "another rank's signal",
                               checkpointer.root / step_dirname(step), EXIT_STOPPED)
                metrics.log({"step": step, "event": "stopped_on_signal", "signal": stop.signal_name or "another rank",
                             "checkpoint": str(checkpointer.root / step_dirname(step)), "exit_code": EXIT_STOPPED})
                exit_code = EXIT_STOPPED
                break
    bar.close()
    checkpointer.close()  # the process never ends before the save in flight has committed
    for event in checkpointer.records():
        metrics.log(event)
    faults.probe(model, accelerator)
    if hub is not None:
        # A stop on a signal has a grace period to meet: uploads not done in a minute resume with the run.
        wait_s = args.hub_exit_timeout_minutes * 60 if exit_code != EXIT_STOPPED else min(60.0, args.hub_exit_timeout_minutes * 60)
        for what in hub.close(wait_s):
            logger.warning("hub upload not finished at exit: %s", what)
        for event in hub.events():
            metrics.log(event)
    metrics.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    stop.restore()
    if lock is not None:
        lock.release()
    # Teardown: a gloo worker thread frees the last finished all-gather (a decref that needs the
    # GIL) while the main thread, holding the GIL, destroys DDP's reducer -> process group ->
    # joins that worker: a deadlock seen here at exit. Sleeping hands the GIL to the workers, and
    # the wrapped objects are kept alive so that process exit, not a destructor, tears them down.
    if world > 1:
        time.sleep(0.2)
        _KEEP_ALIVE.extend([model, optimizer, scheduler])
    return exit_code


@contextlib.contextmanager
def close_on_error(checkpointer):
    try:
        yield
    except BaseException:
        try:
            checkpointer.close()
        except Exception as e:  # noqa: BLE001  (the original error is the one to report)
            logger.error("while stopping: %s", e)
        raise


def tokens_by_source(loader, accelerator) -> dict[str, int]:
    """Per-source tokens consumed by ALL ranks (each loader counts its own)."""
    names = sorted(loader.tokens_by_source)
    counts = torch.tensor([loader.tokens_by_source[n] for n in names], dtype=torch.float64)
    counts = all_reduce_sum(counts, accelerator.device).cpu()
    return {n: int(c) for n, c in zip(names, counts.tolist())}


def evaluate(model, val: dict[str, list[torch.Tensor]], byte_lengths: torch.Tensor) -> dict[str, dict]:
    """Held-out loss (nats/token) and bits per byte per source, beside the unigram and bigram
    baselines counted from the train shards (val_unigram, val_bigram, val_bigram_bpb, val_vs_bigram;
    training/evaluation.py). Every rank runs the same batches (FSDP needs every rank in every
    forward), so no reduction is needed; `genesis eval` on the saved checkpoint reproduces these."""
    return validation_metrics(model, val, byte_lengths)


def save(args, checkpointer, step, model, optimizer, scheduler, loader, train_state, meta) -> None:
    """Save the state of `step` (collective). Async: returns once the state is in host memory."""
    blocked = checkpointer.save(step, model=model, optimizer=optimizer, scheduler=scheduler,
                                train_state=dict(train_state), data_state=loader.state_dict(), meta=meta)
    # The next save's parent: committed by then (a save waits for the previous commit).
    train_state["parent_checkpoint"] = str(checkpointer.root / step_dirname(step))
    logger.info("step %d: checkpoint %s; training blocked %.2fs", step,
                "committed" if checkpointer.mode == "sync" else "staged, committing in the background", blocked)


def main(args: PretrainArguments) -> int:
    return train(args)


def cli_main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except ConfigError as e:
        print(f"pretrain: {e}", file=sys.stderr)
        return 2
    try:
        return main(args)
    except (ConfigError, ValueError, CheckpointError) as e:
        logging.getLogger("training.pretrain").error("%s", e)
        print(f"pretrain: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    rc = cli_main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Everything is flushed and committed; skip interpreter teardown (see the end of train()).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
