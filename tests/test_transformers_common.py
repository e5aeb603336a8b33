"""transformers' own common model tests, run on Genesis with transformers' Llama as the control.

At test time the source distribution of the INSTALLED transformers is fetched from the package
registry (`pip download --no-deps --no-binary :all: transformers==X`, cached under
~/.cache/genesis-test, or $GENESIS_TEST_CACHE) and its `tests/test_modeling_common.py` is imported;
nothing of it is copied into this repository. The sdist lacks `tests/generation/test_utils.py` and
`tests/exporters/`, so the two mixins `ModelTesterMixin` inherits from there are stood in by empty
classes (the generation tests are not run here; tests/test_model.py covers generation).

`ModelTesterMixin` runs twice in one process, with one small tester of ours: on the five Genesis
classes and on Llama's five. Every test that passes on Llama must pass on Genesis (a skip on Genesis
where Llama passes counts as a failure). No registry: skipped, saying why.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import time
import types
import unittest
from pathlib import Path
from unittest import mock

import pytest
import torch
import transformers
from transformers import LlamaConfig
from transformers.models.auto import modeling_auto
from transformers.models.llama import modeling_llama

import genesis_hf
from genesis_hf import (
    GenesisConfig,
    GenesisForCausalLM,
    GenesisForQuestionAnswering,
    GenesisForSequenceClassification,
    GenesisForTokenClassification,
    GenesisModel,
)

VERSION = transformers.__version__
CACHE = Path(os.environ.get("GENESIS_TEST_CACHE", Path.home() / ".cache" / "genesis-test"))
PACKAGE = "_hf_common_tests"  # the sdist's tests/ folder, imported under this name

# Tests that need what the sdist does not ship, on both models alike.
NOT_HERE = ("test_torch_export",)
# The suite's budget (about a minute on 2 cores) holds the base model and the causal LM, and the fp32 cases of
# eager-vs-SDPA (fp16/bf16 on CPU repeat them at 3x the time). GENESIS_COMMON_TESTS=all runs every test on all
# five classes (about 5 minutes here).
FULL = os.environ.get("GENESIS_COMMON_TESTS") == "all"
REDUCED_PRECISION = re.compile(r"test_eager_matches_sdpa_inference_\d+_(fp16|bf16)_")
MARKERS = ("accelerate_tests", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "torch_compile_test")


def _sdist_tests() -> Path:
    """The sdist's tests/ folder for the installed transformers: cached, else downloaded, else skip."""
    tests = CACHE / f"transformers-{VERSION}" / "tests"
    if (tests / "test_modeling_common.py").exists():
        return tests
    CACHE.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"transformers=={VERSION}",
           "-d", str(CACHE), "--quiet"]  # fmt: skip
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        detail = getattr(err, "stderr", "") or str(err)
        pytest.skip(f"transformers=={VERSION} sdist not downloadable from the package registry: {detail[-300:]}")
    with tarfile.open(CACHE / f"transformers-{VERSION}.tar.gz") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f"transformers-{VERSION}/tests/")]
        tar.extractall(CACHE, members=members, filter="data")
    return tests


def _import_common(tests: Path, pytest_config):
    """Import tests/test_modeling_common.py as `_hf_common_tests.test_modeling_common`."""
    if f"{PACKAGE}.test_modeling_common" in sys.modules:
        return sys.modules[f"{PACKAGE}.test_modeling_common"]
    for marker in MARKERS:  # transformers' conftest registers them; our --strict-markers would refuse them
        pytest_config.addinivalue_line("markers", f"{marker}: transformers' common tests")
    pytest.importorskip("parameterized", reason="transformers' common tests need `parameterized` (dev extra)")
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(tests)]
    sys.modules[PACKAGE] = package
    # Not in the sdist: the generation and export mixins ModelTesterMixin derives from.
    for name, mixin in (("exporters.test_export", "ExportTesterMixin"), ("generation.test_utils", "GenerationTesterMixin")):
        parent = f"{PACKAGE}.{name.split('.')[0]}"
        sys.modules.setdefault(parent, types.ModuleType(parent)).__path__ = []
        stub = types.ModuleType(f"{PACKAGE}.{name}")
        setattr(stub, mixin, type(mixin, (), {}))
        sys.modules[stub.__name__] = stub
    spec = importlib.util.spec_from_file_location(f"{PACKAGE}.test_modeling_common", tests / "test_modeling_common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class SmallTester:
    """The inputs and sizes ModelTesterMixin asks of a decoder-only text model (Llama's tester's shapes)."""

    batch_size, seq_length, vocab_size = 13, 7, 99
    hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads = 32, 2, 4, 2
    intermediate_size, max_position_embeddings, num_labels = 37, 512, 3
    is_training, use_input_mask, use_labels = True, True, True

    def __init__(self, parent, config_class):
        self.parent, self.config_class = parent, config_class

    def get_config(self):
        return self.config_class(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            num_labels=self.num_labels,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            initializer_range=0.02,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        )

    def prepare_config_and_inputs_for_common(self):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, self.vocab_size, (self.batch_size, self.seq_length), generator=g)
        mask = torch.ones_like(ids)
        mask[:, :2] = torch.randint(0, 2, (self.batch_size, 2), generator=g)  # some left padding
        return self.get_config(), {"input_ids": ids, "attention_mask": mask}


