"""The side-by-side generation UI shared by `genesis playground` (local folders) and the Hub Space
(the step revisions of a model repo). Self-contained on purpose: it imports only torch,
transformers and gradio, because `genesis playground --space` copies this file verbatim into the
Space folder, where the Genesis packages are not installed (docs/inspect.md).

    class MyModels(SideBySide):          # labels -> loaded (model, tokenizer); add() for the Add box
        def load(self, label): ...
    app = build_ui(MyModels(...), title="...", intro="...", add_label="...")
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import torch

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


class SideBySide:
    """Known models (label -> whatever `load` needs) and the two generation views. Subclasses
    implement load(label) -> (model, tokenizer) and add(text) -> (choices, status)."""

    errors: tuple[type[BaseException], ...] = (KeyError, OSError, RuntimeError, ValueError)

    def __init__(self, columns: int = 4):
        self.columns = columns
        self.models: dict[str, object] = {}
        self.notes: list[str] = []

    def load(self, label: str):
        raise NotImplementedError

    def add(self, text: str) -> tuple[list[str], str]:
        raise NotImplementedError

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
                model, tokenizer = self.load(label)
                for text in generate_stream(model, tokenizer, prompt, temperature=temperature, top_p=top_p,
                                            max_new_tokens=max_new_tokens, seed=seed):
                    texts[i] = text
                    yield texts, labels, status + f"Generating with {label}..."
            except self.errors as e:
                texts[i] = f"[error] {e}"
                status += f"**Error** ({label}): {e} "
                yield texts, labels, status
        yield texts, labels, status or "Done."

    def across_run(self, selected: list[str], temperature: float, top_p: float, max_new_tokens: int, seed: int):
        """Rows: one per fixed prompt; columns: the prompt, then each picked model's continuation."""
        rows = [[p] for p in FIXED_PROMPTS]
        errors = []
        for label in selected:
            try:
                model, tokenizer = self.load(label)
            except self.errors as e:
                errors.append(f"{label}: {e}")
                for r in rows:
                    r.append("[error]")
                continue
            for r, prompt in zip(rows, FIXED_PROMPTS):
                *_, text = generate_stream(model, tokenizer, prompt, temperature=temperature, top_p=top_p,
                                           max_new_tokens=max_new_tokens, seed=seed)
                r.append(text)
        return ["prompt", *selected], rows, ("**Error:** " + "; ".join(errors)) if errors else "Done."


class HubRevisions(SideBySide):
    """The step revisions of a Hub model repo (branches/tags step-XXXXXXXX, plus main), or, for a
    local test, the sub-folders of `revisions_dir` standing in for them."""

    def __init__(self, repo_id: str, *, revisions_dir: str | Path | None = None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, columns: int = 4, cache_size: int = 2):
        super().__init__(columns)
        self.repo_id, self.device, self.dtype = repo_id, device, dtype
        self.revisions_dir = Path(revisions_dir) if revisions_dir else None
        self.cache_size, self._cache = cache_size, OrderedDict()
        try:
            self.refresh()
        except Exception as e:  # noqa: BLE001  (the page says what is wrong; the app keeps serving)
            self.notes.append(f"cannot list the revisions of {repo_id}: {e}")

    def revisions(self) -> list[str]:
        """Step revisions oldest first, then the other branches/tags (main ...)."""
        if self.revisions_dir is not None:
            names = [p.name for p in self.revisions_dir.iterdir() if (p / "config.json").is_file()]
        else:
            from huggingface_hub import HfApi

            refs = HfApi().list_repo_refs(self.repo_id)
            names = [r.name for r in [*refs.branches, *refs.tags]]
        steps = sorted(n for n in names if n.startswith("step-"))
        return steps + sorted(set(names) - set(steps))

    def refresh(self) -> list[str]:
        for name in self.revisions():
            self.models.setdefault(name, name)
        return list(self.models)

    def add(self, text: str) -> tuple[list[str], str]:
        """An empty box re-lists the repo (steps uploaded since); a name adds that revision or says
        which ones exist."""
        try:
            choices = self.refresh()
        except Exception as e:  # noqa: BLE001
            return list(self.models), f"**Error:** cannot list the revisions of {self.repo_id}: {e}"
        rev = (text or "").strip()
        if not rev:
            return choices, f"{len(choices)} revisions of {self.repo_id}."
        if rev not in choices:
            return choices, (f"**Error:** revision {rev!r} does not exist in {self.repo_id}; it has: "
                             + ", ".join(choices))
        return choices, f"Added {rev}."

    def load(self, label: str):
        if label in self._cache:
            self._cache.move_to_end(label)
            return self._cache[label]
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.revisions_dir is not None:
            src, kw = self.revisions_dir / label, {}
        else:
            src, kw = self.repo_id, {"revision": label}
        # The export ships its modeling code (auto_map): no Genesis install needed to load it.
        model = AutoModelForCausalLM.from_pretrained(src, dtype=self.dtype, trust_remote_code=True, **kw)
        item = (model.to(self.device).eval(), AutoTokenizer.from_pretrained(src, **kw))
        self._cache[label] = item
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return item


def theme():
    import gradio as gr

    # System fonts: the default theme fetches Google Fonts, which an offline machine cannot reach.
    return gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def build_ui(backend: SideBySide, *, title: str, intro: str, add_label: str, extra_tabs=None, gpu=None):
    """The Gradio Blocks app (not launched). Element ids (#models, #prompt, #generate, #out-0,
    #status, #add-path, #add, #sweep, ...) are what the browser tests drive. `extra_tabs(gr, status)`
    adds tabs; `gpu` wraps the handlers that run models (ZeroGPU's spaces.GPU)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    columns, gpu = backend.columns, gpu or (lambda fn: fn)
    start = list(backend.models)[-columns:]  # the newest checkpoints
    with gr.Blocks(title=title) as app:
        gr.Markdown(f"## {title}\n{intro}")
        models = gr.CheckboxGroup(choices=list(backend.models), value=start, label="Models", elem_id="models")
        with gr.Row():
            add_box = gr.Textbox(label=add_label, scale=4, elem_id="add-path")
            add_btn = gr.Button("Add", scale=1, elem_id="add")
        status = gr.Markdown("  \n".join(f"**Error:** {n}" for n in backend.notes) or "Ready.", elem_id="status")
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
        if extra_tabs is not None:
            extra_tabs(gr, status)

        @gpu
        def on_generate(selected, p, t, tp, n, s):
            for texts, labels, st in backend.generate(selected or [], p or "", t, tp, n, s):
                yield [gr.update(value=x, label=lab or f"model {i + 1}")
                       for i, (x, lab) in enumerate(zip(texts, labels))] + [st]

        @gpu
        def on_sweep(selected, t, tp, n, s):
            headers, rows, st = backend.across_run(selected or [], t, tp, n, s)
            return gr.update(value=rows, headers=headers), st

        def on_add(text, selected):
            choices, st = backend.add(text)
            picked, text = list(selected or []), (text or "").strip()
            if st.startswith("**Error") or not text:
                new = []  # nothing added (an empty box only re-lists)
            elif text in choices:
                new = [text] if text not in picked else []
            else:  # a path added under its short label: the newest label
                new = [c for c in choices if c not in picked][-1:]
            return gr.update(choices=choices, value=picked + new), st

        go.click(on_generate, [models, prompt, temperature, top_p, max_new, seed], [*outs, status])
        sweep.click(on_sweep, [models, temperature, top_p, max_new, seed], [table, status])
        add_btn.click(on_add, [add_box, models], [models, status])
    app.queue(default_concurrency_limit=1)  # one generation at a time: one model set in memory
    return app
