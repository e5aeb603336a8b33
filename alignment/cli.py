"""`genesis align ...`: constitution revisions, DPO pairs, evaluation and pretrain-then-align cycles.

    genesis align revise  --model DIR --prompts FILE --output FILE     critique-and-revise -> SFT jsonl
    genesis align pairs   --model DIR --prompts FILE --output FILE     sample k, score, chosen/rejected jsonl
    genesis align eval    --model [STAGE=]DIR ... [--prompts FILE]     hedging rate + curiosity table (+ wandb)
    genesis align cycle   --config RECIPE --parent CKPT [--name N]     export -> SFT -> pairs -> DPO -> eval -> lineage
    genesis align compare LINEAGE.json ...                             cycles side by side
    genesis align sft|dpo|reward --config RECIPE [TRL args]            the training scripts (single process)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from alignment.constitution import DEFAULT_CONSTITUTION
from alignment.evaluate import DEFAULT_EVAL_PAIRS, DEFAULT_EVAL_PROMPTS

DATA = Path(__file__).resolve().parent / "data"


def _scorer_name(value: str) -> str:
    if value in ("rule", "judge") or (value.startswith("reward:") and value[len("reward:"):]):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: choose rule, judge or reward:PATH (a reward model folder)")


def _add_scorer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scorer", type=_scorer_name, default="rule", metavar="{rule,judge,reward:PATH}",
                   help="constitution scorer (default: rule); reward:PATH scores with a reward model "
                        "trained by `genesis align reward`")
    p.add_argument("--judge-model", help="model folder or Hub id for --scorer judge")
    p.add_argument("--constitution", default=str(DEFAULT_CONSTITUTION), help="constitution YAML")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genesis align", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("revise", help="critique-and-revise answers against the constitution (SFT data)")
    p.add_argument("--model", required=True, help="model folder or Hub id that answers, critiques and revises")
    p.add_argument("--prompts", default=str(DATA / "pair_prompts.jsonl"), help="jsonl with a 'prompt' per line")
    p.add_argument("--output", required=True, help="jsonl to write (messages + critique trail)")
    p.add_argument("--principles", nargs="*", help="principle ids to apply, in order (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--keep-better", action="store_true", help="keep the first answer when it scores higher")
    _add_scorer(p)

    p = sub.add_parser("pairs", help="sample k answers per prompt, rank with the scorer, write DPO pairs")
    p.add_argument("--model", required=True, help="model folder or Hub id to sample from (usually the SFT model)")
    p.add_argument("--prompts", default=str(DATA / "pair_prompts.jsonl"))
    p.add_argument("--output", required=True, help="jsonl in TRL's preference format")
    p.add_argument("--k", type=int, default=4, help="answers sampled per prompt")
    p.add_argument("--min-margin", type=float, default=0.1, help="skip prompts whose best-worst gap is smaller")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seeds", help="hand-written pairs to append (e.g. alignment/data/preference_seeds.jsonl)")
    p.add_argument("--seed", type=int, default=0)
    _add_scorer(p)

    p = sub.add_parser("eval", help="hedging rate and curiosity on held-out prompts")
    p.add_argument("--model", action="append", required=True, metavar="[STAGE=]DIR",
                   help="model folder; repeat for several stages, e.g. --model base=A --model sft=B")
    p.add_argument("--prompts", default=str(DEFAULT_EVAL_PROMPTS))
    p.add_argument("--pairs", default=str(DEFAULT_EVAL_PAIRS),
                   help="held-out preference pairs for the log-prob preference columns ('' to skip)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--output", help="write results as JSON here")
    p.add_argument("--wandb-project", help="also log to this wandb project (offline without WANDB_API_KEY)")
    _add_scorer(p)

    p = sub.add_parser("cycle", help="export -> SFT -> pairs -> DPO -> evaluate -> lineage.json")
    p.add_argument("--config", required=True, help="cycle recipe, e.g. alignment/recipes/cycle-tiny.yaml")
    p.add_argument("--parent", help="pretraining checkpoint or model folder (overrides the recipe)")
    p.add_argument("--parent-step", type=int, help="the parent's training step, recorded in the lineage")
    p.add_argument("--name", help="cycle name (its folder under output_dir)")
    p.add_argument("--output-dir", help="where cycle folders go (overrides the recipe)")
    p.add_argument("--launcher", help='e.g. "accelerate launch --config_file accelerate_configs/fsdp_2gpu_pcie.yaml"')

    p = sub.add_parser("compare", help="cycles side by side from their lineage.json files")
    p.add_argument("lineage", nargs="+")

    for stage in ("sft", "dpo", "reward"):
        sub.add_parser(stage, help=f"run alignment/{stage}.py (TrlParser: --config RECIPE plus TRL arguments)",
                       add_help=False)
    return parser


def _scorer(args):
    from alignment.constitution import load_constitution
    from alignment.scorer import get_scorer

    return get_scorer(args.scorer, args.judge_model, load_constitution(args.constitution))


def cli_main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(argv)
    if argv and argv[0] in ("sft", "dpo", "reward"):  # TrlParser owns these arguments
        module = __import__(f"alignment.{argv[0]}", fromlist=["main", "parse"])
        module.main(*module.parse(argv[1:]))
        return 0
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"genesis align {args.command}: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from alignment.data import read_prompts

    if args.command == "revise":
        from alignment.constitution import critique_and_revise, load_constitution
        from alignment.generate import load_model_and_tokenizer
        from alignment.pairs import write_jsonl

        model, tokenizer = load_model_and_tokenizer(args.model)
        rows, stats = critique_and_revise(
            model, tokenizer, read_prompts(args.prompts), load_constitution(args.constitution),
            principles=args.principles, scorer=_scorer(args) if args.keep_better else None,
            max_new_tokens=args.max_new_tokens,
        )
        write_jsonl(rows, args.output)
        print(json.dumps(stats))
    elif args.command == "pairs":
        from alignment.generate import load_model_and_tokenizer
        from alignment.pairs import build_pairs, read_seed_pairs, write_jsonl

        model, tokenizer = load_model_and_tokenizer(args.model)
        pairs, stats = build_pairs(model, tokenizer, read_prompts(args.prompts), _scorer(args), k=args.k,
                                   min_margin=args.min_margin, max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, seed=args.seed)
        if args.seeds:
            seeds = read_seed_pairs(args.seeds)
            pairs, stats["seed_pairs"] = pairs + seeds, len(seeds)
        write_jsonl(pairs, args.output)
        print(json.dumps(stats))
    elif args.command == "eval":
        from alignment.evaluate import evaluate_path, format_table, log_to_wandb
        from alignment.pairs import read_seed_pairs

        prompts, scorer, results = read_prompts(args.prompts), _scorer(args), {}
        pairs = read_seed_pairs(args.pairs) if args.pairs else None
        for spec in args.model:
            stage, _, path = spec.rpartition("=")
            results[stage or Path(path).name] = evaluate_path(path, prompts, scorer, max_new_tokens=args.max_new_tokens,
                                                              pairs=pairs)
        print(format_table(results))
        if args.output:
            Path(args.output).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        if args.wandb_project:
            log_to_wandb(results, args.wandb_project, config={"prompts": args.prompts, "scorer": args.scorer})
    elif args.command == "cycle":
        from alignment.cycle import load_cycle_config, run_cycle

        cfg = load_cycle_config(args.config, {"parent": args.parent, "parent_step": args.parent_step,
                                              "name": args.name, "output_dir": args.output_dir,
                                              "launcher": args.launcher})
        lineage = run_cycle(cfg)
        print(f"lineage: {Path(cfg['output_dir']) / cfg['name'] / 'lineage.json'}")
        from alignment.evaluate import format_table

        print(format_table(lineage["scores"]))
    elif args.command == "compare":
        from alignment.cycle import compare_lineages

        print(compare_lineages(args.lineage))
    return 0
