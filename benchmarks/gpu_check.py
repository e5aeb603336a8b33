"""The GPU check: one command, at most ~8 minutes on one H100/H200, results in docs/benchmarks.md.

    python benchmarks/gpu_check.py                  # one CUDA GPU
    python benchmarks/gpu_check.py --dry-run        # CPU, shapes reduced: proves the script (tests run it)
    python benchmarks/gpu_check.py --prepare-only   # build the embedded tokenizer + shards and stop

What it measures:
1. The 1B (GenesisConfig()) at micro-batch 4 x 2048, bf16, activation checkpointing per decoder
   layer, forward + backward: tokens/s, MFU (7.21 GFLOP/token at T=2048, PERFORMANCE.md) and peak
   memory; eager, then each decoder layer compiled; Genesis against transformers'
   LlamaForCausalLM holding the same weights, interleaved in the same process.
2. training/pretrain.py under the FSDP plugin (accelerate_configs/fsdp_2gpu_pcie.yaml with
   --num_processes 1) on the 1B shape for 20 steps, async saves at step 10 and 20 (the training
   stall and the time until commit); then a second run resumes from step 10 and saves step 20
   synchronously: resume seconds, the sync save, and whether steps 11-20 repeat exactly.

The pretraining data is the embedded corpus (Python's own sources and docs). Building it needs the
`datasets` package; on a GPU machine without it, run `--prepare-only` where it is installed and
carry `runs/gpu_check/embedded` along (the device README's `carry`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
from benchmarks._report import REPORT, machine, write_section  # noqa: E402
from benchmarks.bench_model import pair, peak_bytes, sync, train_step  # noqa: E402
from genesis_hf import GenesisConfig  # noqa: E402
from training.fsdp import compile_decoder_layers  # noqa: E402
from training.metrics import flops_per_token, matmul_params, mfu, peak_flops  # noqa: E402

FSDP_CONFIG = REPO / "accelerate_configs" / "fsdp_2gpu_pcie.yaml"
SHIM = REPO / "tests" / "fsdp_on_cpu"  # --dry-run only: Accelerate's FSDP path on CPU ranks
DRY_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
LAYER_CLS = {"Genesis": "GenesisDecoderLayer", "Llama (transformers)": "LlamaDecoderLayer"}


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- 1. model speed


def timed(models: dict, ids, steps: int, warmup: int, device) -> dict[str, float]:
    """Median seconds per train step for each model, interleaved, after `warmup` untimed steps
    (the compiled models compile there)."""
    for model in models.values():
        for _ in range(warmup):
            train_step(model, ids)
    times = {name: [] for name in models}
    for rep in range(steps):
        order = list(models.items()) if rep % 2 == 0 else list(models.items())[::-1]
        for name, model in order:
            sync(device)
            t0 = time.perf_counter()
            train_step(model, ids)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


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
    for mode in ("eager", "compiled"):
        if mode == "compiled":
            for name, model in models.items():
                compile_decoder_layers(model, LAYER_CLS[name])
        log(f"model: {mode}, {steps} steps per model")
        t0 = time.perf_counter()
        times = timed(models, ids, steps, warmup=1 if mode == "eager" else 3, device=device)
        for name, model in models.items():
            tok_s = batch * seq / times[name]
            speed[(name, mode)] = tok_s
            util = mfu(tok_s, flops_tok, peak)
            mem = "n/a (CPU)" if dry else f"{peak_bytes(lambda m=model: train_step(m, ids), device) / 2**30:.2f} GiB"
            rows.append(f"| {name} | {mode} | {tok_s:,.0f} | {'n/a' if util is None else f'{util:.1%}'} | {mem} |")
        log(f"model: {mode} done in {time.perf_counter() - t0:.0f}s")
    g, ll = "Genesis", "Llama (transformers)"
    return "\n".join([
        f"### The 1B, one GPU: {machine()}" + (" — DRY RUN, reduced shapes on CPU" if dry else ""),
        "",
        f"Forward + backward, micro-batch {batch} x {seq}, bf16 weights, activation checkpointing per decoder "
        f"layer, SDPA; median of {steps} interleaved steps; `compiled` = each decoder layer `torch.compile`d "
        f"(inductor) after the eager rows, with warm-up steps untimed.",
        "",
        "| model | mode | tokens/s | MFU | peak memory above the weights |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"Genesis / Llama speed: eager **{speed[(g, 'eager')] / speed[(ll, 'eager')]:.2f}x**, compiled "
        f"**{speed[(g, 'compiled')] / speed[(ll, 'compiled')]:.2f}x**. Genesis compiled / eager: "
        f"**{speed[(g, 'compiled')] / speed[(g, 'eager')]:.2f}x**.",
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


def run_pretrain(dry: bool, out: Path, data: tuple[Path, Path], *extra: str, timeout: float) -> tuple[str, float]:
    tok_dir, data_dir = data
    nproc = 2 if dry else 1
    recipe = "debug.yaml" if dry else "genesis-1b.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
           "--num_processes", str(nproc), "--main_process_port", str(free_port()),
           str(REPO / "training" / "pretrain.py"), "--config", str(REPO / "training" / "recipes" / recipe),
           "--output_dir", str(out), "--tokenizer_dir", str(tok_dir), "--data_dir", str(data_dir),
           "--embedded_data", "", "--mixture", "training/mixtures/embedded.yaml", "--report_to", "none",
           "--eval_steps", "0", "--logging_steps", "1", "--gradient_accumulation_steps", "1",
           "--max_steps", "20", "--warmup_steps", "5", "--save_steps", "10", "--save_minutes", "0",
           "--keep_last", "2", "--no_progress_bar", *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if dry:
        env |= {"GENESIS_TEST_FSDP_ON_CPU": "1",
                "PYTHONPATH": os.pathsep.join([str(SHIM), str(REPO), env.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"pretrain.py failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr, took


def metrics(out: Path) -> dict[int, dict]:
    recs = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            recs[r["step"]] = r
    return recs


def saves(out: Path) -> list[dict]:
    """The run's per-save records (metrics.jsonl "checkpoint" events)."""
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r.get("event") == "checkpoint"]


