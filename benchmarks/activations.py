"""Activation memory of the student's loss forward, with and without gradient checkpointing
(``model.gradient_checkpointing``), per token and per decoder layer; and what the recompute costs in time.

    python benchmarks/activations.py            # decoder layers shaped like Qwen2-1.5B's (random weights)
    python benchmarks/activations.py --quick    # a tiny random model: checks the script in seconds

Setting: a random ``Qwen2ForCausalLM`` with Qwen2-1.5B's layer shape (hidden 1,536, MLP 8,960, 12 query and 2
KV heads of 128, vocabulary 151,936, tied embeddings), float32 weights, one sequence of 64 prompt + T response
tokens through tropd's loss forward (:func:`tropd.forward.response_hidden_states`), in float32 or under bf16
autocast. Memory is what the forward leaves alive for backward: every storage an operator allocated during the
forward that still exists when it returns (tracked with storage weak references; parameters excluded, autocast's
bf16 weight copies included). Per token and layer is the slope between two model depths and two lengths, so
constant costs (weight copies, the embedding) drop out. Time: forward + backward without the tracking,
median of ``--repeats`` after a warm-up pass.
Writes ``<out>/activations.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = 64


def build(layers: int, quick: bool):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = (dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  vocab_size=128) if quick else
             dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                  head_dim=128, vocab_size=151936))
    torch.manual_seed(0)
    config = Qwen2Config(num_hidden_layers=layers, tie_word_embeddings=True, max_position_embeddings=4096, **shape)
    return Qwen2ForCausalLM(config).eval()


def alive_after_forward(model, tokens: int, bf16: bool):
    """``(bytes the forward left alive, hidden states)``: storages allocated by operators during the forward that
    still exist when it returns, parameters excluded."""
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from tropd.forward import response_hidden_states

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    made: list[tuple[StorageWeakRef, int, int]] = []

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params:
                    s = t.untyped_storage()
                    made.append((StorageWeakRef(s), s.data_ptr(), s.nbytes()))
            return out

    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT + tokens))
    mask = torch.ones_like(ids)
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with cast, Track():
        hidden = response_hidden_states(model, ids, mask, PROMPT)
    alive = {ptr: n for ref, ptr, n in made if not ref.expired()}
    return sum(alive.values()), hidden


def measure(checkpointing: bool, bf16: bool, lengths: tuple[int, int], depths: tuple[int, int], quick: bool,
            repeats: int) -> dict:
    from tropd.forward import enable_gradient_checkpointing

    grid = {}
    for layers in depths:
        model = build(layers, quick)
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.eval()
        for tokens in lengths:
            grid[layers, tokens] = alive_after_forward(model, tokens, bf16)[0]
    (l1, l2), (t1, t2) = depths, lengths
    per_token_layer = ((grid[l2, t2] - grid[l1, t2]) - (grid[l2, t1] - grid[l1, t1])) / ((l2 - l1) * (t2 - t1))
    import torch

    from tropd.forward import response_hidden_states

    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT + t2))  # the deeper model, the longer length
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    times = []
    for _ in range(repeats + 1):  # the first pass warms up
        start = time.perf_counter()
        with cast:
            hidden = response_hidden_states(model, ids, torch.ones_like(ids), PROMPT)
        hidden.float().square().mean().backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    times = times[1:]
    return {"bytes_per_token_per_layer": per_token_layer, "forward_backward_s": statistics.median(times),
            "alive_bytes": {f"{layers} layers, {tokens} tokens": b for (layers, tokens), b in grid.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny random model (seconds): checks the script")
    p.add_argument("--repeats", type=int, default=3, help="timed forward + backward passes (median)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for activations.{json,md}")
    args = p.parse_args(argv)

    lengths, depths = ((32, 64), (1, 2)) if args.quick else ((256, 512), (1, 2))
    results = {}
    for precision in ("float32", "bf16 autocast"):
        for checkpointing in (False, True):
            name = f"{precision}, {'gradient checkpointing' if checkpointing else 'plain'}"
            results[name] = measure(checkpointing, precision != "float32", lengths, depths, args.quick, args.repeats)
            print(name, {k: v for k, v in results[name].items() if k != "alive_bytes"}, flush=True)
    for precision in ("float32", "bf16 autocast"):
        plain, ckpt = results[f"{precision}, plain"], results[f"{precision}, gradient checkpointing"]
        ckpt["memory_vs_plain"] = ckpt["bytes_per_token_per_layer"] / plain["bytes_per_token_per_layer"]
        ckpt["time_vs_plain"] = ckpt["forward_backward_s"] / plain["forward_backward_s"]

    from benchmarks.machine import describe

    shape = "a tiny Qwen2 (hidden 32)" if args.quick else "Qwen2-1.5B-shaped decoder layers (hidden 1,536)"
    setting = (f"`python benchmarks/activations.py{' --quick' if args.quick else ''}` on {describe()}. {shape}, "
               f"{depths[0]} and {depths[1]} layers, {PROMPT} prompt + {lengths[0]} or {lengths[1]} response "
               f"tokens, batch 1; time: forward + backward at {depths[1]} layers and {lengths[1]} response tokens, "
               f"median of {args.repeats} after a warm-up pass.")
    lines = ["# Activation memory of the loss forward, with and without gradient checkpointing", "", setting, "",
             "| setting | KB per token per layer | vs plain | forward + backward s | vs plain |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['bytes_per_token_per_layer'] / 1024:.1f} | "
                     f"{r.get('memory_vs_plain', 1.0):.3f}x | {r['forward_backward_s']:.2f} | "
                     f"{r.get('time_vs_plain', 1.0):.2f}x |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "activations_quick" if args.quick else "activations"
    (out / f"{stem}.json").write_text(json.dumps({"setting": setting, "results": results}, indent=2) + "\n")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
