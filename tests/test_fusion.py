"""The fusion core against independent references: PEFT for single/static, a per-LoRA loop for flow."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loraflow import FlowModel, LoraflowError
from loraflow.fusion.adapters import load_adapter
from loraflow.tiny import ARCHS, SEVEN_PROJECTIONS, tiny_lora, tiny_model

ATOL = 1e-5


def _ids(batch=2, seq=9, seed=0):
    return torch.randint(4, 250, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """Per architecture: three saved LoRAs with ranks 4, 8, 16 (the third targets attention only)."""
    root = tmp_path_factory.mktemp("loras")
    out = {}
    for arch in ARCHS:
        paths = []
        for i, (r, targets) in enumerate([(4, SEVEN_PROJECTIONS), (8, SEVEN_PROJECTIONS),
                                          (16, ("q_proj", "k_proj", "v_proj", "o_proj"))]):
            path = root / f"{arch}_{i}"
            tiny_lora(tiny_model(arch), path, r=r, seed=10 + i, alpha=8.0 * (i + 1), target_modules=targets)
            paths.append(path)
        out[arch] = paths
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_single_mode_equals_peft(arch, loras):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(tiny_model(arch), str(loras[arch][1])).eval()
    flow = FlowModel.from_pretrained(tiny_model(arch), [loras[arch][1]], mode="single")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(flow(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_static_mode_equals_peft_weighted_cat(arch, loras):
    from peft import PeftModel

    a, b = loras[arch][:2]
    weights = [0.3, 0.7]
    peft_model = PeftModel.from_pretrained(tiny_model(arch), str(a), adapter_name="a")
    peft_model.load_adapter(str(b), adapter_name="b")
    peft_model.add_weighted_adapter(["a", "b"], weights, "mix", combination_type="cat")
    peft_model.set_adapter("mix")
    flow = FlowModel.from_pretrained(tiny_model(arch), [a, b], mode="static", static_weights=weights)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(flow(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits,
                                   atol=ATOL, rtol=0)


def test_static_with_negative_weight_is_weighted_sum_of_deltas(loras):
    """Base + sum_i w_i delta_i, checked by linearity: each delta measured alone in single mode."""
    paths = loras["llama"][:2]
    flow = FlowModel.from_pretrained(tiny_model("llama"), paths, mode="base")
    x = torch.randn(2, 5, 64)
    proj = flow.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        base = proj(x)
        deltas = []
        for i in range(2):
            flow.set_mode("single", lora=i)
            deltas.append(proj(x) - base)
        flow.set_mode("static", weights=[-0.4, 1.3])
        torch.testing.assert_close(proj(x), base - 0.4 * deltas[0] + 1.3 * deltas[1], atol=ATOL, rtol=0)


class _ReferenceLinear(nn.Module):
    """y = base(x) + sum_i w_i s_i B_i A_i x, one LoRA at a time (the original's loop), w from `weights()`."""

    def __init__(self, base, adapters, module, weights):
        super().__init__()
        self.base, self.weights = base, weights
        self.loras = [(i, *a.weights[module], a.scaling(module)) for i, a in enumerate(adapters) if module in a.weights]

    def forward(self, x):
        w = self.weights()  # (batch, seq, k)
        y = self.base(x)
        for i, a, b, s in self.loras:
            y = y + w[..., i : i + 1] * s * (x @ a.T @ b.T)
        return y


def _reference_flow_model(arch, adapters, gate_params, temperature):
    """A plain re-implementation: explicit gates on each decoder layer's input, looped LoRAs."""
    model = tiny_model(arch)
    current = {}
    for li, layer in enumerate(model.model.layers):
        w_mat, b_vec = gate_params[li]

        def gate_hook(module, args, li=li, w_mat=w_mat, b_vec=b_vec):
            current[li] = torch.softmax(args[0] @ w_mat.T / temperature, dim=-1) + b_vec

        layer.register_forward_pre_hook(gate_hook)
        for name, mod in list(layer.named_modules()):
            full = f"model.layers.{li}.{name}"
            if isinstance(mod, nn.Linear) and any(full in a.weights for a in adapters):
                parent = layer.get_submodule(name.rsplit(".", 1)[0])
                setattr(parent, name.rsplit(".", 1)[1],
                        _ReferenceLinear(mod, adapters, full, lambda li=li: current[li]))
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_flow_mode_matches_plain_reference_k3(arch, loras):
    adapters = [load_adapter(p) for p in loras[arch]]  # ranks 4, 8, 16; the third on attention only
    flow = FlowModel.from_pretrained(tiny_model(arch), adapters, temperature=1.3)
    gen = torch.Generator().manual_seed(5)
    params = []
    with torch.no_grad():
        for gate in flow.gates():
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=gen) * 0.5)
            gate.bias.copy_(torch.randn(gate.bias.shape, generator=gen))
            params.append((gate.weight.clone(), gate.bias.clone()))
    reference = _reference_flow_model(arch, adapters, params, temperature=1.3)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(flow(input_ids=ids).logits, reference(input_ids=ids).logits, atol=ATOL, rtol=0)