GENESIS_CLASSES = (GenesisModel, GenesisForCausalLM, GenesisForSequenceClassification,
                   GenesisForTokenClassification, GenesisForQuestionAnswering)  # fmt: skip
LLAMA_CLASSES = tuple(getattr(modeling_llama, c.__name__.replace("Genesis", "Llama")) for c in GENESIS_CLASSES)


def _auto_names():
    """Genesis in transformers' `*_MAPPING_NAMES`, where the mixin looks a class up by its name."""
    patches = []
    for table, cls in (("MODEL_MAPPING_NAMES", GenesisModel), ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", GenesisForCausalLM),
                       ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", GenesisForSequenceClassification),
                       ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", GenesisForTokenClassification),
                       ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", GenesisForQuestionAnswering)):  # fmt: skip
        patches.append(mock.patch.dict(getattr(modeling_auto, table), {"genesis": cls.__name__}))
    return patches


def _run(common, classes, config_class) -> dict[str, str]:
    """Run every ModelTesterMixin test on `classes`; {test name: passed | failed | skipped}."""

    class Case(common.ModelTesterMixin, unittest.TestCase):
        all_model_classes = classes
        pipeline_model_mapping = {}

        def setUp(self):
            self.model_tester = SmallTester(self, config_class)

    outcome = {}

    class Result(unittest.TestResult):
        def addSuccess(self, test):
            outcome[test._testMethodName] = "passed"

        def addFailure(self, test, err):
            outcome[test._testMethodName] = f"failed: {self._exc_info_to_string(err, test)[-600:]}"

        addError = addFailure

        def addSkip(self, test, reason):
            outcome[test._testMethodName] = f"skipped: {reason}"

    names = [n for n in unittest.TestLoader().getTestCaseNames(Case) if not n.startswith(NOT_HERE)]
    if not FULL:
        names = [n for n in names if not REDUCED_PRECISION.match(n)]
    unittest.TestSuite(Case(n) for n in names).run(Result())
    return outcome


def test_genesis_passes_every_common_model_test_llama_passes(capsys, pytestconfig):
    common = _import_common(_sdist_tests(), pytestconfig)
    started = time.perf_counter()
    patches = _auto_names()
    for p in patches:
        p.start()
    try:
        torch.manual_seed(0)
        classes = slice(None) if FULL else slice(2)  # base model and causal LM; the heads with FULL
        llama = _run(common, LLAMA_CLASSES[classes], LlamaConfig)
        genesis = _run(common, GENESIS_CLASSES[classes], GenesisConfig)
    finally:
        for p in patches:
            p.stop()
    seconds = time.perf_counter() - started
    control = [n for n, r in llama.items() if r == "passed"]
    behind = {n: genesis.get(n, "not run") for n in control if genesis.get(n) != "passed"}
    with capsys.disabled():
        print(f"\ntransformers {VERSION} common tests: Llama passed {len(control)}/{len(llama)}, Genesis passed "
              f"{sum(r == 'passed' for r in genesis.values())}/{len(genesis)} in {seconds:.0f} s")  # fmt: skip
    assert len(control) > 50, f"the control ran too few tests: {llama}"
    assert not behind, "Genesis fails tests Llama passes:\n" + "\n".join(f"{n}: {r}" for n, r in behind.items())
    assert genesis_hf.GenesisForCausalLM is GenesisForCausalLM
