"""`genesis playground`: generate from several checkpoints side by side, in a browser.

    genesis playground runs/genesis-1b                    # every committed checkpoint of the run
    genesis playground out/genesis-1b-20k out/genesis-1b-40k runs/genesis-1b/checkpoints/step-00030000
    genesis playground runs/genesis-1b --port 7860 --device cuda

Then open http://127.0.0.1:7860. Tab "Generate": pick up to --columns models, a prompt and the
sampling settings (temperature 0 = greedy; the seed makes sampling repeatable); each column
streams its model's text. Tab "Curves": `genesis plot` for run folders or files. Tab "Across the run": a fixed prompt set through every picked model,
one column per model, to see how the model changed over training. More models can be added
while it runs (a path box); a bad path is reported in the status line and the app keeps serving.
Models are exports (`from_pretrained` folders) or committed training checkpoints, read directly.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path

import torch

from . import InspectError
from .models import ModelCache, expand_paths

logger = logging.getLogger(__name__)

FIXED_PROMPTS: list[str] = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, there was a",
    "The three states of matter are",
    "import numpy as np\n\n",
    "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n",
]


def _inputs(tokenizer, prompt: str, max_len: int, max_new_tokens: int) -> torch.Tensor:
    """(1, T) prompt ids, left-truncated so that prompt + new tokens fit the model's positions.
    An empty prompt starts a new document (<|endoftext|>): unconditional text."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    if not ids:
        ids = [tokenizer.eos_token_id]
    keep = max(1, max_len - max_new_tokens)
    return torch.tensor([ids[-keep:]], dtype=torch.long)


