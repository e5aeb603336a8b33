"""The GPU check: one command, at most ~8 minutes on one H100/H200, results in docs/benchmarks.md.

    python benchmarks/gpu_check.py                  # one CUDA GPU
    python benchmarks/gpu_check.py --ranks 2        # two CUDA GPUs: the 2-rank run below, its own section
    python benchmarks/gpu_check.py --dry-run        # CPU, shapes reduced: proves the script (tests run it)
    python benchmarks/gpu_check.py --dry-run --ranks 2
    python benchmarks/gpu_check.py --prepare-only   # build the embedded tokenizer + shards and stop
    python benchmarks/gpu_check.py --calibrate      # one CUDA GPU, ~4-5 minutes (estimated): plan beside measurement
    python benchmarks/gpu_check.py --dry-run --calibrate

What it measures:
1. The 1B (GenesisConfig()) at micro-batch 4 x 2048, bf16, activation checkpointing per decoder
   layer, forward + backward: tokens/s, MFU (7.21 GFLOP/token at T=2048, PERFORMANCE.md) and peak
   memory; eager, then each decoder layer compiled; Genesis against transformers'
   LlamaForCausalLM holding the same weights, interleaved in the same process. Genesis eager also
   runs with deterministic algorithms on (what pretrain.py --deterministic sets), interleaved with
   the default: the cost of bit-exact resumes.
2. training/pretrain.py under the FSDP plugin (accelerate_configs/fsdp_2gpu_pcie.yaml with
   --num_processes 1) on the 1B shape for 20 steps, async saves at step 10 and 20 (the training
   stall and the time until commit); then a second run resumes from step 10 and saves step 20
   synchronously: resume seconds, the sync save, and the resume check. The rule (RESUME_RULE):
   step 11's loss is bit-equal (same weights, same batch, a deterministic forward); after it, loss
   and grad norm agree within LOSS_RTOL / GRAD_RTOL, because SDPA's flash-attention backward on
   CUDA is not deterministic by default. `--deterministic` runs both with pretrain.py
   --deterministic and requires every step bit-equal.
3. `--ranks 2` (two GPUs): pretrain.py on 2 ranks, the 1B shape, 1,010 steps with async saves at
   1,000 and at the end: each GPU's memory from NVML, a failure if any rank holds a context on
   another rank's GPU (the async writer thread once did), the host's pinned bytes; one table.
4. `--calibrate` (on its own, so the default check keeps its ~8 minutes): pretrain.py on the 1B at
   micro-batch 2, 4 and 8 (x 2048, accumulation 1, 14 steps, --ranks ranks) beside `genesis plan --json`
   of the same flags: peak allocated and reserved (pretrain.py's plan_vs_measured record at step 10),
   what NVML shows for the run's process, tokens/s; a table, and
   benchmarks/results/plan_calibration-<gpu>.json, from which `genesis plan calibrate` fits the profile.

Disk and host memory are checked first (two 1B checkpoints of 11.2 GiB at a time, up to 15 GiB
pinned), with one message saying what is missing; each phase deletes its run folder once measured.

The pretraining data is the embedded corpus (Python's own sources and docs). Building it needs the
`datasets` package; on a GPU machine without it, run `--prepare-only` where it is installed and
carry `runs/gpu_check/embedded` along (the device README's `carry`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks import _plan_calibration as cal  # noqa: E402
from benchmarks._gpu_rules import RESUME_RULE, check_room, compare_resume  # noqa: E402
from benchmarks._gpu_watch import Watch, foreign_contexts, gpu_snapshot, own_gpu, worker_pids  # noqa: E402
from benchmarks._report import REPORT, machine, write_section  # noqa: E402
from benchmarks.bench_model import pair, peak_bytes, sync, train_step  # noqa: E402
from genesis_hf import GenesisConfig  # noqa: E402
from training.checkpoint.layout import step_dirname  # noqa: E402
from training.fsdp import compile_decoder_layers  # noqa: E402
from training.metrics import flops_per_token, matmul_params, mfu, peak_flops  # noqa: E402

FSDP_CONFIG = REPO / "accelerate_configs" / "fsdp_2gpu_pcie.yaml"
SHIM = REPO / "tests" / "fsdp_on_cpu"  # --dry-run only: Accelerate's FSDP path on CPU ranks
DRY_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
LAYER_CLS = {"Genesis": "GenesisDecoderLayer", "Llama (transformers)": "LlamaDecoderLayer"}

_CUBLAS_SET_HERE = False  # main() set CUBLAS_WORKSPACE_CONFIG (for the deterministic rows) itself


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- 1. model speed


def timed(steps_by_name: dict, steps: int, warmup: int, device) -> dict[str, float]:
    """Median seconds per call of each zero-argument train step, interleaved, after `warmup`
    untimed calls (the compiled models compile there)."""
    for fn in steps_by_name.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in steps_by_name}
    for rep in range(steps):
        order = list(steps_by_name.items()) if rep % 2 == 0 else list(steps_by_name.items())[::-1]
        for name, fn in order:
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


@contextlib.contextmanager
def deterministic_algorithms():
    """What pretrain.py --deterministic turns on (training/run_setup.py apply_determinism), for the
    calls inside only. The flash-attention backward reads the flag at each call, so on and off
    interleave in one process; CUBLAS_WORKSPACE_CONFIG is set once in main() (on Hopper it equals
    torch's default workspace, so the other rows are unaffected)."""
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic = before[1]


def deterministic_step(model, ids) -> None:
    with deterministic_algorithms():
        train_step(model, ids)


def model_section(dry: bool, steps: int) -> str:
    device = torch.device("cpu" if dry else "cuda")
    config = GenesisConfig(**DRY_SHAPE) if dry else GenesisConfig()
    batch, seq = (2, 64) if dry else (4, 2048)
    models = pair(config, device, torch.bfloat16)
    for model in models.values():
        model.train().activation_checkpointing_enable()
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    peak, note = peak_flops(device)
    flops_tok = flops_per_token(config, seq, matmul_params(models["Genesis"]))
    rows, speed = [], {}
    g, ll, det = "Genesis", "Llama (transformers)", "eager, deterministic"
    det_error = None
    for mode in ("eager", "compiled"):
        if mode == "compiled":
            for name, model in models.items():
                compile_decoder_layers(model, LAYER_CLS[name])
        runs = {(name, mode): lambda m=model: train_step(m, ids) for name, model in models.items()}
        if mode == "eager":  # deterministic algorithms on, interleaved with the same model's default
            try:  # an op with no deterministic kernel raises: that is a finding, not the end of the check
                deterministic_step(models[g], ids)
                runs[(g, det)] = lambda m=models[g]: deterministic_step(m, ids)
            except RuntimeError as e:
                det_error = str(e).splitlines()[0]
                log(f"model: deterministic algorithms fail: {det_error}")
        log(f"model: {mode}, {steps} steps per model")
        t0 = time.perf_counter()
        times = timed(runs, steps, warmup=1 if mode == "eager" else 3, device=device)
        for (name, how), fn in runs.items():
            tok_s = batch * seq / times[(name, how)]
            speed[(name, how)] = tok_s
            util = mfu(tok_s, flops_tok, peak)
            mem = "n/a (CPU)" if dry else f"{peak_bytes(fn, device) / 2**30:.2f} GiB"
            rows.append(f"| {name} | {how} | {tok_s:,.0f} | {'n/a' if util is None else f'{util:.1%}'} | {mem} |")
        log(f"model: {mode} done in {time.perf_counter() - t0:.0f}s")
    return "\n".join([
        f"### The 1B, one GPU: {machine()}" + (" — DRY RUN, reduced shapes on CPU" if dry else ""),
        "",
        f"Forward + backward, micro-batch {batch} x {seq}, bf16 weights, activation checkpointing per decoder "
        f"layer, SDPA; median of {steps} interleaved steps; `compiled` = each decoder layer `torch.compile`d "
        f"(inductor) after the eager rows, with warm-up steps untimed; `{det}` = the eager Genesis with "
        "`torch.use_deterministic_algorithms(True)` and cudnn.deterministic (pretrain.py `--deterministic`), "
        "interleaved with the eager rows.",
        "",
        "| model | mode | tokens/s | MFU | peak memory above the weights |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"Genesis / Llama speed: eager **{speed[(g, 'eager')] / speed[(ll, 'eager')]:.2f}x**, compiled "
        f"**{speed[(g, 'compiled')] / speed[(ll, 'compiled')]:.2f}x**. Genesis compiled / eager: "
        f"**{speed[(g, 'compiled')] / speed[(g, 'eager')]:.2f}x**. Deterministic algorithms (bit-exact resumes) / "
        "default, Genesis eager: " + (f"**{speed[(g, det)] / speed[(g, 'eager')]:.2f}x** tokens/s." if det_error is None
                                      else f"**fails**: {det_error}"),
        "",
        f"Peak FLOPs: {note}. FLOPs/token {flops_tok / 1e9:.3g} G.",
    ])


# ----------------------------------------------------------------------------- 2. pretrain.py under FSDP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_data(root: Path, vocab: int) -> tuple[Path, Path]:
    from training.data.prepare import ensure_embedded_data

    return ensure_embedded_data(str(root), vocab_size=vocab)


def kill_tree(pid: int) -> None:
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        for proc in [*root.children(recursive=True), root]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


def recipe_path(dry: bool) -> str:
    return "training/recipes/" + ("debug.yaml" if dry else "genesis-1b.yaml")


def pretrain_overrides(out: Path, data: tuple[Path, Path], *extra: str, max_steps: int = 20,
                       save_steps: int = 10) -> list[str]:
    """What follows `pretrain.py --config RECIPE` in every run of the check."""
    tok_dir, data_dir = data
    return ["--output_dir", str(out), "--tokenizer_dir", str(tok_dir), "--data_dir", str(data_dir),
            "--embedded_data", "", "--mixture", "training/mixtures/embedded.yaml", "--report_to", "none",
            "--eval_steps", "0", "--logging_steps", "1", "--gradient_accumulation_steps", "1",
            "--max_steps", str(max_steps), "--warmup_steps", "5", "--save_steps", str(save_steps),
            "--save_minutes", "0", "--keep_last", "2", "--no_progress_bar", *extra]


def run_pretrain(dry: bool, out: Path, data: tuple[Path, Path], *extra: str, timeout: float, nproc: int = 1,
                 max_steps: int = 20, save_steps: int = 10, sample=None, every: float = 2.0) -> tuple[str, float]:
    """pretrain.py through the FSDP config (dry run: 2 CPU ranks through the shim). `sample(pid)`
    is called every `every` seconds with the launcher's pid while the run lasts."""
    nproc = max(nproc, 2) if dry else nproc
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
           "--num_processes", str(nproc), "--main_process_port", str(free_port()),
           str(REPO / "training" / "pretrain.py"), "--config", str(REPO / recipe_path(dry)),
           *pretrain_overrides(out, data, *extra, max_steps=max_steps, save_steps=save_steps)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if _CUBLAS_SET_HERE:  # main() set it for the model rows; pretrain.py sets it itself with --deterministic
        env.pop("CUBLAS_WORKSPACE_CONFIG", None)
    if dry:
        env |= {"GENESIS_TEST_FSDP_ON_CPU": "1",
                "PYTHONPATH": os.pathsep.join([str(SHIM), str(REPO), env.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    # Output through a file, not a pipe: a rank left holding a pipe cannot block the check.
    with tempfile.TemporaryFile("w+") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True)
        while True:
            if sample is not None:
                sample(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=every)  # returns the moment the run ends: `took` stays exact
                break
            if time.perf_counter() - t0 > timeout:
                kill_tree(proc.pid)
                proc.wait()
                log_file.seek(0)
                raise RuntimeError(f"pretrain.py ran past {timeout:.0f}s:\n{log_file.read()[-4000:]}")
        took = time.perf_counter() - t0
        log_file.seek(0)
        text = log_file.read()
    if proc.returncode != 0:
        raise RuntimeError(f"pretrain.py failed (rc {proc.returncode}):\n{text[-4000:]}")
    return text, took


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def metrics(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(out) if "loss" in r}


def saves(out: Path) -> list[dict]:
    """The run's per-save records (metrics.jsonl "checkpoint" events)."""
    return [r for r in records(out) if r.get("event") == "checkpoint"]



def pretrain_section(dry: bool, data: tuple[Path, Path], work: Path, deterministic: bool = False) -> tuple[str, bool]:
    first, second = work / "straight", work / "resumed"
    det = ("--deterministic",) if deterministic else ()
    log("pretrain: 20 steps under the FSDP plugin, saves at 10 and 20" + (", --deterministic" if det else ""))
    text1, took1 = run_pretrain(dry, first, data, "--save_mode", "async", *det, timeout=420)
    async_saves = saves(first)
    log(f"pretrain: straight run {took1:.0f}s, async saves {async_saves}")
    # Room: the resume needs step 10 only; step 20 has been measured.
    shutil.rmtree(first / "checkpoints" / step_dirname(20), ignore_errors=True)
    ckpt10 = first / "checkpoints" / step_dirname(10)
    text2, took2 = run_pretrain(dry, second, data, "--resume", str(ckpt10), "--save_mode", "sync", *det, timeout=420)
    sync_saves = saves(second)
    loads = re.findall(r"load_seconds: ([0-9.]+)", text2)[:1]
    a, b = metrics(first), metrics(second)
    shutil.rmtree(first, ignore_errors=True)
    shutil.rmtree(second, ignore_errors=True)
    check = compare_resume(a, b, range(11, 21), exact=deterministic)
    steady = [a[s] for s in range(3, 21) if s not in (10, 20)]
    tok_s = statistics.median(r["tok_s"] for r in steady)
    util = [r["mfu"] for r in steady if r.get("mfu") is not None]
    mem = max((r.get("peak_mem_gb") or 0.0) for r in a.values())
    mfu_text = f"{statistics.median(util):.1%}" if util else "n/a"
    setup = next((ln.split("FSDP2: ", 1)[1] for ln in text1.splitlines() if "FSDP2: " in ln), "not logged")
    flag = next((ln.split("deterministic: ", 1)[1] for ln in text1.splitlines() if "deterministic: " in ln),
                "not logged")
    rule = "every step bit-equal (--deterministic)" if deterministic else RESUME_RULE
    log(f"pretrain: resumed run {took2:.0f}s, resume check {'pass' if check.ok else 'FAIL'}, bit-exact {check.exact}")
    return "\n".join([
        f"### pretrain.py under the FSDP plugin: {machine()}" + (" — DRY RUN, debug.yaml on 2 CPU ranks" if dry else ""),
        "",
        f"`accelerate launch --config_file accelerate_configs/fsdp_2gpu_pcie.yaml --num_processes {2 if dry else 1} "
        f"training/pretrain.py --config training/recipes/{'debug' if dry else 'genesis-1b'}.yaml` on the embedded "
        "corpus, micro-batch x 1 accumulation, 20 steps, saves at 10 and 20; a second run resumes from step 10."
        + (" Both runs with `--deterministic`." if deterministic else ""),
        "",
        f"- FSDP setup: {setup}",
        f"- deterministic: {flag}",
        f"- tokens/s (median, steps 3-20 without the save steps): {tok_s:,.0f}; MFU {mfu_text}",
        f"- peak memory (max allocated): {mem:.1f} GiB" if mem else "- peak memory: n/a (CPU)",
        "- saves (sharded DCP + sha256 manifest + commit), training stall / until commit: async "
        + ", ".join(f"step {r['step']}: {r['blocked_s']:.2f} s / {r['total_s']:.1f} s" for r in async_saves)
        + "; sync " + ", ".join(f"step {r['step']}: {r['blocked_s']:.2f} s" for r in sync_saves),
        f"- resume load: {', '.join(f'{float(s):.1f} s' for s in loads) or 'see the log'}; wall time straight "
        f"run {took1:.0f} s, resumed run {took2:.0f} s",
        f"- resume check, steps 11-20 against the straight run: **{'pass' if check.ok else 'FAIL'}** (rule: {rule}); "
        f"bit-exact: **{check.exact}**; largest relative difference: loss {check.worst_loss:.3g}, grad norm "
        f"{check.worst_grad:.3g}" + ("".join(f"\n  - {p}" for p in check.problems[:5])),
    ]), check.ok


# ----------------------------------------------------------------------------- 3. two ranks


def ranks_section(dry: bool, data: tuple[Path, Path], work: Path, steps: int, save_step: int) -> tuple[str, bool]:
    """pretrain.py on 2 ranks with async saves; NVML watched from here while it runs."""
    out, watch = work / "ranks2", Watch()

    def sample(launcher: int) -> None:
        watch.add(None if dry else gpu_snapshot(), worker_pids(launcher))

    log(f"ranks 2: {steps} steps, async saves at {save_step} and {steps}")
    _, took = run_pretrain(dry, out, data, "--save_mode", "async", "--logging_steps", "1" if dry else "10",
                           "--warmup_steps", "2" if dry else "100", nproc=2, max_steps=steps, save_steps=save_step,
                           timeout=420 if dry else 3600, sample=sample, every=0.5 if dry else 2.0)
    recs = records(out)
    shutil.rmtree(out, ignore_errors=True)
    steps_logged = [r for r in recs if "loss" in r and "tok_s" in r]
    plan = next((r for r in recs if r.get("event") == "checkpoint_plan"), {})
    saved = [r for r in recs if r.get("event") == "checkpoint"]
    if dry:
        verdict, findings = None, ["dry run: no GPU to watch"]
    else:
        verdict, findings = foreign_contexts(watch.pids, watch.workers, ranks=2)
    ranks_of = {pid: rank for pid, rank in watch.workers.items()}
    gib = 2**30
    rows = [f"| run | 2 ranks, {steps} steps, async saves at step {save_step} and {steps}; wall time {took:.0f} s |",
            "| workers | " + (", ".join(f"rank {r}: pid {pid} (GPU {own_gpu(r)})" for pid, r in
                                      sorted(ranks_of.items(), key=lambda kv: kv[1])) or "not found") + " |"]
    if watch.samples:
        for gpu in sorted(watch.peak_used):
            who = ", ".join(f"pid {pid}" + (f" (rank {ranks_of[pid]})" if pid in ranks_of else "")
                            for pid in sorted(watch.pids.get(gpu, ()))) or "none"
            rows.append(f"| GPU {gpu}: memory in use, peak over {watch.samples} samples ({watch.source}) | "
                        f"{watch.peak_used[gpu] / gib:.2f} GiB |")
            rows.append(f"| GPU {gpu}: processes with a context | {who} |")
    else:
        rows.append("| GPU memory (NVML) | " + ("n/a: dry run on CPU" if dry else
                                                 "n/a: neither pynvml nor nvidia-smi answered") + " |")
    word = {True: "**pass**", False: "**FAIL**", None: "not checked"}[verdict]
    rows.append(f"| each rank's context on its own GPU only | {word}: {'; '.join(findings)} |")
    pinned = [r["host_pinned_gb"] for r in steps_logged if r.get("host_pinned_gb") is not None]
    rows.append("| host memory pinned, rank 0 (torch.cuda.host_memory_stats, peak of the logged steps) | "
                + (f"{max(pinned):.2f} GiB" if pinned else "n/a (no CUDA host allocator)") + " |")
    if plan.get("need_bytes") is not None:
        available = plan.get("available_bytes")
        rows.append(f"| async staging planned for this host (checkpoint_plan) | {plan['need_bytes'] / gib:.2f} GiB"
                    + (f" of {available / gib:.1f} GiB available" if available else "")
                    + f"; mode {plan.get('mode')} |")
    rows.append("| saves: training stall / until commit (size) | " + (", ".join(
        f"step {r['step']}: {r['blocked_s']:.2f} s / {r['total_s']:.1f} s ({r.get('bytes', 0) / gib:.2f} GiB)"
        for r in saved) or "none recorded") + " |")
    if steps_logged:
        mem = max((r.get("peak_mem_gb") or 0.0) for r in steps_logged)
        rows.append(f"| tokens/s, all ranks (median of the logged windows) | "
                    f"{statistics.median(r['tok_s'] for r in steps_logged):,.0f}"
                    + (f"; peak allocated rank 0 {mem:.1f} GiB" if mem else "") + " |")
    log(f"ranks 2: done in {took:.0f}s, contexts {word}")
    return "\n".join([
        f"### pretrain.py on 2 ranks: {machine()}" + (" — DRY RUN, debug.yaml on 2 CPU ranks" if dry else ""),
        "",
        "`accelerate launch --config_file accelerate_configs/fsdp_2gpu_pcie.yaml training/pretrain.py --config "
        f"training/recipes/{'debug' if dry else 'genesis-1b'}.yaml --max_steps {steps} --save_steps {save_step} "
        "--save_mode async`; NVML sampled from outside the run.",
        "",
        "| what | measured |",
        "| --- | --- |",
        *rows,
    ]), verdict is not False


# ----------------------------------------------------------------------------- 4. the plan beside the measurement

CALIBRATION_BATCHES = (2, 4, 8)
FSDP_REL = str(FSDP_CONFIG.relative_to(REPO))
DRY_PROFILE = "RTX 4090"  # the dry run plans for some card; CPU timings calibrate nothing


def calibration_section(dry: bool, data: tuple[Path, Path], work: Path, ranks: int, steps: int,
                        results: Path | None) -> tuple[str, bool]:
    """pretrain.py at micro-batch 2, 4 and 8, each beside `genesis plan --json` of the same flags (planned
    in child processes started first, on the CPU, while the runs train). Writes the results file."""
    from training.plan.preflight import profile_name
    from training.plan.profiles import lookup

    nproc = max(ranks, 2) if dry else ranks
    if dry:
        gpu_name, profile, vram = "CPU (dry run)", DRY_PROFILE, None
    else:
        gpu_name, total = cal.cuda_device()
        vram, profile = total / 2**30, profile_name(gpu_name, total)
        if profile is None:
            raise SystemExit(f"gpu_check --calibrate: {gpu_name} has no profile in training/plan/gpus.yaml; add one")
    extra_dry = ("--vocab_size", "4096") if dry else ()  # the model takes the embedded tokenizer's 4096
    started = {}
    for mb in CALIBRATION_BATCHES:
        out = work / f"calibrate-mb{mb}"
        extra = ("--per_device_train_batch_size", str(mb), "--save_mode", "sync", *extra_dry)
        overrides = pretrain_overrides(out, data, *extra, max_steps=steps, save_steps=0)
        started[mb] = (out, extra, overrides, cal.start_plan(recipe_path(dry), FSDP_REL, nproc, profile, vram,
                                                                  overrides, work / f"plan-mb{mb}.log"))
    rows, failed = [], []
    for mb, (out, extra, overrides, planner) in started.items():
        watch = None if dry else cal.CardWatch(tuple(own_gpu(r) for r in range(nproc)))
        if watch is not None:
            watch.start(gpu_snapshot())
        log(f"calibrate: micro-batch {mb}, {steps} steps on {nproc} rank(s), planned as {profile}")
        try:
            _, took = run_pretrain(dry, out, data, *extra, timeout=420 if dry else 600, nproc=nproc,
                                   max_steps=steps, save_steps=0, every=1.0,
                                   sample=None if watch is None else lambda _pid, w=watch: w.add(gpu_snapshot()))
            recs = records(out)
            plan = cal.plan_json(planner)
        except RuntimeError as e:  # e.g. the preflight refused a setting predicted not to fit: a finding
            failed.append({"per_device_train_batch_size": mb, "error": str(e)[-1500:]})
            log(f"calibrate: micro-batch {mb} failed: {str(e).splitlines()[0]}")
            continue
        finally:
            shutil.rmtree(out, ignore_errors=True)
        s = plan["setting"]
        tokens = s["per_device_train_batch_size"] * s["gradient_accumulation_steps"] * s["seq_len"] * nproc
        rows.append({"gpu_name": gpu_name, "profile": profile, "recipe": recipe_path(dry), "overrides": overrides,
                     "world_size": nproc, "accelerate_config": FSDP_REL, "plan": plan,
                     "preflight": next((r for r in recs if r.get("event") == "plan_vs_measured"), None),
                     "measured": cal.measured(recs, tokens, watch, took)})
        log(f"calibrate: micro-batch {mb}: {rows[-1]['measured']['tokens_per_s']:,.0f} tokens/s measured, "
            f"{plan['time']['tokens_per_s']:,.0f} planned")
    for _, _, _, planner in started.values():  # a run that failed early leaves its planner behind
        if planner.poll() is None:
            kill_tree(planner.pid)
    path = results or (cal.results_file(gpu_name) if not dry else Path(tempfile.gettempdir()) / "plan_calibration-dry.json")
    cal.write_results(path, rows, dry=dry, gpu_name=gpu_name, profile=profile, machine=machine(), failed=failed)
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    reserve = lookup(profile).allocator_reserve_fraction
    return "\n".join([
        f"### The plan beside the measurement: {machine()}" + (" — DRY RUN, debug.yaml on 2 CPU ranks" if dry else ""),
        "",
        f"Each row: `accelerate launch --config_file {FSDP_REL} --num_processes {nproc} training/pretrain.py --config "
        f"{recipe_path(dry)} --per_device_train_batch_size MB --gradient_accumulation_steps 1 --max_steps {steps} "
        f"--save_mode sync` on the embedded corpus, and `genesis plan --gpu \"{profile}\"` of the same flags "
        f"(the profile as this commit has it). Measured: max_memory_allocated and max_memory_reserved at step 10 "
        "(pretrain.py's `plan_vs_measured` record), the card total as NVML showed it for the run's process(es) "
        "(sampled every second), tokens/s the median of the steps from 3 on, all ranks. Ratios: plan / measured.",
        "",
        *cal.table(rows, reserve),
        *(f"\n- micro-batch {f['per_device_train_batch_size']}: **failed**: {f['error'].strip().splitlines()[-1]}"
          for f in failed),
        "",
        f"Rows, plans and measurements: `{shown}`. `genesis plan calibrate --from {shown}` fits the profile's "
        "constants to them (`--write` stores them in training/plan/gpus.yaml).",
    ]), not failed


def main(argv: list[str] | None = None) -> int:
    global _CUBLAS_SET_HERE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, reduced shapes; proves the script")
    parser.add_argument("--prepare-only", action="store_true", help="build the embedded tokenizer + shards, exit")
    parser.add_argument("--data-root", default=str(REPO / "runs" / "gpu_check" / "embedded"),
                        help="embedded tokenizer + shards (built here if missing)")
    parser.add_argument("--work-dir", default=None, help="where the runs write their checkpoints (default: the "
                                                         "system temporary folder); each phase deletes its own")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model (default 10; dry run 2)")
    parser.add_argument("--skip-model", action="store_true", help="only the pretrain.py check")
    parser.add_argument("--deterministic", action="store_true",
                        help="run the resume pair with pretrain.py --deterministic and require every step bit-equal")
    parser.add_argument("--ranks", type=int, choices=(1, 2), default=1,
                        help="2: only the two-GPU run of pretrain.py (its own section of the report)")
    parser.add_argument("--ranks-steps", type=int, default=None, help="--ranks 2: steps (default 1010; dry run 6)")
    parser.add_argument("--ranks-save-step", type=int, default=None,
                        help="--ranks 2: save every this many steps (default 1000; dry run 4)")
    parser.add_argument("--calibrate", action="store_true",
                        help="only the plan beside the measurement: pretrain.py at micro-batch 2, 4, 8 (--ranks ranks), "
                             "each with `genesis plan` of the same flags; its own section, and a results file for "
                             "`genesis plan calibrate`")
    parser.add_argument("--calibrate-steps", type=int, default=None,
                        help="--calibrate: steps per run (default 14: the plan_vs_measured record is at step 10; dry run 4)")
    parser.add_argument("--results", default=None, help="--calibrate: the results file (default "
                        "benchmarks/results/plan_calibration-<gpu>.json; the dry run: the system temporary folder)")
    parser.add_argument("--report", default=None, help="file to write the section to (default docs/benchmarks.md; "
                                                       "the dry run writes nowhere unless given)")
    args = parser.parse_args(argv)
    if not (args.dry_run or args.prepare_only) and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: use --dry-run to check the script on CPU")
    if args.ranks == 2 and not (args.dry_run or args.prepare_only) and torch.cuda.device_count() < 2:
        parser.error(f"--ranks 2 needs two CUDA GPUs, this machine has {torch.cuda.device_count()}")
    work_parent = Path(args.work_dir or tempfile.gettempdir())
    work_parent.mkdir(parents=True, exist_ok=True)
    if not args.prepare_only:
        config = GenesisConfig(**DRY_SHAPE) if args.dry_run else GenesisConfig()
        log(f"room: {check_room(config, args.dry_run, args.ranks, work_parent)}")
    data = prepare_data(Path(args.data_root), 4096)
    if args.prepare_only:
        log(f"data ready: {data}")
        return 0
    if not args.dry_run and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        # Before the first cuBLAS call: the deterministic rows need it (see deterministic_algorithms).
        os.environ["CUBLAS_WORKSPACE_CONFIG"], _CUBLAS_SET_HERE = ":4096:8", True
    t0 = time.perf_counter()
    sections, ok = [], True
    with tempfile.TemporaryDirectory(prefix="gpu_check-", dir=work_parent) as work:
        if args.calibrate:
            steps = args.calibrate_steps or (4 if args.dry_run else 14)
            text, ok = calibration_section(args.dry_run, data, Path(work), args.ranks, steps,
                                           Path(args.results) if args.results else None)
            sections.append(text)
        elif args.ranks == 2:
            steps = args.ranks_steps or (6 if args.dry_run else 1010)
            save_step = args.ranks_save_step or (4 if args.dry_run else 1000)
            text, ok = ranks_section(args.dry_run, data, Path(work), steps, save_step)
            sections.append(text)
        else:
            if not args.skip_model:
                sections.append(model_section(args.dry_run, args.steps or (2 if args.dry_run else 10)))
                if not args.dry_run:  # pretrain.py gets the GPU to itself: no compiled graphs or cached blocks of ours
                    torch._dynamo.reset()
                    gc.collect()
                    torch.cuda.empty_cache()
            text, ok = pretrain_section(args.dry_run, data, Path(work), args.deterministic)
            sections.append(text)
    name = "gpu_check_ranks2" if args.ranks == 2 else "gpu_check"
    title = "GPU check, two GPUs (`benchmarks/gpu_check.py --ranks 2`)" if args.ranks == 2 else \
        "GPU check (`benchmarks/gpu_check.py`)"
    if args.calibrate:
        name = "plan_calibration" + ("_ranks2" if args.ranks == 2 else "")
        title = f"Plan against measurement (`benchmarks/gpu_check.py --calibrate{' --ranks 2' if args.ranks == 2 else ''}`)"
    body = f"## {title}\n\n" + "\n\n".join(sections)
    body += f"\n\nWall time of the whole check: {time.perf_counter() - t0:.0f} s."
    print(body)
    if args.report or not args.dry_run:
        print(f"\nwrote {write_section(name, body, Path(args.report) if args.report else REPORT)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
