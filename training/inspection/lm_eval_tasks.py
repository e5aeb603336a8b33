"""Offline lm-evaluation-harness tasks from local files.

lm-eval is not a dependency of Genesis (install it where you evaluate: `pip install lm-eval`).
These helpers write task YAMLs that read only local JSONL files (`dataset_path: json`), so
`lm_eval` runs with HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1:

  * genesis_val_<source>: the held-out text of a prepared data folder, decoded back to text,
    one document per line, scored with `loglikelihood_rolling` -> bits_per_byte, byte_perplexity,
    word_perplexity. lm-eval's bits_per_byte is over whole documents, ours over fixed windows, so
    the two agree closely but not to the last digit.
  * a multiple-choice file of your own ({"query", "choices", "gold"} per line):
    `write_multiple_choice_task(jsonl, tasks_dir, name)` -> acc, acc_norm.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from . import InspectError

_NAME = re.compile(r"[^a-z0-9_]+")


def _task_name(prefix: str, source: str) -> str:
    return f"{prefix}_{_NAME.sub('_', source.lower()).strip('_')}"


def write_val_text_tasks(data_dir: str | Path, tasks_dir: str | Path, *, tokenizer_dir: str | Path | None = None,
                         max_documents: int = 200) -> list[str]:
    """One rolling-loglikelihood task per source of `data_dir`; returns the task names."""
    import numpy as np
    from transformers import AutoTokenizer

    from training.data import shards

    data_dir, tasks_dir = Path(data_dir), Path(tasks_dir)
    try:
        manifest = shards.read_manifest(data_dir)
    except (OSError, ValueError) as e:
        raise InspectError(f"{data_dir}: not a prepared data folder ({e})") from e
    tok_dir = Path(tokenizer_dir or manifest.get("tokenizer_dir") or "")
    if not tok_dir.is_dir():
        raise InspectError(f"{data_dir}: its tokenizer folder {str(tok_dir)!r} is not here; pass --tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    dtype, eos = np.dtype(manifest["dtype"]), manifest.get("eos_token_id", tokenizer.eos_token_id)
    tasks_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for source, entry in sorted(manifest["sources"].items()):
        ids = [shards.open_shard(data_dir, s, dtype) for s in entry["shards"] if s["split"] == "val" and s["tokens"]]
        if not ids:
            continue
        flat = np.concatenate(ids).astype(np.int64)
        docs, start = [], 0
        for end in [*np.flatnonzero(flat == eos).tolist(), len(flat)]:  # documents end at <|endoftext|>
            if end > start:
                text = tokenizer.decode(flat[start:end].tolist(), skip_special_tokens=True)
                if text.strip():
                    docs.append({"text": text})
            start = end + 1
            if len(docs) >= max_documents:
                break
        if not docs:
            continue
        name = _task_name("genesis_val", source)
        data_file = (tasks_dir / f"{name}.jsonl").resolve()
        data_file.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        (tasks_dir / f"{name}.yaml").write_text(
            f"# Held-out text of source {source!r} from {data_dir} ({len(docs)} documents)\n"
            f"task: {name}\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data_file))}\n"
            "test_split: test\n"
            "output_type: loglikelihood_rolling\n"
            'doc_to_text: ""\n'
            'doc_to_target: "{{text}}"\n'
            "metric_list:\n"
            "  - metric: bits_per_byte\n  - metric: byte_perplexity\n  - metric: word_perplexity\n",
            encoding="utf-8")
        names.append(name)
    if not names:
        raise InspectError(f"{data_dir}: no held-out text in any source")
    return names


def write_multiple_choice_task(jsonl: str | Path, tasks_dir: str | Path, name: str) -> str:
    """A task over a local JSONL of {"query": str, "choices": [str, ...], "gold": int}; checks every line."""
    jsonl, tasks_dir = Path(jsonl), Path(tasks_dir)
    for i, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ok = (isinstance(row.get("query"), str) and isinstance(row.get("choices"), list)
                  and isinstance(row.get("gold"), int) and 0 <= row["gold"] < len(row["choices"]))
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            raise InspectError(f"{jsonl}:{i}: expected {{\"query\": str, \"choices\": [str], \"gold\": int index}}")
    tasks_dir.mkdir(parents=True, exist_ok=True)
    (tasks_dir / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(jsonl.resolve()))}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{query}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n", encoding="utf-8")
    return name


def lm_eval_command(model_path: str | Path, tasks_dir: str | Path, tasks: list[str], *, device: str = "cuda",
                    batch_size: int = 8) -> list[str]:
    """The offline `lm_eval` command line for an export (a checkpoint must be exported first)."""
    return ["HF_HUB_OFFLINE=1", "HF_DATASETS_OFFLINE=1", "lm_eval", "--model", "hf", "--model_args",
            f"pretrained={Path(model_path).resolve()},dtype=float32,trust_remote_code=True",
            "--include_path", str(Path(tasks_dir).resolve()), "--tasks", ",".join(tasks),
            "--device", device, "--batch_size", str(batch_size)]


def find_local_tasks(dirs: list[str | Path]) -> dict[str, Path]:
    """{task name: its YAML} for every `task:` YAML under `dirs` (recursively)."""
    import yaml

    found: dict[str, Path] = {}
    for d in dirs:
        for spec in sorted(Path(d).rglob("*.y*ml")):
            try:
                doc = yaml.safe_load(spec.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(doc, dict) and isinstance(doc.get("task"), str):
                found.setdefault(doc["task"], spec)
    return found


def run_lm_eval(model_path: str | Path, tasks: list[str], include: list[str | Path], *, device: str = "cpu",
                batch_size: int = 8, limit: int | None = None) -> dict[str, dict[str, float]]:
    """Run lm-evaluation-harness (the `lm-eval` extra) on an export with LOCAL task files only:
    {task: {metric: value}}. A task that no YAML under `include` defines is refused, naming it and
    the folders searched (offline: lm-eval's own tasks would download their datasets)."""
    model_path = Path(model_path)
    if not (model_path / "config.json").is_file():
        raise InspectError(f"{model_path}: --lm-eval runs on an exported model folder (genesis export CKPT DIR first)")
    local = find_local_tasks(include)
    unknown = [t for t in tasks if t not in local]
    if unknown:
        where = ", ".join(str(Path(d).resolve()) for d in include) or "(no folder given: --lm-eval-include DIR)"
        raise InspectError(f"--lm-eval: unknown task(s) {', '.join(unknown)}: no task YAML defines them; searched "
                           f"{where}; found {', '.join(sorted(local)) or 'none'}")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise InspectError("--lm-eval needs lm-evaluation-harness: pip install -e '.[lm-eval]'") from e
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    manager = TaskManager(include_path=[str(Path(d).resolve()) for d in include], include_defaults=False)
    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(model_path.resolve()), "dtype": "float32", "trust_remote_code": True},
        tasks=list(tasks), task_manager=manager, device=device, batch_size=batch_size, limit=limit,
        log_samples=False)
    return {task: {k.split(",")[0]: v for k, v in res.items() if isinstance(v, (int, float)) and "_stderr" not in k}
            for task, res in out["results"].items()}
