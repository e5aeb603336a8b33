"""Measuring the goal: hedging rate and curiosity score on held-out prompts.

Greedy answers to `alignment/data/eval_prompts.jsonl` (prompts that appear in no training file),
scored by the constitution scorer. The same prompts and scorer are used before SFT, after SFT and
after DPO, so the three rows of the table are comparable; results go to a markdown table and to
wandb (offline unless WANDB_API_KEY is set; the key itself is never logged).

    genesis align eval --model base=runs/export-40k --model sft=runs/align/sft --model dpo=runs/align/dpo
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_EVAL_PROMPTS = Path(__file__).resolve().parent / "data" / "eval_prompts.jsonl"
METRICS = ("hedging_rate", "curiosity", "hedging", "score", "mean_words")


def evaluate_model(model, tokenizer, prompts: list[str], scorer, max_new_tokens: int = 128, batch_size: int = 8,
                   keep_samples: int = 3) -> dict:
    """Greedy answers -> {n, hedging_rate, curiosity, hedging, score, mean_words, samples}."""
    from alignment.generate import generate_replies

    answers = [r[0] for r in generate_replies(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts],
                                              max_new_tokens=max_new_tokens, batch_size=batch_size)]
    scores = [scorer.score(p, a) for p, a in zip(prompts, answers)]
    n = len(scores)
    return {
        "n": n,
        "hedging_rate": sum(s.hedged for s in scores) / n,
        "curiosity": sum(s.curiosity for s in scores) / n,
        "hedging": sum(s.hedging for s in scores) / n,
        "score": sum(s.total for s in scores) / n,
        "mean_words": sum(s.details.get("words", 0.0) for s in scores) / n,
        "scorer": getattr(scorer, "name", type(scorer).__name__),
        "samples": [{"prompt": p, "answer": a} for p, a in list(zip(prompts, answers))[:keep_samples]],
    }


def evaluate_path(path: str | Path, prompts: list[str], scorer, device: str | None = None, **kwargs) -> dict:
    from alignment.generate import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(path, device=device)
    result = evaluate_model(model, tokenizer, prompts, scorer, **kwargs)
    result["model"] = str(path)
    return result


def format_table(results: dict[str, dict]) -> str:
    """{stage: result} -> markdown table, one row per stage, in insertion order."""
    lines = ["| stage | n | hedging rate | curiosity | hedging | score | words |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for stage, r in results.items():
        lines.append(
            f"| {stage} | {r['n']} | {r['hedging_rate']:.1%} | {r['curiosity']:.3f} | {r['hedging']:.3f} "
            f"| {r['score']:+.3f} | {r['mean_words']:.0f} |"
        )
    return "\n".join(lines)


def log_to_wandb(results: dict[str, dict], project: str = "genesis-align", run_name: str | None = None,
                 config: dict | None = None, wandb_dir: str | Path | None = None) -> str | None:
    """One wandb run with `<stage>/<metric>` summaries and a table; offline without an API key.

    Returns the run directory. `config` must not hold secrets: keys that look like tokens are dropped.
    """
    import wandb

    if not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")
    safe_config = {k: v for k, v in (config or {}).items() if "token" not in k.lower() and "key" not in k.lower()}
    wandb_dir = Path(wandb_dir) if wandb_dir else Path("runs") / "wandb"
    wandb_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, name=run_name, config=safe_config, dir=str(wandb_dir), job_type="eval",
                     reinit="finish_previous")
    table = wandb.Table(columns=["stage", *METRICS])
    for stage, r in results.items():
        table.add_data(stage, *[r[m] for m in METRICS])
        run.summary.update({f"{stage}/{m}": r[m] for m in METRICS})
    run.log({"alignment_eval": table})
    run_dir = run.dir
    run.finish()
    return run_dir
