"""The ``tropd`` command: parses arguments, then calls one function per subcommand."""

from __future__ import annotations

import argparse
import os
import sys


def _cmd_train(args: argparse.Namespace) -> int:
    from tropd.train.config import config_help, load_config

    if args.help_config:
        print(config_help())
        return 0
    cfg = load_config(args.config, args.overrides)  # fails here, before any model loads, on a bad config
    from tropd.train.run import train_from_config

    summary = train_from_config(cfg, resume=args.resume)
    _print_summary(summary)
    return 130 if summary["interrupted"] else 0


def _print_summary(summary: dict) -> None:
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    print(f"\nrun directory: {summary['run_dir']}")
    print(f"steps: {summary['steps_done']}{' (interrupted: resume with --resume)' if summary['interrupted'] else ''}"
          f"  wall time: {summary['wall_time_s']}s")
    print(f"checkpoint: {summary['checkpoint']}\nreport: {summary['report']}")
    keys = [k for k in ("teacher_text_nll", "teacher_text_ppl", "distinct_ratio", "task_score") if k in after]
    if keys:
        print("\n| held-out metric | before | after |\n|---|---|---|")
        for k in keys:
            b = before.get(k)
            print(f"| {k} | {'' if b is None else f'{b:.4g}'} | {after[k]:.4g} |")
        if "teacher_distinct_ratio" in after:
            print(f"(teacher's own distinct_ratio: {after['teacher_distinct_ratio']:.3f})")
    if "sample" in after:
        print(f"\nstudent sample before: {before.get('sample', '')[:200]!r}")
        print(f"student sample after:  {after['sample'][:200]!r}")


def _cmd_objectives(args: argparse.Namespace) -> int:
    from tropd.objectives import describe_objectives, objective_keywords

    for name, text in describe_objectives().items():
        print(f"{name:16s} {text}")
        if args.verbose:
            kws = ", ".join(f"{k}={v!r}" for k, v in objective_keywords(name).items())
            print(f"{'':16s}   keywords: {kws}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from tropd.report import write_report

    print(write_report(args.run_dir))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from tropd.eval.tasks_eval import run_eval

    run_eval(model=args.model, tasks=args.tasks.split(","), n=args.n, limit=args.limit,
             max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed, json_path=args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tropd", description="Trust Region On-Policy Distillation of language models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="distil a student from a teacher (no arguments: the embedded offline default)")
    t.add_argument("--config", default=None, help="YAML config (default: the embedded default)")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of the run directory (--run-dir)")
    t.add_argument("--run-dir", default=None, help="shorthand for train.output_dir=...")
    t.add_argument("--help-config", action="store_true", help="list every config key with its default and help")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. objective.name=opd train.lr=1e-4")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="score a model on the verifiable task suites (avg@n, pass@k)")
    e.add_argument("--model", required=True, help="HF model folder, .gguf file, or 'smollm2'")
    e.add_argument("--tasks", default="math,code,if,mcq", help="comma-separated suites")
    e.add_argument("--n", type=int, default=4, help="samples per problem")
    e.add_argument("--limit", type=int, default=16, help="problems per suite (test split)")
    e.add_argument("--max-new-tokens", type=int, default=256)
    e.add_argument("--temperature", type=float, default=0.7)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", default=None, help="write the results here")
    e.set_defaults(func=_cmd_eval)

    o = sub.add_parser("objectives", help="list the registered objectives")
    o.add_argument("-v", "--verbose", action="store_true", help="also show each objective's keywords")
    o.set_defaults(func=_cmd_objectives)

    r = sub.add_parser("report", help="plots and a markdown summary from a run's metrics.jsonl")
    r.add_argument("run_dir")
    r.set_defaults(func=_cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train" and args.run_dir:
        args.overrides = [*args.overrides, f"train.output_dir={args.run_dir}"]
        args.run_dir = None
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:  # bad input: one clear line, no traceback
        if os.environ.get("TROPD_DEBUG"):
            raise
        print(f"tropd {args.command}: error: {err}", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())
