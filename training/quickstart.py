"""`genesis quickstart`: the whole pipeline on CPU in minutes, with nothing to download.

    genesis quickstart                       # 3,200 steps, at most 4 minutes of pretraining on 2 cores
    genesis quickstart --max-steps 20        # shorter
    genesis quickstart --output-dir /tmp/qs  # elsewhere (default runs/quickstart)

1. trains a 1,024-token tokenizer on the embedded corpus (Python's own docs and sources) and
   prepares its shards (once; later runs verify them),
2. pretrains a tiny Genesis with the same main() as training/pretrain.py (one process, progress
   bar, checkpoints, metrics.jsonl; rerunning resumes, a larger --max-steps extends the run) and
   prints its held-out loss beside the bigram counted from the train shards (it ends >= 15% below),
3. exports the last checkpoint to a from_pretrained folder,
4. loads it with AutoModelForCausalLM and prints samples,
5. aligns it: one tiny cycle of constitution-guided SFT, curiosity-over-hedging DPO pairs, DPO
   (SFT-regularised, so answers keep their length) and the hedging/curiosity evaluation with
   degenerate output flagged (alignment/recipes/cycle-tiny.yaml; `--no-align` skips it).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

RECIPE = Path(__file__).resolve().parent / "recipes" / "quickstart.yaml"
PROMPTS = ["def ", "The ", "import "]

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genesis quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default="runs/quickstart", help="everything goes under here")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: the recipe's 3,200)")
    p.add_argument("--recipe", default=str(RECIPE), help="pretraining recipe")
    p.add_argument("--max-new-tokens", type=int, default=48, help="length of each sample")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-align", action="store_true", help="stop after pretraining (skip SFT and DPO)")
    return p


def ensure_embedded_data(root: Path, vocab_size: int = 4096) -> tuple[Path, Path]:
    from training.data.prepare import ensure_embedded_data as ensure

    return ensure(root, vocab_size=vocab_size)


def recipe_vocab_size(recipe: str | Path) -> int:
    import yaml

    return int(yaml.safe_load(Path(recipe).read_text(encoding="utf-8")).get("embedded_vocab_size") or 4096)


def versus_counting(metrics: Path) -> list[str]:
    """The last evaluation of the run beside the bigram baseline, one line per source."""
    import json

    evals = [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("val_bigram")]
    if not evals:
        return []
    r = evals[-1]
    return [f"{src}: val loss {r['val_loss'][src]:.3f} vs bigram {big:.3f} ({r['val_loss'][src] / big - 1:+.1%}), "
            f"unigram {r['val_unigram'][src]:.3f} (step {r['step']})" for src, big in sorted(r["val_bigram"].items())]


def samples(model_dir: Path, max_new_tokens: int, seed: int = 0) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import genesis_hf  # noqa: F401  (registers the model type)

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    out = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        # at least half the length: a tiny model ends documents early, and one line says little
        gen = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens // 2, do_sample=True,
                             temperature=0.8, top_p=0.95,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(gen[0], skip_special_tokens=True))
    return out


def main(args: argparse.Namespace) -> int:
    from training import pretrain
    from training.args import parse_args
    from training.checkpoint import latest_checkpoint
    from training.export import export_checkpoint

    root = Path(args.output_dir)
    n = 4 if args.no_align else 5
    print(f"[1/{n}] tokenizer + data from the embedded corpus under {root / 'embedded'} (first run: about a minute)")
    tok_dir, data_dir = ensure_embedded_data(root / "embedded", recipe_vocab_size(args.recipe))
    print(f"[2/{n}] pretraining a tiny Genesis on CPU -> {root / 'run'}")
    argv = ["--config", args.recipe, "--output_dir", str(root / "run"), "--embedded_data", "",
            "--tokenizer_dir", str(tok_dir), "--data_dir", str(data_dir), "--resume", "auto"]
    argv += ["--max_steps", str(args.max_steps)] if args.max_steps else []
    argv += ["--no_progress_bar"] if args.no_progress else []
    rc = pretrain.main(parse_args(argv))
    if rc:
        print(f"pretraining stopped with exit code {rc}; see the log above")
        return rc
    print("held-out loss vs counting (training/evaluation.py):")
    for line in versus_counting(root / "run" / "metrics.jsonl"):
        print(f"  {line}")
    ckpt = latest_checkpoint(root / "run" / "checkpoints")
    dst = root / "model" / ckpt.name
    print(f"[3/{n}] exporting {ckpt} -> {dst}")
    if not dst.exists():
        export_checkpoint(ckpt, dst)
    print(f"[4/{n}] samples from {dst} (load it with AutoModelForCausalLM.from_pretrained)")
    for text in samples(dst, args.max_new_tokens):
        print("-" * 60)
        print(text)
    print("-" * 60)
    print(f"metrics: {root / 'run' / 'metrics.jsonl'}\nmodel:   {dst}")
    if not args.no_align:
        align(dst, root / "align", ckpt.name)
    return 0


def align(model_dir: Path, out: Path, name: str) -> None:
    """Step 5: the tiny pretrain-then-align cycle on the export (reused when it already ran)."""
    from alignment.cycle import quickstart_align

    lineage = out / name / "lineage.json"
    print(f"[5/5] aligning {model_dir}: SFT on the constitution's conversations, DPO pairs, DPO -> {out / name}")
    if not lineage.is_file():
        quickstart_align(model_dir, output_dir=out, name=name)
    results = lineage.with_name("results.md")
    if results.is_file():
        print(results.read_text(encoding="utf-8"))
    print(f"aligned model: {out / name / 'dpo'}\nlineage:       {lineage}")


def cli_main(argv: list[str] | None = None) -> int:
    return main(build_parser().parse_args(argv))
