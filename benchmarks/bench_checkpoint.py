"""Checkpoint cost: our atomic, sha256-manifested save/load against bare DCP on the same state.

    torchrun --nproc-per-node 2 benchmarks/bench_checkpoint.py --size small --write   # CPU, 2 gloo ranks
    torchrun --nproc-per-node 2 benchmarks/bench_checkpoint.py --size 1b --write      # 2 GPUs, FSDP2
    python benchmarks/bench_checkpoint.py --size 1b --write                           # 1 GPU, plain module
    python benchmarks/bench_checkpoint.py --async-compare 100m 300m --write           # sync vs async saves

The model is a Genesis of the chosen size with AdamW state (one zero-gradient step), sharded with
FSDP2 when there are several ranks. Each repeat times, interleaved: `save_checkpoint` (DCP shards +
JSON parts + parallel sha256 + commit rename) vs `dcp.save` of the same state dicts, and
`load_checkpoint` (verify="sha256" and "size") vs `dcp.load`. The ratio of medians is the price of
atomicity and verification. With --write the table goes to docs/benchmarks.md (section "checkpoint").
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._report import machine, write_section  # noqa: E402
from genesis_hf import GenesisConfig, GenesisForCausalLM  # noqa: E402
from training.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

SIZES = {
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4),
    "medium": dict(vocab_size=16384, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                   num_attention_heads=8, num_key_value_heads=4),
    "100m": dict(vocab_size=16384, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=6),
    "300m": dict(vocab_size=32768, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                 num_attention_heads=8, num_key_value_heads=4),
    "1b": {},  # GenesisConfig() is the 1B model
}  # fmt: skip


def build(size: str, device: torch.device, shard: bool):
    """Genesis on `device` with random weights and initialised AdamW state; built on meta first so
    the 1B model never exists unsharded."""
    with torch.device("meta"):
        model = GenesisForCausalLM(GenesisConfig(**SIZES[size]))
    if shard:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def timed(fn) -> float:
    if dist.is_initialized():
        dist.barrier()
    t = time.perf_counter()
    fn()
    if dist.is_initialized():
        dist.barrier()
    return time.perf_counter() - t


def main(size: str, repeat: int, workdir: str | None, write: bool) -> str:
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model, opt, sched = build(size, device, shard=world > 1)
    n_params = sum(p.numel() for p in model.parameters())  # a DTensor's numel is the global one
    root = Path(workdir or tempfile.gettempdir()) / "bench_checkpoint"
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    times: dict[str, list[float]] = {k: [] for k in ("ours save", "dcp save", "ours load sha256",
                                                     "ours load size", "dcp load")}  # fmt: skip
    kw = dict(model=model, optimizer=opt, scheduler=sched, train_state={}, data_state={}, meta={})
    for r in range(repeat):
        raw = root / f"raw-{r}"

        def ours_save(r=r):
            save_checkpoint(root / "ours", r + 1, **kw)

        def raw_save(raw=raw):
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=raw)

        pair = [("ours save", ours_save), ("dcp save", raw_save)]
        for name, fn in pair if r % 2 == 0 else pair[::-1]:
            times[name].append(timed(fn))
        ckpt = root / "ours" / f"step-{r + 1:08d}"

        def raw_load(raw=raw):
            msd, osd = get_state_dict(model, opt)
            dcp.load({"model": msd, "optim": osd}, checkpoint_id=raw)

        for verify in ("sha256", "size"):
            load = dict(model=model, optimizer=opt, scheduler=sched, verify=verify)
            times[f"ours load {verify}"].append(timed(lambda ckpt=ckpt, load=load: load_checkpoint(ckpt, **load)))
        times["dcp load"].append(timed(raw_load))
        if rank == 0:
            shutil.rmtree(raw, ignore_errors=True)
    gb = sum(f.stat().st_size for f in (root / "ours").rglob("*") if f.is_file()) / 2 / 1e9  # 2 kept
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [
        f"| {k} | {med[k]:.2f} | {gb / med[k]:.2f} | "
        f"{med[k] / med['dcp save' if 'save' in k else 'dcp load']:.2f}x |"
        for k in times
    ]
    body = "\n".join([
        "## Checkpoints: save and load",
        "",
        f"Machine: {machine()}; {world} rank(s){' (FSDP2)' if world > 1 else ''}. Model: Genesis `{size}`, "
        f"{n_params / 1e6:.0f}M parameters, AdamW state; checkpoint {gb:.2f} GB. Median of {repeat}, "
        "ours and bare DCP interleaved. `benchmarks/bench_checkpoint.py`.",
        "",
        "| operation | median s | GB/s | vs bare DCP |",
        "| --- | --- | --- | --- |",
        *rows,
    ])  # fmt: skip
    if rank == 0:
        print(body)
        if write:
            print(f"wrote {write_section('checkpoint', body)}")
        shutil.rmtree(root, ignore_errors=True)
    return body


def async_compare(sizes: list[str], repeat: int, workdir: str | None, write: bool) -> str:
    """Sync vs async saves through `Checkpointer` (what pretrain.py runs), one process: the stall
    training sees, the time until the commit, and the time to copy the same state in memory."""
    from training.checkpoint.async_save import Checkpointer, HostStager

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    rows = []
    for size in sizes:
        model, opt, sched = build(size, device, shard=False)
        n_params = sum(p.numel() for p in model.parameters())
        root = Path(workdir or tempfile.gettempdir()) / f"bench_checkpoint_async_{size}"
        shutil.rmtree(root, ignore_errors=True)
        kw = dict(model=model, optimizer=opt, scheduler=sched, train_state={}, data_state={}, meta={})
        ck = {m: Checkpointer(root / m, mode=m, keep_last=2, timeout_s=3600) for m in ("sync", "async")}
        # The memory-copy reference: a stager of its own copying the same state into buffers it
        # already holds, timed right before each pair of saves (the machine's load moves).
        msd, osd = get_state_dict(model, opt)
        stager = HostStager(pin_memory=device.type == "cuda")
        stager("model", msd), stager("optimizer", osd)
        staged_gb = stager.nbytes() / 1e9
        first_async = ck["async"].save(1, **kw)  # allocates the staging buffers (untimed below)
        ck["async"].close()
        ck["async"].records()
        res: dict[str, dict[str, list[float]]] = {m: {"blocked": [], "total": []} for m in ck}
        copy_s = []
        for r in range(repeat):
            t = time.perf_counter()
            stager("model", msd), stager("optimizer", osd)
            copy_s.append(time.perf_counter() - t)
            for mode in (("sync", "async") if r % 2 == 0 else ("async", "sync")):
                ck[mode].save(r + 2, **kw)
                ck[mode].close()
                (rec,) = ck[mode].records()
                res[mode]["blocked"].append(rec["blocked_s"])
                res[mode]["total"].append(rec["total_s"])
        gb = rec["bytes"] / 1e9
        med = {m: {k: statistics.median(v) for k, v in d.items()} for m, d in res.items()}
        copy = statistics.median(copy_s)
        rows.append(f"| `{size}` ({n_params / 1e6:.0f}M params, {gb:.2f} GB) | {med['sync']['blocked']:.2f} | "
                    f"{med['async']['blocked']:.2f} | {med['async']['total']:.2f} | {copy:.2f} | "
                    f"{med['async']['blocked'] / copy:.2f}x | {med['sync']['blocked'] / med['async']['blocked']:.0f}x | "
                    f"{first_async:.2f} | {staged_gb:.2f} |")
        shutil.rmtree(root, ignore_errors=True)
        del model, opt, sched, ck, stager, msd, osd
    body = "\n".join([
        "## Checkpoints: sync vs async saves",
        "",
        f"Machine: {machine()}; 1 process. `Checkpointer` as pretrain.py runs it (`save_mode`), Genesis of each "
        f"size with AdamW state; median of {repeat} saves per mode, interleaved, after one async save that "
        "allocated the staging buffers. *Stall*: the seconds training is blocked (sync: the whole save). "
        "*Until commit*: from the call to the committed rename, the background part included. *Copy in "
        "memory*: the same state copied into buffers that already exist (what staging does), same run. "
        "`python benchmarks/bench_checkpoint.py --async-compare 100m 300m --write`.",
        "",
        "| model | sync stall (s) | async stall (s) | async until commit (s) | copy in memory (s) | "
        "async stall / copy | sync / async stall | first async stall, buffers allocated (s) | staging memory (GB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ])  # fmt: skip
    print(body)
    if write:
        print(f"wrote {write_section('checkpoint_async', body)}")
    return body


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="small")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", default=None, help="where to write checkpoints (default: the temp dir)")
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    p.add_argument("--async-compare", nargs="+", choices=list(SIZES), default=None, metavar="SIZE",
                   help="instead: sync vs async saves at these sizes, one process (e.g. 100m 300m)")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse()
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")  # fmt: skip
    if "RANK" in os.environ:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    if args.async_compare:
        async_compare(args.async_compare, args.repeat, args.workdir, args.write)
    else:
        main(args.size, args.repeat, args.workdir, args.write)
    if dist.is_initialized():
        dist.destroy_process_group()
