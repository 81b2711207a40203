"""The benchmarked variants compute the same thing, and `loraflow bench` runs end to end (timings never asserted)."""

import json

import pytest
import torch

from loraflow.bench.cli import main
from loraflow.bench.layer import LoopLoRALinear, flop_floor, layer_calls, make_fused, make_peft
from loraflow.bench.timing import Timings, interleaved


def test_fused_loop_and_original_agree_in_value_and_gradients():
    fused, state = make_fused(48, 80, [4, 12, 8], "cpu", torch.float32)
    x = torch.randn(2, 5, 48, requires_grad=True)
    w = torch.softmax(torch.randn(2, 5, 3), -1).requires_grad_(True)
    outs, grads = [], []
    for variant in ("fused", "loop", "loop_base_twice"):
        x.grad = w.grad = None
        if variant == "fused":
            state.set_weights(w)
            y = fused(x)
        else:
            y = LoopLoRALinear(fused, base_twice=variant == "loop_base_twice")(x, w)
        y.pow(2).sum().backward()
        outs.append(y.detach())
        grads.append((x.grad.clone(), w.grad.clone()))
    for y, (gx, gw) in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(y, outs[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx, grads[0][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(gw, grads[0][1], atol=1e-4, rtol=1e-4)


def test_peft_lora_layer_equals_fused_with_unit_weights():
    # PEFT sums its active adapters: the fused layer with every per-token weight 1, in value and input gradient
    fused, state = make_fused(48, 80, [4, 16], "cpu", torch.float32)
    peft = make_peft(fused)
    assert peft.active_adapters == ["lora0", "lora1"] and peft.base_layer is fused.base_layer
    x = torch.randn(2, 5, 48, requires_grad=True)
    state.set_weights(torch.ones(2, 5, 2))
    y = fused(x)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x)
    y2 = peft(x)
    (gx2,) = torch.autograd.grad(y2.pow(2).sum(), x)
    torch.testing.assert_close(y2, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx2, gx, atol=1e-4, rtol=1e-4)
    assert not any(p.requires_grad for p in peft.parameters())


def test_every_timed_layer_call_runs_both_passes():
    calls = layer_calls(32, 40, 6, [4, 4], "cpu", torch.float32)
    assert set(calls) == {"fwd", "fwd_bwd"}
    assert set(calls["fwd"]) == {"base", "fused", "loop", "original", "peft"}
    for fns in calls.values():
        for fn in fns.values():
            fn()


def test_interleaved_runs_every_variant_each_round_in_a_seeded_changing_order():
    calls = []
    variants = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    timings = interleaved(variants, "cpu", rounds=6, warmup=1, rounds_of={"d": 2})
    rounds = [calls[i:i + 4] for i in range(0, 12, 4)]  # warm-up and the first two rounds: all four variants
    assert all(sorted(r) == list("abcd") for r in rounds)
    assert calls.count("d") == 3 and all(calls.count(v) == 7 for v in "abc")
    assert len({tuple(r) for r in rounds}) > 1  # the order changes between rounds ...
    again = []
    interleaved({name: (lambda name=name: again.append(name)) for name in "abcd"}, "cpu", rounds=6, warmup=1,
                rounds_of={"d": 2})
    assert again == calls  # ... and is the same in every run (seeded)
    assert {len(v) for k, v in timings.samples.items() if k != "d"} == {6} and len(timings.samples["d"]) == 2


def test_timings_ratio_pairs_the_samples_of_one_round():
    # round medians would give 4 / 2 = 2; the rounds' own ratios are 0.5, 2, 0.5 -> 0.5
    t = Timings({"a": [1.0, 4.0, 9.0], "b": [2.0, 2.0, 18.0], "slow": [3.0]})
    assert t["a"] == 4.0 and t["b"] == 2.0
    assert t.ratio("a", "b") == 0.5
    assert t.ratio("slow", "a") == 3.0  # only the rounds where both ran


def test_loop_targets_report_the_original_and_the_strict_loop():
    from loraflow.bench.report import targets

    def row(k, original, loop):
        return {"k": k, "shape": "8x8", "tokens": 4, "ranks": [1] * k, "flop_floor": 1.1,
                "fwd_bwd": {"speedup_of_fused": {"original": original, "loop": loop}, "over_base": {"fused": 1.2}}}
    rows = [row(2, 2.1, 1.1), row(2, 1.8, 1.2), row(4, 2.3, 1.3)]
    found = targets({"parts": {"layer": {"rows": rows}}})
    got = {t["target"]: (t["measured"], t["met"]) for t in found}
    notes = [t["note"] for t in found]
    assert notes[0].endswith("FLOP ceiling 1.91×") and notes[1].endswith("FLOP ceiling 1.00×")  # (1 + 1.1) / 1.1
    assert got["fused fwd+bwd vs the original per-LoRA loop (base twice), k = 2 (slowest row)"] == ("1.80×", True)
    assert got["fused fwd+bwd vs a per-LoRA loop with the base once, k = 2 (slowest row)"] == ("1.10×", False)
    assert got["fused fwd+bwd vs the original per-LoRA loop (base twice), k = 4 (slowest row)"] == ("2.30×", True)
    assert got["fused fwd+bwd vs a per-LoRA loop with the base once, k = 4 (slowest row)"] == ("1.30×", False)


def test_flop_floor_matches_the_paper_setting():
    """Llama-2-7B, two rank-64 LoRAs on all seven projections: about +4.9% FLOPs over the base (the README's
    number); a projection's floor grows linearly with the total rank and is 1 without LoRAs."""
    from loraflow.bench.decode import ModelShape

    seven_b = ModelShape(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=0, rank=64)
    assert abs(seven_b.lora_flop_ratio([64, 64]) - 1.049) < 0.001
    assert flop_floor(4096, 11008, []) == 1.0
    assert flop_floor(4096, 11008, [64, 64]) - 1 == pytest.approx(2 * (flop_floor(4096, 11008, [64]) - 1))
    assert flop_floor(4096, 11008, [64, 256]) == pytest.approx(flop_floor(4096, 11008, [160, 160]))


TINY = dict(hidden=64, layers=2, heads=2, kv_heads=2, intermediate=172, vocab=260, rank=4)


@pytest.fixture(scope="module")
def decode_models(tmp_path_factory):
    from loraflow.bench.decode import ModelShape, build_decode_variants, save_loras

    shape = ModelShape(**TINY)
    loras = save_loras(shape, tmp_path_factory.mktemp("bench_loras"))
    return shape, build_decode_variants(shape, loras, "cpu", torch.float32)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_decode_variants_compute_the_expected_model(decode_models):
    from loraflow.bench.decode import prompts

    shape, models = decode_models
    inputs = prompts(2, 7, shape.vocab, "cpu")
    base = _logits(models["base"], inputs)
    merged = _logits(models["lora_merged"], inputs)
    torch.testing.assert_close(_logits(models["lora_unmerged"], inputs), merged, atol=1e-4, rtol=1e-4)
    assert (merged - base).abs().max() > 1e-3  # the LoRA does change the output
    static, flow = models["static"], models["flow"]
    try:
        static.set_mode("single", lora=0)  # loraflow with LoRA 0 alone = PEFT's merged LoRA 0
        torch.testing.assert_close(_logits(static, inputs), merged, atol=1e-4, rtol=1e-4)
        static.set_mode("base")
        torch.testing.assert_close(_logits(static, inputs), base, atol=1e-5, rtol=1e-5)
    finally:
        static.set_mode("static", weights=[0.5, 0.5])
    saved = [(g.weight.detach().clone(), g.bias.detach().clone()) for g in flow.gates()]
    try:  # a gate with W = 0 and b = 0 outputs softmax(0) = [0.5, 0.5] at every token: the static average
        with torch.no_grad():
            for g in flow.gates():
                g.weight.zero_()
                g.bias.zero_()
        torch.testing.assert_close(_logits(flow, inputs), _logits(static, inputs), atol=1e-5, rtol=1e-5)
    finally:
        with torch.no_grad():
            for g, (w, b) in zip(flow.gates(), saved):
                g.weight.copy_(w)
                g.bias.copy_(b)


def test_xlora_equals_flow_with_the_same_per_token_weights(decode_models):
    # X-LoRA's output = the base + sum_i w_i s_i B_i A_i x with w from its head; loraflow's flow mode with its gates
    # replaced by those same weights must give the same logits
    from loraflow.bench.decode import prompts

    shape, models = decode_models
    inputs = prompts(2, 7, shape.vocab, "cpu")
    xlora, flow = models["xlora"], models["flow"]
    expected = _logits(xlora, inputs)
    scalings = xlora.get_latest_scalings()  # (batch, seq, n LoRA layers, k), the same for every layer here
    assert scalings.shape[:2] == (2, 7) and scalings.shape[-1] == 2
    weights = scalings[:, :, 0, :].float()
    assert (weights - weights.mean()).abs().max() > 0  # the untrained head still varies per token and LoRA
    gates = flow.gates()
    try:
        for g in gates:
            g.forward = lambda x, w=weights: w
        torch.testing.assert_close(_logits(flow, inputs), expected, atol=1e-4, rtol=1e-4)
    finally:
        for g in gates:
            del g.forward
    assert not torch.allclose(_logits(flow, inputs), expected, atol=1e-4)  # the real gates differ


def test_decode_variants_generate_exactly_the_new_tokens(decode_models):
    from loraflow.bench.decode import greedy, prompts

    shape, models = decode_models
    inputs = prompts(2, 5, shape.vocab, "cpu")
    for name, model in models.items():
        out = greedy(model, inputs, 3)
        assert out.shape == (2, 8), name
        assert torch.equal(out[:, :5], inputs["input_ids"]), name
    torch.testing.assert_close(greedy(models["lora_unmerged"], inputs, 3), greedy(models["lora_merged"], inputs, 3))


@pytest.mark.slow
def test_train_peak_memory_child_reports_bytes(tmp_path):
    from loraflow.bench.decode import ModelShape, save_loras
    from loraflow.bench.train import peak_memory

    shape = ModelShape(**TINY)
    loras = save_loras(shape, tmp_path, dropout=0.1)
    mem = peak_memory(shape, loras, 2, 8, torch.device("cpu"), variants=("gate_step",))
    assert isinstance(mem["bytes"]["gate_step"], int), mem
    assert mem["bytes"]["gate_step"] >= 0


@pytest.mark.slow
def test_fsdp_memory_reports_every_process_with_and_without_fsdp(tmp_path):
    """2 gloo processes load the model as the recipe does (FSDP: rank 0 only, the other on meta) and run a step."""
    from loraflow.bench.decode import ModelShape, save_loras
    from loraflow.bench.report import _train_table
    from loraflow.bench.train import fsdp_memory

    shape = ModelShape(**TINY)
    mem = fsdp_memory(shape, save_loras(shape, tmp_path, dropout=0.1), 2, 8)
    for name in ("no_fsdp", "fsdp"):
        assert not mem[name].get("errors"), mem[name]
        assert len(mem[name]["bytes"]) == 2 and all(isinstance(v, int) for v in mem[name]["bytes"])
    part = {"seconds": {"base_act": 1.0}, "tokens_per_s": {"base_act": 1.0}, "batch": 2, "seq": 8, "k": 2,
            "lora_flop_ratio": 1.1, "fsdp_memory": mem}
    assert any(line.startswith("| --fsdp |") for line in _train_table(part))


@pytest.mark.slow
def test_bench_all_quick_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "results" / "r.json"
    assert main(["all", "--quick", "--no-memory", "--device", "cpu", "--sandbox-limit", "2",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["parts"]) == {"layer", "scaling", "decode", "train", "sandbox"}
    assert result["environment"]["load_average"] and result["quick"] is True
    for part in result["parts"].values():
        assert part["wall_seconds"] >= 0 and len(part["load_average_before"]) == 3
    row = result["parts"]["layer"]["rows"][0]
    assert set(row["fwd_bwd"]["seconds"]) == {"base", "fused", "loop", "original", "peft"}
    decode = result["parts"]["decode"]["rows"]
    assert [r["batch"] for r in decode] == [1, 2]
    assert set(decode[0]["tokens_per_s"]) == {"base", "lora_unmerged", "lora_merged", "static", "flow", "xlora"}
    assert result["parts"]["sandbox"]["loraflow"]["passed"] == 2 == result["parts"]["sandbox"]["problems"]
    md = out.with_suffix(".md").read_text()
    for heading in ("| target |", "**Projection**", "**Scaling**", "**Decoding**", "**Gate training step**",
                    "**Sandbox**"):
        assert heading in md
    assert "wrote" in capsys.readouterr().out


def test_layer_subcommand_and_bad_shape(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["layer", "--shapes", "32x48", "--tokens", "8", "--ranks", "4,4", "--rounds", "1", "--scale", "1",
                 "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["parts"]["layer"]["rows"]
    assert [(r["shape"], r["k"]) for r in rows] == [("32x48", 2)]
    assert "| 32x48 | 8 | 4,4 | fwd+bwd |" in out.with_suffix(".md").read_text()
    from loraflow.cli import main as cli

    assert cli(["bench", "layer", "--shapes", "32by48", "--device", "cpu"]) == 2
    assert "--shapes" in capsys.readouterr().err