def test_fresh_k2_gate_equals_task_lora(loras):
    paths = loras["llama"][:2]
    flow = FlowModel.from_pretrained(tiny_model("llama"), paths)
    assert [g.bias.tolist() for g in flow.gates()][0] == [-0.5, 0.5]
    ids = _ids()
    with torch.no_grad():
        fused = flow(input_ids=ids).logits
        flow.set_mode("single", lora=1)
        torch.testing.assert_close(fused, flow(input_ids=ids).logits, atol=ATOL, rtol=0)


def test_bias_inits_for_general_k(loras):
    flow = FlowModel.from_pretrained(tiny_model("llama"), loras["llama"], bias_init="one-hot", bias_index=0)
    x = torch.randn(1, 3, 64)
    torch.testing.assert_close(flow.gates()[0](x), torch.tensor([1.0, 0.0, 0.0]).expand(1, 3, 3))
    flow = FlowModel.from_pretrained(tiny_model("llama"), loras["llama"], bias_init="uniform")
    torch.testing.assert_close(flow.gates()[1](x), torch.full((1, 3, 3), 1 / 3))


def test_gate_parameter_count_formula(loras):
    flow = FlowModel.from_pretrained(tiny_model("llama", layers=3), loras["llama"][:2])
    hidden, layers, k = 64, 3, 2
    assert sum(p.numel() for p in flow.gate_parameters()) == layers * (k * hidden + k)


def test_bf16_base_keeps_fp32_gates_and_bf16_output(loras):
    flow = FlowModel.from_pretrained(tiny_model("llama"), loras["llama"][:2], torch_dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in flow.gate_parameters())
    proj = flow.model.model.layers[0].mlp.down_proj
    assert proj.lora_A.dtype == torch.bfloat16
    with torch.no_grad():
        out = flow(input_ids=_ids())
    assert out.logits.dtype == torch.bfloat16
    assert torch.isfinite(out.logits.float()).all()


def test_set_mode_errors(loras):
    flow = FlowModel.from_pretrained(tiny_model("llama"), loras["llama"][:2])
    with pytest.raises(LoraflowError, match="needs 2 weights"):
        flow.set_mode("static", weights=[1.0])
    with pytest.raises(LoraflowError, match="no LoRA named"):
        flow.set_mode("single", lora="nope")
    with pytest.raises(LoraflowError, match="choose one of"):
        flow.set_mode("hub")


def test_base_mode_equals_plain_model(loras):
    flow = FlowModel.from_pretrained(tiny_model("llama"), loras["llama"][:2], mode="base")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(flow(input_ids=ids).logits, tiny_model("llama")(input_ids=ids).logits)


