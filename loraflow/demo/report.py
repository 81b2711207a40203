"""The demo's gate-weight plots (`loraflow.plots`), drawn from LoRA-Flow's answers to the composite test set."""

from __future__ import annotations

import shutil
from pathlib import Path

from loraflow.files import read_jsonl

BAR_ITEMS = 100  # the per-layer bars average over this many composite test answers


def write_plots(cfg, out: Path, base: Path, loras: list[Path], gate: Path,
                assets: Path | None = None) -> tuple[dict[str, Path], dict]:
    """gate_heatmap.png (one correctly answered composite test item) and gate_layers.png (per-layer means) in
    `out/report/`; the heatmap is also copied to `assets/demo_gate_heatmap.png` when `assets` is given.
    Returns (files, facts for results.json)."""
    from loraflow.plots import gate_heatmap, layer_bars, mean_layer_weights, record_teacher_forced

    from .pipeline import load_flow, load_tokenizer

    report = out / "report"
    flow = load_flow(base, loras, gate)
    tok = load_tokenizer(base)
    preds = read_jsonl(out / "eval_flow" / "xx" / "predictions.scored.jsonl")  # written by `loraflow score`
    shown = next((r for r in preds if r["correct"] and r["generation"].strip()),
                 next((r for r in preds if r["generation"].strip()), preds[0]))
    weights, tokens = record_teacher_forced(flow, tok, shown["prompt"], shown["generation"])
    heatmap = gate_heatmap(weights, tokens, flow.lora_names, report / "gate_heatmap.png",
                           f"LoRA-Flow gate weight per layer and generated token (L test item {shown['id']}, "
                           f"{'correct' if shown['correct'] else 'wrong'})")
    items = [r for r in preds if r["generation"].strip()][:BAR_ITEMS]
    mean = mean_layer_weights(flow, tok, items)
    bars = layer_bars(mean, flow.lora_names, report / "gate_layers.png",
                      f"LoRA-Flow: mean gate weight per layer over {len(items)} L test answers")
    files = {"heatmap": heatmap, "layer_bars": bars}
    if assets is not None:
        assets.mkdir(parents=True, exist_ok=True)
        shutil.copy(heatmap, assets / "demo_gate_heatmap.png")
        files["asset"] = assets / "demo_gate_heatmap.png"
    facts = {
        "heatmap_item": {"id": shown["id"], "prompt": shown["prompt"], "generation": shown["generation"],
                         "correct": shown["correct"]},
        "mean_gate_weight_per_layer": {name: [round(float(x), 4) for x in mean[:, i]]
                                       for i, name in enumerate(flow.lora_names)},
    }
    return files, facts
