"""Loss kernels side by side: tropd, TRL and the naive floor, each in a fresh process (time and extra memory).

    python benchmarks/speed.py              # the issue's sizes; needs TRL (pip install 'tropd[bench]')
    python benchmarks/speed.py --quick      # tiny sizes: checks the script in seconds (--one-process: one start-up)

Every kernel runs forward + backward of one loss over N response positions and a vocabulary of V, float32,
in its own process: inputs are allocated, then the loss is timed (median of ``--repeats``; a single run at
N = 8192) and its extra peak memory is the process's peak RSS above what the inputs held. Kernels:

from logits (``[N, V]`` student logits given, requiring grad)
    ``naive_k1``: ``log_softmax`` + gather + ``−sg(r)·s`` (the floor); ``opd`` and ``tropd``: tropd's
    objectives (tropd with top-64 teacher ids, sampled trust mask); ``trl_gkd``: TRL's
    ``GKDTrainer.generalized_jsd_loss`` at β = 1 (teacher logits given too).
from hidden states (``[N, H]`` student hidden states and the ``[V, H]`` LM head given, both requiring grad)
    ``dense_naive_k1``: the projection ``h Wᵀ`` then ``naive_k1``; ``tropd_fused``: tropd's fused path
    (chunks of 1024 positions, recomputed in backward); ``trl_chunked``: TRL's ``ChunkedDivergenceFunction``
    at β = 1 (reverse KL; teacher hidden states and head given too).

A kernel that needs more than ``--memory-gb`` fails with "out of memory" instead of taking the machine down.
Writes ``<out>/speed.json`` and ``<out>/speed.md``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SIZES = [(2048, 49152, 576), (2048, 151936, 896), (8192, 151936, 896)]  # (N, V, H): SmolLM2 and Qwen2.5-0.5B
QUICK_SIZES = [(256, 4096, 64)]
FROM_LOGITS = ("naive_k1", "opd", "tropd", "trl_gkd")
FROM_HIDDEN = ("dense_naive_k1", "tropd_fused", "trl_chunked")


def _rss_kb() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def worker(kind: str, n: int, v: int, h: int, repeats: int) -> dict:
    """Run one kernel in this (fresh) process; returns seconds and extra peak memory."""
    import torch

    sys.path.insert(0, str(ROOT))
    from tropd.objectives import TokenInputs, get_objective
    from tropd.objectives.head import LMHead

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, v, (1, n), generator=g)
    k = 64
    topk_ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(min(n, 64))])  # [64, K], tiled
    topk_ids = topk_ids.repeat((n + 63) // 64, 1)[:n][None]
    topk_lp = torch.log_softmax(torch.randn(1, n, k, generator=g), -1) - 0.5
    b = -torch.rand(1, n, generator=g) * 3
    q = b + torch.randn(1, n, generator=g)
    uniforms = torch.rand(1, n, generator=g)  # the trust-mask uniforms the trainer passes (row streams)
    if kind in FROM_LOGITS:
        logits = torch.randn(1, n, v, generator=g).requires_grad_(True)
        teacher = torch.randn(1, n, v, generator=g) if kind == "trl_gkd" else None
    else:
        hidden = (torch.randn(n, h, generator=g) / h ** 0.5).requires_grad_(True)
        weight = torch.randn(v, h, generator=g).requires_grad_(True)
        if kind == "trl_chunked":
            t_hidden = torch.randn(n, h, generator=g) / h ** 0.5
            t_weight = torch.randn(v, h, generator=g)

    # TRL is imported before the timing and the memory baseline (a first import takes seconds and ~0.3 GB)
    if kind == "trl_gkd":
        from trl.experimental.gkd.gkd_trainer import GKDTrainer
    elif kind == "trl_chunked":
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    def naive(z):
        s = torch.log_softmax(z, -1).gather(-1, tokens[0][:, None])[:, 0]
        return (-(q[0] - b[0]) * s).mean()

    def step():
        if kind == "naive_k1":
            loss = naive(logits[0])
        elif kind in ("opd", "tropd"):
            kw = {"top_k": k} if kind == "tropd" else {}
            x = TokenInputs(student_logits=logits, tokens=tokens, behavior_logprobs=b, teacher_logprobs=q,
                            teacher_topk_ids=topk_ids, teacher_topk_logprobs=topk_lp, trust_uniforms=uniforms)
            loss = get_objective(kind, **kw)(x).loss
        elif kind == "trl_gkd":
            loss = GKDTrainer.generalized_jsd_loss(logits, teacher, beta=1.0)
        elif kind == "dense_naive_k1":
            loss = naive(hidden @ weight.T)
        elif kind == "tropd_fused":
            head = LMHead(lambda z: z @ weight.T, v, params=(weight,))  # weight named: gradient formed in forward
            x = TokenInputs(student_hidden=hidden[None], student_head=head,
                            tokens=tokens, behavior_logprobs=b, teacher_logprobs=q, teacher_topk_ids=topk_ids,
                            teacher_topk_logprobs=topk_lp, trust_uniforms=uniforms)
            loss = get_objective("tropd", top_k=k)(x).loss
        elif kind == "trl_chunked":
            divergence, _ = ChunkedDivergenceFunction.apply(hidden, weight, None, t_hidden, t_weight, None, 1.0)
            loss = divergence.mean()
        else:
            raise ValueError(f"unknown kernel {kind!r}")
        loss.backward()

    base = max(_rss_kb(), _peak_kb())
    times = []
    for _ in range(repeats):
        for leaf in ((logits,) if kind in FROM_LOGITS else (hidden, weight)):
            leaf.grad = None
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "extra_gb": (_peak_kb() - base) / 2**20, "runs": repeats}


def run_kernels(kinds: list[str], n: int, v: int, h: int, repeats: int, memory_gb: float) -> dict[str, dict]:
    """Run ``kinds`` one after another in one fresh process; each kernel's result, or the process's error."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, __file__, "--worker", ",".join(kinds), str(n), str(v), str(h), str(repeats), str(memory_gb)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
    oom = "out of memory" in proc.stderr.lower() or "MemoryError" in proc.stderr or proc.returncode == -9
    return {kind: {"error": f"out of memory (> {memory_gb:g} GB)" if oom else tail[:200]} for kind in kinds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds): checks the script")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per kernel at N < 8192 (median; the machine is noisy)")
    p.add_argument("--memory-gb", type=float, default=20.0, help="address-space limit of each kernel's process")
    p.add_argument("--kernels", default=",".join(FROM_LOGITS + FROM_HIDDEN), help="comma-separated kernels")
    p.add_argument("--jobs", type=int, default=1,
                   help="kernel processes run at a time (more than 1 skews the timings: for checking the script)")
    p.add_argument("--one-process", action="store_true",
                   help="every kernel in one process, one after another (for checking the script: one start-up "
                        "instead of one per kernel; a kernel's extra memory is then not its own)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for speed.{json,md}")
    p.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        kinds, n, v, h, repeats, memory_gb = args.worker  # kinds: comma-separated, run one after another
        limit = int(float(memory_gb) * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        print(json.dumps({k: worker(k, int(n), int(v), int(h), int(repeats)) for k in kinds.split(",")}))
        return 0

    kernels = args.kernels.split(",")
    results = []
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    for n, v, h in QUICK_SIZES if args.quick else SIZES:
        row = {"N": n, "V": v, "H": h}
        # from full logits at N = 8192 opd and trl_gkd are left out: the point is that the fused path needs no logits
        todo = [kind for kind in kernels if not (n >= 8192 and kind in ("opd", "trl_gkd"))]
        repeats = 1 if n >= 8192 else args.repeats
        groups = [todo] if args.one_process else [[kind] for kind in todo]  # each a process of its own
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run_kernels, group, n, v, h, repeats, args.memory_gb) for group in groups]
            for future in futures:
                for kind, cell in future.result().items():
                    row[kind] = cell
                    print(f"N={n} V={v} {kind}: {cell}", flush=True)
        results.append(row)

    from benchmarks.machine import describe

    machine = describe()
    lines = [f"# Loss kernels, forward + backward, float32 ({'--quick' if args.quick else 'full'})", "",
             f"`python benchmarks/speed.py{' --quick' if args.quick else ''} --repeats {args.repeats}` on {machine}. "
             f"Each cell: seconds (median of {args.repeats} runs; 1 run at N = 8192) / extra peak memory; ratios "
             "against the naive floor of the same input."
             + (f" Kernels ran {args.jobs} at a time: timings not comparable." if args.jobs > 1 else "")
             + (" Every kernel ran in one process: the extra memory is not each kernel's own." if args.one_process
                else ""), ""]
    for row in results:
        lines += [f"## N = {row['N']}, V = {row['V']} (H = {row['H']})", "", "| kernel | seconds | extra GB | ratio |",
                  "|---|---|---|---|"]
        for kind in kernels:
            cell = row.get(kind)
            if cell is None:
                continue
            if "error" in cell:
                lines.append(f"| {kind} | {cell['error']} | | |")
                continue
            floor = row.get("naive_k1" if kind in FROM_LOGITS else "dense_naive_k1", {})
            ratio = f"{cell['seconds'] / floor['seconds']:.2f}x" if floor.get("seconds") else ""
            lines.append(f"| {kind} | {cell['seconds']:.2f} | {cell['extra_gb']:.2f} | {ratio} |")
        lines.append("")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "speed_quick" if args.quick else "speed"
    (out / f"{stem}.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    (out / f"{stem}.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
