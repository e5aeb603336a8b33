"""Genesis vs transformers' LlamaForCausalLM: same shape, same weights, same process, interleaved.

    python benchmarks/bench_model.py            # CPU tables, ~2 minutes on 2 cores
    python benchmarks/bench_model.py --gpu      # plus Genesis 1B at micro-batch 4 x 2048, bf16, on CUDA

Writes its section of docs/benchmarks.md. Reported:
- training step (forward + backward): tokens/s and peak memory, ratio Genesis / Llama;
- generation with the KV cache (greedy, batch 1): tokens/s, ratio;
- train step with each decoder layer torch.compile'd, against eager (both models);
- the loss alone at vocab 49,152 over a 4 x 2048 batch: peak memory of `causal_lm_loss`
  against plain `F.cross_entropy` on the full logits (target: at most half);
- on a GPU: the 1B config with activation checkpointing, tokens/s, MFU and peak memory.
CPU peak memory comes from torch's MemTracker (every live tensor: parameters, gradients,
activations, temporaries), CUDA's from `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._report import machine, write_section  # noqa: E402
from genesis_hf import GenesisConfig, GenesisForCausalLM, causal_lm_loss  # noqa: E402
from genesis_hf.export import genesis_to_llama_config  # noqa: E402

# A scaled-down Genesis with the 1B's proportions (head_dim 128, GQA 2:1, FFN ~2.75x, embedding ~15%).
CPU_SHAPE = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)


def pair(config: GenesisConfig, device, dtype):
    torch.manual_seed(0)
    genesis = GenesisForCausalLM(config).to(device, dtype)
    llama = LlamaForCausalLM(genesis_to_llama_config(config)).to(device, dtype)
    llama.load_state_dict(genesis.state_dict(), strict=True)
    return {"Genesis": genesis, "Llama (transformers)": llama}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model, ids):
    # use_cache=False: Llama's config says use_cache, and a training forward that fills a KV cache
    # indexed by layer makes per-layer torch.compile recompile once per layer (eager past 8).
    model(ids, labels=ids, use_cache=False).loss.backward()
    model.zero_grad(set_to_none=True)


def interleaved(models: dict, fn, reps: int, device) -> dict[str, float]:
    """Median seconds per call of fn(model) for each model, alternating which runs first."""
    times = {name: [] for name in models}
    for model in models.values():  # warm-up
        fn(model)
    for rep in range(reps):
        order = list(models.items()) if rep % 2 == 0 else list(models.items())[::-1]
        for name, model in order:
            sync(device)
            start = time.perf_counter()
            fn(model)
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_bytes(fn, device, modules=()) -> int:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - base
    tracker = MemTracker()
    for module in modules:
        tracker.track_external(module)
    with tracker:
        fn()
    return tracker.get_tracker_snapshot("peak")[device]["Total"]


def cpu_tables(reps: int) -> str:
    device = torch.device("cpu")
    config = GenesisConfig(**CPU_SHAPE)
    models = pair(config, device, torch.float32)
    batch, seq = 4, 256
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    step = interleaved(models, lambda m: train_step(m.train(), ids), reps, device)
    mem = {name: peak_bytes(lambda m=m: train_step(m, ids), device, [m]) for name, m in models.items()}

    prompt = torch.randint(0, config.vocab_size, (1, 32))
    new = 96

    def generate(model):
        with torch.no_grad():
            model.eval().generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    gen = interleaved(models, generate, max(3, reps // 2), device)

    g, ll = "Genesis", "Llama (transformers)"
    lines = [
        f"### Genesis vs LlamaForCausalLM on CPU ({machine()})",
        "",
        f"Shape: hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
        f"{config.num_attention_heads}/{config.num_key_value_heads} heads (head_dim {config.head_dim}), "
        f"FFN {config.intermediate_size}, vocab {config.vocab_size}; fp32; same weights; median of {reps} "
        "interleaved repetitions.",
        "",
        "| measure | Genesis | Llama | Genesis / Llama |",
        "| --- | --- | --- | --- |",
        f"| train step tokens/s (batch {batch} x {seq}, fwd+bwd) | {batch * seq / step[g]:,.0f} | "
        f"{batch * seq / step[ll]:,.0f} | **{step[ll] / step[g]:.2f}x** speed |",
        f"| train step peak memory | {mem[g] / 2**20:,.0f} MiB | {mem[ll] / 2**20:,.0f} MiB | "
        f"**{mem[g] / mem[ll]:.2f}x** memory |",
        f"| generation tokens/s (KV cache, batch 1, {new} new tokens) | {new / gen[g]:,.1f} | "
        f"{new / gen[ll]:,.1f} | **{gen[ll] / gen[g]:.2f}x** speed |",
    ]
    return "\n".join(lines)


def compile_table(reps: int) -> str:
    """Train-step speed with each decoder layer `torch.compile`d (inductor), against eager, for
    Genesis and Llama with the same weights (how `torch_compile: true` runs in our scripts)."""
    from training.fsdp import compile_decoder_layers

    device = torch.device("cpu")
    config = GenesisConfig(**CPU_SHAPE)
    models = pair(config, device, torch.float32)
    for model in models.values():
        model.train()
    batch, seq = 4, 256
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    eager = interleaved(models, lambda m: train_step(m, ids), reps, device)
    start = time.perf_counter()
    for model, cls in zip(models.values(), ("GenesisDecoderLayer", "LlamaDecoderLayer")):
        compile_decoder_layers(model, cls)
        train_step(model, ids)  # compiles (untimed)
    compile_s = time.perf_counter() - start
    compiled = interleaved(models, lambda m: train_step(m, ids), reps, device)
    lines = [
        f"### torch.compile per decoder layer, CPU ({machine()})",
        "",
        f"Same shape as above, fp32, train step (fwd+bwd) on batch {batch} x {seq}; median of {reps} interleaved "
        f"repetitions before and after compiling each decoder layer (inductor; compiling both models took "
        f"{compile_s:.0f} s, untimed).",
        "",
        "| model | eager tokens/s | compiled tokens/s | compiled / eager |",
        "| --- | --- | --- | --- |",
    ]
    for name in models:
        lines.append(f"| {name} | {batch * seq / eager[name]:,.0f} | {batch * seq / compiled[name]:,.0f} | "
                     f"**{eager[name] / compiled[name]:.2f}x** |")
    return "\n".join(lines)


def loss_table(reps: int) -> str:
    """The loss alone at the 1B's vocabulary and micro-batch: chunked vs plain cross-entropy."""
    device = torch.device("cpu")
    batch, seq, d, vocab = 4, 2048, 1536, 49152
    torch.manual_seed(0)
    hidden = torch.randn(batch, seq, d, requires_grad=True)
    weight = (torch.randn(vocab, d) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq))

    def plain():
        logits = hidden[:, :-1] @ weight.t()  # (B, T-1, V): what a stock LM head builds
        F.cross_entropy(logits.float().flatten(0, 1), labels[:, 1:].flatten()).backward()

    def chunked():
        causal_lm_loss(hidden, weight, labels, chunk_size=1024).backward()

    def clear():
        hidden.grad = weight.grad = None

    results = {}
    for name, fn in (("plain F.cross_entropy on full logits", plain), ("Genesis causal_lm_loss", chunked)):
        times = []
        for _ in range(max(1, reps // 3)):
            clear()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        clear()
        results[name] = (statistics.median(times), peak_bytes(lambda fn=fn: (fn(), clear()), device))
    (p_name, (p_t, p_m)), (c_name, (c_t, c_m)) = results.items()
    return "\n".join(
        [
            f"### The training loss at vocab {vocab:,}, batch {batch} x {seq}, hidden {d} (CPU, fp32)",
            "",
            "| loss | seconds (fwd+bwd) | peak memory |",
            "| --- | --- | --- |",
            f"| {p_name} | {p_t:.2f} | {p_m / 2**20:,.0f} MiB |",
            f"| {c_name} (chunks of 1024 tokens) | {c_t:.2f} | {c_m / 2**20:,.0f} MiB |",
            "",
            f"Peak memory ratio chunked / plain: **{c_m / p_m:.2f}** (target <= 0.50); "
            f"time ratio plain / chunked: {p_t / c_t:.2f}x.",
        ]
    )


def gpu_table(steps: int) -> str:
    from training.metrics import flops_per_token, matmul_params, mfu, peak_flops

    device = torch.device("cuda")
    config = GenesisConfig()
    batch, seq = 4, 2048
    lines = [
        f"### Genesis 1B on {machine()}",
        "",
        f"Forward + backward, micro-batch {batch} x {seq}, bf16 weights, activation checkpointing per "
        f"decoder layer, SDPA; median of {steps} steps after warm-up, one GPU.",
        "",
        "| model | tokens/s | MFU | peak memory above weights |",
        "| --- | --- | --- | --- |",
    ]
    peak, note = peak_flops(device)
    models = pair(config, device, torch.bfloat16)
    for model in models.values():
        model.train().activation_checkpointing_enable()
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    times = interleaved(models, lambda m: train_step(m, ids), steps, device)
    flops_tok = flops_per_token(config, seq, matmul_params(models["Genesis"]))
    for name, model in models.items():
        tok_s = batch * seq / times[name]
        util = mfu(tok_s, flops_tok, peak)
        mem = peak_bytes(lambda m=model: train_step(m, ids), device)
        lines.append(
            f"| {name} | {tok_s:,.0f} | {'n/a' if util is None else f'{util:.1%}'} | {mem / 2**30:.1f} GiB |"
        )
    g, ll = "Genesis", "Llama (transformers)"
    lines += ["", f"Speed ratio Genesis / Llama: **{times[ll] / times[g]:.2f}x**."]
    lines += ["", f"Peak FLOPs: {note}. FLOPs/token {flops_tok / 1e9:.2f} G (PERFORMANCE.md)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=6, help="timed repetitions per model (default 6)")
    parser.add_argument("--gpu", action="store_true", help="also benchmark the 1B config on CUDA")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    sections = [cpu_tables(args.reps), compile_table(args.reps), loss_table(args.reps)]
    if args.gpu:
        if not torch.cuda.is_available():
            parser.error("--gpu needs CUDA")
        sections.append(gpu_table(args.reps))
    else:
        sections.append(
            "### Genesis 1B on a GPU\n\nNot measured in this run (no GPU); "
            "`python benchmarks/bench_model.py --gpu` on a CUDA machine adds it."
        )
    body = "## Model (`benchmarks/bench_model.py`)\n\n" + "\n\n".join(sections)
    print(body)
    if not args.no_write:
        print(f"\nwrote {write_section('model', body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
