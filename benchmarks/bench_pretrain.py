"""Pretraining benchmark: a few steps of the 1B recipe, a save and a resume, on the GPU(s) here.

Records tokens/s, MFU, peak memory and checkpoint save/load times in docs/benchmarks.md
(between <!-- pretrain:start --> and <!-- pretrain:end -->), with the GPU's name.

    python benchmarks/bench_pretrain.py                                   # one GPU, micro 4 x 2048, bf16
    python benchmarks/bench_pretrain.py --accelerate-config accelerate_configs/fsdp_2gpu_pcie.yaml
    python benchmarks/bench_pretrain.py --cpu-smoke --no-write             # the same flow, debug recipe, CPU

Data: the embedded corpus (tokenized with its 4,096-token tokenizer; the model keeps the 1B
recipe's 49,152-row embedding), so the numbers measure the trainer, not a dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARK_START, MARK_END = "<!-- pretrain:start -->", "<!-- pretrain:end -->"


def launch(config: str, recipe: str, out: Path, data: tuple[Path, Path], extra: list[str]) -> tuple[str, str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
           str(REPO / "training" / "pretrain.py"), "--config", recipe, "--output_dir", str(out),
           "--embedded_data", "", "--tokenizer_dir", str(data[0]), "--data_dir", str(data[1]),
           "--report_to", "none", "--no_progress_bar", "--eval_steps", "0", "--logging_steps", "1",
           "--save_minutes", "0", "--resume", "auto", *extra]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if res.returncode != 0:
        raise SystemExit(f"pretrain failed (rc {res.returncode}):\n{res.stderr[-6000:]}")
    return res.stdout, res.stderr


def main(args: argparse.Namespace) -> int:
    import torch

    from training.data.prepare import ensure_embedded_data

    if args.cpu_smoke:
        config, recipe, gpu = str(REPO / "accelerate_configs" / "cpu.yaml"), str(REPO / "training/recipes/debug.yaml"), "CPU"
        model_args = []
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_pretrain: needs a CUDA GPU (or --cpu-smoke)")
        config, recipe = args.accelerate_config, str(REPO / "training/recipes/genesis-1b.yaml")
        gpu = torch.cuda.get_device_name(0)
        model_args = ["--vocab_size", "49152", "--per_device_train_batch_size", str(args.micro_batch),
                      "--gradient_accumulation_steps", str(args.accum)]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-pretrain-"))
    data = ensure_embedded_data(work / "embedded")
    out = work / "run"
    steps = args.steps
    _, err1 = launch(config, recipe, out, data, [*model_args, "--max_steps", str(steps), "--save_steps", str(steps)])
    out2, err2 = launch(config, recipe, out, data, [*model_args, "--max_steps", str(steps + 2),
                                                    "--save_steps", str(steps + 2)])
    meta = json.loads((out / "checkpoints" / f"step-{steps + 2:08d}" / "meta.json").read_text())
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["step"] > 1]  # step 1 includes warm-up / compilation of kernels
    tok_s = statistics.median(r["tok_s_per_device"] for r in timed)
    mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
    mem = max((r.get("peak_mem_gb") or 0.0) for r in records)
    save_s = [float(m) for m in re.findall(r"checkpoint committed at \S+ in ([\d.]+)s", err1 + err2)]
    load_s = re.findall(r"load_seconds: ([\d.]+)", out2)
    rows = [
        ("GPU", gpu), ("accelerate config", Path(config).name),
        ("processes x micro-batch x seq len x accumulation", f"{meta['world_size']} x "
         f"{meta['per_device_train_batch_size']} x {meta['seq_len']} x {meta['gradient_accumulation_steps']}"),
        ("parameters", f"{meta['n_params']:,}"),
        ("tokens/s per device (median, steps 2+)", f"{tok_s:,.0f}"),
        ("MFU (median)", f"{statistics.median(mfus):.1%}" if mfus else "n/a"),
        ("peak memory (GiB)", f"{mem:.1f}" if mem else "n/a"),
        ("checkpoint save (s)", ", ".join(f"{s:.1f}" for s in save_s) or "n/a"),
        ("checkpoint load on resume (s)", load_s[0] if load_s else "n/a"),
        ("loss step 1 -> last", f"{records[0]['loss']:.3f} -> {records[-1]['loss']:.3f}"),
    ]
    table = "\n".join(["## Pretraining (benchmarks/bench_pretrain.py)", "", "| what | value |", "| --- | --- |",
                       *[f"| {k} | {v} |" for k, v in rows]])
    print(table)
    if not args.no_write:
        path = REPO / "docs" / "benchmarks.md"
        text = path.read_text() if path.exists() else "# Benchmarks\n"
        block = f"{MARK_START}\n{table}\n{MARK_END}"
        if MARK_START in text and MARK_END in text:
            text = text[: text.index(MARK_START)] + block + text[text.index(MARK_END) + len(MARK_END):]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
        path.write_text(text)
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--accelerate-config", default=str(REPO / "accelerate_configs" / "single_gpu.yaml"))
    p.add_argument("--steps", type=int, default=6, help="steps of the first run (the resume adds 2)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation (the seed: 32)")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--cpu-smoke", action="store_true", help="debug recipe on 2 CPU processes")
    p.add_argument("--no-write", action="store_true", help="print only")
    return p


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main(build_parser().parse_args()))
