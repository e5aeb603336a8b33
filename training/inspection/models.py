"""Load a model to look at: an export (a `from_pretrained` folder) or a committed training
checkpoint read directly (no export step), and list the checkpoints of a run.

    model, tokenizer, info = load_model("runs/genesis-1b/checkpoints/step-00020000")
    model, tokenizer, info = load_model("out/genesis-1b-40k")
    expand_paths(["runs/genesis-1b"])   # -> every committed checkpoint of the run, oldest first
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from . import InspectError

logger = logging.getLogger(__name__)


@dataclass
class ModelInfo:
    path: Path
    kind: str  # "export" or "checkpoint"
    label: str  # short name for tables and UI columns
    step: int | None = None
    seq_len: int | None = None  # the training window, when known (checkpoints)
    data_dir: str | None = None  # the run's prepared data, when known (checkpoints)


def kind_of(path: str | Path) -> str:
    """'export' | 'checkpoint', or InspectError saying what the folder lacks."""
    path = Path(path)
    if not path.exists():
        raise InspectError(f"{path}: no such folder")
    if not path.is_dir():
        raise InspectError(f"{path}: not a folder (expected an exported model or a training checkpoint)")
    if (path / "manifest.json").is_file():
        return "checkpoint"
    if (path / "config.json").is_file():
        return "export"
    raise InspectError(f"{path}: neither an exported model (no config.json) nor a training checkpoint "
                       "(no manifest.json)")


def expand_paths(paths: list[str | Path]) -> list[Path]:
    """Exports and checkpoints as given; an output folder or a checkpoints root becomes its
    committed checkpoints (oldest first). Anything else -> InspectError naming it."""
    from training.checkpoint.layout import committed

    out: list[Path] = []
    for p in map(Path, paths):
        roots = [p / "checkpoints", p]
        found = next((committed(r) for r in roots if r.is_dir() and committed(r)), None)
        if found and not (p / "manifest.json").is_file():
            out += [c for _, c in found]
        else:
            kind_of(p)
            out.append(p)
    return out


def _label(path: Path, kind: str, step: int | None) -> str:
    if kind == "checkpoint":
        run = path.parent.parent.name if path.parent.name == "checkpoints" else path.parent.name
        return f"{run}@{step}"
    return path.name


def load_model(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               tokenizer_dir: str | Path | None = None):
    """(model in eval mode on `device`, tokenizer, ModelInfo). Checkpoints: Genesis weights from
    the DCP shards (sha256-verified) and the tokenizer the run used (meta.json's tokenizer_dir,
    or `tokenizer_dir`). Every failure is an InspectError naming the path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import genesis_hf  # noqa: F401  (registers "genesis" with the Auto classes)
    from training.checkpoint import CheckpointError, load_model_weights, read_meta

    path = Path(path)
    kind = kind_of(path)
    if kind == "export":
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or path)
        except (OSError, ValueError, KeyError) as e:
            raise InspectError(f"{path}: cannot load the exported model: {e}") from e
        info = ModelInfo(path, kind, _label(path, kind, None))
    else:
        from genesis_hf import GenesisConfig, GenesisForCausalLM

        try:
            meta = read_meta(path)
        except CheckpointError as e:
            raise InspectError(str(e)) from e
        if "model_config" not in meta:
            raise InspectError(f"{path}: meta.json has no model_config; not a Genesis pretraining checkpoint")
        tok_dir = Path(tokenizer_dir or meta.get("tokenizer_dir") or "")
        if not (tok_dir / "tokenizer.json").is_file() and not (tok_dir / "tokenizer_config.json").is_file():
            raise InspectError(f"{path}: the run's tokenizer folder {str(tok_dir)!r} is not here; pass "
                               "--tokenizer DIR")
        model = GenesisForCausalLM(GenesisConfig.from_dict(meta["model_config"]))
        try:
            load_model_weights(path, model)
        except CheckpointError as e:
            raise InspectError(str(e)) from e
        model.to(dtype)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        step = meta.get("step")
        info = ModelInfo(path, kind, _label(path, kind, step), step=step, seq_len=meta.get("seq_len"),
                         data_dir=meta.get("data_dir"))
    model.to(device).eval()
    return model, tokenizer, info


class ModelCache:
    """The last `size` loaded models, so that switching back and forth does not reload from disk."""

    def __init__(self, size: int = 4, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.size, self.device, self.dtype = size, device, dtype
        self._items: dict[str, tuple] = {}

    def get(self, path: str | Path):
        key = str(Path(path).resolve())
        if key in self._items:
            self._items[key] = self._items.pop(key)  # most recently used last
            return self._items[key]
        item = load_model(path, device=self.device, dtype=self.dtype)
        self._items[key] = item
        while len(self._items) > self.size:
            self._items.pop(next(iter(self._items)))
        return item
