"""tropd.forward: logits aligned to response positions under left-padded prompts and right-padded responses."""

from __future__ import annotations

import pytest
import torch

from transformers import GPT2Config, GPT2LMHeadModel

from tests.helpers import PAD_ID, TINY_MODELS
from tropd.forward import lm_head_logits, position_ids_from_mask, response_hidden, response_logits

PROMPTS = [[2, 8, 17, 9, 20], [2, 11], [2, 5, 30, 31]]
RESPONSES = [[40, 41, 42], [43, 44, 45, 46, 1], [47]]


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """Learned absolute position embeddings: unlike RoPE, wrong position ids under left padding change the output."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2,
                        bos_token_id=2, eos_token_id=1)
    return GPT2LMHeadModel(config).eval()


BUILDERS = {**TINY_MODELS, "gpt2": tiny_gpt2}


def padded_batch(prompts=PROMPTS, responses=RESPONSES):
    """Left-pad prompts to P, right-pad responses to T: ``(input_ids, attention_mask, P)``."""
    P, T = max(map(len, prompts)), max(map(len, responses))
    rows, masks = [], []
    for p, r in zip(prompts, responses):
        rows.append([PAD_ID] * (P - len(p)) + p + r + [PAD_ID] * (T - len(r)))
        masks.append([0] * (P - len(p)) + [1] * (len(p) + len(r)) + [0] * (T - len(r)))
    return torch.tensor(rows), torch.tensor(masks), P


def test_position_ids_count_real_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_response_logits_match_unpadded_forward(arch):
    model = BUILDERS[arch](seed=2)
    ids, mask, P = padded_batch()
    with torch.no_grad():
        logits = response_logits(model, ids, mask, P)
        assert logits.shape == (3, 5, 64)
        for b, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
            alone = model(torch.tensor([p + r])).logits[0]
            # position t scores response token r[t]: the unpadded output just before it
            torch.testing.assert_close(logits[b, : len(r)], alone[len(p) - 1 : len(p) + len(r) - 1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_chunked_head_and_hidden_give_the_same_logits(arch):
    model = TINY_MODELS[arch](seed=4)
    ids, mask, P = padded_batch()
    with torch.no_grad():
        whole = response_logits(model, ids, mask, P)
        torch.testing.assert_close(response_logits(model, ids, mask, P, chunk_size=2), whole, rtol=0, atol=1e-6)
        hidden = response_hidden(model, ids, mask, P)
        assert hidden.shape == (3, 5, model.config.hidden_size)
        torch.testing.assert_close(lm_head_logits(model, hidden), whole, rtol=0, atol=1e-6)
        # the model's own forward on a full (unpadded) batch agrees, soft-capping included
        full = torch.tensor([[2, 8, 17, 9, 20, 40, 41]])
        ones = torch.ones_like(full)
        torch.testing.assert_close(response_logits(model, full, ones, 3), model(full).logits[:, 2:-1], rtol=0, atol=1e-5)


def test_response_logits_carry_gradients():
    model = TINY_MODELS["llama"]()
    ids, mask, P = padded_batch()
    logits = response_logits(model, ids, mask, P, chunk_size=2)
    logits.logsumexp(-1).sum().backward()
    assert model.lm_head.weight.grad is not None and model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_layout_errors():
    model = TINY_MODELS["llama"]()
    ids, mask, P = padded_batch()
    for start in (0, ids.shape[1]):
        with pytest.raises(ValueError, match="response_start"):
            response_logits(model, ids, mask, start)
    with pytest.raises(ValueError, match="attention_mask"):
        response_logits(model, ids, mask[:, 1:], P)
    with pytest.raises(ValueError, match="chunk_size"):
        response_logits(model, ids, mask, P, chunk_size=0)


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_gradient_checkpointing_recomputes_layers_in_eval_mode_with_the_same_gradients(arch):
    """HF checkpoints a layer only in training mode; tropd's loss forward runs in eval mode and still checkpoints
    (each decoder layer runs again in backward) with the gradients of the plain forward."""
    from tropd.forward import enable_gradient_checkpointing, response_hidden_states

    ids, mask, P = padded_batch()
    grads, calls = {}, {}
    for on in (False, True):
        model = TINY_MODELS[arch](vocab_size=64).double()
        if on:
            enable_gradient_checkpointing(model)
        model.eval()
        count = [0]  # calls of a layer's MLP: HF checkpoints the layer's forward, inside its hooks
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        hidden = response_hidden_states(model, ids, mask, P)
        (hidden ** 2).sum().backward()
        grads[on] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        calls[on] = count[0]
        assert not any(m.training for m in model.modules())  # eval mode is left as it was
    assert calls == {False: 1, True: 2}  # recomputed in backward
    assert grads[True].keys() == grads[False].keys()
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-10, atol=1e-12, msg=name)


def test_gradient_checkpointing_refuses_layers_that_drop_out_in_training_mode():
    from tropd.forward import enable_gradient_checkpointing

    model = TINY_MODELS["llama"](vocab_size=64)
    for layer in model.model.layers:  # a layer applying dropout of its own once marked training
        forward = layer.forward
        layer.forward = lambda *a, _f=forward, _l=layer, **k: (
            torch.nn.functional.dropout(_f(*a, **k), p=0.5, training=_l.training))
    with pytest.raises(ValueError, match="model.gradient_checkpointing: LlamaForCausalLM's decoder layers change"):
        enable_gradient_checkpointing(model)
