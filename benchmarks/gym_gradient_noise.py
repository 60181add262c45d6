"""How noisy is each method's gradient on a gym starting student? The measurement behind docs/gym.md's mechanism.

    python benchmarks/gym_gradient_noise.py                 # the gym's teacher, the first design's matched student
    python benchmarks/gym_gradient_noise.py --quick         # tiny models (seconds): checks the script

From the start student, ``--pool`` training prompts each get one response sampled at temperature 1 (student
rows), and one written by the teacher (teacher rows, for SFT). For every row ``i`` the gradient of its summed
token losses ``G_i`` is taken once; the gradient of any batch ``B`` of rows is then ``g_B = Σ_{i∈B} G_i /
Σ_{i∈B} n_i`` (the trainer's token mean). Reported per method and batch size ``b`` (rows per step), over
``--draws`` random batches:

- ``cos``: mean cosine between ``g_B`` and the method's *expected* gradient, estimated on the whole pool. For
  ``opd`` (K1 REINFORCE) the expectation is the exact reverse-KL gradient (docs/objectives.md), so its reference is
  the pool gradient of ``rkl_exact`` (``gkd`` with ``beta = 1``, every sample on-policy). ``fkl_outlier`` (TrOPD's
  trust region and top-k forward KL on the outliers, without guidance) is another objective: its reference is
  its own pool gradient, whose cosine to the exact reverse-KL gradient is reported too.
- ``snr``: ``|E g|² / E|g_B − E g|²``, the signal-to-noise ratio of one step's gradient (1 = as much noise as
  signal); it grows linearly in ``b`` for an unbiased estimator.

Also the K1 rewards ``r_t = log π_T(y_t) − log π_S(y_t)`` of the student rows: quantiles, the share of tokens
below TrOPD's outlier threshold ``τ = log(0.2/0.8)``, and the share of ``Σ r_t²`` (the squared per-token REINFORCE
weights, which set the K1 gradient's size) that those tokens carry. Writes ``<out>/gym_gradient_noise.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: label -> (objective, kwargs). ``sft`` trains on teacher-written rows, the others on the student's own samples.
METHODS = {"opd": ("opd", {}), "rkl_exact": ("gkd", {"beta": 1.0, "lmbda": 1.0}),
           "fkl_outlier": ("fkl_outlier", {"top_k": 16}), "sft": ("sft", {})}
TAU = math.log(0.2 / 0.8)


def row_gradients(student, teacher, batch, objective) -> "torch.Tensor":
    """``[n_rows, n_params]``: the gradient of each row's summed token losses under ``objective``."""
    import torch

    from tropd.forward import response_logits
    from tropd.objectives import TokenInputs
    from tropd.teacher import score_with_teacher

    scores = score_with_teacher(teacher, batch.input_ids, batch.attention_mask, batch.response_start,
                                batch.tokens, objective.needs)
    params = [p for p in student.parameters() if p.requires_grad]
    rows = []
    for i in range(batch.tokens.shape[0]):
        pick = slice(i, i + 1)
        logits = response_logits(student, batch.input_ids[pick], batch.attention_mask[pick], batch.response_start)
        fields = {k: (v[pick] if v is not None else None) for k, v in scores.as_kwargs().items()}
        out = objective(TokenInputs(student_logits=logits, tokens=batch.tokens[pick],
                                    behavior_logprobs=batch.behavior_logprobs[pick], loss_mask=batch.loss_mask[pick],
                                    teacher_token_mask=batch.teacher_token_mask[pick], **fields), num_tokens=1)
        grads = torch.autograd.grad(out.loss, params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                               for g, p in zip(grads, params)]))
    return torch.stack(rows)