def generate_stream(model, tokenizer, prompt: str, *, temperature: float = 0.8, top_p: float = 0.95,
                    max_new_tokens: int = 64, seed: int = 0):
    """Yield the generated text so far (without the prompt) as tokens arrive; stops at <|endoftext|>."""
    from transformers import TextIteratorStreamer

    max_new_tokens = max(1, min(int(max_new_tokens), model.config.max_position_embeddings - 1))
    x = _inputs(tokenizer, prompt, model.config.max_position_embeddings, max_new_tokens).to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=False, timeout=600)
    sample = temperature > 0
    kwargs = dict(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                  do_sample=sample, streamer=streamer, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if sample:
        kwargs |= dict(temperature=float(temperature), top_p=float(top_p))
    else:
        kwargs |= dict(temperature=None, top_p=None, top_k=None)
    errors: list[BaseException] = []

    def run():
        try:
            torch.manual_seed(int(seed))  # same seed, same model, same settings -> same text
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as e:  # surfaced below, never lost in the thread
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text
    thread.join()
    if errors:
        raise errors[0]


class Playground:
    """The app's state: known models (label -> path) and a cache of loaded ones."""

    def __init__(self, paths: list[str | Path], *, device: str = "cpu", columns: int = 4, cache_size: int = 4,
                 dtype: torch.dtype = torch.float32):
        self.columns, self.cache = columns, ModelCache(cache_size, device=device, dtype=dtype)
        self.models: dict[str, Path] = {}
        self.notes: list[str] = []
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

    def add(self, path: str) -> tuple[list[str], str]:
        """(the new choice list, a status line). Never raises: the error is the status line."""
        if not path or not path.strip():
            return list(self.models), "Enter the path of an export, a checkpoint or a run folder."
        try:
            added = self._add(path)
        except InspectError as e:
            return list(self.models), f"**Error:** {e}"
        return list(self.models), f"Added {', '.join(added)}."

    def generate(self, selected: list[str], prompt: str, temperature: float, top_p: float, max_new_tokens: int,
                 seed: int):
        """Yield (column texts, column labels, status) while the picked models generate in turn."""
        texts, status = [""] * self.columns, ""
        labels = list(selected[: self.columns]) + [""] * (self.columns - min(len(selected), self.columns))
        if not selected:
            yield texts, labels, "Pick at least one model."
            return
        if len(selected) > self.columns:
            status = f"Showing the first {self.columns} of {len(selected)} picked models. "
        for i, label in enumerate(selected[: self.columns]):
            try:
                model, tokenizer, _ = self.cache.get(self.models[label])
                for text in generate_stream(model, tokenizer, prompt, temperature=temperature, top_p=top_p,
                                            max_new_tokens=max_new_tokens, seed=seed):
                    texts[i] = text
                    yield texts, labels, status + f"Generating with {label}..."
            except (InspectError, KeyError, RuntimeError, ValueError) as e:
                texts[i] = f"[error] {e}"
                status += f"**Error** ({label}): {e} "
                yield texts, labels, status
        yield texts, labels, status or "Done."

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

    def across_run(self, selected: list[str], temperature: float, top_p: float, max_new_tokens: int, seed: int):
        """Rows: one per fixed prompt; columns: the prompt, then each picked model's continuation."""
        rows = [[p] for p in FIXED_PROMPTS]
        errors = []
        for label in selected:
            try:
                model, tokenizer, _ = self.cache.get(self.models[label])
            except (InspectError, KeyError) as e:
                errors.append(f"{label}: {e}")
                for r in rows:
                    r.append("[error]")
                continue
            for r, prompt in zip(rows, FIXED_PROMPTS):
                *_, text = generate_stream(model, tokenizer, prompt, temperature=temperature, top_p=top_p,
                                           max_new_tokens=max_new_tokens, seed=seed)
                r.append(text)
        return ["prompt", *selected], rows, ("**Error:** " + "; ".join(errors)) if errors else "Done."


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
    """The Gradio Blocks app (not launched). Element ids (#prompt, #generate, #out-0, #status, ...)
    are what the browser test drives."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    pg = Playground(paths, device=device, columns=columns, dtype=getattr(torch, dtype))
    start = list(pg.models)[-columns:]  # the newest checkpoints
    with gr.Blocks(title="Genesis playground") as app:
        gr.Markdown("## Genesis playground\nGenerate from checkpoints side by side.")
        models = gr.CheckboxGroup(choices=list(pg.models), value=start, label="Models", elem_id="models")
        with gr.Row():
            add_box = gr.Textbox(label="Add an export, checkpoint or run folder", scale=4, elem_id="add-path")
            add_btn = gr.Button("Add", scale=1, elem_id="add")
        status = gr.Markdown("  \n".join(f"**Error:** {n}" for n in pg.notes) or "Ready.", elem_id="status")
        with gr.Row():
            temperature = gr.Slider(0.0, 2.0, value=0.8, step=0.05, label="temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="top-p")
            max_new = gr.Slider(1, 512, value=64, step=1, label="max new tokens")
            seed = gr.Number(value=0, precision=0, label="seed")
        with gr.Tab("Generate"):
            prompt = gr.Textbox(label="Prompt", lines=3, value="The capital of France is", elem_id="prompt")
            go = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Row():
                outs = [gr.Textbox(label=f"model {i + 1}", lines=10, interactive=False, elem_id=f"out-{i}")
                        for i in range(columns)]
        with gr.Tab("Across the run"):
            gr.Markdown("The same prompts through every picked model: how the model changed across the run.")
            sweep = gr.Button("Run the prompt set", elem_id="sweep")
            table = gr.Dataframe(headers=["prompt"], wrap=True, interactive=False, elem_id="sweep-table")
        with gr.Tab("Curves"):
            sources = gr.Textbox(label="Run folders, metrics.jsonl or run-*.wandb files (one per line)", lines=3,
                                 value="\n".join(pg.runs), elem_id="plot-sources")
            with gr.Row():
                smooth_n = gr.Number(value=1, precision=0, label="smoothing window (steps)")
                plot_btn = gr.Button("Plot", elem_id="plot")
            image = gr.Image(type="filepath", label="loss, LR, grad norm, tokens/s", interactive=False,
                             elem_id="plot-image")

        def on_generate(selected, p, t, tp, n, s):
            for texts, labels, st in pg.generate(selected or [], p or "", t, tp, n, s):
                yield [gr.update(value=x, label=lab or f"model {i + 1}")
                       for i, (x, lab) in enumerate(zip(texts, labels))] + [st]

        def on_sweep(selected, t, tp, n, s):
            headers, rows, st = pg.across_run(selected or [], t, tp, n, s)
            return gr.update(value=rows, headers=headers), st

        def on_add(path, selected):
            choices, st = pg.add(path)
            return gr.update(choices=choices, value=list(selected or []) + [c for c in choices if c not in
                                                                           (selected or [])][-1:]), st

        go.click(on_generate, [models, prompt, temperature, top_p, max_new, seed], [*outs, status])
        sweep.click(on_sweep, [models, temperature, top_p, max_new, seed], [table, status])
        add_btn.click(on_add, [add_box, models], [models, status])
        plot_btn.click(pg.plot, [sources, smooth_n], [image, status])
    app.queue(default_concurrency_limit=1)  # one generation at a time: one model set in memory
    return app


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
    return p


def cli_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = build_app(args.paths, device=args.device, columns=args.columns, dtype=args.dtype)
    print(f"Genesis playground on http://{args.host}:{args.port} (Ctrl-C to stop)")
    try:
        app.launch(server_name=args.host, server_port=args.port, share=False, ssr_mode=False, show_error=True,
                   theme=_theme())
    except OSError as e:  # e.g. the port is taken
        print(f"genesis playground: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    return 0


def _theme():
    import gradio as gr

    # System fonts: the default theme fetches Google Fonts, which an offline machine cannot reach.
    return gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


if __name__ == "__main__":
    sys.exit(cli_main())
