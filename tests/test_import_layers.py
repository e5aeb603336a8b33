"""Imports run one way (docs: STYLE item 11): genesis_hf imports neither training nor alignment,
not even lazily or by name; the loop does not reach into training/inspection; no two files import
each other in alignment's command and cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth, plus strings handed to importlib/__import__."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and getattr(node.func, "attr", getattr(node.func, "id", "")) \
                in ("import_module", "__import__"):
            out.add(node.args[0].value)
    return out


@pytest.mark.parametrize("path", sorted((ROOT / "genesis_hf").glob("*.py")), ids=lambda p: p.name)
def test_genesis_hf_imports_neither_training_nor_alignment(path):
    bad = {m for m in _imports(path) if m.split(".")[0] in ("training", "alignment", "genesis_cli")}
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_the_loop_owns_its_evaluation():
    assert not {m for m in _imports(ROOT / "training" / "pretrain.py") if m.startswith("training.inspection")}
    assert "training.evaluation" in _imports(ROOT / "training" / "inspection" / "evaluate.py")


def test_alignment_cli_and_cycle_do_not_import_each_other():
    assert "alignment.cycle" in _imports(ROOT / "alignment" / "cli.py")  # the command uses the cycle ...
    assert "alignment.cli" not in _imports(ROOT / "alignment" / "cycle.py")  # ... never the other way


def test_checkpoints_are_exported_by_the_training_side(tmp_path):
    from genesis_hf.export import ExportError, export

    (tmp_path / "step-00000001").mkdir()
    (tmp_path / "step-00000001" / "manifest.json").write_text("{}")
    with pytest.raises(ExportError, match=r"is a training checkpoint.*`genesis export .*` \(training.export.export\)"):
        export(tmp_path / "step-00000001", tmp_path / "out")


PRODUCT = sorted(p for d in ("training", "alignment", "genesis_hf") for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("path", PRODUCT, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_product_imports_no_test_double(path):
    """Test doubles (the fake Hub) live under tests/ and are injected by the tests."""
    imported = _imports(path)
    assert not {m for m in imported if m.split(".")[0] in ("tests", "genesis_fake_hub", "conftest")}, imported
    assert "FakeHfApi" not in path.read_text(encoding="utf-8")
