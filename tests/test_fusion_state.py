"""The fusion state is module state: `.to()` moves and casts carry it in every mode, `unload()` gives back the plain
base, a second injection is refused, and the gate keeps no fp32 copy of a bf16 layer input for backward."""

from __future__ import annotations

import pytest
import torch

from loraflow import FlowModel, LoraflowError
from loraflow.fusion.adapters import load_adapter
from loraflow.fusion.layers import FusedLoRALinear, FusionState
from loraflow.fusion.model import GATE_MODULE, STATE_MODULE, inject_fusion
from loraflow.tiny import randomize_gates, save_tiny_loras, tiny_model

MODES = {"flow": {}, "static": {"static_weights": [0.3, -0.7]}, "single": {"lora": 1}, "base": {}}


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return save_tiny_loras(lambda: tiny_model("llama", seed=0), root, {"lang_lora": 4, "task_lora": 8}, dropout=0.1)


def _flow(loras, mode: str, base=None, dtype=None) -> FlowModel:
    flow = FlowModel.from_pretrained(tiny_model("llama", seed=0) if base is None else base, loras, mode=mode,
                                     torch_dtype=dtype, **MODES[mode])
    return randomize_gates(flow, seed=0, std=0.5).eval()  # eval: no LoRA dropout


def _ids(device="cpu"):
    return torch.randint(4, 250, (2, 9), generator=torch.Generator().manual_seed(0)).to(device)


def _logits(model, device="cpu") -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids(device)).logits


def _fusion_tensors(flow: FlowModel) -> dict[str, torch.Tensor]:
    return {n: t for n, t in [*flow.named_parameters(), *flow.named_buffers()]
            if GATE_MODULE in n or STATE_MODULE in n or ".lora_" in n or n.endswith("static_scale")}


@pytest.mark.parametrize("mode", list(MODES))
def test_dtype_cast_after_loading_equals_loading_in_that_dtype_and_keeps_gates_fp32(loras, mode):
    cast = _flow(loras, mode).to(torch.bfloat16)
    loaded = _flow(loras, mode, dtype=torch.bfloat16)
    for flow in (cast, loaded):
        assert all(p.dtype == torch.float32 for p in flow.gate_parameters())
        assert all(s.static.dtype == torch.float32 for s in flow.states)
        proj = flow.model.model.layers[0].self_attn.q_proj
        assert proj.lora_A.dtype == torch.bfloat16 and proj.lora_scaling.dtype == torch.float32
    assert torch.equal(_logits(cast), _logits(loaded))
    back = cast.to(torch.float32)  # and back: the derived buffers are rebuilt, not upcast from bf16
    proj = back.model.model.layers[0].self_attn.q_proj
    assert proj.lora_A.dtype == torch.float32
    if mode == "static":
        _logits(back)
        weights = MODES["static"]["static_weights"]
        columns = [i for i, (s, e) in proj.segments.items() for _ in range(e - s)]
        expected = torch.tensor([weights[i] for i in columns]) * torch.tensor([proj.scalings[i] for i in columns])
        assert torch.equal(proj.static_scale, expected)


@pytest.mark.parametrize("mode", list(MODES))
def test_a_move_carries_every_fusion_tensor_and_the_model_runs_there(loras, mode):
    """A device move (meta here, standing in for CUDA): every fusion tensor follows, and the forward runs on the
    new device in every mode (a tensor left behind would raise a device mismatch)."""
    flow = _flow(loras, mode)
    _logits(flow)  # leaves per-forward values (gate weights, scales) from the CPU run behind
    flow.to("meta")
    tensors = _fusion_tensors(flow)
    assert any(n.endswith(".static") for n in tensors) and any(n.endswith("lora_salts") for n in tensors)
    assert {t.device.type for t in tensors.values()} == {"meta"}
    assert all(p.dtype == torch.float32 for p in flow.gate_parameters())
    flow.train()  # the training path too: dropout masks from keys on the new device
    flow.set_dropout_keys(torch.tensor([1, 2]))
    logits = flow(input_ids=_ids("meta")).logits
    assert logits.device.type == "meta" and logits.shape == (2, 9, flow.config.vocab_size)


@pytest.mark.parametrize("mode", list(MODES))
def test_through_meta_and_to_empty_then_weights_loaded_equals_the_original(loras, mode):
    """The FSDP-style path: build on meta, `to_empty`, load the persistent weights. The fusion's own buffers are
    rebuilt from their description, so the logits equal the model that never left the CPU."""
    reference = _flow(loras, mode)
    with torch.device("meta"):
        base = tiny_model("llama", seed=0)
    flow = _flow(loras, mode, base=base)
    flow.to_empty(device="cpu")
    flow.load_state_dict(reference.state_dict())
    for (name, buf), (_, ref) in zip(flow.model.named_buffers(), reference.model.named_buffers()):
        if "rotary" in name:  # the base's own non-persistent buffers come from elsewhere (FSDP: rank 0)
            buf.copy_(ref)
    assert torch.equal(_logits(flow), _logits(reference))


def test_unload_returns_the_plain_base_and_a_second_injection_is_refused(loras):
    flow = _flow(loras, "flow")
    with pytest.raises(LoraflowError, match="already has a LoRA-Flow fusion injected"):
        FlowModel.from_pretrained(flow.model, loras)
    with pytest.raises(LoraflowError, match="already has a LoRA-Flow fusion injected"):
        inject_fusion(flow.model, [load_adapter(p) for p in loras])
    assert not torch.equal(_logits(flow), _logits(tiny_model("llama", seed=0)))
    base = flow.unload()
    assert torch.equal(_logits(base), _logits(tiny_model("llama", seed=0)))
    assert not any(isinstance(m, (FusedLoRALinear, FusionState)) for m in base.modules())
    assert all(not hasattr(layer, GATE_MODULE) and not layer.input_layernorm._forward_pre_hooks
               for layer in base.model.layers)
    assert all(p.requires_grad for p in base.parameters())  # as the plain model had them
    with pytest.raises(LoraflowError, match="unloaded"):
        flow(input_ids=_ids())
    again = _flow(loras, "flow", base=base)  # the unloaded base takes a new fusion
    assert torch.equal(_logits(again), _logits(_flow(loras, "flow")))


def test_gate_saves_a_bf16_layer_input_as_bf16_for_backward(loras):
    """bf16 model: the gate computes in fp32, but autograd keeps only the bf16 input (and the small fp32 weight
    and softmax output), and the gradients equal the plain fp32-cast computation."""
    flow = _flow(loras, "flow", dtype=torch.bfloat16)
    gate = flow.gates()[0]
    x = flow.model.model.embed_tokens(_ids()).detach().requires_grad_(True)  # (batch, seq, hidden), bf16
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        w = gate(x)
    assert (torch.bfloat16, tuple(x.shape)) in saved
    assert not [s for s in saved if s[0] == torch.float32 and s[1][-1] == x.shape[-1] and len(s[1]) > 2]
    grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    gx, gw = torch.autograd.grad(w, (x, gate.weight), grad)
    x_ref = x.detach().requires_grad_(True)
    w_ref = torch.softmax(torch.nn.functional.linear(x_ref.float(), gate.weight), -1) + gate.bias
    gx_ref, gw_ref = torch.autograd.grad(w_ref, (x_ref, gate.weight), grad)
    torch.testing.assert_close(w, w_ref)
    assert gx.dtype == torch.bfloat16
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gw, gw_ref)
