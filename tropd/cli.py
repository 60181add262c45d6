"""The ``tropd`` command: parses arguments, then calls one function per subcommand."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tropd.train.config import config_help, load_config

    config = args.config
    if config is None and args.resume and args.run_dir:  # resume with the run's own settings
        saved = Path(args.run_dir) / "config.yaml"
        config = saved if saved.is_file() else None
    cfg = load_config(config, args.overrides)  # fails here, before any model loads, on a bad config
    if args.help_config:
        print(config_help(cfg))
        return 0
    from tropd.train.errors import NoStepTrainedError
    from tropd.train.run import train_from_config

    try:
        summary = train_from_config(cfg, resume=args.resume, override_config=args.override_config)
    except NoStepTrainedError as err:  # report what the run did, then fail with the cause
        if err.summary["main_process"]:
            if cfg.train.write_report:
                err.summary["report"] = _write_report(Path(err.summary["run_dir"]))
            _print_summary(err.summary)
        raise
    if not summary["main_process"]:
        return 130 if summary["interrupted"] else 0
    run_dir = Path(summary["run_dir"])
    if summary.get("already_complete"):
        if not _report_due(summary):
            return 0
        print(f"{run_dir}: its report was never written (it failed or was interrupted): writing it")
        report = _write_report(run_dir)
        if report is None:
            return 1
        print(f"report: {report}")
        return 0
    if cfg.train.write_report:
        summary["report"] = _write_report(run_dir)
        if summary["report"] is None:
            return 1
    _print_summary(summary)
    return 130 if summary["interrupted"] else 0


def _report_due(summary: dict) -> bool:
    """``tropd train`` began writing this run's report (summary.json has a ``report`` key) and did not finish:
    the key is null, or names a file that is gone. A run trained in code (no key) never gets one here."""
    from pathlib import Path

    return "report" in summary and (summary["report"] is None or not Path(summary["report"]).is_file())


def _write_report(run_dir) -> str | None:
    """Write the report of a run that trained (``tropd report``) and return its path; ``summary.json`` says
    ``"report": null`` until it is written, so that ``--resume`` of the finished run writes a missing one. If
    writing fails, say so in one line on stderr (the run itself is saved) and return None."""
    import json

    from tropd.files import write_text_atomic
    from tropd.report import write_report

    done = run_dir / "summary.json"
    record = json.loads(done.read_text())
    write_text_atomic(done, json.dumps({**record, "report": None}, indent=2))
    try:
        path = str(write_report(run_dir))
    except Exception as err:  # noqa: BLE001  (any failure: the run is saved, only its report is missing)
        if os.environ.get("TROPD_DEBUG"):
            raise
        cause = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"tropd train: error: the run is saved, but writing its report failed: {type(err).__name__}"
              f"{': ' + cause if cause else ''}; `tropd train --run-dir {run_dir} --resume` writes it",
              file=sys.stderr)
        return None
    write_text_atomic(done, json.dumps({**record, "report": path}, indent=2))
    return path


def _print_summary(summary: dict) -> None:
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    print(f"\nrun directory: {summary['run_dir']}")
    print(f"steps: {summary['steps_done']}{' (interrupted: resume with --resume)' if summary['interrupted'] else ''}"
          f"  wall time: {summary['wall_time_s']}s")
    skipped, run = summary.get("nonfinite_steps", 0), summary.get("steps_run", summary["steps_done"])
    if skipped:
        print(f"skipped: {skipped} of the {run} step(s) run had a non-finite loss or gradient and left the weights "
              f"unchanged{' (none trained)' if skipped == run else ''}; nonfinite_reason in metrics.jsonl says why")
    print(f"checkpoint: {summary['checkpoint']}")
    if "report" in summary:
        print(f"report: {summary['report']}")
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


def _cmd_gym(args: argparse.Namespace) -> int:
    import importlib
    import platform
    import time
    from pathlib import Path

    from tropd.gym.run import CORE, QUICK, GymSpec, check_mismatch, run_gym, write_outputs

    for flag in ("seeds", "steps", "workers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be >= 1, got {value}")
    if args.lr is not None and not args.lr > 0:
        raise ValueError(f"--lr must be a positive learning rate, got {args.lr}")
    mismatches = check_mismatch(x for x in args.mismatch.split(",") if x.strip())
    if not mismatches:
        raise ValueError("--mismatch needs at least one value in [0, 1], e.g. --mismatch 0,0.5,1")
    for module in args.plugin:  # e.g. a module whose @register adds the objective to compare
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"--plugin {module}: cannot import it ({err}); give an importable module name") from None
    spec = (QUICK if args.quick else GymSpec()).with_budget(steps=args.steps, lr=args.lr)
    methods = list(dict.fromkeys([*CORE, *args.objective]))
    workdir = Path(args.workdir)
    start = time.perf_counter()
    result = run_gym(spec, {m: args.seeds for m in methods}, mismatches, workdir, workers=args.workers)
    lrs = ", ".join(f"{m} {spec.lr_of(m):g}" for m in methods)
    meta = {"command": "tropd gym " + " ".join(args.argv), "duration": round(time.perf_counter() - start, 1),
            "budget": f"{spec.steps} steps; learning rates: {lrs}",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores"}
    paths = write_outputs(result, Path(args.out or workdir), "gym", meta,
                          compare=tuple(m for m in methods if m != "opd"))
    print(paths["md"].read_text())
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0


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


def _cmd_serve_teacher(args: argparse.Namespace) -> int:
    from tropd.teacher.remote import TOKEN_ENV

    try:
        from tropd.teacher.server import Limits, serve
    except ImportError as err:
        raise ValueError(f"{err}; install the server extra: pip install 'tropd[server]'") from None
    limits = Limits(max_body_mb=args.max_body_mb, max_request_rows=args.max_request_rows,
                    max_request_tokens=args.max_request_tokens, max_response_mb=args.max_response_mb,
                    request_timeout=args.request_timeout, read_timeout=args.read_timeout,
                    header_timeout=args.header_timeout)
    serve(args.model, host=args.host, port=args.port, token=os.environ.get(TOKEN_ENV), device=args.device,
          dtype=args.dtype, chunk_size=args.chunk_size, max_batch_rows=args.max_batch_rows, limits=limits,
          allow_no_token=args.allow_no_token, engine=args.engine, max_model_len=args.max_model_len,
          kv_cache_mb=args.kv_cache_mb)
    return 0


def _cmd_merge_lora(args: argparse.Namespace) -> int:
    from tropd.train.merge import merge_checkpoint

    merge_checkpoint(args.checkpoint, args.out)
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help unless the help states its default itself (then it would be said
    twice) or there is none worth printing (None, a flag's False, a repeatable option's empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default == []:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    p = argparse.ArgumentParser(prog="tropd", description="Trust Region On-Policy Distillation of language models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="distil a student from a teacher (no arguments: the embedded offline default)",
                       formatter_class=fmt)
    t.add_argument("--config", default=None, help="YAML config (default: the embedded tropd/configs/default.yaml; "
                                                  "with --resume, the run's own config.yaml)")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of the run directory (--run-dir)")
    t.add_argument("--override-config", action="store_true",
                   help="with --resume: accept settings that differ from the run's (recorded in its config.yaml)")
    t.add_argument("--run-dir", default=None, help="shorthand for train.output_dir=... (the folder as written)")
    t.add_argument("--help-config", action="store_true",
                   help="list every config key with the value this command would use, and its help")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. objective.name=opd train.lr=1e-4")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="score a model on the verifiable task suites (avg@n, pass@k)", formatter_class=fmt)
    e.add_argument("--model", required=True, help="HF model folder, .gguf file, or 'smollm2'")
    e.add_argument("--tasks", default="math,code,if,mcq", help="comma-separated suites")
    e.add_argument("--n", type=int, default=4, help="samples per problem")
    e.add_argument("--limit", type=int, default=16, help="problems per suite (test split)")
    e.add_argument("--max-new-tokens", type=int, default=256, help="length budget of each answer")
    e.add_argument("--temperature", type=float, default=0.7, help="sampling temperature, >= 0 (0: greedy)")
    e.add_argument("--seed", type=int, default=0, help="seed of the problems drawn and of sampling")
    e.add_argument("--json", default=None, help="write the results here; rewritten after each suite ('complete': "
                                                "false until all are done), so an interrupted eval keeps what finished")
    e.set_defaults(func=_cmd_eval)

    g = sub.add_parser("gym", help="compare objectives on accuracy in the distillation gym: a teacher and students "
                                   "trained from scratch on code-generated tasks (docs/gym.md)", formatter_class=fmt)
    g.add_argument("--objective", action="append", default=[],
                   help="objective to run besides the baselines opd and tropd (repeatable)")
    g.add_argument("--mismatch", default="0,0.5,1",
                   help="comma-separated values of the mismatch knob: the share (0 to 1) of the starting student's "
                        "SFT traces written in another valid style than the teacher's (0 = the teacher's style)")
    g.add_argument("--seeds", type=int, default=3, help="seeds per (objective, mismatch)")
    g.add_argument("--steps", type=int, default=None,
                   help="training steps per run (default: the gym's 200; 4 with --quick)")
    g.add_argument("--lr", type=float, default=None,
                   help="one learning rate for every method (default: each method's rate from the gym's "
                        "validation sweep, docs/gym.md, and 1e-4 for objectives it did not sweep)")
    g.add_argument("--workers", type=int, default=2, help="runs trained at once (one CPU thread each)")
    g.add_argument("--workdir", default="runs/gym", help="run folders; a finished run is reused, so an "
                                                         "interrupted command continues where it stopped")
    g.add_argument("--out", default=None, help="folder for gym.{json,md,png} (default: the --workdir)")
    g.add_argument("--plugin", action="append", default=[], help="module to import first (registers objectives)")
    g.add_argument("--quick", action="store_true", help="tiny models and 4 steps: checks the pipeline in seconds")
    g.set_defaults(func=_cmd_gym)

    o = sub.add_parser("objectives", help="list the registered objectives", formatter_class=fmt)
    o.add_argument("-v", "--verbose", action="store_true", help="also show each objective's keywords")
    o.set_defaults(func=_cmd_objectives)

    r = sub.add_parser("report", help="plots (a panel per unit, the SFT warm-up end marked) and summary.md with "
                                      "first/last tables per phase, from a run's metrics.jsonl", formatter_class=fmt)
    r.add_argument("run_dir", help="a run directory (holding metrics.jsonl)")
    r.set_defaults(func=_cmd_report)

    s = sub.add_parser("serve-teacher", help="serve a frozen teacher over HTTP for trainers elsewhere "
                                             "(model.teacher=http://HOST:PORT; docs/scaling.md)", formatter_class=fmt)
    s.add_argument("model", help="HF model folder, .gguf file, or 'smollm2'")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; then a "
                                                       "token in TROPD_TEACHER_TOKEN is required)")
    s.add_argument("--allow-no-token", action="store_true",
                   help="serve a --host reachable from other machines without a token (anyone who reaches it may "
                        "use it)")
    s.add_argument("--port", type=int, default=8000, help="port, 0 to 65535 (0: a free one, printed at start-up)")
    s.add_argument("--engine", default="hf", choices=("hf", "vllm"),
                   help="hf: transformers (every score); vllm: an in-process vLLM engine on an HF model folder "
                        "(sampled-token log-probs and top-k only: no full logits (gkd, trb) or entropy (eopd); "
                        "docs/vllm.md)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (--engine hf; vLLM picks its own)")
    s.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    s.add_argument("--chunk-size", type=int, default=512, help="response positions turned into logits at a time "
                                                               "(--engine hf)")
    s.add_argument("--max-model-len", type=int, default=None,
                   help="--engine vllm: longest sequence in tokens (default: the model's); one less is scored")
    s.add_argument("--kv-cache-mb", type=float, default=None,
                   help="--engine vllm: KV-cache size in MiB (default: vLLM's share of GPU memory; 512 without CUDA)")
    s.add_argument("--max-batch-rows", type=int, default=64, help="most rows merged from waiting requests into one "
                                                                  "forward")
    s.add_argument("--max-body-mb", type=float, default=128.0,
                   help="largest request body in MiB; a larger one is refused (413) before it is read")
    s.add_argument("--max-request-rows", type=int, default=1024, help="most rows (sequences) in one request (413)")
    s.add_argument("--max-request-tokens", type=int, default=1 << 21,
                   help="most tokens in one request (413): rows x padded length to score, rows x (longest context + "
                        "largest budget) to generate")
    s.add_argument("--max-response-mb", type=float, default=1024.0,
                   help="largest answer to a score request in MiB (413; full logits take rows x positions x vocab "
                        "x 4 bytes)")
    s.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds from a request's arrival to its answer, queue included; then 503 and its work is "
                        "dropped")
    s.add_argument("--read-timeout", type=float, default=60.0,
                   help="seconds a client may take to send a request body; then 408")
    s.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client may take to send a request's line and headers; then the connection is "
                        "closed")
    s.set_defaults(func=_cmd_serve_teacher)

    m = sub.add_parser("merge-lora", help="fold a LoRA run's adapters into its base student: a plain model folder "
                                          "that AutoModelForCausalLM.from_pretrained loads", formatter_class=fmt)
    m.add_argument("checkpoint", help="a checkpoint folder, or a run directory (its latest checkpoint)")
    m.add_argument("--out", required=True, help="new (or empty) folder for the merged model and its tokenizer")
    m.set_defaults(func=_cmd_merge_lora)
    return p


def _os_error_line(err: OSError, command: str) -> str:
    """An error of the file system as one line: the file, what the OS said, what to do."""
    import errno

    text = str(err).strip()
    what = err.strerror or (text.splitlines()[0] if text else type(err).__name__)
    where = f"cannot write or read {err.filename}: " if err.filename else ""
    hint = ""
    if command == "train" and err.errno == errno.ENOSPC:
        hint = ("; free some space, then `tropd train --run-dir <run> --resume` continues from the last complete "
                "checkpoint")
    elif command == "train" and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "; choose a --run-dir this user can write"
    return f"{where}{what}{hint}"


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)[1:]
    if args.command == "train" and args.run_dir:
        args.overrides = [*args.overrides, f"train.output_dir={args.run_dir}"]
    if getattr(args, "override_config", False) and not args.resume:
        print("tropd train: error: --override-config only applies with --resume", file=sys.stderr)
        return 2
    from tropd.train.errors import NonFiniteTrainingError

    debug = bool(os.environ.get("TROPD_DEBUG"))
    # both are process-wide: set for this command, put back after it (main() may run inside a larger program)
    previous_format = warnings.formatwarning
    if not debug:  # warnings as one plain line each, not file:line plus source
        warnings.formatwarning = lambda message, category, *_: f"tropd {args.command}: warning: {message}\n"
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    # `kill` / `timeout` stop like Ctrl-C (training saves first)
    previous_sigterm = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return args.func(args)
    except BrokenPipeError:  # e.g. `tropd train --help-config | head`: the reader left; say nothing more (first:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # it is a ConnectionError too)
        return 0
    except (ValueError, FileNotFoundError, FileExistsError, NonFiniteTrainingError, ConnectionError) as err:
        if debug:  # bad input or a run that cannot go on: one clear line, no traceback
            raise
        print(f"tropd {args.command}: error: {err}", file=sys.stderr)
        return 1 if isinstance(err, (NonFiniteTrainingError, ConnectionError)) else 2
    except OSError as err:  # the file system refused: no permission, read-only, disk full
        if debug:
            raise
        print(f"tropd {args.command}: error: {_os_error_line(err, args.command)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (e.g. while models load): nothing to save
        if debug:
            raise
        print(f"\ntropd {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = previous_format
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous_sigterm is None else previous_sigterm)

if __name__ == "__main__":
    sys.exit(main())
