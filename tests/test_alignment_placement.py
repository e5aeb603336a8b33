"""Where the alignment scripts load the model on a CUDA machine, checked on CPU by telling TRL's loader
that it runs on GPU 1 (as rank 1 of `accelerate launch --config_file fsdp_2gpu_pcie.yaml` does)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from _alignment_fixtures import make_model_folder

from alignment.dpo import parse
from alignment.sft import model_init_kwargs

RECIPES = Path(__file__).resolve().parents[1] / "alignment" / "recipes"


def test_several_processes_load_on_cpu_not_spread_over_every_gpu(monkeypatch, tmp_path):
    """TRL's `create_model_from_path` asks for device_map="auto" on CUDA unless told otherwise (only
    MULTI_GPU and DeepSpeed runs are), and transformers balances "auto" over every visible GPU: under
    FSDP each rank would put part of its copy, and a CUDA context, on the other rank's card."""
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM

    seen = []
    monkeypatch.setattr(trl_utils, "PartialState", lambda: SimpleNamespace(device=torch.device("cuda", 1)))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda path, **kwargs: seen.append(kwargs.get("device_map", "unset")))
    base = make_model_folder(tmp_path)
    _, training_args, model_args = parse(["--config", str(RECIPES / "dpo-tiny.yaml"), "--model_name_or_path",
                                          str(base), "--output_dir", str(tmp_path / "out")])
    for world in ("2", "1"):
        monkeypatch.setenv("WORLD_SIZE", world)
        trl_utils.create_model_from_path(str(base), **model_init_kwargs(model_args, training_args))
    assert seen == [None, "auto"]  # several processes: CPU, then each rank's own GPU; one: TRL's choice
