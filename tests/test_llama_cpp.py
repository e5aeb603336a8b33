"""llama.cpp itself reads our GGUF: the same token ids as the HF tokenizer (its `llama-tokenize`),
the same logits and the same greedy continuations (its API, through tests/llama_cpp_check.cpp);
and llama.cpp's own converter refuses our tokenizer instead of getting it wrong.

Slow: the first run builds llama.cpp from the `llama-cpp-python` sdist on the package index
(it vendors llama.cpp) into the user cache folder, about 5-8 minutes on 2 cores; later runs
reuse the build (~/.cache/genesis/llama.cpp-<version>/llama.cpp/build).

    pytest --runslow tests/test_llama_cpp.py
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from test_tokenizer import ROUND_TRIP

pytestmark = pytest.mark.slow

LLAMA_CPP_PYTHON = "0.3.36"  # its sdist vendors llama.cpp under vendor/llama.cpp
TARGETS = ("llama-tokenize",)  # also builds the static libraries llama_cpp_check.cpp links
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               "-DGGML_NATIVE=OFF"]  # fmt: skip
LIBS = ("src/libllama.a", "ggml/src/libggml.a", "ggml/src/libggml-cpu.a", "ggml/src/libggml-base.a")
TEXTS = dict(ROUND_TRIP) | {
    "georgian": "ქართული ენა მსოფლიოში ერთ-ერთი უძველესი ენაა.",
    "crlf": "line one\r\nline two\r\n\r\n  indented\r\n",
    "whitespace": "a\t\t b    \n\n\n   \t\n  end   ",
    "digits": "In 2024, 1234567 + 89 = 1234656; π≈3.14159",
    "contractions": "I'M sure they'LL say it's fine, WE'VE DONE it. 'S 'd",
    "unicode_spaces": "Straße 東京 مرحبا 🙂 ქართ\u00a0nbsp\u2003em\u3000ideographic",
    "chat": "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{}\n</tool_call>",
    "python": "class A:\n    def __init__(self):\n        self.x = {'k': [1, 2]}\n\n\tif x:\n\t\treturn",
}


def _cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "genesis" / f"llama.cpp-{LLAMA_CPP_PYTHON}"


def _run(cmd: list, log: Path, **kw) -> None:
    with open(log, "ab") as fh:
        res = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, **kw)
    if res.returncode:
        tail = log.read_text(errors="replace")[-3000:]
        pytest.fail(f"{' '.join(map(str, cmd))} failed (rc {res.returncode}); log {log}:\n{tail}")


@pytest.fixture(scope="session")
def llama_cpp() -> Path:
    """The vendored llama.cpp source tree with TARGETS built in build/bin (built once, then reused)."""
    root = _cache_root()
    src = root / "llama.cpp"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two sessions never build into one tree at once
        if all((src / "build" / "bin" / t).is_file() for t in TARGETS) and all(
            (src / "build" / lib).is_file() for lib in LIBS
        ):
            return src
        log = root / "build.log"
        if not (src / "CMakeLists.txt").is_file():
            dl = root / "sdist"
            shutil.rmtree(dl, ignore_errors=True)
            res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                                  "-d", str(dl), f"llama-cpp-python=={LLAMA_CPP_PYTHON}"],
                                 capture_output=True, text=True)  # fmt: skip
            if res.returncode:
                pytest.skip(f"cannot download the llama-cpp-python {LLAMA_CPP_PYTHON} sdist: {res.stderr[-500:]}")
            (archive,) = dl.glob("*.tar.gz")
            prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
            tmp = root / "llama.cpp.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            with tarfile.open(archive) as tar:
                members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
                for m in members:
                    m.name = m.name[len(prefix):]
                tar.extractall(tmp, members=members, filter="data")
            shutil.rmtree(src, ignore_errors=True)
            os.replace(tmp, src)
            shutil.rmtree(dl)
        jobs = str(max(1, min(4, os.cpu_count() or 1)))
        _run(["cmake", "-B", "build", *CMAKE_FLAGS], log, cwd=src)
        _run(["cmake", "--build", "build", "-j", jobs, "--target", *TARGETS], log, cwd=src)
    return src


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A small model trained to memorise a few pages, so greedy text is real text, not one token
    repeated; its tokenizer has merges inside multi-byte characters (trained on TEXTS too)."""
    from genesis_hf import GenesisConfig, GenesisForCausalLM
    from genesis_hf.tokenizer import train_tokenizer
    from training.data.corpus import iter_documents

    root = tmp_path_factory.mktemp("llama-cpp") / "model"
    docs = [d["text"] for kind in ("prose", "code") for d in itertools.islice(iter_documents(kind), 30)]
    tok = train_tokenizer(iter(docs + list(TEXTS.values()) * 3), 1024, show_progress=False)
    torch.manual_seed(0)
    model = GenesisForCausalLM(GenesisConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=160,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=256))  # fmt: skip
    pages = "".join(d[:1500] for d in docs[:4])  # a few pages, to memorise
    ids = torch.tensor(tok.encode(pages))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        starts = torch.randint(0, len(ids) - 65, (8,))
        batch = torch.stack([ids[s : s + 65] for s in starts])  # (8, 65)
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval().save_pretrained(root)
    tok.save_pretrained(root)
    (root / "pages.txt").write_text(pages)
    return root


@pytest.fixture(scope="module")
def gguf_f32(trained, tmp_path_factory) -> Path:
    from genesis_hf.export import export

    return export(trained, tmp_path_factory.mktemp("gguf") / "model-f32.gguf", fmt="gguf", outtype="f32")


