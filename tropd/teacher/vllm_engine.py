"""``tropd serve-teacher --engine vllm``: the server's engine as an in-process vLLM engine instead of transformers.

:class:`VLLMEngine` has :class:`~tropd.teacher.server.HFEngine`'s interface (``info``, ``score``, ``write``, and
``unsupported``, which the server asks before a score request joins a batch), so the tropd wire protocol, the
batching and every limit and check of :mod:`tropd.teacher.server` apply unchanged. It runs ``vllm.LLM`` on an HF
model folder (``skip_tokenizer_init``: it is given token ids; the folder's tokenizer, read with transformers,
answers ``/v1/info`` and the client's compatibility check):

- scores: each row's unpadded ``prompt ++ response`` with ``prompt_logprobs=K`` and one generated token
  (:mod:`tropd.teacher.logprob_lists`): the sampled token's log-prob and the top-k, in float32 like vLLM's
  log-softmax. Full logits and the exact entropy are not computed: :meth:`VLLMEngine.unsupported` names them, the
  server refuses such a request with a 422, and ``/v1/info`` says so (``supports``);
- rows: vLLM's sampler with ``logprobs_mode="processed_logprobs"`` (the sampled token's log-prob under the
  distribution it was drawn from, after temperature and top-p: the exact behaviour log-prob), a seed per row
  from the caller's uniforms (:func:`~tropd.teacher.logprob_lists.row_seed`), stopping at the request's EOS ids.

vLLM is imported when the engine is built (``pip install 'tropd[vllm]'``, docs/vllm.md); it runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``). Eager mode (no CUDA graphs, no compilation) on a machine without CUDA.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tropd.needs import Needs
from tropd.rollout.sampling import SamplingConfig
from tropd.teacher import logprob_lists
from tropd.teacher.scoring import TeacherScores

ENGINE = "the vLLM engine (tropd serve-teacher --engine vllm)"
#: KV-cache size on a machine without CUDA when ``--kv-cache-mb`` is not given (vLLM's CPU backend would
#: otherwise reserve most of the machine's memory).
CPU_KV_CACHE_MB = 512


def _parameters(folder: Path) -> int:
    """Weights in the folder's safetensors files (from their headers; nothing is read into memory)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                total += int(torch.Size(f.get_slice(key).get_shape()).numel())
    return total


def _entries(position) -> logprob_lists.Entries | None:
    return None if position is None else {int(t): (float(lp.logprob), int(lp.rank or 0)) for t, lp in position.items()}


class VLLMEngine:
    """A frozen HF model folder in an in-process ``vllm.LLM`` (module docstring); ``name`` is what ``/v1/info``
    calls it."""

    def __init__(self, model: str, name: str, dtype: str = "float32", max_model_len: int | None = None,
                 kv_cache_mb: float | None = None, seed: int = 0) -> None:
        from transformers import AutoTokenizer

        from tropd.models import prepare_tokenizer

        folder = Path(model).expanduser()
        if not (folder / "config.json").is_file():
            raise ValueError(f"--engine vllm serves an HF model folder (with config.json); {model!r} is not one")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError as err:
            raise ValueError(f"--engine vllm needs vLLM ({err}): pip install 'tropd[vllm]' (on a CPU: "
                             f"docs/vllm.md)") from None
        cuda = torch.cuda.is_available()
        if kv_cache_mb is None and not cuda:
            kv_cache_mb = CPU_KV_CACHE_MB
        extra = {} if kv_cache_mb is None else {"kv_cache_memory_bytes": int(kv_cache_mb * 2**20)}
        self.llm = LLM(model=str(folder), skip_tokenizer_init=True, dtype=dtype, max_model_len=max_model_len,
                       seed=seed, enforce_eager=not cuda, logprobs_mode="processed_logprobs", max_logprobs=-1,
                       **extra)
        config = self.llm.llm_engine.model_config
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        prepare_tokenizer(self.tokenizer)
        self.name, self.dtype = name, str(config.dtype).replace("torch.", "")
        self.vocab_size = self.id_limit = int(config.get_vocab_size())
        #: one token is generated after every scored sequence, so sequences are one shorter than vLLM's limit
        self.context_length = int(config.max_model_len) - 1
        self.num_layers = getattr(config.hf_text_config, "num_hidden_layers", None)
        self.num_parameters = _parameters(folder)
        self.device = "cuda" if cuda else "cpu"

    def info(self) -> dict:
        tok = self.tokenizer
        return {"model": self.name, "engine": "vllm", "vocab_size": self.vocab_size,
                "context_length": self.context_length, "num_layers": self.num_layers,
                "num_parameters": self.num_parameters, "dtype": self.dtype,
                "supports": {"teacher_logprobs": True, "teacher_topk": True, "teacher_entropy": False,
                             "teacher_logits": False},
                "tokenizer": {"vocab": tok.get_vocab(), "len": len(tok),
                              "chat_template": bool(getattr(tok, "chat_template", None)),
                              **{name: getattr(tok, name, None) for name in
                                 ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}}}

    def unsupported(self, needs: Needs) -> str | None:
        """Why a score request with ``needs`` cannot be answered, else None."""
        return logprob_lists.unsupported(needs, ENGINE)

    def score(self, input_ids, attention_mask, response_start: int, tokens, needs: Needs) -> TeacherScores:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not (needs.teacher_logprobs or needs.teacher_topk or needs.teacher_entropy or needs.teacher_logits):
            return TeacherScores()
        why = self.unsupported(needs)
        if why:
            raise ValueError(why)
        rows = logprob_lists.score_rows(input_ids, attention_mask, response_start, tokens)
        wanted = [i for i, (_, _, n) in enumerate(rows) if n]
        k = needs.top_k if needs.teacher_topk else 0
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=rows[i][0]) for i in wanted], params,
                                    use_tqdm=False) if wanted else []
        lists: list = [None] * len(rows)
        for i, out in zip(wanted, outputs):
            lists[i] = [_entries(position) for position in out.prompt_logprobs]
        return logprob_lists.scores_from_lists(rows, lists, tokens.shape[1], needs)

    def write(self, contexts: list[list[int]], cfg: SamplingConfig, budgets: torch.Tensor, uniforms: torch.Tensor):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        caps = [max(0, min(int(b), self.context_length + 1 - len(c))) for b, c in zip(budgets.tolist(), contexts)]
        wanted = [i for i, cap in enumerate(caps) if cap > 0]
        params = [SamplingParams(max_tokens=caps[i], temperature=cfg.temperature, top_p=cfg.top_p, top_k=-1,
                                 min_p=0.0, seed=logprob_lists.row_seed(uniforms[i, :caps[i]]), logprobs=0,
                                 ignore_eos=True, stop_token_ids=list(cfg.eos_token_ids), detokenize=False)
                  for i in wanted]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=contexts[i]) for i in wanted], params,
                                    use_tqdm=False) if wanted else []
        rows = [logprob_lists.finished_row([], None, 0, cfg) for _ in contexts]
        for i, out in zip(wanted, outputs):
            sample = out.outputs[0]
            tokens = list(sample.token_ids)
            logprobs = [float(step[t].logprob) for t, step in zip(tokens, sample.logprobs or [])]
            rows[i] = logprob_lists.finished_row(tokens, logprobs if sample.logprobs else None, caps[i], cfg)
        return rows