def test_recording_gate_weights(loras):
    flow = FlowModel.from_pretrained(tiny_model("llama"), loras["llama"][:2])
    with torch.no_grad():
        for gate in flow.gates():
            gate.weight.normal_(0, 0.5)
    ids = _ids(batch=1, seq=6)
    with flow.record_gates() as rec, torch.no_grad():
        out = flow.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    weights = rec.weights(row=0)  # (layers, tokens, k)
    assert weights.shape == (2, out.shape[1] - 1, 2)
    # the first prompt positions' weights are the gate applied to the embeddings (layer 0 input)
    with torch.no_grad():
        x0 = flow.model.model.embed_tokens(ids)
        torch.testing.assert_close(weights[0, :6], flow.gates()[0](x0)[0])
    assert not torch.allclose(weights[0, :, 0], weights[0, :1, 0].expand(weights.shape[1]))  # varies per token


@pytest.mark.parametrize("tokens", [3, 80])  # below and above layers.ADDMM_MIN_ROWS: both ways of adding B h
@pytest.mark.parametrize("mode", ["flow", "static", "single"])
def test_fused_projection_matches_a_plain_sum_in_value_and_gradient(tokens, mode):
    from loraflow.fusion.layers import ADDMM_MIN_ROWS, FusedLoRALinear, FusionState

    assert 3 < ADDMM_MIN_ROWS <= 80
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(24, 40, bias=True).requires_grad_(False)
    ranks, scalings = (4, 6), (2.0, 0.5)
    loras = [(torch.randn(r, 24, generator=gen), torch.randn(40, r, generator=gen), s, 0.0)
             for r, s in zip(ranks, scalings)]
    state = FusionState(2)
    layer = FusedLoRALinear(base, loras, state).eval()
    x = torch.randn(2, tokens, 24, generator=gen, requires_grad=True)
    w = torch.rand(2, tokens, 2, generator=gen)
    if mode == "flow":
        state.mode = "flow"
        state.set_weights(w)
    else:
        values = [0.3, -1.2] if mode == "static" else [0.0, 1.0]
        state.set_static(values)
        assert state.active == (1 if mode == "single" else None)
        w = torch.tensor(values).expand(2, tokens, 2)
    expected = base(x) + sum(w[..., i : i + 1] * s * (x @ a.T @ b.T) for i, ((a, b, s, _)) in enumerate(loras))
    (gx_expected,) = torch.autograd.grad(expected.pow(2).sum(), x)
    y = layer(x)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gx, gx_expected, atol=1e-3, rtol=1e-4)
    with torch.no_grad():  # generation's path: B h added in place into the base output
        torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: bf16 out, close to the fp32 sum
        y16 = layer(x)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), expected, atol=0.15 * expected.abs().max().item(), rtol=0.05)


def test_gate_computes_in_fp32_under_autocast_and_divides_by_temperature():
    from loraflow.fusion.gate import FusionGate

    gen = torch.Generator().manual_seed(0)
    gate = FusionGate(16, 3, temperature=1.7, bias_init="uniform")
    with torch.no_grad():
        gate.weight.copy_(torch.randn(3, 16, generator=gen))
    x = torch.randn(2, 5, 16, generator=gen)
    expected = torch.softmax(x @ gate.weight.T / 1.7, dim=-1)
    torch.testing.assert_close(gate(x), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 matmul would round the logits
        w = gate(x.to(torch.bfloat16))
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, torch.softmax(x.to(torch.bfloat16).float() @ gate.weight.T / 1.7, dim=-1))


def _reference_words(key: int, count: int) -> list[int]:
    """`layers.random_words` for one key, in plain Python integers (unsigned 64-bit, wrapping)."""
    mask = 2**64 - 1
    out = []
    for c in range(count):
        z = (key + c * 0x9E3779B97F4A7C15) & mask
        z ^= z >> 32
        z = (z * 0xBF58476D1CE4E5B9) & mask
        z ^= z >> 32
        z = (z * 0x94D049BB133111EB) & mask
        z ^= z >> 32
        out.append(z - 2**64 if z >= 2**63 else z)
    return out


