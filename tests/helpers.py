"""Tiny models and tokenizers built in code, shared by every test (``from tests.helpers import tiny_llama``).

Token ids of :func:`tiny_tokenizer` (and the special ids the tiny models are configured with):
``PAD_ID = 0``, ``EOS_ID = 1``, ``BOS_ID = 2``, ``UNK_ID = 3``, then the role markers ``<|system|>``,
``<|user|>``, ``<|assistant|>``, the digits ``0``–``9``, ``+ - * = . ?`` and filler words ``wa, wb, …, wz, wba, …`` (letters only) up to
``vocab_size``. Text is split on whitespace and punctuation, digits one by one.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
BASE_WORDS = [str(d) for d in range(10)] + ["+", "-", "*", "=", ".", "?"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _letters(i: int) -> str:
    """``i`` in base 26 written with a..z (``0 -> a``, ``26 -> ba``): filler words without digits."""
    out = ""
    while True:
        i, r = divmod(i, 26)
        out = chr(ord("a") + r) + out
        if i == 0:
            return out


def tiny_tokenizer(
    vocab_size: int = 64, *, chat_template: bool = True, word_prefix: str = "w"
) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer of exactly ``vocab_size`` tokens (see the module docstring for the ids).

    ``word_prefix`` renames the filler words: same size and special ids, a different vocabulary.
    """
    fixed = SPECIAL_TOKENS + BASE_WORDS
    if vocab_size < len(fixed) + 1:
        raise ValueError(f"tiny_tokenizer needs vocab_size > {len(fixed)}, got {vocab_size}")
    words = fixed + [word_prefix + _letters(i) for i in range(vocab_size - len(fixed))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def _common(vocab_size: int, hidden: int, layers: int, heads: int, eos_token_id: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=256,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )


def _build(model_cls: type, config, seed: int, init_std: float) -> PreTrainedModel:
    """Random model; weights ~ N(0, init_std) so that logits differ visibly between positions."""
    config.initializer_range = init_std
    torch.manual_seed(seed)
    model = model_cls(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * init_std)
    return model.float().eval()


def tiny_llama(
    vocab_size: int = 64,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    eos_token_id: int = EOS_ID,
    init_std: float = 0.2,
) -> LlamaForCausalLM:
    """A random float32 ``LlamaForCausalLM`` (GQA: ``heads // 2`` KV heads), eval mode, eager-free (SDPA)."""
    config = LlamaConfig(**_common(vocab_size, hidden, layers, heads, eos_token_id))
    return _build(LlamaForCausalLM, config, seed, init_std)


def tiny_qwen2(
    vocab_size: int = 64,
    hidden: int = 32,
    layers: int = 4,
    heads: int = 4,
    seed: int = 0,
    eos_token_id: int = EOS_ID,
    sliding_window: int = 4,
    init_std: float = 0.2,
) -> Qwen2ForCausalLM:
    """A random ``Qwen2ForCausalLM`` whose layers from index 2 on use sliding-window attention (``layer_types`` mixed)."""
    config = Qwen2Config(
        **_common(vocab_size, hidden, layers, heads, eos_token_id),
        use_sliding_window=True,
        sliding_window=sliding_window,
        max_window_layers=2,
    )
    return _build(Qwen2ForCausalLM, config, seed, init_std)


def tiny_gemma3(
    vocab_size: int = 64,
    hidden: int = 32,
    layers: int = 4,
    heads: int = 4,
    seed: int = 0,
    eos_token_id: int = EOS_ID,
    sliding_window: int = 4,
    init_std: float = 0.2,
) -> Gemma3ForCausalLM:
    """A random ``Gemma3ForCausalLM``: sliding/full layers alternating, logit soft-capping at 5 (so it matters)."""
    config = Gemma3TextConfig(
        **_common(vocab_size, hidden, layers, heads, eos_token_id),
        head_dim=hidden // heads,
        query_pre_attn_scalar=hidden // heads,
        sliding_window=sliding_window,
        sliding_window_pattern=2,
        final_logit_softcapping=5.0,
    )
    return _build(Gemma3ForCausalLM, config, seed, init_std)


TINY_MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gemma3": tiny_gemma3}
