"""The benchmarked variants compute the same thing (timings themselves are never asserted)."""

import torch

from loraflow.bench import LoopLoRALinear, flop_floor, main, make_fused


def test_fused_and_loop_variants_agree_in_value_and_gradients():
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


def test_flop_floor_matches_the_paper_setting():
    # Llama-2-7B, two rank-64 LoRAs on all seven projections: about +4.9% over the base (issue 6)
    shapes = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]
    extra = sum(128 * (i + o) for i, o in shapes) / sum(i * o for i, o in shapes)
    assert abs(extra - 0.049) < 0.001
    assert abs(flop_floor(4096, 4096, [64, 64]) - (1 + 128 * 8192 / 4096**2)) < 1e-12


def test_layer_benchmark_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["layer", "--shapes", "32x48", "--tokens", "8", "--ranks", "4,4", "--rounds", "1",
                 "--device", "cpu", "--json", str(out)]) == 0
    import json

    row = json.loads(out.read_text())["layer"][0]
    assert row["shape"] == "32x48" and set(row["seconds"]) == {"base", "fused", "loop", "loop_base_twice"}
    assert "loop/fused" in capsys.readouterr().out
