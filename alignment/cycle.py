"""One pretrain-then-align cycle: checkpoint -> export -> SFT -> pairs -> DPO -> evaluate -> lineage.

    genesis align cycle --config alignment/recipes/cycle-genesis-1b.yaml \
        --parent checkpoints/step-40000 --name from-40k
    genesis align compare runs/align/cycles/*/lineage.json

The cycle folder (`output_dir/name`, never reused) ends up holding:
    base/ sft/ dpo/       model folders (base = the exported parent checkpoint)
    pairs.jsonl           the preference pairs DPO trained on
    lineage.json          parent checkpoint, constitution, data, recipes (path, sha256, values),
                          scores before SFT / after SFT / after DPO, git commit; written last
    results.md            the evaluation table (degenerate stages flagged: alignment/evaluate.py)
so that cycles from 40k, 60k and 80k steps compare side by side (`genesis align compare`).

With `launcher` set (e.g. "accelerate launch --config_file accelerate_configs/fsdp_2gpu_pcie.yaml"),
SFT and DPO run as that command on `alignment/sft.py` / `alignment/dpo.py`; otherwise in this process.
Export, pair sampling and evaluation run in this process on one device.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import shlex
import subprocess
from pathlib import Path

import yaml

from alignment.data import resolve_path

logger = logging.getLogger(__name__)

ALIGNMENT_DIR = Path(__file__).resolve().parent
CYCLE_KEYS = {
    "name", "parent", "parent_step", "output_dir", "sft_recipe", "dpo_recipe", "launcher", "scorer",
    "judge_model", "pairs", "eval", "wandb_project", "report_to_wandb", "constitution", "seed",
}
PAIRS_KEYS = {"prompts", "k", "min_margin", "max_new_tokens", "temperature", "seeds"}
EVAL_KEYS = {"prompts", "max_new_tokens", "pairs"}


def load_cycle_config(path: str | Path, overrides: dict | None = None) -> dict:
    """Read a cycle recipe, apply non-None overrides, and validate keys and required fields."""
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cycle recipe {path} does not exist")
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a cycle recipe must be a YAML mapping")
    cfg.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = set(cfg) - CYCLE_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(CYCLE_KEYS)}")
    for section, allowed in (("pairs", PAIRS_KEYS), ("eval", EVAL_KEYS)):
        extra = set(cfg.get(section) or {}) - allowed
        if extra:
            raise ValueError(f"{path}: unknown keys {sorted(extra)} in '{section}'; allowed: {sorted(allowed)}")
    for key in ("name", "parent", "output_dir", "sft_recipe", "dpo_recipe"):
        if not cfg.get(key):
            raise ValueError(f"{path}: field {key!r} is required (set it in the recipe or on the command line)")
    for key in ("sft_recipe", "dpo_recipe"):
        cfg[key] = str(resolve_path(cfg[key]))
        if not Path(cfg[key]).is_file():
            raise FileNotFoundError(f"{path}: {key} {cfg[key]} does not exist")
    cfg["_path"] = str(path)
    return cfg


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ALIGNMENT_DIR, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _recipe_record(path: str) -> dict:
    return {"path": path, "sha256": _sha256(path), "values": yaml.safe_load(Path(path).read_text(encoding="utf-8"))}


def _train(stage: str, cfg: dict, argv: list[str], output_dir: Path) -> dict:
    """Run SFT or DPO with the recipe plus overrides, in process or through the launcher; return the
    stage's `alignment.json` (data stats, loss, ...) either way."""
    script = ALIGNMENT_DIR / f"{stage}.py"
    record: dict = {}
    if cfg.get("launcher"):
        cmd = [*shlex.split(cfg["launcher"]), str(script), *argv]
        logger.info("running %s", " ".join(cmd))
        subprocess.run(cmd, check=True)
        record["launched"] = " ".join(cmd)
    else:
        module = __import__(f"alignment.{stage}", fromlist=["main", "parse"])
        module.main(*module.parse(argv))
    record.update(json.loads((output_dir / "alignment.json").read_text(encoding="utf-8")))
    record["output_dir"] = str(output_dir)
    return record


