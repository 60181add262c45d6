"""What a teacher behind `tropd serve-teacher` costs per step, against the same teacher in process.

    python benchmarks/teacher_http.py            # SmolLM2-135M-Instruct (the embedded teacher), CPU
    python benchmarks/teacher_http.py --quick    # a tiny random model: checks the script in seconds

For each scoring request of one micro-batch (B rows, P prompt + T response tokens) it times, median of
``--repeats`` after a warm-up, in-process and server calls interleaved: the in-process scoring (`InProcessTeacher.score`), the same request through a
server on loopback started in another process (`RemoteTeacher.score`), split into the server's compute (its
``x-tropd-compute-s`` header) and the transport (serialisation, HTTP, batching wait), and the bytes of the
response. Needs:
``topk`` is what `tropd` asks (log-prob of the sampled token and the top-64), ``logits`` what `gkd`/`trb` ask
(the full `[B, T, V]` logits). Writes ``<out>/teacher_http.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _start_server(model: str):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TROPD_TEACHER_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "tropd", "serve-teacher", model, "--port", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        if "listening on " in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, line.split("listening on ")[1].strip()
    raise RuntimeError(f"the teacher server did not start (exit {proc.wait()})")


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny random model instead of SmolLM2")
    parser.add_argument("--rows", type=int, default=8, help="rows B of one micro-batch")
    parser.add_argument("--prompt-tokens", type=int, default=48, help="prompt tokens P")
    parser.add_argument("--response-tokens", type=int, default=96, help="response tokens T")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats (median)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the JSON and table")
    args = parser.parse_args(argv)

    import torch

    from tropd.objectives.registry import Needs
    from tropd.rollout.batch import RolloutBatch, RolloutRow
    from tropd.teacher import wire
    from tropd.teacher import InProcessTeacher
    from tropd.teacher.remote import RemoteTeacher
    from tropd.models import load_named_model

    # both processes keep torch's default threads: the measurements run one at a time, the other process idle
    tmp = None
    if args.quick:
        from tests.helpers import tiny_llama, tiny_tokenizer

        tmp = tempfile.TemporaryDirectory()
        tiny_llama(vocab_size=512, hidden=64, layers=2, seed=0).save_pretrained(tmp.name)
        tiny_tokenizer(512).save_pretrained(tmp.name)
        model_name = tmp.name
    else:
        model_name = "smollm2"
    model, _ = load_named_model(model_name)
    local = InProcessTeacher(model)
    server, url = _start_server(model_name)
    try:
        remote = RemoteTeacher(url)
        vocab = remote.vocab_size
        g = torch.Generator().manual_seed(0)
        b, p, t = args.rows, args.prompt_tokens, args.response_tokens
        ids = torch.randint(3, min(vocab, 20000), (b, p + t), generator=g)
        rows_in = [RolloutRow(tokens=ids[i, p:], behavior_logprobs=torch.zeros(t)) for i in range(b)]
        batch = RolloutBatch.from_rows(ids[:, :p].tolist(), rows_in, pad_token_id=0)
        rows = []
        for name, needs in [("topk", Needs(teacher_logprobs=True, teacher_topk=True, top_k=64)),
                            ("logits", Needs(teacher_logprobs=False, teacher_logits=True))]:
            local_s, http_s, compute_s = [], [], []
            for _ in range(args.repeats + 1):  # interleaved, so drifts in machine load hit both alike
                local_s.append(_seconds(lambda: local.score(batch, needs)))
                http_s.append(_seconds(lambda: remote.score(batch, needs)))
                compute_s.append(remote.last_compute_s)
            in_process, over_http, compute = (statistics.median(x[1:]) for x in (local_s, http_s, compute_s))
            size = len(wire.pack_scores(local.score(batch, needs)))
            rows.append({"needs": name, "in_process_s": in_process, "http_s": over_http, "server_compute_s": compute,
                         "transport_s": over_http - compute, "ratio": over_http / in_process, "response_bytes": size})
    finally:
        server.terminate()
        server.wait(30)
        if tmp is not None:
            tmp.cleanup()

    from benchmarks.machine import describe

    machine = describe()
    result = {"model": "tiny random (--quick)" if args.quick else "SmolLM2-135M-Instruct", "rows": b,
              "prompt_tokens": p, "response_tokens": t, "vocab": vocab, "repeats": args.repeats,
              "machine": machine, "results": rows}
    lines = [f"# Teacher over HTTP vs in process ({result['model']}, B={b}, P={p}, T={t}, V={vocab})", "",
             f"Measured by `python benchmarks/teacher_http.py{' --quick' if args.quick else ''}` on {machine}; "
             f"median of {args.repeats}, server on loopback in another process.", "",
             "| needs | in process | over HTTP | of which server compute | of which transport | ratio | response size |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['needs']} | {r['in_process_s'] * 1e3:.0f} ms | {r['http_s'] * 1e3:.0f} ms | "
                     f"{r['server_compute_s'] * 1e3:.0f} ms | {r['transport_s'] * 1e3:.0f} ms | {r['ratio']:.2f}x | "
                     f"{r['response_bytes'] / 1e6:.2f} MB |")
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "teacher_http_quick" if args.quick else "teacher_http"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