def test_random_words_are_the_documented_integer_hash():
    """The dropout bits are integer arithmetic only (the same on every device): pinned to a Python reference."""
    from loraflow.fusion.layers import random_words

    keys = torch.tensor([[0, -1], [2**62 + 12345, -(2**63)]])
    words = random_words(keys, 37)
    assert words.shape == (2, 2, 37) and words.dtype == torch.int64
    for key, row in zip(keys.flatten().tolist(), words.reshape(4, 37)):
        assert row.tolist() == _reference_words(key, 37)
    assert torch.equal(random_words(keys, 5), words[..., :5])  # a stream's prefix does not depend on its length


def test_dropout_masks_are_bernoulli_with_rounded_p_and_independent():
    from loraflow.fusion.layers import DROPOUT_BITS, dropout_masks

    x = torch.empty(2, 200, 501)  # odd width: the last int64 word of each token is only partly used
    salts = torch.tensor([11, 22, 33])
    torch.manual_seed(3)
    masks, scales = dropout_masks(x, [0.1, 0.0, 0.3], salts)  # no keys: drawn from torch's generator
    torch.manual_seed(3)
    again, _ = dropout_masks(x, [0.1, 0.0, 0.3], salts)
    assert masks[1] is None and scales[1] == 1.0
    assert all(torch.equal(a, b) for a, b in zip((masks[0], masks[2]), (again[0], again[2])))
    keyed, _ = dropout_masks(x, [0.1, 0.0, 0.3], salts, torch.tensor([5, 6]))
    unit = 2.0**-DROPOUT_BITS
    for mask, p, scale in ((masks[0], 0.1, scales[0]), (masks[2], 0.3, scales[2]), (keyed[0], 0.1, scales[0])):
        assert mask.dtype == torch.uint8 and mask.shape == x.shape and set(mask.unique().tolist()) == {0, 1}
        rounded = round(p / unit) * unit
        assert scale == pytest.approx(1.0 / (1.0 - rounded), rel=1e-12)  # E[mask * scale] = 1 exactly
        dropped = 1.0 - mask.double().mean().item()
        assert abs(dropped - rounded) < 5 * (p * (1 - p) / x.numel()) ** 0.5  # 5 sigma
    n = x.numel()
    for a, b, pa, pb in ((masks[0], masks[2], 0.1, 0.3), (keyed[0], keyed[2], 0.1, 0.3),
                         (keyed[0][0], keyed[0][1], 0.1, 0.1), (keyed[0][:, 1:], keyed[0][:, :-1], 0.1, 0.1)):
        both = ((a == 0) & (b == 0)).double().mean().item()  # LoRAs, rows and neighbouring tokens: independent
        assert abs(both - pa * pb) < 5 * (pa * pb * (1 - pa * pb) / (n / 2)) ** 0.5
    rows = keyed[0].double().mean(dim=-1)
    assert rows.std() < 0.05  # no structure along a dimension (every element gets its own bits)


def test_keyed_dropout_masks_do_not_depend_on_the_batch_or_padding():
    """An example's masks are a function of its key (and the salt) only: the same alone, in another batch
    position, or padded to another length."""
    from loraflow.fusion.layers import dropout_masks, example_dropout_key

    keys = [example_dropout_key(0, 3, position) for position in range(3)]
    salts = torch.tensor([7, 8])
    together, _ = dropout_masks(torch.empty(3, 9, 40), [0.1, 0.2], salts, torch.tensor(keys))
    alone, _ = dropout_masks(torch.empty(1, 5, 40), [0.1, 0.2], salts, torch.tensor(keys[2:]))
    for j in range(2):
        assert torch.equal(together[j][2, :5], alone[j][0])
        assert not torch.equal(together[j][0], together[j][1])
    assert not torch.equal(together[0], together[1])
    other_step, _ = dropout_masks(torch.empty(1, 5, 40), [0.1, 0.2], salts,
                                  torch.tensor([example_dropout_key(0, 4, 2)]))
    assert not torch.equal(other_step[0], alone[0])
    with pytest.raises(RuntimeError, match="2 example keys set for an input of 3 rows"):
        dropout_masks(torch.empty(3, 9, 40), [0.1], salts[:1], torch.tensor(keys[:2]))


