"""Generation (KV cache, left padding) in every mode, and what gate training relies on (grads, freezing)."""

from __future__ import annotations

import pytest
import torch

from loraflow import FlowModel
from loraflow.tiny import randomize_gates, tiny_model

PAD = 3


@pytest.fixture
def flow(tiny_pair):
    _, loras = tiny_pair
    return randomize_gates(FlowModel.from_pretrained(tiny_model("llama", seed=0), loras), seed=1)


MODES = [("flow", {}), ("static", {"weights": [0.5, 0.5]}), ("single", {"lora": 0}), ("base", {})]


@pytest.mark.parametrize("mode,kwargs", MODES, ids=[m for m, _ in MODES])
def test_greedy_with_cache_equals_without(flow, mode, kwargs):
    flow.set_mode(mode, **kwargs)
    ids = torch.randint(4, 250, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cached = flow.generate(input_ids=ids, max_new_tokens=12, do_sample=False, use_cache=True)
        uncached = flow.generate(input_ids=ids, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("mode,kwargs", MODES[:2], ids=["flow", "static"])
def test_left_padded_batch_equals_single_rows(flow, mode, kwargs):
    flow.set_mode(mode, **kwargs)
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(4, 250, (n,), generator=gen) for n in (9, 4, 6)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    with torch.no_grad():
        batch = flow.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                              pad_token_id=PAD)
        for i, r in enumerate(rows):
            single = flow.generate(input_ids=r[None], max_new_tokens=8, do_sample=False, pad_token_id=PAD)
            assert torch.equal(batch[i, width:], single[0, len(r):]), f"row {i}"


def test_sampling_runs(flow):
    ids = torch.randint(4, 250, (2, 5))
    torch.manual_seed(0)
    out = flow.generate(input_ids=ids, max_new_tokens=5, do_sample=True, top_k=20, pad_token_id=PAD)
    assert out.shape == (2, 10)


def _step(flow, ids):
    flow.train()
    flow.set_lora_dropout(False)
    opt = torch.optim.AdamW(flow.gate_parameters(), lr=1e-2)
    loss = flow(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in flow.named_gate_parameters()}
    opt.step()
    return grads


def test_only_gates_train_and_frozen_weights_stay_bit_identical(flow):
    trainable = {n for n, p in flow.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in flow.named_gate_parameters()}
    assert len(trainable) == 2 * flow.num_layers
    frozen = {n: p.detach().clone() for n, p in flow.named_parameters() if not p.requires_grad}
    assert any("lora_A" in n for n in frozen) and any("lora_B" in n for n in frozen)
    gates_before = {n: p.detach().clone() for n, p in flow.named_gate_parameters()}
    grads = _step(flow, torch.randint(4, 250, (2, 8)))
    for n, p in flow.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
            assert p.grad is None, n
    for i in range(flow.num_layers):
        g = grads[f"model.model.layers.{i}.lora_fusion_gate.weight"]
        assert g.abs().sum() > 0, f"layer {i} gate got no gradient"
    assert any(not torch.equal(p, gates_before[n]) for n, p in flow.named_gate_parameters())


def test_gradient_checkpointing_gives_the_same_gradients(tiny_pair):
    _, loras = tiny_pair
    ids = torch.randint(4, 250, (2, 8), generator=torch.Generator().manual_seed(4))
    results = []
    for checkpointing in (False, True):
        flow = FlowModel.from_pretrained(tiny_model("llama", seed=0), loras)
        with torch.no_grad():
            for gate in flow.gates():
                gate.weight.fill_(0.01)
        if checkpointing:
            flow.gradient_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in flow.layers())
        results.append(_step(flow, ids))
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], atol=1e-6, rtol=1e-5)


def test_lora_dropout_is_active_in_training_and_switchable(tiny_pair, tmp_path):
    from loraflow.tiny import tiny_lora

    path = tmp_path / "dropout_lora"
    tiny_lora(tiny_model("llama"), path, r=4, dropout=0.5, seed=3)
    flow = FlowModel.from_pretrained(tiny_model("llama"), [path, tiny_pair[1][1]], bias_init="uniform")
    ids = torch.randint(4, 250, (1, 6))
    flow.train()
    with torch.no_grad():
        a, b = flow(input_ids=ids).logits, flow(input_ids=ids).logits
    assert not torch.equal(a, b)  # dropout masks differ between calls
    flow.set_lora_dropout(False)
    with torch.no_grad():
        assert torch.equal(flow(input_ids=ids).logits, flow(input_ids=ids).logits)
