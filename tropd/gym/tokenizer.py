"""A fixed character-level tokenizer for the gym's tasks (HuggingFace ``tokenizers``, wrapped for transformers).

Vocabulary (100 ids, the same on every build): the special tokens ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2,
``<unk>`` 3, then one token per character of :data:`ALPHABET` in code-point order: ``"\\n"`` 4, ``" "`` 5, ...,
``"0"`` 21, ..., ``"~"`` 99. The alphabet is newline plus all of printable ASCII, a superset of every character
any task family emits (digits, ``+*%=()|#``, space, the letters of ``sort``), so a family added later that stays
in printable ASCII keeps the ids, and models, valid. Any other character encodes to ``<unk>``.

Encoding splits text into single characters; the post-processor prepends ``<bos>`` when special tokens are asked
for (``tok(text)``, as a base model's tokenizer does); ``<eos>`` is never added -- training appends it after a
completion. Decoding joins the characters with nothing in between (``decoders.Fuse``, no clean-up), so::

    tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text

for any text in the alphabet that does not contain a special token's literal text (e.g. ``"<eos>"``).
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
ALPHABET: str = "\n" + "".join(chr(c) for c in range(32, 127))


def vocabulary() -> dict[str, int]:
    """Token -> id: the special tokens first, then :data:`ALPHABET` in order."""
    tokens = list(SPECIAL_TOKENS) + list(ALPHABET)
    return {token: i for i, token in enumerate(tokens)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The gym's character-level tokenizer; see the module docstring for its ids and behaviour."""
    vocab = vocabulary()
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char, newline too
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        clean_up_tokenization_spaces=False)
