"""Gym tokenizer: fixed character-level ids, exact round trips, every task character known, save/load."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tropd.gym.tasks import FAMILIES, STYLES, get_family, make_dataset
from tropd.gym.tokenizer import ALPHABET, SPECIAL_TOKENS, build_tokenizer, vocabulary


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """prompt + completion of every style (and a noisy one) for problems of every family, both splits."""
    out = []
    for name in FAMILIES:
        fam = get_family(name)
        hard = get_family(name, fam.difficulty_range[1])
        for f, split in ((fam, "train"), (fam, "heldout"), (hard, "train")):
            for p in f.problems(split, 60, seed=1):
                out += [p.prompt + f.completion(p, s) for s in STYLES]
                out.append(p.prompt + f.noisy_completion(p, 0.5, seed=1))
    return out


def test_ids_are_fixed(tok):
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == SPECIAL_TOKENS
    assert len(tok) == len(SPECIAL_TOKENS) + len(ALPHABET) == 100
    assert tok.get_vocab() == vocabulary() == build_tokenizer().get_vocab()
    assert tok.convert_tokens_to_ids(["\n", " ", "0", "9", "#", "~"]) == [4, 5, 21, 30, 8, 99]
    assert len(set(ALPHABET)) == len(ALPHABET) and list(ALPHABET) == sorted(ALPHABET)


def test_every_task_character_is_in_the_alphabet(tok, texts):
    used = set("".join(texts))
    assert used <= set(ALPHABET), used - set(ALPHABET)
    assert set("0123456789+*%=()|# sort") <= used
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and len(ids) == len(text)


def test_task_texts_round_trip(tok, texts):
    batch = tok(texts)["input_ids"]
    for text, ids in zip(texts, batch):
        assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids and len(ids) == len(text) + 1
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(ids[1:]) == text
        assert tok.convert_ids_to_tokens(ids[1:]) == list(text)  # one token per character


def test_prompt_and_completion_tokenize_separately_like_together(tok):
    for p in make_dataset(list(FAMILIES), "train", 30, seed=0):
        completion = get_family(p.family).completion(p)
        joined = tok(p.prompt + completion)["input_ids"]
        assert joined == tok(p.prompt)["input_ids"] + tok(completion, add_special_tokens=False)["input_ids"]


@given(st.text(alphabet=ALPHABET, max_size=80))
@settings(max_examples=200, deadline=None)
def test_any_alphabet_text_round_trips(tok, text):
    assume(not any(s in text for s in SPECIAL_TOKENS))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text


def test_no_tokenization_space_clean_up(tok):
    text = "a . b , c ! d ? e 's n't f 'm g 've h 're"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_unknown_characters_and_specials(tok):
    ids = tok("1é+\t2", add_special_tokens=False)["input_ids"]
    assert ids == [22, 3, 16, 3, 23]
    assert tok.decode(ids) == "1<unk>+<unk>2"
    assert tok.decode([1, 22, 2, 0, 0]) == "<bos>1<eos><pad><pad>"
    assert tok.decode([1, 22, 2, 0, 0], skip_special_tokens=True) == "1"


def test_padding_uses_pad_id(tok):
    batch = tok(["12", "3456"], padding=True)
    assert batch["input_ids"][0][-2:] == [0, 0] and batch["attention_mask"][0] == [1, 1, 1, 0, 0]


def test_save_and_load_round_trip(tok, tmp_path, texts):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id"):
        assert getattr(loaded, attr) == getattr(tok, attr)
    for text in texts[:200] + ["1é2", "a b\nc"]:
        ids = tok(text)["input_ids"]
        assert loaded(text)["input_ids"] == ids
        assert loaded.decode(ids) == tok.decode(ids)
        assert loaded.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