def _write_json(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def run_cycle(cfg: dict) -> dict:
    """Run every stage of one cycle; returns the lineage record (also written to lineage.json)."""
    from alignment.constitution import load_constitution
    from alignment.data import read_prompts
    from alignment.evaluate import degeneracy_flags, evaluate_path, format_table, log_to_wandb
    from alignment.generate import load_model_and_tokenizer
    from alignment.pairs import build_pairs, read_seed_pairs, write_jsonl
    from alignment.scorer import get_scorer
    from training.export import export  # a checkpoint or a model folder

    out = Path(cfg["output_dir"]) / cfg["name"]
    if out.exists():
        raise FileExistsError(f"cycle folder {out} already exists; cycles never reuse a folder (pick a new name)")
    out.mkdir(parents=True)
    constitution = load_constitution(cfg.get("constitution"))
    scorer = get_scorer(cfg.get("scorer", "rule"), cfg.get("judge_model"), constitution)
    eval_cfg = cfg.get("eval") or {}
    eval_prompts_path = resolve_path(eval_cfg.get("prompts", ALIGNMENT_DIR / "data" / "eval_prompts.jsonl"))
    eval_prompts = read_prompts(eval_prompts_path)
    eval_kwargs = {"max_new_tokens": eval_cfg.get("max_new_tokens", 128)}
    eval_pairs_path = resolve_path(eval_cfg["pairs"]) if eval_cfg.get("pairs") else None
    if eval_pairs_path:
        eval_kwargs["pairs"] = read_seed_pairs(eval_pairs_path)
    lineage = {
        "cycle": cfg["name"],
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "parent": {"checkpoint": str(cfg["parent"]), "step": cfg.get("parent_step")},
        "constitution": {"name": constitution.name, "version": constitution.version, "sha256": constitution.sha256},
        "recipes": {"cycle": _recipe_record(cfg["_path"]), "sft": _recipe_record(cfg["sft_recipe"]),
                    "dpo": _recipe_record(cfg["dpo_recipe"])},
        "scorer": getattr(scorer, "name", "rule"),
        "eval_prompts": {"path": str(eval_prompts_path), "sha256": _sha256(eval_prompts_path), "n": len(eval_prompts)},
        "eval_pairs": {"path": str(eval_pairs_path), "sha256": _sha256(eval_pairs_path),
                       "n": len(eval_kwargs["pairs"])} if eval_pairs_path else None,
        "data": {},
        "scores": {},
        "models": {},
    }

    base = export(cfg["parent"], out / "base")
    lineage["models"]["base"] = str(base)
    lineage["scores"]["base"] = evaluate_path(base, eval_prompts, scorer, **eval_kwargs)

    sft_dir = out / "sft"
    lineage["data"]["sft"] = _train("sft", cfg, ["--config", cfg["sft_recipe"], "--model_name_or_path", str(base),
                                                 "--output_dir", str(sft_dir)], sft_dir)
    lineage["models"]["sft"] = str(sft_dir)
    lineage["scores"]["sft"] = evaluate_path(sft_dir, eval_prompts, scorer, **eval_kwargs)

    pairs_cfg = cfg.get("pairs")
    dpo_argv = ["--config", cfg["dpo_recipe"], "--model_name_or_path", str(sft_dir), "--output_dir", str(out / "dpo")]
    if pairs_cfg:
        model, tokenizer = load_model_and_tokenizer(sft_dir)
        pairs, stats = build_pairs(
            model, tokenizer, read_prompts(pairs_cfg["prompts"]), scorer, k=pairs_cfg.get("k", 4),
            min_margin=pairs_cfg.get("min_margin", 0.1), max_new_tokens=pairs_cfg.get("max_new_tokens", 128),
            temperature=pairs_cfg.get("temperature", 1.0), seed=cfg.get("seed", 0),
        )
        del model
        if pairs_cfg.get("seeds"):
            seeds = read_seed_pairs(pairs_cfg["seeds"])
            pairs += seeds
            stats["seed_pairs"] = len(seeds)
        if not pairs:
            raise RuntimeError(f"no preference pairs: every prompt's answers scored within {stats}")
        write_jsonl(pairs, out / "pairs.jsonl")
        lineage["data"]["pairs"] = {**stats, "path": str(out / "pairs.jsonl"), "sha256": _sha256(out / "pairs.jsonl")}
        dpo_argv += ["--dataset_name", str(out / "pairs.jsonl")]
    lineage["data"]["dpo"] = _train("dpo", cfg, dpo_argv, out / "dpo")
    lineage["models"]["dpo"] = str(out / "dpo")
    lineage["scores"]["dpo"] = evaluate_path(out / "dpo", eval_prompts, scorer, **eval_kwargs)

    table = format_table(lineage["scores"])
    lineage["flags"] = degeneracy_flags(lineage["scores"])
    for stage, reasons in lineage["flags"].items():
        if reasons:
            logger.warning("cycle %s: %s output is degenerate: %s", cfg["name"], stage, "; ".join(reasons))
    (out / "results.md").write_text(f"# {cfg['name']}\n\n{table}\n", encoding="utf-8")
    if cfg.get("report_to_wandb", True):
        lineage["wandb_dir"] = log_to_wandb(
            lineage["scores"], cfg.get("wandb_project", "genesis-align"), cfg["name"],
            {"parent": lineage["parent"], "constitution": lineage["constitution"]}, out / "wandb",
        )
    _write_json(lineage, out / "lineage.json")
    logger.info("cycle %s done:\n%s", cfg["name"], table)
    return lineage


def quickstart_align(parent: str | Path, output_dir: str | Path = "runs/align/cycles", name: str = "quickstart") -> dict:
    """The quickstart's alignment leg: the tiny cycle (SFT, pairs, DPO, evaluation) on `parent`, on CPU."""
    return run_cycle(load_cycle_config("alignment/recipes/cycle-tiny.yaml",
                                       {"parent": str(parent), "output_dir": str(output_dir), "name": name}))


def compare_lineages(paths: list[str | Path]) -> str:
    """Side-by-side table of several cycles' lineage.json files, one row per cycle and stage, with
    degenerate stages flagged (alignment/evaluate.py: short against the parent stage, loops, empty)."""
    from alignment.evaluate import degeneracy_flags

    lines = [
        "| cycle | parent step | constitution | stage | hedging rate | curiosity | score | words | flags |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no lineage.json (a cycle that did not finish writes none)")
        lin = json.loads(path.read_text(encoding="utf-8"))
        flags = degeneracy_flags(lin["scores"])
        for stage, r in lin["scores"].items():
            lines.append(
                f"| {lin['cycle']} | {lin['parent'].get('step') or '-'} | v{lin['constitution']['version']} | {stage} "
                f"| {r['hedging_rate']:.1%} | {r['curiosity']:.3f} | {r['score']:+.3f} | {r['mean_words']:.1f} "
                f"| {'DEGENERATE: ' + '; '.join(flags[stage]) if flags[stage] else 'ok'} |"
            )
    return "\n".join(lines)
