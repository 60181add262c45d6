"""TRB's β* solver: safeguarded Newton (tropd) against plain bisection, side by side in one process.

    python benchmarks/trb_solver.py            # 4 rows x V = 49,152, float64, the default budget ε = 0.02

Both find ``β* = max{β : KL(μ_β‖π_S) ≤ ε}`` per row (docs/method.md §4.3); bisection uses 60 halvings (what
tropd ran before), tropd's solver 16 Newton evaluations. Prints seconds per call (median of 5) and the largest
difference in β*; writes ``<out>/trb_solver.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def bisection(s, t, eps: float, iters: int = 60):
    import torch

    from tropd.rollout.trb import _kl_blend

    s, t = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    lo, hi = torch.zeros(s.shape[:-1], dtype=torch.float64), torch.ones(s.shape[:-1], dtype=torch.float64)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        ok = _kl_blend(s, t, mid) <= eps
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return lo


def main(argv=None) -> int:
    import torch

    from tropd.rollout.trb import solve_beta

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--eps", type=float, default=0.02)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(args.rows, args.vocab, generator=g, dtype=torch.float64) * 3
    t = torch.randn(args.rows, args.vocab, generator=g, dtype=torch.float64) * 3
    results = {}
    for name, fn in (("bisection_60", bisection), ("tropd_newton_16", solve_beta)):
        times = []
        for _ in range(5):
            start = time.perf_counter()
            beta = fn(s, t, args.eps)
            times.append(time.perf_counter() - start)
        results[name] = {"seconds": statistics.median(times), "beta": beta.tolist()}
    diff = max(abs(a - b) for a, b in zip(results["bisection_60"]["beta"], results["tropd_newton_16"]["beta"]))
    ratio = results["bisection_60"]["seconds"] / results["tropd_newton_16"]["seconds"]
    from benchmarks.machine import describe

    machine = describe()
    text = (f"# TRB β* solver, {args.rows} rows x V = {args.vocab}, ε = {args.eps}\n\n"
            f"`python benchmarks/trb_solver.py` on {machine}. Median of 5 calls.\n\n"
            "| solver | seconds per call |\n|---|---|\n"
            + "".join(f"| {k} | {v['seconds']:.4f} |\n" for k, v in results.items())
            + f"\nNewton is {ratio:.1f}x faster; largest |Δβ*| between the two: {diff:.2e}.\n")
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trb_solver.json").write_text(json.dumps({"machine": machine, "ratio": ratio, "max_beta_diff": diff,
                                                     "results": results}, indent=2) + "\n")
    (out / "trb_solver.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
