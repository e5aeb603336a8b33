"""Training checkpoint -> a `from_pretrained`-ready model folder.

    genesis export runs/genesis-1b/checkpoints/step-00040000 out/genesis-1b-40k [--format llama]

This module owns the `genesis export` command: a training checkpoint goes through
`export_checkpoint`, a model folder straight to `genesis_hf.export.export` (Genesis, Llama, GGUF).
The folder holds safetensors weights, config.json (+ the modeling code through
auto_map), the tokenizer, generation_config.json and a model card with the run's step, tokens,
loss, data mixture and parent checkpoint. Written to a temporary folder and renamed into place,
so an interrupted export never leaves a half folder under the final name.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


class ExportError(ValueError):
    """The checkpoint cannot be exported; the message names the path and the part."""


def _tokenizer(meta: dict, ckpt: Path, tokenizer_dir: str | Path | None):
    from transformers import AutoTokenizer

    from genesis_hf.tokenizer import tokenizer_fingerprint

    tok_dir = Path(tokenizer_dir or meta.get("tokenizer_dir") or "")
    if not tok_dir.is_dir():
        raise ExportError(f"{ckpt}: its tokenizer folder {str(tok_dir)!r} does not exist here; pass tokenizer_dir")
    fp = tokenizer_fingerprint(tok_dir)
    if meta.get("tokenizer_fingerprint") and fp != meta["tokenizer_fingerprint"]:
        raise ExportError(f"{tok_dir}: tokenizer fingerprint {fp[:12]} differs from the checkpoint's "
                          f"{meta['tokenizer_fingerprint'][:12]} ({ckpt})")
    return AutoTokenizer.from_pretrained(tok_dir)


def _generation_config(config, tokenizer):
    from transformers import GenerationConfig

    from genesis_hf.tokenizer import CHAT_STOP_TOKENS

    stop = [tokenizer.convert_tokens_to_ids(t) for t in CHAT_STOP_TOKENS if t in tokenizer.get_vocab()]
    return GenerationConfig(eos_token_id=stop or config.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=256)


def card_details(meta: dict, train_state: dict, ckpt: Path) -> dict:
    return {
        "title": f"Genesis ({meta.get('n_params', 0) / 1e9:.2f}B) at step {train_state.get('step')}"
        if meta.get("n_params", 0) >= 1e8 else f"Genesis (tiny) at step {train_state.get('step')}",
        "step": train_state.get("step"),
        "tokens seen": f"{train_state.get('tokens_seen', 0):,}",
        "last training loss": train_state.get("last_loss"),
        "data mixture": meta.get("mixture"),
        "tokens per step": f"{meta.get('tokens_per_step', 0):,}",
        "LR schedule": train_state.get("lr_schedule"),
        "checkpoint": str(ckpt),
        "parent checkpoint": train_state.get("parent_checkpoint"),
        "tokenizer fingerprint": meta.get("tokenizer_fingerprint"),
    }


def export_checkpoint(ckpt_dir: str | Path, dst: str | Path, *, push_to_hub: str | None = None,
                      tokenizer_dir: str | Path | None = None, dtype: str = "bfloat16") -> Path:
    """Export a committed training checkpoint to `dst` (which must not exist); returns `dst`.

    Single process, no process group: the sharded weights are read into one plain module.
    push_to_hub: a repo id; the upload runs in a background (non-daemon) thread with the token
    huggingface_hub finds in the environment (HF_TOKEN), never one we pass or store.
    """
    from genesis_hf import GenesisConfig, GenesisForCausalLM
    from genesis_hf.export import write_head_auto_map
    from genesis_hf.hub import write_model_card
    from training.checkpoint import load_model_weights, read_meta

    ckpt, dst = Path(ckpt_dir), Path(dst)
    if dst.exists():
        raise ExportError(f"{dst} already exists; refusing to overwrite an export")
    meta = read_meta(ckpt)  # CheckpointError if ckpt is not a committed checkpoint
    if "model_config" not in meta:
        raise ExportError(f"{ckpt}: meta.json has no model_config; not a Genesis pretraining checkpoint")
    train_state = json.loads((ckpt / "train_state.json").read_text()) if (ckpt / "train_state.json").is_file() else {}
    tokenizer = _tokenizer(meta, ckpt, tokenizer_dir)
    config = GenesisConfig.from_dict(meta["model_config"])
    model = GenesisForCausalLM(config)
    load_model_weights(ckpt, model)  # verifies the model files, loads the full unsharded weights
    model.to(getattr(torch, dtype))
    config.dtype = dtype

    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)  # safetensors, config.json with auto_map, modeling code
        write_head_auto_map(tmp)  # the task heads load from the export too (a reward model from it)
        tokenizer.save_pretrained(tmp)
        _generation_config(config, tokenizer).save_pretrained(tmp)
        write_model_card(tmp, config, card_details(meta, train_state, ckpt))
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %s (step %s) -> %s", ckpt, train_state.get("step"), dst)
    if push_to_hub:
        start_push(dst, push_to_hub)
    return dst


def start_push(folder: Path, repo_id: str) -> threading.Thread:
    """Upload in the background; the interpreter waits for the (non-daemon) thread at exit."""
    from genesis_hf.hub import push_folder

    def run():
        try:
            push_folder(folder, repo_id, commit_message=f"Upload {folder.name}")
        except Exception as e:  # reported, never raised into the training process
            logger.error("push of %s to %s failed: %s", folder, repo_id, e)

    thread = threading.Thread(target=run, name=f"push-{folder.name}", daemon=False)
    thread.start()
    logger.info("pushing %s to the Hub repo %s in the background", folder, repo_id)
    return thread


def export(src: str | Path, dst: str | Path, *, fmt: str = "genesis", push_to_hub: str | None = None,
           outtype: str | None = None) -> Path:
    """`genesis_hf.export.export` for model folders, and for training checkpoints too: a checkpoint
    becomes a Genesis folder first (export_checkpoint), then `fmt` (llama, gguf) from that."""
    from genesis_hf.export import ExportError as FolderExportError
    from genesis_hf.export import _is_training_checkpoint
    from genesis_hf.export import export as export_folder

    src, dst = Path(src), Path(dst)
    if not _is_training_checkpoint(src):
        return export_folder(src, dst, fmt=fmt, push_to_hub=push_to_hub, outtype=outtype)
    if fmt == "genesis" and outtype is None:
        return export_checkpoint(src, dst, push_to_hub=push_to_hub)
    if dst.exists():
        raise FolderExportError(f"{dst} already exists; refusing to overwrite an export.")
    staging = dst.with_name(f".{dst.name}.genesis-tmp")
    shutil.rmtree(staging, ignore_errors=True)
    export_checkpoint(src, staging)
    try:
        return export_folder(staging, dst, fmt=fmt, push_to_hub=push_to_hub, outtype=outtype)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cli_main(argv: list[str] | None = None) -> int:
    from genesis_hf.export import FORMATS, OUTTYPES
    from genesis_hf.export import ExportError as FolderExportError

    parser = argparse.ArgumentParser(
        prog="genesis export",
        description="Turn a training checkpoint or a model folder into a from_pretrained-ready folder.",
    )
    parser.add_argument("src", help="a training checkpoint (checkpoints/step-N) or a model folder")
    parser.add_argument("dst", help="the folder (or, for gguf, the .gguf file) to write; must not exist")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="genesis",
        help="genesis: GenesisForCausalLM (default); llama: a stock LlamaForCausalLM with the same weights; "
        "gguf: one file for llama.cpp and Ollama",
    )
    parser.add_argument(
        "--outtype",
        default=None,
        help=f"gguf only: type of the 2-D weights, one of {', '.join(OUTTYPES)} (default f16); norms stay f32",
    )
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        help="also upload the folder to this Hub repo (token from HF_TOKEN only)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = export(args.src, args.dst, fmt=args.format, push_to_hub=args.push_to_hub, outtype=args.outtype)
    except (ExportError, FolderExportError) as err:
        print(f"genesis export: error: {err}")
        return 2
    kind = f"gguf, {args.outtype or 'f16'}" if args.format == "gguf" else args.format
    print(f"exported {args.src} -> {out} ({kind})")
    return 0
