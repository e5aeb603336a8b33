"""Model folder -> a `from_pretrained` folder (Genesis or Llama) or a GGUF file. The `genesis export`
command (training/export.py) also takes training checkpoints.

    genesis export runs/1b/checkpoints/step-00040000 exports/1b-40k           # training checkpoint
    genesis export exports/1b-40k exports/1b-40k-llama --format llama         # stock LlamaForCausalLM
    genesis export some-llama-folder exports/back --format genesis            # and back
    genesis export exports/1b-40k exports/1b-40k.gguf --format gguf --outtype q8_0   # llama.cpp, Ollama

Genesis uses Llama's weight names and config field names, so conversion is a
strict `load_state_dict` into the other class: any missing or unexpected
weight is an error, never a silent partial copy. DST must not exist, and the
folder is written under a temporary name and renamed, so a failed export leaves
nothing half-written. `--format gguf` writes one file (see `gguf_export.py`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from .configuration_genesis import GenesisConfig
from .gguf_export import OUTTYPES, GGUFExportError, write_gguf
from .modeling_genesis import GenesisForCausalLM

logger = logging.getLogger(__name__)

# Config fields both classes share, with the same meaning.
SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
FORMATS = ("genesis", "llama", "gguf")


class ExportError(ValueError):
    """A source that cannot be exported as asked; the message names the file or field."""


def _fields(config) -> dict:
    return {name: getattr(config, name) for name in SHARED_FIELDS}


def genesis_to_llama_config(config: GenesisConfig) -> LlamaConfig:
    return LlamaConfig(**_fields(config), pretraining_tp=1, dtype=config.dtype)


def llama_to_genesis_config(config: LlamaConfig, source: str = "config.json") -> GenesisConfig:
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        raise ExportError(f"{source}: pretraining_tp={config.pretraining_tp} is not supported (must be 1).")
    try:
        return GenesisConfig(**_fields(config), dtype=config.dtype)
    except ValueError as err:
        raise ExportError(f"{source}: not a Genesis-compatible Llama config: {err}") from err


def _model_type(src: Path) -> str:
    config_file = src / "config.json"
    if not config_file.is_file():
        found = sorted(p.name for p in src.iterdir())
        shown = ", ".join(found[:8]) + (f", ... ({len(found)} entries)" if len(found) > 8 else "")
        raise ExportError(
            f"{src} is neither a model folder (no config.json) nor a training checkpoint (no manifest.json); "
            f"found: {shown or 'nothing'}."
        )
    try:
        return json.loads(config_file.read_text())["model_type"]
    except (json.JSONDecodeError, KeyError) as err:
        raise ExportError(f"{config_file}: unreadable or missing field 'model_type' ({err}).") from err


def convert_model(src: str | Path, fmt: str):
    """Load the model in `src` and return it as a `fmt` ("genesis" or "llama") model with the same weights."""
    src = Path(src)
    model_type = _model_type(src)
    if model_type == "genesis":
        model = GenesisForCausalLM.from_pretrained(src)
        if fmt == "genesis":
            return model
        target = LlamaForCausalLM(genesis_to_llama_config(model.config))
    elif model_type == "llama":
        model = LlamaForCausalLM.from_pretrained(src)
        if fmt == "llama":
            return model
        target = GenesisForCausalLM(llama_to_genesis_config(model.config, str(src / "config.json")))
    else:
        raise ExportError(
            f"{src / 'config.json'}: model_type {model_type!r} is neither 'genesis' nor 'llama'."
        )
    # Same names, same shapes: a strict load proves the mapping is complete.
    target.load_state_dict(model.state_dict(), strict=True)
    target.to(next(model.parameters()).dtype)
    target.generation_config = model.generation_config
    return target


HEADS = {
    "AutoModel": "GenesisModel",
    "AutoModelForSequenceClassification": "GenesisForSequenceClassification",
    "AutoModelForTokenClassification": "GenesisForTokenClassification",
    "AutoModelForQuestionAnswering": "GenesisForQuestionAnswering",
}


def write_head_auto_map(folder: str | Path) -> None:
    """Add the backbone and the task heads to a saved Genesis folder's `auto_map`, beside the causal LM:
    `AutoModelForSequenceClassification.from_pretrained(export, trust_remote_code=True)` then starts a
    reward model from an export where genesis_hf is not installed (the code is already in the folder)."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    auto_map = config.get("auto_map") or {}
    if not str(auto_map.get("AutoModelForCausalLM", "")).startswith("modeling_genesis."):
        return
    for auto, cls in HEADS.items():
        auto_map.setdefault(auto, f"modeling_genesis.{cls}")
    config["auto_map"] = auto_map
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _copy_tokenizer(src: Path, dst: Path) -> bool:
    if not any((src / name).is_file() for name in TOKENIZER_FILES):
        return False
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return True


