"""The `genesis` console command (pyproject: genesis = "genesis_cli:main").

Each subcommand lives in the module that owns the work and exposes
`cli_main(argv: list[str]) -> int`; this file only dispatches, importing a
module when its subcommand runs so that `genesis --help` stays fast. It sits
above the three packages: genesis_hf (what a model user installs) imports
neither training nor alignment, so the command that reaches all of them starts
here (docs: STYLE item 11).

    genesis tokenizer train SOURCES... --vocab-size 49152 --output DIR
    genesis data prepare --mixture YAML --tokenizer DIR --output DIR
    genesis export SRC DST [--format genesis|llama|gguf]
    genesis lr --config training/recipes/genesis-1b.yaml [--plot lr.png]
    genesis quickstart
    genesis align ...
    genesis playground | plot | eval | report ...
    genesis plan --config RECIPE --hardware ACCELERATE_CONFIG --gpu "RTX 4090" [--fit] [--json]
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help). The module's cli_main parses the rest of argv.
COMMANDS: dict[str, tuple[str, str]] = {
    "tokenizer": ("training.tokenizer_cli", "train a byte-level BPE tokenizer and report bytes per token"),
    "data": ("training.data.prepare", "tokenise a mixture into checksummed uint16 shards"),
    "export": (
        "training.export",
        "turn a checkpoint or model folder into a from_pretrained folder (Genesis or Llama) or a GGUF",
    ),
    "lr": ("training.schedule", "print or plot the learning-rate curve of a recipe before launch"),
    "quickstart": ("training.quickstart", "tokenizer, data, a tiny pretraining run on CPU, export, samples"),
    "align": (
        "alignment.cli",
        "constitution revisions, DPO pairs, evaluation and pretrain-then-align cycles",
    ),
    "playground": (
        "training.inspection.playground",
        "a local web app: generate from checkpoints side by side",
    ),
    "plot": (
        "training.inspection.plots",
        "loss, LR, grad norm and tokens/s curves from metrics.jsonl and wandb files",
    ),
    "eval": (
        "training.inspection.evaluate",
        "validation loss and bits per byte per source for exports or checkpoints",
    ),
    "report": ("training.inspection.report", "a markdown page with plots and tables for a run"),
    "plan": ("training.plan.cli", "before launch: will a recipe fit these GPUs, how fast, which setting (--fit)"),
    "spikes": ("training.inspection.spikes", "a run's loss spikes, the documents behind them, and its rollbacks"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: genesis COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `genesis COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"genesis: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.cli_main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
