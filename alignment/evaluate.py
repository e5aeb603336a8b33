"""Measuring the goal: hedging rate and curiosity score on held-out prompts.

Greedy answers to `alignment/data/eval_prompts.jsonl` (prompts that appear in no training file),
scored by the constitution scorer; plus, on held-out hand-written pairs (`eval_pairs.jsonl`, the same
prompts), how much the model's own log-probs prefer the curious answer to the hedging one. The same prompts and scorer are used before SFT, after SFT and
after DPO, so the three rows of the table are comparable; results go to a markdown table and to
wandb (offline unless WANDB_API_KEY is set; the key itself is never logged).

    genesis align eval --model base=runs/export-40k --model sft=runs/align/sft --model dpo=runs/align/dpo

Degenerate output is flagged beside the scores (a collapsed DPO model can score well on a rule
scorer by saying little): a stage is flagged when its mean answer length is under half of the
stage before it (its parent: base -> sft -> dpo), when REPETITION_FLAG of its answers or more loop
on themselves (under half of an answer's word 3-grams are distinct), or when EMPTY_FLAG of its
answers or more are empty.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_EVAL_PROMPTS = Path(__file__).resolve().parent / "data" / "eval_prompts.jsonl"
DEFAULT_EVAL_PAIRS = Path(__file__).resolve().parent / "data" / "eval_pairs.jsonl"
METRICS = ("hedging_rate", "curiosity", "hedging", "score", "mean_words", "empty_rate", "repetition_rate")
SHORT_FLAG = 0.5  # mean words under this share of the parent stage's
REPETITION_FLAG = 0.25  # share of answers that loop
EMPTY_FLAG = 0.2  # share of empty answers
_WORDS = re.compile(r"\w+")
PREF_METRICS = ("pref_accuracy", "pref_margin")


@torch.no_grad()
def preference_margin(model, tokenizer, pairs: list[dict]) -> dict:
    """How much the model itself prefers the curious answer over the hedging one on held-out pairs.

    Per pair: mean log-prob per token of `chosen` minus that of `rejected`, each given the prompt
    through the chat template (length-normalised, so a longer specific answer is not penalised for
    its length). Returns {pref_accuracy: share of pairs with a positive gap, pref_margin: mean gap}.
    This reads the model's distribution directly, so it is meaningful even when a small model's
    greedy answers are not yet.
    """
    gaps = []
    for pair in pairs:
        prompt_ids = tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"]
        means = []
        for key in ("chosen", "rejected"):
            ids = tokenizer.apply_chat_template(pair["prompt"] + pair[key], return_dict=True)["input_ids"]
            input_ids = torch.tensor([ids], device=model.device)
            logps = torch.log_softmax(model(input_ids=input_ids).logits[0, :-1].float(), -1)  # (T-1, V)
            targets = input_ids[0, 1:]  # (T-1,)
            token_logps = logps.gather(-1, targets[:, None])[:, 0][len(prompt_ids) - 1 :]  # the answer's tokens
            means.append(token_logps.mean().item())
        gaps.append(means[0] - means[1])
    return {"pref_accuracy": sum(g > 0 for g in gaps) / len(gaps), "pref_margin": sum(gaps) / len(gaps)}


def is_repetitive(answer: str, n: int = 3) -> bool:
    """An answer of at least 2n words whose word n-grams are less than half distinct ("a a a a", loops)."""
    words = _WORDS.findall(answer.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(words) >= 2 * n and len(set(grams)) < 0.5 * len(grams)


def degeneracy_flags(results: dict[str, dict]) -> dict[str, list[str]]:
    """{stage: [reasons]} for the stages in `results` (in order; each stage's parent is the one
    before it) whose output is degenerate: too short against the parent, repetitive, or empty."""
    flags, parent = {}, None
    for stage, r in results.items():
        reasons = []
        if parent is not None and parent.get("mean_words") and r["mean_words"] < SHORT_FLAG * parent["mean_words"]:
            reasons.append(f"short: {r['mean_words']:.1f} words < {SHORT_FLAG:.0%} of {parent['stage']}'s "
                           f"{parent['mean_words']:.1f}")
        if r.get("repetition_rate", 0.0) >= REPETITION_FLAG:
            reasons.append(f"repetitive: {r['repetition_rate']:.0%} of answers loop")
        if r.get("empty_rate", 0.0) >= EMPTY_FLAG:
            reasons.append(f"empty: {r['empty_rate']:.0%} of answers")
        flags[stage] = reasons
        parent = {**r, "stage": stage}
    return flags


def evaluate_model(model, tokenizer, prompts: list[str], scorer, max_new_tokens: int = 128, batch_size: int = 8,
                   keep_samples: int = 3, pairs: list[dict] | None = None) -> dict:
    """Greedy answers -> {n, hedging_rate, curiosity, hedging, score, mean_words, samples}
    (+ pref_accuracy, pref_margin on held-out `pairs`)."""
    from alignment.generate import generate_replies

    # Greedy, so that one model always gets one score: exports ship a sampling generation_config
    # (do_sample, temperature 0.8), which generate() would otherwise follow (unseeded noise of
    # +-0.06 curiosity and +-1 word on 16 prompts, measured).
    config = model.generation_config
    sampling = (config.do_sample, config.temperature, config.top_p)
    config.do_sample, config.temperature, config.top_p = False, None, None
    try:
        answers = [r[0] for r in generate_replies(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts],
                                                  max_new_tokens=max_new_tokens, batch_size=batch_size)]
    finally:
        config.do_sample, config.temperature, config.top_p = sampling
    scores = [scorer.score(p, a) for p, a in zip(prompts, answers)]
    n = len(scores)
    pref = preference_margin(model, tokenizer, pairs) if pairs else {}
    return {
        **pref,
        "n": n,
        "hedging_rate": sum(s.hedged for s in scores) / n,
        "curiosity": sum(s.curiosity for s in scores) / n,
        "hedging": sum(s.hedging for s in scores) / n,
        "score": sum(s.total for s in scores) / n,
        "mean_words": sum(s.details.get("words", 0.0) for s in scores) / n,
        "empty_rate": sum(not _WORDS.search(a) for a in answers) / n,
        "repetition_rate": sum(is_repetitive(a) for a in answers) / n,
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
    """{stage: result} -> markdown table, one row per stage, in insertion order (each stage's parent
    is the row above it); a last column flags degenerate output, with the reasons under the table."""
    pref = all("pref_accuracy" in r for r in results.values())
    flags = degeneracy_flags(results)
    head = "| stage | n | hedging rate | curiosity | hedging | score | words |"
    rule = "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    if pref:
        head, rule = head + " pref. acc. | pref. margin |", rule + " ---: | ---: |"
    head, rule = head + " flags |", rule + " --- |"
    lines = [head, rule]
    for stage, r in results.items():
        row = (
            f"| {stage} | {r['n']} | {r['hedging_rate']:.1%} | {r['curiosity']:.3f} | {r['hedging']:.3f} "
            f"| {r['score']:+.3f} | {r['mean_words']:.1f} |"
        )
        if pref:
            row += f" {r['pref_accuracy']:.1%} | {r['pref_margin']:+.3f} |"
        row += f" {'**DEGENERATE**' if flags[stage] else 'ok'} |"
        lines.append(row)
    notes = [f"- **{stage} is degenerate**: {'; '.join(reasons)}" for stage, reasons in flags.items() if reasons]
    return "\n".join(lines + ([""] + notes if notes else []))


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
    metrics = METRICS + (PREF_METRICS if all("pref_accuracy" in r for r in results.values()) else ())
    table = wandb.Table(columns=["stage", *metrics])
    for stage, r in results.items():
        table.add_data(stage, *[r.get(m) for m in metrics])
        run.summary.update({f"{stage}/{m}": r[m] for m in metrics if m in r})
    run.log({"alignment_eval": table})
    run_dir = run.dir
    run.finish()
    return run_dir