def _llama_tokenize(bin_dir: Path, gguf: Path, text: str, tmp: Path) -> list[int]:
    f = tmp / "prompt.txt"
    f.write_bytes(text.encode("utf-8"))  # a file: bytes exactly (CRLF, trailing spaces)
    res = subprocess.run([bin_dir / "llama-tokenize", "-m", gguf, "-f", f, "--ids", "--no-escape", "--log-disable"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_llama_cpp_tokenizes_like_hf(llama_cpp, trained, gguf_f32, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained)
    bins = llama_cpp / "build" / "bin"
    differ = {}
    for name, text in TEXTS.items():
        want = tok.encode(text)
        got = _llama_tokenize(bins, gguf_f32, text, tmp_path)
        if got != want:
            differ[name] = (want[:12], got[:12])
    assert not differ, f"{len(differ)} of {len(TEXTS)} strings tokenize differently: {differ}"
    # not trivially equal: merges inside multi-byte characters were learned and used
    assert any(len(tok.convert_ids_to_tokens(i)) > 1 and ord(tok.convert_ids_to_tokens(i)[0]) > 0x7F
               for i in tok.encode(TEXTS["chinese"] + TEXTS["georgian"]))  # fmt: skip
    assert tok.convert_tokens_to_ids("<|im_end|>") in tok.encode(TEXTS["chat"])  # specials as one token


@pytest.fixture(scope="module")
def llama_check(llama_cpp, tmp_path_factory) -> Path:
    """tests/llama_cpp_check.cpp linked against the cached build's static libraries (seconds)."""
    exe = tmp_path_factory.mktemp("bin") / "llama-check"
    cmd = ["g++", "-O2", "-std=c++17", Path(__file__).with_name("llama_cpp_check.cpp"),
           f"-I{llama_cpp / 'include'}", f"-I{llama_cpp / 'ggml' / 'include'}",
           *[llama_cpp / "build" / lib for lib in LIBS], "-fopenmp", "-lpthread", "-ldl", "-o", exe]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return exe


def _greedy_hf(model, tok, prompt: str) -> tuple[list[int], list[int]]:
    """(prompt ids, up to 32 new ids, ending with a stop token if one came)."""
    from genesis_hf.tokenizer import CHAT_STOP_TOKENS

    stop = [tok.convert_tokens_to_ids(t) for t in CHAT_STOP_TOKENS]  # llama.cpp's end-of-generation set
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=stop, pad_token_id=1)
    return ids[0].tolist(), out[0, ids.shape[1]:].tolist()


def _prompts(trained: Path) -> list[str]:
    pages = (trained / "pages.txt").read_text()
    return [pages[:40], pages[1500:1530], pages[3000:3050], "def main(argv):\n    ", "Return the number of"]


def test_llama_cpp_logits_are_transformers_logits(trained, gguf_f32, llama_check):
    from transformers import AutoTokenizer

    from genesis_hf import GenesisForCausalLM

    tok = AutoTokenizer.from_pretrained(trained)
    model = GenesisForCausalLM.from_pretrained(trained, dtype=torch.float32).eval()
    for prompt in _prompts(trained)[:2]:
        prompt_ids, new = _greedy_hf(model, tok, prompt)
        ids = prompt_ids + new
        res = subprocess.run([llama_check, "logits", gguf_f32, *map(str, ids)], capture_output=True, text=True,
                             timeout=120)  # fmt: skip
        assert res.returncode == 0, res.stderr[-2000:]
        got = torch.tensor([[float(x) for x in line.split()] for line in res.stdout.strip().splitlines()])
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0]  # (T, V)
        assert got.shape == want.shape
        assert want.abs().max() > 5  # a trained model's logits, not ~0
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_llama_cpp_greedy_continuation_is_transformers_greedy(trained, gguf_f32, llama_check):
    from transformers import AutoTokenizer

    from genesis_hf import GenesisForCausalLM

    tok = AutoTokenizer.from_pretrained(trained)
    model = GenesisForCausalLM.from_pretrained(trained, dtype=torch.float32).eval()
    distinct = set()
    for prompt in _prompts(trained):
        want = _greedy_hf(model, tok, prompt)
        res = subprocess.run([llama_check, "generate", gguf_f32, "32", prompt], capture_output=True, text=True,
                             timeout=300)  # fmt: skip
        assert res.returncode == 0, res.stderr[-2000:]
        got = tuple(json.loads(line) for line in res.stdout.strip().splitlines())
        assert got == want, (prompt, tok.decode(want[1]), tok.decode(got[1]))  # prompt ids (no BOS), then 32 new
        distinct.update(want[1])
    assert len(distinct) > 20  # real text, not one token repeated


def test_llama_cpp_converter_refuses_our_tokenizer_loudly(llama_cpp, trained, tmp_path):
    """llama.cpp's own converter on a `--format llama` folder: it must fail, never write a GGUF
    that tokenizes differently (it identifies BPE pre-tokenizers by hash and does not know ours)."""
    from genesis_hf.export import export

    llama_dir = export(trained, tmp_path / "llama", fmt="llama")
    out = tmp_path / "converted.gguf"
    env = dict(os.environ, PYTHONPATH=str(llama_cpp / "gguf-py"))
    res = subprocess.run([sys.executable, llama_cpp / "convert_hf_to_gguf.py", llama_dir, "--outfile", out,
                          "--outtype", "f32"], capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert res.returncode != 0, res.stdout[-2000:]
    assert "BPE pre-tokenizer was not recognized" in res.stderr, res.stderr[-3000:]
    assert not out.exists()