def test_fused_projection_with_dropout_is_the_plain_sum_over_masked_inputs():
    """Training mode, dropout on: y = base(x) + sum_i w_i s_i B_i A_i (x * mask_i) / (1 - p_i), gradients too."""
    from loraflow.fusion.layers import FusedLoRALinear, FusionState, dropout_masks

    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(24, 40).requires_grad_(False)
    loras = [(torch.randn(4, 24, generator=gen), torch.randn(40, 4, generator=gen), 2.0, 0.1),
             (torch.randn(6, 24, generator=gen), torch.randn(40, 6, generator=gen), 0.5, 0.25)]
    state = FusionState(2)
    layer = FusedLoRALinear(base, loras, state, name="layers.0.q_proj").train()
    x = torch.randn(2, 40, 24, generator=gen, requires_grad=True)
    w = torch.rand(2, 40, 2, generator=gen)
    state.set_weights(w)
    state.dropout_keys = torch.tensor([101, -202])
    y = layer(x)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x)
    masks, scales = dropout_masks(x, [0.1, 0.25], layer.lora_salts, state.dropout_keys)
    expected = base(x) + sum(w[..., i:i + 1] * s * scales[i] * ((x * masks[i]) @ a.T @ b.T)
                             for i, (a, b, s, _) in enumerate(loras))
    (gx_expected,) = torch.autograd.grad(expected.pow(2).sum(), x)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gx, gx_expected, atol=1e-3, rtol=1e-4)
    with torch.no_grad():  # no autograd, still training: the masks apply, the same for the same keys
        torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-5)
        assert not torch.allclose(y, layer.eval()(x))  # the masks did drop something


@pytest.mark.parametrize("mode", ["single", "static"])
def test_loaded_model_is_in_eval_mode_with_dropout_loras(tiny_pair, mode):
    """`from_pretrained` returns an inference model: with the release's lora_dropout=0.1 two calls on the same
    input agree, and agree with PEFT's (no `.eval()` called on the FlowModel)."""
    from peft import PeftModel

    base, (a, b) = tiny_pair
    assert load_adapter(a).dropout == 0.1 and load_adapter(b).dropout == 0.1
    weights = [0.3, 0.7] if mode == "static" else None
    flow = FlowModel.from_pretrained(str(base), [a, b], mode=mode, static_weights=weights, lora=1)
    assert not flow.training and not any(m.training for m in flow.modules())
    peft_model = PeftModel.from_pretrained(tiny_model("llama"), str(b if mode == "single" else a), adapter_name="a")
    if mode == "static":
        peft_model.load_adapter(str(b), adapter_name="b")
        peft_model.add_weighted_adapter(["a", "b"], weights, "mix", combination_type="cat")
        peft_model.set_adapter("mix")
    ids = _ids()
    with torch.no_grad():
        first, second = flow(input_ids=ids).logits, flow(input_ids=ids).logits
        expected = peft_model.eval()(input_ids=ids).logits
    assert torch.equal(first, second)
    torch.testing.assert_close(first, expected, atol=ATOL, rtol=0)


def test_flow_mode_is_deterministic_after_loading_and_dropout_runs_only_under_train(tiny_pair):
    base, loras = tiny_pair
    flow = FlowModel.from_pretrained(str(base), loras, bias_init="uniform")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(flow(input_ids=ids).logits, flow(input_ids=ids).logits)
        out = flow.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=3)
        assert torch.equal(out, flow.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=3))
        flow.train()
        assert not torch.equal(flow(input_ids=ids).logits, flow(input_ids=ids).logits)  # dropout 0.1 on
