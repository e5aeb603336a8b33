"""DPO recipes by measurement: which loss, beta, LR and length of training keep the tiny model talking.

    python benchmarks/bench_dpo.py --parent runs/quickstart/model/step-00000600   # docs/alignment.md table

Runs the quickstart's tiny cycle once (alignment/recipes/cycle-tiny.yaml: export, SFT, pairs, DPO,
evaluation), then DPO again from the same SFT model on the same pairs for each variant below
(TRL DPOConfig arguments on top of alignment/recipes/dpo-tiny.yaml), each evaluated on the
held-out prompts with the same scorer. A variant is acceptable when it keeps >= 70% of SFT's mean
answer length, does not lower curiosity, does not raise the hedging rate, and no degeneracy flag
is raised (alignment/evaluate.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name -> DPOConfig overrides of dpo-tiny.yaml ("before": the recipe as it was when DPO collapsed)
VARIANTS: dict[str, list[str]] = {
    "before: sigmoid, lr 1e-3, 12 steps": ["--learning_rate", "1.0e-3", "--loss_type", "sigmoid", "--loss_weights", "1.0", "--beta", "0.1",
                                            "--max_steps", "12"],
    "sigmoid, lr 1e-4": ["--learning_rate", "1.0e-4", "--loss_type", "sigmoid", "--loss_weights", "1.0", "--beta", "0.1"],
    "sigmoid, lr 1e-4, beta 0.5": ["--learning_rate", "1.0e-4", "--loss_type", "sigmoid", "--loss_weights", "1.0", "--beta", "0.5"],
    "sigmoid_norm (length-normalised), lr 1e-4": ["--learning_rate", "1.0e-4", "--loss_type", "sigmoid_norm",
                                                  "--loss_weights", "1.0", "--beta", "0.1"],
    "RPO: sigmoid + sft, lr 1e-4": ["--learning_rate", "1.0e-4", "--loss_type", "sigmoid", "sft",
                                    "--loss_weights", "1.0", "1.0", "--beta", "0.1"],
    "RPO: sigmoid + sft, lr 3e-4": ["--learning_rate", "3.0e-4", "--loss_type", "sigmoid", "sft",
                                    "--loss_weights", "1.0", "1.0", "--beta", "0.1"],
    "RPO: sigmoid + sft, lr 3e-4, 24 steps (~4 epochs)": ["--learning_rate", "3.0e-4", "--loss_type", "sigmoid", "sft",
                                                          "--loss_weights", "1.0", "1.0", "--beta", "0.1",
                                                          "--max_steps", "24"],
    "RPO: sigmoid + 2 x sft, lr 3e-4, 24 steps": ["--learning_rate", "3.0e-4", "--loss_type", "sigmoid", "sft",
                                                  "--loss_weights", "1.0", "2.0", "--beta", "0.1", "--max_steps", "24"],
    "RPO: sigmoid + sft, lr 3e-4, 36 steps (~6 epochs)": ["--learning_rate", "3.0e-4", "--loss_type", "sigmoid", "sft",
                                                          "--loss_weights", "1.0", "1.0", "--beta", "0.1",
                                                          "--max_steps", "36"],
    "ipo, lr 1e-4": ["--learning_rate", "1.0e-4", "--loss_type", "ipo", "--loss_weights", "1.0", "--beta", "0.1"],
}


def acceptable(sft: dict, dpo: dict, flags: list[str]) -> bool:
    return (dpo["mean_words"] >= 0.7 * sft["mean_words"] and dpo["curiosity"] >= sft["curiosity"]
            and dpo["hedging_rate"] <= sft["hedging_rate"] and not flags)


def run(parent: str, work: Path, names: list[str]) -> dict:
    from alignment.cycle import load_cycle_config, run_cycle
    from alignment.data import read_prompts
    from alignment.dpo import main as dpo_main
    from alignment.dpo import parse as dpo_parse
    from alignment.evaluate import degeneracy_flags, evaluate_path
    from alignment.pairs import read_seed_pairs
    from alignment.scorer import get_scorer

    cfg = load_cycle_config("alignment/recipes/cycle-tiny.yaml", {"parent": parent, "output_dir": str(work),
                                                                    "name": "cycle", "report_to_wandb": False})
    cycle = work / "cycle"
    lineage = json.loads((cycle / "lineage.json").read_text()) if (cycle / "lineage.json").is_file() else run_cycle(cfg)
    prompts = read_prompts(ROOT / cfg["eval"]["prompts"])
    kwargs = {"max_new_tokens": cfg["eval"]["max_new_tokens"], "pairs": read_seed_pairs(ROOT / cfg["eval"]["pairs"])}
    scorer = get_scorer("rule")
    scores = {stage: evaluate_path(cycle / stage, prompts, scorer, **kwargs) for stage in ("base", "sft")}
    for name in names:
        out = work / f"dpo-{list(VARIANTS).index(name)}"
        if not (out / "model.safetensors").is_file():
            dpo_main(*dpo_parse(["--config", cfg["dpo_recipe"], "--model_name_or_path", str(cycle / "sft"),
                                 "--output_dir", str(out), "--dataset_name", str(cycle / "pairs.jsonl"),
                                 *VARIANTS[name]]))
        scores[name] = evaluate_path(out, prompts, scorer, **kwargs)
    flags = {n: degeneracy_flags({"sft": scores["sft"], n: r})[n] for n, r in scores.items() if n not in ("base", "sft")}
    return {"scores": scores, "flags": flags, "pairs": lineage["data"].get("pairs")}


def table(res: dict) -> str:
    sft = res["scores"]["sft"]
    lines = ["| stage / DPO variant | hedging rate | curiosity | score | words | words vs SFT | pref. acc. | "
             "flags | acceptable |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["scores"].items():
        flags = res["flags"].get(name, [])
        ok = "-" if name in ("base", "sft") else ("yes" if acceptable(sft, r, flags) else "no")
        lines.append(f"| {name} | {r['hedging_rate']:.1%} | {r['curiosity']:.3f} | {r['score']:+.3f} | "
                     f"{r['mean_words']:.1f} | {r['mean_words'] / max(sft['mean_words'], 1e-9):.0%} | "
                     f"{r.get('pref_accuracy', float('nan')):.0%} | {'; '.join(flags) or 'ok'} | {ok} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parent", required=True, help="the quickstart's pretraining checkpoint or export")
    p.add_argument("--work", default="runs/bench-dpo")
    p.add_argument("--only", default=None, help="comma-separated variant indices")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    names = list(VARIANTS)
    if args.only:
        names = [names[int(i)] for i in args.only.split(",")]
    res = run(args.parent, Path(args.work), names)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
