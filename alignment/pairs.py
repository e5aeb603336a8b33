"""Preference pairs that reward curiosity and penalise hedging.

For each prompt: sample k answers from the model, score each with the constitution scorer, and
keep (best, worst) as (chosen, rejected) when the score gap is at least `min_margin`; prompts whose
answers all score alike carry no preference and are skipped (counted). Seed pairs written by hand
(alignment/data/preference_seeds.jsonl) can be appended. Output is TRL's conversational
preference format, one JSON object per line, written atomically:

    {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}],
     "rejected": [{"role": "assistant", ...}], "score_chosen": 0.61, "score_rejected": -0.4}

    genesis align pairs --model runs/align/sft --prompts alignment/data/pair_prompts.jsonl \
        --k 4 --output runs/align/pairs.jsonl [--seeds alignment/data/preference_seeds.jsonl]
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def rank_answers(prompt: str, answers: list[str], scorer) -> list[tuple[float, str]]:
    """(score, answer) best first; duplicates and empty answers removed."""
    unique = [a for i, a in enumerate(answers) if a.strip() and a not in answers[:i]]
    return sorted(((scorer.score(prompt, a).total, a) for a in unique), key=lambda t: -t[0])


def pair_from_ranking(prompt: str, ranked: list[tuple[float, str]], min_margin: float) -> dict | None:
    if len(ranked) < 2 or ranked[0][0] - ranked[-1][0] < min_margin:
        return None
    (best_score, best), (worst_score, worst) = ranked[0], ranked[-1]
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": best}],
        "rejected": [{"role": "assistant", "content": worst}],
        "score_chosen": round(best_score, 4),
        "score_rejected": round(worst_score, 4),
    }


def build_pairs(
    model,
    tokenizer,
    prompts: list[str],
    scorer,
    k: int = 4,
    min_margin: float = 0.1,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 0.95,
    seed: int = 0,
    batch_size: int = 4,
) -> tuple[list[dict], dict]:
    """Sample k answers per prompt, score, keep (best, worst). Returns (pairs, stats)."""
    from alignment.generate import generate_replies

    if k < 2:
        raise ValueError(f"k={k}: a pair needs at least 2 sampled answers per prompt")
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    samples = generate_replies(
        model, tokenizer, conversations, max_new_tokens=max_new_tokens, num_return_sequences=k,
        do_sample=True, temperature=temperature, top_p=top_p, batch_size=batch_size, seed=seed,
    )
    pairs, skipped = [], 0
    for prompt, answers in zip(prompts, samples):
        pair = pair_from_ranking(prompt, rank_answers(prompt, answers, scorer), min_margin)
        if pair is None:
            skipped += 1
        else:
            pairs.append(pair)
    margins = [p["score_chosen"] - p["score_rejected"] for p in pairs]
    stats = {
        "prompts": len(prompts),
        "k": k,
        "pairs": len(pairs),
        "skipped_low_margin": skipped,
        "mean_margin": round(sum(margins) / len(margins), 4) if margins else None,
        "scorer": getattr(scorer, "name", type(scorer).__name__),
    }
    logger.info("pairs: %s", stats)
    return pairs, stats


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write rows atomically: a crash never leaves a half-written file at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def read_seed_pairs(path: str | Path) -> list[dict]:
    """Hand-written pairs, validated through the same loader DPO uses."""
    from alignment.data import load_preference_dataset

    ds, _ = load_preference_dataset(str(path))
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in ds]
