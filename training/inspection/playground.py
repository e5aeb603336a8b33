"""`genesis playground`: generate from several checkpoints side by side, in a browser.

    genesis playground runs/genesis-1b                    # every committed checkpoint of the run
    genesis playground out/genesis-1b-20k out/genesis-1b-40k runs/genesis-1b/checkpoints/step-00030000
    genesis playground runs/genesis-1b --port 7860 --device cuda

Then open http://127.0.0.1:7860. Tab "Generate": pick up to --columns models, a prompt and the
sampling settings (temperature 0 = greedy; the seed makes sampling repeatable); each column
streams its model's text. Tab "Curves": `genesis plot` for run folders or files. Tab "Across the
run": a fixed prompt set through every picked model, one column per model, to see how the model changed over training. More models can be added
while it runs (a path box); a bad path is reported in the status line and the app keeps serving.
Models are exports (`from_pretrained` folders) or committed training checkpoints, read directly.

    genesis playground --space out/space --repo me/genesis-1b [--push me/genesis-playground]

writes the same UI as a Gradio Space over the Hub repo's step revisions (training/inspection/space.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import torch

from . import InspectError
from .models import ModelCache, expand_paths
from .space_ui import FIXED_PROMPTS, SideBySide, build_ui, generate_stream, theme

__all__ = ["FIXED_PROMPTS", "Playground", "build_app", "cli_main", "generate_stream"]

logger = logging.getLogger(__name__)

class Playground(SideBySide):
    """Local folders: known models (label -> path) and a cache of loaded ones."""

    errors = (InspectError, KeyError, RuntimeError, ValueError)

    def __init__(self, paths: list[str | Path], *, device: str = "cpu", columns: int = 4, cache_size: int = 4,
                 dtype: torch.dtype = torch.float32):
        super().__init__(columns)
        self.cache = ModelCache(cache_size, device=device, dtype=dtype)
        self.models: dict[str, Path] = {}
        self.runs = [str(p) for p in paths if (Path(p) / "metrics.jsonl").is_file()]  # for the Curves tab
        self._plot_dir = Path(tempfile.mkdtemp(prefix="genesis-playground-"))
        for p in paths:
            try:
                self._add(p)
            except InspectError as e:  # reported in the page; the others still load
                self.notes.append(str(e))

    def _add(self, path: str | Path) -> list[str]:
        added = []
        for p in expand_paths([Path(str(path).strip())]):
            label = _unique(self.models, _short_label(p))
            self.models[label] = p
            added.append(label)
        return added

    def load(self, label: str):
        model, tokenizer, _ = self.cache.get(self.models[label])
        return model, tokenizer

    def add(self, path: str) -> tuple[list[str], str]:
        """(the new choice list, a status line). Never raises: the error is the status line."""
        if not path or not path.strip():
            return list(self.models), "Enter the path of an export, a checkpoint or a run folder."
        try:
            added = self._add(path)
        except InspectError as e:
            return list(self.models), f"**Error:** {e}"
        return list(self.models), f"Added {', '.join(added)}."

    def plot(self, sources: str, smooth_window: int = 1) -> tuple[str | None, str]:
        """(PNG path or None, status) for the sources (one per line: run folders, metrics.jsonl,
        run-*.wandb). Never raises: a broken source is named in the status line."""
        from .plots import plot_runs
        from .runs import load_run

        paths = [s.strip() for s in (sources or "").splitlines() if s.strip()]
        if not paths:
            return None, "Enter one run folder, metrics.jsonl or run-*.wandb file per line."
        try:
            runs = [load_run(p) for p in paths]
            out = plot_runs(runs, self._plot_dir / f"curves-{len(list(self._plot_dir.iterdir()))}.png",
                            smooth_window=int(smooth_window or 1))
        except InspectError as e:
            return None, f"**Error:** {e}"
        notes = [n for r in runs for n in r.notes]
        return str(out), ("Notes: " + "; ".join(notes)) if notes else "Plotted " + ", ".join(r.name for r in runs) + "."


def _short_label(path: Path) -> str:
    if (path / "manifest.json").is_file():
        run = path.parent.parent.name if path.parent.name == "checkpoints" else path.parent.name
        return f"{run}/{path.name}"
    return path.name


def _unique(existing: dict, label: str) -> str:
    out, n = label, 2
    while out in existing:
        out, n = f"{label} ({n})", n + 1
    return out


def build_app(paths: list[str | Path], *, device: str = "cpu", columns: int = 4, dtype: str = "float32"):
    """The Gradio Blocks app (not launched): the shared side-by-side UI (space_ui.build_ui) over
    local folders, plus the Curves tab. Element ids are what the browser test drives."""
    pg = Playground(paths, device=device, columns=columns, dtype=getattr(torch, dtype))

    def curves_tab(gr, status):
        with gr.Tab("Curves"):
            sources = gr.Textbox(label="Run folders, metrics.jsonl or run-*.wandb files (one per line)", lines=3,
                                 value="\n".join(pg.runs), elem_id="plot-sources")
            with gr.Row():
                smooth_n = gr.Number(value=1, precision=0, label="smoothing window (steps)")
                plot_btn = gr.Button("Plot", elem_id="plot")
            image = gr.Image(type="filepath", label="loss, LR, grad norm, tokens/s", interactive=False,
                             elem_id="plot-image")
        plot_btn.click(pg.plot, [sources, smooth_n], [image, status])

    return build_ui(pg, title="Genesis playground", intro="Generate from checkpoints side by side.",
                    add_label="Add an export, checkpoint or run folder", extra_tabs=curves_tab)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genesis playground", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", help="exports, checkpoints, run folders (= all their checkpoints)")
    p.add_argument("--host", default="127.0.0.1", help="127.0.0.1 keeps it on this machine (default)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--columns", type=int, default=4, help="models shown side by side")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights in memory (bfloat16 halves a GPU's share per model)")
    space = p.add_argument_group("as a Hub Space (training/inspection/space.py)")
    space.add_argument("--space", metavar="DIR", help="write a Gradio Space folder here (must not exist)")
    space.add_argument("--repo", metavar="OWNER/NAME", help="the model repo whose step revisions it shows")
    space.add_argument("--push", metavar="SPACE_ID", help="then upload the folder to this Space (HF_TOKEN)")
    space.add_argument("--title", default="Genesis playground", help="the Space's title")
    return p


def cli_main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.space or args.repo or args.push:
        if not (args.space and args.repo) or args.paths:
            parser.error("a Space needs --space DIR and --repo OWNER/NAME (and no local paths)")
        from .space import cli_main as space_main

        return space_main(args)
    app = build_app(args.paths, device=args.device, columns=args.columns, dtype=args.dtype)
    print(f"Genesis playground on http://{args.host}:{args.port} (Ctrl-C to stop)")
    try:
        app.launch(server_name=args.host, server_port=args.port, share=False, ssr_mode=False, show_error=True,
                   theme=_theme())
    except OSError as e:  # e.g. the port is taken
        print(f"genesis playground: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    return 0


_theme = theme  # the name the browser test imports


if __name__ == "__main__":
    sys.exit(cli_main())