def _is_training_checkpoint(src: Path) -> bool:
    # Model folders never hold a manifest.json; committed training checkpoints always do.
    return (src / "manifest.json").is_file()


def export(src: str | Path, dst: str | Path, *, fmt: str = "genesis", push_to_hub: str | None = None,
           outtype: str | None = None) -> Path:
    """Write the model folder `src` as a `fmt` model folder at `dst`, or for
    fmt "gguf" as one GGUF file with 2-D weights in `outtype` (f32, bf16, f16 (default), q8_0)."""
    src, dst = Path(src), Path(dst)
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}.")
    if fmt == "gguf":
        outtype = outtype or "f16"
        if outtype not in OUTTYPES:
            raise ExportError(f"--outtype {outtype!r} is not supported; choose one of {', '.join(OUTTYPES)}.")
        if dst.suffix != ".gguf":
            raise ExportError(f"{dst}: --format gguf writes one file; name it *.gguf.")
        if push_to_hub:
            raise ExportError("--push-to-hub uploads folders; upload the .gguf with `hf upload REPO FILE`.")
    elif outtype is not None:
        raise ExportError(f"--outtype applies to --format gguf only (got --format {fmt}).")
    elif dst.suffix == ".gguf":
        raise ExportError(f"{dst}: a .gguf name for a {fmt} folder; did you mean --format gguf?")
    if not src.is_dir():
        raise ExportError(f"{src}: no such folder.")
    if dst.exists():
        raise ExportError(f"{dst} already exists; refusing to overwrite an export.")
    if _is_training_checkpoint(src):  # genesis_hf never imports the training package (docs: STYLE 11)
        raise ExportError(f"{src} is a training checkpoint; this function reads model folders. Export it with "
                          f"`genesis export {src} {dst}` (training.export.export).")

    if fmt == "gguf":
        model = convert_model(src, "llama")  # Llama names; a strict load proves the mapping is complete
        try:
            write_gguf(model.state_dict(), model.config, src, dst, outtype=outtype, name=src.name)
        except GGUFExportError as err:
            raise ExportError(str(err)) from err
        logger.info("exported %s -> %s (gguf, %s)", src, dst, outtype)
        return dst
    model = convert_model(src, fmt)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        if isinstance(model, GenesisForCausalLM):
            write_head_auto_map(tmp)
        if (
            isinstance(model, GenesisForCausalLM)
            and (src / "README.md").is_file()
            and _model_type(src) == "genesis"
        ):
            shutil.copy2(src / "README.md", tmp / "README.md")  # keep the run's card
        _copy_tokenizer(src, tmp)
        if (src / "generation_config.json").is_file():
            GenerationConfig.from_pretrained(src).save_pretrained(tmp)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %s -> %s (%s)", src, dst, fmt)
    if push_to_hub:
        from .hub import push_folder

        push_folder(dst, push_to_hub)
    return dst


__all__ = ["FORMATS", "ExportError", "convert_model", "export", "genesis_to_llama_config", "llama_to_genesis_config"]