def batch_stats(grads, counts, reference, sizes: list[int], draws: int, seed: int) -> dict:
    """Mean cosine to ``reference`` and SNR of batch gradients of each size (rows drawn without replacement)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    ref_sq = float(reference.pow(2).sum())
    for b in sizes:
        cos, err = [], []
        for _ in range(draws):
            idx = torch.randperm(grads.shape[0], generator=gen)[:b]
            g = grads[idx].sum(0) / counts[idx].sum()
            cos.append(float(torch.nn.functional.cosine_similarity(g, reference, dim=0)))
            err.append(float((g - reference).pow(2).sum()))
        mean_err = sum(err) / len(err)
        out[str(b)] = {"cos": sum(cos) / len(cos), "snr": ref_sq / mean_err if mean_err > 0 else math.inf}
    return out


def reward_stats(batch, teacher) -> dict:
    import torch

    from tropd.needs import Needs
    from tropd.teacher import score_with_teacher

    q = score_with_teacher(teacher, batch.input_ids, batch.attention_mask, batch.response_start, batch.tokens,
                           Needs(teacher_logprobs=True)).teacher_logprobs
    r = (q - batch.behavior_logprobs)[batch.loss_mask].double()
    low = r < TAU
    rows_with_outlier = ((q - batch.behavior_logprobs < TAU) & batch.loss_mask).any(1).double().mean()
    return {"tokens": int(r.numel()), "p01": float(torch.quantile(r, 0.01)), "p10": float(torch.quantile(r, 0.10)),
            "median": float(r.median()), "min": float(r.min()), "share_below_tau": float(low.double().mean()),
            "share_of_r2_below_tau": float(r[low].pow(2).sum() / r.pow(2).sum()),
            "rows_with_a_token_below_tau": float(rows_with_outlier)}


def measure(spec, teacher_folder: Path, student_folder: Path, pool: int, sizes: list[int], draws: int,
            seed: int, log=print) -> dict:
    import torch

    from tropd.gym.run import write_prompts
    from tropd.gym.tokenizer import build_tokenizer
    from tropd.models import load_causal_lm
    from tropd.objectives import get_objective
    from tropd.rollout.sampling import SamplingConfig, sample, sample_teacher
    from tropd.teacher import InProcessTeacher

    tok = build_tokenizer()
    student = load_causal_lm(student_folder)[0].eval()
    teacher = load_causal_lm(teacher_folder)[0].eval().requires_grad_(False)
    prompts_file = write_prompts(spec, Path(os.environ.get("TMPDIR", "/tmp")) / f"tropd-noise-{os.getpid()}.jsonl",
                                 n=pool)
    prompts = [tok(json.loads(line)["prompt"])["input_ids"] for line in prompts_file.read_text().splitlines()]
    prompts_file.unlink()
    cfg = SamplingConfig(max_new_tokens=spec.max_new_tokens, eos_token_ids=(tok.eos_token_id,),
                         pad_token_id=tok.pad_token_id, temperature=1.0)
    with torch.no_grad():
        own = sample(student, prompts, cfg, streams=seed)
        written = sample_teacher(InProcessTeacher(teacher), prompts, cfg, streams=seed + 1)
    result = {"rewards": reward_stats(own, teacher), "methods": {}}
    grads, counts = {}, {}
    for label, (name, kwargs) in METHODS.items():
        t0 = time.perf_counter()
        batch = written if name == "sft" else own
        grads[label] = row_gradients(student, teacher, batch, get_objective(name, **kwargs))
        counts[label] = batch.loss_mask.sum(1).double()
        log(f"{label}: {grads[label].shape[0]} row gradients in {time.perf_counter() - t0:.0f}s")
    expected = {label: grads[label].sum(0) / counts[label].sum() for label in grads}
    expected["opd"] = expected["rkl_exact"]  # K1 is an unbiased estimate of the exact reverse-KL gradient
    for label in METHODS:
        result["methods"][label] = batch_stats(grads[label], counts[label], expected[label], sizes, draws, seed)
    pooled = {label: grads[label].sum(0) / counts[label].sum() for label in grads}
    result["pool_cos_to_exact"] = {
        label: float(torch.nn.functional.cosine_similarity(pooled[label], expected["rkl_exact"], dim=0))
        for label in ("opd", "fkl_outlier", "sft")}
    return result


def table(result: dict, meta: dict) -> str:
    sizes = sorted({int(b) for m in result["methods"].values() for b in m})
    rw = result["rewards"]
    lines = ["# Gradient noise of each method on a gym start student", "",
             f"`{meta['command']}` on {meta['machine']}; {meta['duration']:.0f} s. Student `{meta['student']}` "
             f"({meta['start']} start, held-out accuracy {100 * meta['start_accuracy']:.1f}%), teacher "
             f"`{meta['teacher']}`; pool of {meta['pool']} rows per method, {meta['draws']} random batches per size.",
             "",
             "| method | " + " | ".join(f"cos to E g, b = {b}" for b in sizes) + " | "
             + " | ".join(f"SNR, b = {b}" for b in sizes) + " |",
             "|---|" + "---|" * (2 * len(sizes))]
    for label, stats in result["methods"].items():
        lines.append(f"| {label} | " + " | ".join(f"{stats[str(b)]['cos']:.3f}" for b in sizes) + " | "
                     + " | ".join(f"{stats[str(b)]['snr']:.3f}" for b in sizes) + " |")
    lines += ["", "Cosine of each method's whole-pool gradient to the exact reverse-KL gradient: "
              + ", ".join(f"{k} {v:.3f}" for k, v in result["pool_cos_to_exact"].items()) + ".", "",
              f"K1 rewards of the student's own samples ({rw['tokens']} tokens): min {rw['min']:.1f}, p01 "
              f"{rw['p01']:.2f}, p10 {rw['p10']:.3f}, median {rw['median']:.4f}; {100 * rw['share_below_tau']:.1f}% "
              f"of tokens are below τ = log(0.2/0.8) and carry {100 * rw['share_of_r2_below_tau']:.1f}% of Σ r²; "
              f"{100 * rw['rows_with_a_token_below_tau']:.0f}% of rows hold at least one such token.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.machine import describe

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, small pool: checks the script in seconds")
    p.add_argument("--mismatch", type=float, default=0.0, help="which start student (the gym's knob)")
    p.add_argument("--pool", type=int, default=1024, help="rows per method (the expected gradient's sample)")
    p.add_argument("--sizes", default="32,128", help="batch sizes (rows per step) to measure")
    p.add_argument("--draws", type=int, default=200, help="random batches per size")
    p.add_argument("--annealed", action="store_true",
                   help="measure on the annealed start student (tropd.gym.run.ANNEALED), not the constant-rate one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    import torch

    from dataclasses import replace

    from tropd.gym.run import ANNEALED, FIRST_START, QUICK, GymSpec, trained_models

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    spec = QUICK if args.quick else replace(GymSpec(), **FIRST_START)  # the student the committed results measured
    if args.annealed:
        spec = replace(spec, **ANNEALED)
    pool = min(args.pool, 32) if args.quick else args.pool
    sizes = [8, 16] if args.quick else [int(s) for s in args.sizes.split(",")]
    if max(sizes) >= pool:
        raise ValueError(f"--sizes must stay below --pool ({pool}): a batch as large as the pool has no noise")
    start = time.perf_counter()
    models = trained_models(spec, (args.mismatch,))
    student = Path(models["students"][args.mismatch])
    result = measure(spec, Path(models["teacher"]), student, pool, sizes, args.draws, args.seed)
    meta = {"command": "python benchmarks/gym_gradient_noise.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": describe(load=False),
            "duration": time.perf_counter() - start, "pool": pool, "draws": args.draws, "mismatch": args.mismatch,
            "student": student.name, "start": "annealed" if args.annealed else "constant-lr (600 steps)",
            "teacher": Path(models["teacher"]).name,
            "start_accuracy": models["start_eval"][f"{args.mismatch:g}"]["accuracy"]}
    text = table(result, meta)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gym_gradient_noise" + ("_annealed" if args.annealed else "") + ("_quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, **result}, indent=1) + "\n")
    (out / f"{stem}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
