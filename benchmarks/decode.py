"""Decoding: tropd's KV-cache sampler with its dynamic cache, a static (preallocated) cache, either under
``torch.compile``, and vLLM (``rollout.engine: vllm``). Answers whether those would speed up rollouts here.

    python benchmarks/decode.py                                     # the KV-cache variants at 4 rows
    python benchmarks/decode.py --variants dynamic,vllm --rows 4,16,64   # tropd's sampler against vLLM
    python benchmarks/decode.py --quick                             # a tiny random model: checks the script

Setting: the student of ``benchmarks/step.py`` (SmolLM2-135M-Instruct with 11 of its 30 layers, float32), ``--rows``
prompts (4 chat prompts, repeated) × 64 new tokens (EOS disabled, so every variant decodes the same number of
tokens), temperature 1, through ``tropd.rollout.sampling.sample_rows`` with fixed row streams. Variants:

- ``dynamic``: tropd's sampler as it is (transformers' ``DynamicCache``, grown by concatenation each token);
- ``static``: the same loop with transformers' ``StaticCache`` sized for prompt + budget, written in place
  (``rollout.kv_cache: static``);
- ``dynamic_compiled`` / ``static_compiled``: the model's forward under ``torch.compile`` (default mode);
- ``vllm``: the same model in a vLLM engine in the process (:class:`tropd.rollout.vllm_sampler.VLLMStudent`, as
  ``rollout.engine: vllm`` builds it), each row with its own seed. Its draws are not ``dynamic``'s, so the sample
  comparison does not apply to it. Its process also times ``dynamic``, call for call with vLLM's, and its speed
  ratio is against those paired calls (both under the same load), not against the ``dynamic`` process.

Each variant runs in a fresh process: one warm-up call (which compiles, timed separately), then the median of
``--repeats`` calls. The table gives tokens/s, the ratio to ``dynamic``, and how the samples compare with
``dynamic``'s: the same uniforms draw the same tokens until float rounding moves a draw across a token
boundary, so it reports the rows that came out identical and the largest behaviour log-prob difference on the
tokens before each row's first difference. Writes ``<out>/decode.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
VARIANTS = ("dynamic", "static", "dynamic_compiled", "static_compiled", "vllm")
PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about a cat that likes rain.",
    "What are three good habits for staying healthy?",
    "Describe how a bicycle works to a ten-year-old.",
]


def worker(variant: str, args) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from tropd.models import prepare_tokenizer, prune_layers
    from tropd.rollout.sampling import SamplingConfig, sample_rows
    from tropd.rollout.streams import RowStreams
    from tropd.models import load_named_model

    torch.manual_seed(0)
    if args.quick:
        from tests.helpers import tiny_llama, tiny_tokenizer

        model, tok = tiny_llama(vocab_size=96, hidden=48, layers=2, seed=7), tiny_tokenizer(96)
        model = tiny_llama(vocab_size=96, hidden=128, heads=2, layers=2, seed=7) if variant == "vllm" else model
        contexts = [[1 + (7 * i + j) % 90 for j in range(5 + i)] for i in range(4)]
    else:
        teacher, tok = load_named_model("smollm2")
        model = prune_layers(teacher, 11).float()
        del teacher
        prepare_tokenizer(tok)
        contexts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False) for p in PROMPTS]
    model.eval()
    contexts = [contexts[i % len(contexts)] for i in range(args.rows)]
    cfg = SamplingConfig(max_new_tokens=args.tokens, eos_token_ids=(), pad_token_id=tok.pad_token_id or 0,
                         kv_cache="static" if variant.startswith("static") else "dynamic")
    if variant.endswith("compiled"):
        model.forward = torch.compile(model.forward)

    write = sample_rows
    if variant == "vllm":
        from tropd.rollout.vllm_sampler import VLLMStudent

        longest = max(len(c) for c in contexts) + args.tokens
        engine = VLLMStudent(model, max_model_len=longest, kv_cache_gb=1.0, seed=0)
        engine.start()  # built outside the timed calls, as a run builds it once

        def write(model, contexts, cfg, streams):
            return engine(contexts, cfg, cfg.max_new_tokens, streams)

    def run(write=write):
        start = time.perf_counter()
        rows = write(model, contexts, cfg, streams=RowStreams.of(0, len(contexts)))
        return time.perf_counter() - start, [(r.tokens.tolist(), r.behavior_logprobs.tolist()) for r in rows]

    first, output = run()
    times, paired = [], []
    for _ in range(args.repeats):
        times.append(run()[0])
        if variant == "vllm":  # tropd's sampler in the same process, call for call: the same load on both
            paired.append(run(sample_rows)[0])
    if args.profile:  # one more call of each engine under torch.profiler (vLLM's engine runs in this process)
        from torch.profiler import ProfilerActivity, profile

        tables = []
        for name, fn in ([(variant, write)] + ([("dynamic, same process", sample_rows)] if variant == "vllm" else [])):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run(fn)
            tables.append(f"## {name}, {args.rows} rows\n\n```\n"
                          f"{prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=15)}\n```\n")
        Path(args.profile).write_text(f"# torch.profiler, one call of benchmarks/decode.py\n\n" + "\n".join(tables))
    n = sum(len(t) for t, _ in output)
    seconds = statistics.median(times)
    out = {"seconds": seconds, "first_call": first, "tokens": n, "tokens_per_s": n / seconds, "output": output}
    if paired:
        out["paired_dynamic_seconds"] = statistics.median(paired)
    return out


def compare(output: list, reference: list) -> dict:
    """Rows identical to ``reference``'s, and the largest |Δ log-prob| before each row's first differing token."""
    same, delta = 0, 0.0
    for (toks, lps), (ref_toks, ref_lps) in zip(output, reference):
        shared = next((i for i, (a, b) in enumerate(zip(toks, ref_toks)) if a != b), min(len(toks), len(ref_toks)))
        same += toks == ref_toks
        delta = max([delta] + [abs(a - b) for a, b in zip(lps[:shared], ref_lps[:shared])])
    return {"rows_identical": same, "rows": len(reference), "max_logprob_diff": delta}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny random model (seconds): checks the script")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    p.add_argument("--rows", default="4", help="comma-separated row counts (prompts decoded together)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up (median)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for decode.{json,md}")
    p.add_argument("--stem", help="output file name without extension (default decode, or decode_quick)")
    p.add_argument("--profile", metavar="FILE", help="with one variant and one --rows value: write a torch.profiler "
                                                     "table of one call (vllm: and of tropd's sampler beside it)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.rows = int(args.rows)
        print(json.dumps(worker(args.worker, args)))
        return 0
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "dynamic" not in variants:
        p.error(f"--variants must include 'dynamic' and come from {', '.join(VARIANTS)}; got {args.variants}")
    try:
        row_counts = [int(r) for r in args.rows.split(",")]
    except ValueError:
        p.error(f"--rows must be comma-separated integers, got {args.rows}")
    if min(row_counts) < 1:
        p.error(f"--rows must be >= 1, got {args.rows}")

    results = {}
    for rows in row_counts:
        for variant in variants:
            cmd = [sys.executable, __file__, "--worker", variant, "--tokens", str(args.tokens), "--rows", str(rows),
                   "--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
            if args.profile and variant != "dynamic":
                cmd += ["--profile", str(Path(args.profile).resolve())]
            env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
            if proc.returncode != 0 or not lines:
                r = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
            else:
                r = json.loads(lines[-1])
            results[f"{variant}@{rows}"] = {"variant": variant, "rows": rows, **r}
            print(variant, rows, {k: v for k, v in r.items() if k != "output"}, flush=True)
        base = results[f"dynamic@{rows}"]
        if "error" in base:
            print(f"the dynamic-cache baseline failed at {rows} rows: {base['error']}", file=sys.stderr)
            return 1
        reference = base["output"]
        for variant in variants:
            r = results[f"{variant}@{rows}"]
            if "error" not in r:
                output = r.pop("output")
                if variant != "vllm":  # other draws: no sample comparison
                    r.update(compare(output, reference))
                r["vs_dynamic"] = r.get("paired_dynamic_seconds", base["seconds"]) / r["seconds"]

    from benchmarks.machine import describe

    command = " ".join(["python benchmarks/decode.py", *(sys.argv[1:] if argv is None else argv)])
    setting = (f"`{command}` on {describe()}. Rows x {args.tokens} new tokens, float32; median of {args.repeats} "
               "calls after a warm-up call, each variant in a fresh process (vLLM's engine is built before the "
               "warm-up call).")
    lines = ["# Decoding: tropd's sampler (dynamic or static KV cache, with and without torch.compile) and vLLM", "",
             setting, "",
             "| rows | variant | s per call | tokens/s | speed vs dynamic | first call s | rows identical to dynamic | "
             "max abs log-prob diff before a row differs |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results.values():
        name, rows = r["variant"], r["rows"]
        if "error" in r:
            lines.append(f"| {rows} | {name} | failed: {r['error']} | | | | | |")
            continue
        same = (f"{r['rows_identical']}/{r['rows']} | {r['max_logprob_diff']:.1e}" if "rows_identical" in r
                else f"other draws (dynamic in its process: {r['tokens'] / r['paired_dynamic_seconds']:.1f} "
                     "tokens/s) | –")
        lines.append(f"| {rows} | {name} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} | {r['vs_dynamic']:.2f}x | "
                     f"{r['first_call']:.1f} | {same} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("decode_quick" if args.quick else "decode")
    (out / f"{stem}.json").write_text(json.dumps({"setting": setting, "results": results}, indent=2) + "\n")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
