"""Evaluate a model on the verifiable task suites: avg@n, unbiased pass@k, response length, truncation.

``tropd eval`` calls :func:`run_eval`; the trainer's evaluation hook calls :func:`evaluate_examples` on held-out
prompts that carry a grading reference, so training-time and standalone scores are the same computation.
"""

from __future__ import annotations

import json
import time

from torch import nn

from tropd.eval.metrics import summarize
from tropd.files import write_text_atomic
from tropd.rollout import RowStreams, SamplingConfig, sample, sample_teacher
from tropd.settings import is_int, is_number
from tropd.tasks import Example, get_suite, grade_batch, list_suites
from tropd.tasks.encoding import encode_prompt


def generate(model, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
             seed: int = 0, batch_size: int = 16, desc: str | None = None) -> tuple[list[list[int]], list[bool]]:
    """One response per prompt with the rollout sampler (``temperature=0``: greedy): token ids up to and
    including EOS, and whether each hit ``max_new_tokens``. ``model`` is a model in this process, or a
    :class:`~tropd.teacher.Teacher` (which writes the responses wherever it runs)."""
    eos = tuple(t for t in (tokenizer.eos_token_id,) if t is not None)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id,
                         temperature=temperature)
    tokens, truncated = [], []
    bar = None
    if desc:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompt_ids), desc=desc, unit="sample", leave=False)
    draw = sample if isinstance(model, nn.Module) else sample_teacher
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start:start + batch_size]  # each sample's own stream: results do not depend on batch_size
        batch = draw(model, chunk, cfg, streams=RowStreams.of(seed, len(chunk), first_row=start))
        for row in range(batch.batch_size):
            tokens.append(batch.tokens[row, : int(batch.response_lengths[row])].tolist())
            truncated.append(bool(batch.truncated[row]))
        if bar is not None:
            bar.update(batch.batch_size)
    if bar is not None:
        bar.close()
    return tokens, truncated


def score_responses(examples: list[Example], owners: list[int], texts: list[str], n: int,
                    task: str = "task") -> dict:
    """Grade ``texts[i]`` (a response to ``examples[owners[i]]``) and summarise: avg@n, pass@1, pass@n."""
    scores = grade_batch([examples[o].domain for o in owners], texts, [examples[o].reference for o in owners])
    per_problem: dict[str, list[float]] = {}
    for o, s in zip(owners, scores):
        per_problem.setdefault(examples[o].id, []).append(float(s))
    return summarize({task: per_problem}, ks=sorted({1, n}))[task]


def evaluate_examples(model, tokenizer, examples: list[Example], *, n: int, max_new_tokens: int,
                      temperature: float, seed: int = 0, progress: bool = True, task: str = "task") -> dict:
    """Sample ``n`` responses per example, grade them, and summarise.

    Returns ``{"avg@n", "pass@1", "pass@n", "problems", "samples", "mean_response_tokens", "truncation_rate"}``.
    """
    chat = bool(getattr(tokenizer, "chat_template", None))
    owners = [i for i in range(len(examples)) for _ in range(n)]
    prompt_ids = [encode_prompt(examples[o], tokenizer, chat_template=chat) for o in owners]
    tokens, truncated = generate(model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens,
                                 temperature=temperature, seed=seed, desc=f"eval {task}" if progress else None)
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    row = score_responses(examples, owners, texts, n, task)
    row["mean_response_tokens"] = sum(map(len, tokens)) / max(len(tokens), 1)
    row["truncation_rate"] = sum(truncated) / max(len(truncated), 1)
    return row


def run_eval(model: str, tasks: list[str], *, n: int = 4, limit: int = 16, max_new_tokens: int = 256,
             temperature: float = 0.7, seed: int = 0, json_path: str | None = None, console=print) -> dict:
    """``tropd eval``: load ``model``, score it on each suite's test split, print a table, optionally write JSON.

    Results are kept as suites finish: a line per suite is printed, and ``json_path`` is rewritten (atomically)
    after each one with the suites done so far (``"complete": false`` until the last), so an interrupted or
    failed evaluation keeps what finished."""
    unknown = [t for t in tasks if t not in list_suites()]
    if unknown:
        raise ValueError(f"--tasks: unknown suite(s) {', '.join(unknown)}; available: {', '.join(list_suites())}")
    for flag, value in (("--n", n), ("--limit", limit), ("--max-new-tokens", max_new_tokens)):
        if not (is_int(value) and value >= 1):
            raise ValueError(f"{flag} must be an integer >= 1, got {value!r}")
    if not (is_number(temperature) and temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if not is_int(seed):
        raise ValueError(f"--seed must be an integer, got {seed!r}")
    from tropd.models import context_length, load_named_model, prepare_tokenizer, quiet_progress_bars

    quiet_progress_bars()
    lm, tok = load_named_model(model)
    context = context_length(lm)
    if context is not None and max_new_tokens >= context:  # before any sampling
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context of "
                         f"{context} tokens; lower it below {context}")
    prepare_tokenizer(tok)
    ks = sorted({1, n})
    results: dict[str, dict] = {}
    payload = {"model": model, "n": n, "limit": limit, "temperature": temperature,
               "max_new_tokens": max_new_tokens, "seed": seed, "requested_tasks": list(tasks), "complete": False,
               "tasks": results}
    try:
        for i, task in enumerate(tasks, 1):
            t0 = time.perf_counter()
            examples = get_suite(task).examples("test", limit, seed)
            r = evaluate_examples(lm, tok, examples, n=n, max_new_tokens=max_new_tokens,
                                  temperature=temperature, seed=seed, task=task)
            r["wall_s"] = round(time.perf_counter() - t0, 1)
            results[task] = r
            payload["complete"] = i == len(tasks)
            if json_path:
                write_text_atomic(json_path, json.dumps(payload, indent=2))  # an interruption keeps the last
            scores = " ".join(f"{k}={r[k]:.3f}" for k in ("avg@n", *[f"pass@{k}" for k in ks]))
            console(f"[{i}/{len(tasks)}] {task}: {scores} ({int(r['problems'])} problems, "
                    f"{r['mean_response_tokens']:.1f} mean tokens, {r['truncation_rate']:.2f} truncated, "
                    f"{r['wall_s']:.0f}s)")
    except BaseException:  # interrupted or failed: say what was kept, then let the caller report the error
        if json_path and results:
            console(f"stopped after {len(results)} of {len(tasks)} suites; {json_path} holds "
                    f"{', '.join(results)}")
        raise
    header = ["task", "avg@n", *[f"pass@{k}" for k in ks], "problems", "mean tokens", "truncated"]
    console(f"\nmodel: {model}  (n={n}, temperature={temperature}, max_new_tokens={max_new_tokens})")
    console("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for task, r in results.items():
        cells = [task, f"{r['avg@n']:.3f}", *[f"{r[f'pass@{k}']:.3f}" for k in ks], f"{int(r['problems'])}",
                 f"{r['mean_response_tokens']:.1f}", f"{r['truncation_rate']:.2f}"]
        console("| " + " | ".join(cells) + " |")
    if json_path:
        console(f"wrote {json_path}")
    return payload

