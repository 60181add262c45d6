"""The distillation gym's full experiment: does TrOPD beat OPD on accuracy and stability under mismatch?

    python benchmarks/gym.py            # full protocol (docs/gym.md): 3 mismatch levels, every method
    python benchmarks/gym.py --quick    # tiny models, 4 steps: checks the pipeline end to end (seconds)

A teacher (Llama decoder trained from scratch, cached) and three starting students (``matched``, ``alt``,
``noisy``; see ``tropd/gym/run.py``) are built once; then every method trains from each start with the same
budget: ``opd`` and ``tropd`` with ``--core-seeds`` seeds (run first), the other methods with ``--seeds``.
Finished runs are kept under ``--workdir``: an interrupted invocation continues where it stopped.
Writes ``<out>/gym.{json,md,png}`` (``gym_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from tropd.gym.run import CORE, LEVELS, METHODS, QUICK, GymSpec, run_gym, write_outputs

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, 4 steps, opd/tropd/gkd, one seed")
    p.add_argument("--core-seeds", type=int, default=5, help="seeds of opd and tropd per mismatch level")
    p.add_argument("--seeds", type=int, default=3, help="seeds of every other method per mismatch level")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    p.add_argument("--levels", default=",".join(LEVELS), help="comma-separated mismatch levels")
    p.add_argument("--lr", type=float, default=None, help="learning rate of every method (default: GymSpec's 1e-4)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: GymSpec's 200)")
    p.add_argument("--stem", default=None, help="output name (default: gym, or gym_quick with --quick)")
    p.add_argument("--workers", type=int, default=2, help="runs at once (one CPU thread each)")
    p.add_argument("--workdir", default=str(ROOT / "runs" / "gym-benchmark"), help="run folders (resumable)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for gym.{json,md,png}")
    args = p.parse_args(argv)

    methods = ["opd", "tropd", "gkd"] if args.quick else args.methods.split(",")
    seeds = {m: (1 if args.quick else args.core_seeds if m in CORE else args.seeds) for m in methods}
    levels = ("matched", "alt") if args.quick else tuple(args.levels.split(","))
    spec = (QUICK if args.quick else GymSpec()).with_budget(steps=args.steps, lr=args.lr)
    start = time.perf_counter()
    result = run_gym(spec, seeds, levels, Path(args.workdir) / ("quick" if args.quick else "full"),
                     workers=args.workers)
    import torch

    meta = {"command": "python benchmarks/gym.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "duration": round(time.perf_counter() - start, 1),
            "budget": f"{spec.steps} steps, lr {spec.lr:g}",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                       f"load {os.getloadavg()[0]:.2f} at the end"}
    compare = tuple(m for m in methods if m != "opd")
    stem = args.stem or ("gym_quick" if args.quick else "gym")
    paths = write_outputs(result, Path(args.out), stem, meta, compare=compare)
    print(paths["md"].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