def pretrain_section(dry: bool, data: tuple[Path, Path], work: Path) -> str:
    first, second = work / "straight", work / "resumed"
    log("pretrain: 20 steps under the FSDP plugin, saves at 10 and 20")
    text1, took1 = run_pretrain(dry, first, data, "--save_mode", "async", timeout=420)
    async_saves = saves(first)
    log(f"pretrain: straight run {took1:.0f}s, async saves {async_saves}")
    ckpt10 = first / "checkpoints" / "step-00000010"
    text2, took2 = run_pretrain(dry, second, data, "--resume", str(ckpt10), "--save_mode", "sync", timeout=420)
    sync_saves = saves(second)
    loads = re.findall(r"load_seconds: ([0-9.]+)", text2)[:1]
    a, b = metrics(first), metrics(second)
    same = all(a[s]["loss"] == b[s]["loss"] and a[s]["grad_norm"] == b[s]["grad_norm"] for s in range(11, 21))
    worst = max(abs(a[s]["loss"] - b[s]["loss"]) for s in range(11, 21))
    steady = [a[s] for s in range(3, 21) if s not in (10, 20)]
    tok_s = statistics.median(r["tok_s"] for r in steady)
    util = [r["mfu"] for r in steady if r.get("mfu") is not None]
    mem = max((r.get("peak_mem_gb") or 0.0) for r in a.values())
    mfu_text = f"{statistics.median(util):.1%}" if util else "n/a"
    setup = next((ln.split("FSDP2: ", 1)[1] for ln in text1.splitlines() if "FSDP2: " in ln), "not logged")
    log(f"pretrain: resumed run {took2:.0f}s, steps 11-20 identical: {same}")
    return "\n".join([
        f"### pretrain.py under the FSDP plugin: {machine()}" + (" — DRY RUN, debug.yaml on 2 CPU ranks" if dry else ""),
        "",
        f"`accelerate launch --config_file accelerate_configs/fsdp_2gpu_pcie.yaml --num_processes {2 if dry else 1} "
        f"training/pretrain.py --config training/recipes/{'debug' if dry else 'genesis-1b'}.yaml` on the embedded "
        "corpus, micro-batch x 1 accumulation, 20 steps, saves at 10 and 20; a second run resumes from step 10.",
        "",
        f"- FSDP setup: {setup}",
        f"- tokens/s (median, steps 3-20 without the save steps): {tok_s:,.0f}; MFU {mfu_text}",
        f"- peak memory (max allocated): {mem:.1f} GiB" if mem else "- peak memory: n/a (CPU)",
        "- saves (sharded DCP + sha256 manifest + commit), training stall / until commit: async "
        + ", ".join(f"step {r['step']}: {r['blocked_s']:.2f} s / {r['total_s']:.1f} s" for r in async_saves)
        + "; sync " + ", ".join(f"step {r['step']}: {r['blocked_s']:.2f} s" for r in sync_saves),
        f"- resume load: {', '.join(f'{float(s):.1f} s' for s in loads) or 'see the log'}; wall time straight "
        f"run {took1:.0f} s, resumed run {took2:.0f} s",
        f"- steps 11-20 after the resume equal the straight run's (loss and grad norm): **{same}** "
        f"(largest loss difference {worst:.3g})",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, reduced shapes; proves the script")
    parser.add_argument("--prepare-only", action="store_true", help="build the embedded tokenizer + shards, exit")
    parser.add_argument("--data-root", default=str(REPO / "runs" / "gpu_check" / "embedded"),
                        help="embedded tokenizer + shards (built here if missing)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model (default 10; dry run 2)")
    parser.add_argument("--skip-model", action="store_true", help="only the pretrain.py check")
    parser.add_argument("--report", default=None, help="file to write the section to (default docs/benchmarks.md; "
                                                       "the dry run writes nowhere unless given)")
    args = parser.parse_args(argv)
    if not (args.dry_run or args.prepare_only) and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: use --dry-run to check the script on CPU")
    data = prepare_data(Path(args.data_root), 4096)
    if args.prepare_only:
        log(f"data ready: {data}")
        return 0
    t0 = time.perf_counter()
    sections = []
    if not args.skip_model:
        sections.append(model_section(args.dry_run, args.steps or (2 if args.dry_run else 10)))
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as work:
        sections.append(pretrain_section(args.dry_run, data, Path(work)))
    body = "## GPU check (`benchmarks/gpu_check.py`)\n\n" + "\n\n".join(sections)
    body += f"\n\nWall time of the whole check: {time.perf_counter() - t0:.0f} s."
    print(body)
    if args.report or not args.dry_run:
        print(f"\nwrote {write_section('gpu_check', body, Path(args.report) if args.report else REPORT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
