"""The constitution: loading it, critique-and-revise with any HF causal LM, and the model-card record.

Critique-and-revise is the supervised phase of Constitutional AI: for each prompt the model
answers; then, for each principle in turn, it critiques the current answer against that
principle and rewrites it; the last revision is kept as an SFT target. With a scorer, the
revision is kept only when it scores at least as well as the first answer (counted in the stats).

    genesis align revise --model runs/export-40k --prompts alignment/data/pair_prompts.jsonl \
        --output runs/revised.jsonl
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)

DEFAULT_CONSTITUTION = Path(__file__).resolve().parent / "constitution.yaml"
_PRINCIPLE_FIELDS = ("id", "name", "description", "rewards", "penalises", "critique", "revision")


@dataclass(frozen=True)
class Principle:
    id: str
    name: str
    description: str
    rewards: tuple[str, ...]
    penalises: tuple[str, ...]
    critique: str
    revision: str


@dataclass(frozen=True)
class Constitution:
    name: str
    version: str
    summary: str
    principles: tuple[Principle, ...]
    path: str
    sha256: str  # of the file's bytes: lineage compares cycles by it

    def principle(self, pid: str) -> Principle:
        for p in self.principles:
            if p.id == pid:
                return p
        raise KeyError(f"constitution {self.path} has no principle {pid!r}; it has {[p.id for p in self.principles]}")


def load_constitution(path: str | Path | None = None) -> Constitution:
    """Read and validate a constitution YAML; errors name the file and the field."""
    from alignment.data import resolve_path

    path = resolve_path(path) if path else DEFAULT_CONSTITUTION
    if not path.is_file():
        raise FileNotFoundError(f"constitution file {path} does not exist")
    raw = path.read_bytes()
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: not valid UTF-8 YAML ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with version, name, summary, principles")
    for key in ("version", "name", "principles"):
        if key not in data:
            raise ValueError(f"{path}: missing field {key!r}")
    if not isinstance(data["principles"], list) or not data["principles"]:
        raise ValueError(f"{path}: field 'principles' must be a non-empty list")
    principles = []
    for i, p in enumerate(data["principles"]):
        if not isinstance(p, dict):
            raise ValueError(f"{path}: principles[{i}] must be a mapping")
        for f in _PRINCIPLE_FIELDS:
            if not p.get(f):
                raise ValueError(f"{path}: principles[{i}] ({p.get('id', '?')}) is missing field {f!r}")
        principles.append(
            Principle(
                id=str(p["id"]),
                name=str(p["name"]),
                description=" ".join(str(p["description"]).split()),
                rewards=tuple(p["rewards"]),
                penalises=tuple(p["penalises"]),
                critique=str(p["critique"]),
                revision=str(p["revision"]),
            )
        )
    ids = [p.id for p in principles]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate principle ids in {ids}")
    return Constitution(
        name=str(data["name"]),
        version=str(data["version"]),
        summary=" ".join(str(data.get("summary", "")).split()),
        principles=tuple(principles),
        path=str(path),
        sha256=hashlib.sha256(raw).hexdigest(),
    )


# --- critique and revise -----------------------------------------------------------------------


def critique_request(principle: Principle, prompt: str, answer: str) -> str:
    return (
        f"Here is a question and an answer.\n\nQuestion: {prompt}\n\nAnswer: {answer}\n\n"
        f"Principle - {principle.name}: {principle.description}\n"
        f"Critique the answer against this principle. {principle.critique}"
    )


def revision_request(principle: Principle, prompt: str, answer: str, critique: str) -> str:
    return (
        f"Question: {prompt}\n\nAnswer: {answer}\n\nCritique ({principle.name}): {critique}\n\n"
        f"{principle.revision} Reply with the revised answer only."
    )


def critique_and_revise(
    model,
    tokenizer,
    prompts: list[str],
    constitution: Constitution,
    principles: list[str] | None = None,
    scorer=None,
    max_new_tokens: int = 256,
    seed: int = 0,
) -> tuple[list[dict], dict]:
    """Generate -> (critique -> revise) per principle -> keep. Returns (rows, stats).

    Each row holds the SFT conversation (`messages`: user prompt, kept answer) plus the trail
    (`initial`, `critiques`, `revision`, `kept`). Batched across prompts: one generate call per
    stage and principle.
    """
    from alignment.generate import generate_replies

    chosen = [constitution.principle(pid) for pid in principles] if principles else list(constitution.principles)
    user = [[{"role": "user", "content": p}] for p in prompts]
    initial = [r[0] for r in generate_replies(model, tokenizer, user, max_new_tokens, seed=seed)]
    current = list(initial)
    trails: list[list[dict]] = [[] for _ in prompts]
    for principle in chosen:
        asks = [[{"role": "user", "content": critique_request(principle, p, a)}] for p, a in zip(prompts, current)]
        critiques = [r[0] for r in generate_replies(model, tokenizer, asks, max_new_tokens, seed=seed)]
        asks = [
            [{"role": "user", "content": revision_request(principle, p, a, c)}]
            for p, a, c in zip(prompts, current, critiques)
        ]
        revisions = [r[0] for r in generate_replies(model, tokenizer, asks, max_new_tokens, seed=seed)]
        for i, (c, r) in enumerate(zip(critiques, revisions)):
            trails[i].append({"principle": principle.id, "critique": c, "revision": r})
            if r.strip():  # an empty revision keeps the previous answer
                current[i] = r

    rows, stats = [], {"prompts": len(prompts), "kept_revision": 0, "kept_initial": 0, "empty": 0}
    for p, first, last, trail in zip(prompts, initial, current, trails):
        kept = "revision"
        if scorer is not None and scorer.score(p, last).total < scorer.score(p, first).total:
            kept = "initial"
        answer = last if kept == "revision" else first
        if not answer.strip():
            stats["empty"] += 1
            continue
        stats[f"kept_{kept}"] += 1
        rows.append(
            {
                "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": answer}],
                "initial": first,
                "critiques": trail,
                "kept": kept,
                "constitution_version": constitution.version,
            }
        )
    logger.info("critique-and-revise: %s", stats)
    return rows, stats


# --- model card ----------------------------------------------------------------------------------


def model_card_section(constitution: Constitution, stage: str, extra: dict | None = None) -> str:
    lines = [
        "## Alignment",
        "",
        f"Stage: **{stage}**, trained with TRL under the **{constitution.name}** constitution, "
        f"version **{constitution.version}** (sha256 `{constitution.sha256[:16]}`).",
        "",
        constitution.summary,
        "",
        "| principle | what it asks |",
        "| --- | --- |",
    ]
    lines += [f"| {p.name} | {p.description} |" for p in constitution.principles]
    if extra:
        lines += ["", "```json", json.dumps(extra, indent=2, sort_keys=True, default=str), "```"]
    return "\n".join(lines) + "\n"


def record_in_model_card(output_dir: str | Path, constitution: Constitution, stage: str, extra: dict | None = None):
    """Write the constitution into `README.md` (replacing an earlier Alignment section), copy the YAML, and
    write `alignment.json` (stage, constitution, `extra`): what a cycle's lineage reads back."""
    out = Path(output_dir)
    card = out / "README.md"
    text = card.read_text(encoding="utf-8") if card.exists() else f"---\nlibrary_name: transformers\n---\n# {out.name}\n"
    head = text.split("\n## Alignment\n")[0].rstrip("\n") + "\n\n"
    tmp = card.with_suffix(".md.tmp")
    tmp.write_text(head + model_card_section(constitution, stage, extra), encoding="utf-8")
    tmp.replace(card)
    (out / "constitution.yaml").write_bytes(Path(constitution.path).read_bytes())
    record = {"stage": stage, "constitution": {"name": constitution.name, "version": constitution.version,
                                               "sha256": constitution.sha256}, **(extra or {})}
    tmp = out / "alignment.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    tmp.replace(out / "alignment.json")
