"""Inspect checkpoints without a model or a process group.

    python -m training.checkpoint list runs/genesis-1b/checkpoints
    python -m training.checkpoint verify runs/genesis-1b/checkpoints/step-00040000 [--size-only]

`verify` checks what a resume would check for every rank (manifest, every part present, sizes,
sha256) and exits 1 with the checkpoint and the part named if anything is missing or wrong.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import layout as L
from ._runtime import CheckpointError


def verify(path: Path, size_only: bool = False) -> dict:
    """Verify a whole checkpoint (all ranks' parts). Returns its manifest; raises CheckpointError."""
    manifest = L.read_manifest(path)
    world = manifest.get("world_size", 1)
    required = ["meta", "model", "optimizer", "scheduler", "train_state"]
    required += [f"{k}/rank-{r:05d}" for k in ("rng", "data") for r in range(world)]
    L.verify_files(path, manifest, required, set() if size_only else None)
    L.read_meta(path)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.checkpoint", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_list = sub.add_parser("list", help="committed checkpoints under a root, and leftovers of killed saves")
    p_list.add_argument("root", type=Path)
    p_ver = sub.add_parser("verify", help="verify one checkpoint as a resume would (all ranks)")
    p_ver.add_argument("path", type=Path)
    p_ver.add_argument("--size-only", action="store_true", help="check sizes, skip sha256")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "list":
            for step, path in L.committed(args.root):
                m = L.read_manifest(path)
                size = sum(f["size"] for f in m["files"].values())
                print(f"{path}  step {step}  {size / 1e6:.1f} MB  world_size {m.get('world_size')}")
            for p in L.leftovers(args.root):
                print(f"{p}  (unfinished save or prune: not a checkpoint)")
            return 0
        m = verify(args.path, args.size_only)
        size = sum(f["size"] for f in m["files"].values())
        how = "sizes" if args.size_only else "sizes and sha256"
        print(f"OK {args.path}: step {m['step']}, {len(m['files'])} files, {size / 1e6:.1f} MB ({how})")
        return 0
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


cli_main = main

if __name__ == "__main__":
    sys.exit(main())
