"""The demo's gate-weight plots (`loraflow.plots`), drawn from LoRA-Flow's answers to the composite test set."""

from __future__ import annotations

import shutil
from pathlib import Path

from loraflow.files import atomic_path, read_jsonl

BAR_ITEMS = 100  # the per-layer bars average over this many composite test answers


def write_plots(cfg, out: Path, base: Path, loras: list[Path], gate: Path,
                assets: Path | None = None) -> tuple[dict[str, Path], dict]:
    """gate_heatmap.png (one correctly answered composite test item) and gate_layers.png (per-layer means) in
    `out/report/`; the heatmap is also copied to `assets/demo_gate_heatmap.png` when `assets` is given (`loraflow demo
    --update-assets`, used when refreshing the README; otherwise the demo writes under its output folder only).
    Returns (files, facts for results.json)."""
    from loraflow.demo.methods import load_flow, load_tokenizer
    from loraflow.plots import gate_heatmap, layer_bars, mean_layer_weights, record_teacher_forced

    report = out / "report"
    flow = load_flow(base, loras, gate)
    tok = load_tokenizer(base)
    preds = read_jsonl(out / "eval_flow" / "xx" / "predictions.scored.jsonl")  # written by `loraflow score`
    if not any(r["generation"].strip() for r in preds):
        # every answer empty (an untrained gate, as in the CI-sized run): draw the weights over the reference
        # answers instead, teacher-forced, and say so in the titles
        refs = read_jsonl(out / "data" / "test" / "xx_math_test.jsonl")
        preds = [{**r, "generation": ref["response"], "correct": False, "reference": True}
                 for r, ref in zip(preds, refs)]
    what = "reference answer" if preds[0].get("reference") else "generated token"
    shown = next((r for r in preds if r["correct"] and r["generation"].strip()),
                 next(r for r in preds if r["generation"].strip()))
    weights, tokens = record_teacher_forced(flow, tok, shown["prompt"], shown["generation"])
    heatmap = gate_heatmap(weights, tokens, flow.lora_names, report / "gate_heatmap.png",
                           f"LoRA-Flow gate weight per layer and {what} (L test item {shown['id']}, "
                           f"{'correct' if shown['correct'] else 'wrong' if what.startswith('gen') else 'reference'})")
    items = [r for r in preds if r["generation"].strip()][:BAR_ITEMS]
    mean = mean_layer_weights(flow, tok, items)
    bars = layer_bars(mean, flow.lora_names, report / "gate_layers.png",
                      f"LoRA-Flow: mean gate weight per layer over {len(items)} L test "
                      f"{'answers' if what.startswith('gen') else 'reference answers'}")
    files = {"heatmap": heatmap, "layer_bars": bars}
    if assets is not None:
        assets.mkdir(parents=True, exist_ok=True)
        with atomic_path(assets / "demo_gate_heatmap.png") as tmp:
            shutil.copy(heatmap, tmp)
        files["asset"] = assets / "demo_gate_heatmap.png"
    facts = {
        "heatmap_item": {"id": shown["id"], "prompt": shown["prompt"], "generation": shown["generation"],
                         "correct": shown["correct"]},
        "mean_gate_weight_per_layer": {name: [round(float(x), 4) for x in mean[:, i]]
                                       for i, name in enumerate(flow.lora_names)},
    }
    return files, facts


def token_type(world, token: str) -> str:
    """The kind of a response token: an L word, an English word, a number, an operator (+ - =) or other."""
    lang = world.language_of(token)
    if lang:
        return "L word" if lang == "xx" else "English word"
    if token.isdigit():
        return "number"
    return "operator" if token in ("+", "-", "=") else "other"


def dev_token_losses(cfg, out: Path, base: Path, loras: list[Path], gate: Path) -> dict[str, dict[str, float]]:
    """Mean cross-entropy of the reference composite answers of the dev set (never the test set) per method and
    per kind of token (`token_type`): where each method fails to produce a composite answer."""
    import torch

    from loraflow.demo.methods import load_flow, load_tokenizer
    from loraflow.demo.training import encode
    from loraflow.demo.world import World
    from loraflow.eval.registry import METHODS, apply_method
    from loraflow.train.lorahub import load_weights

    world = World(cfg.seed)
    flow = load_flow(base, loras, gate)
    tok = load_tokenizer(base)
    dev = [encode(tok, ex, 4096) for ex in read_jsonl(out / "data" / "composite_dev.jsonl")]
    weights = load_weights(out / "lorahub" / "weights.json", flow.lora_names)
    result = {}
    for method in (m for m, spec in METHODS.items() if spec.mode != "base"):
        apply_method(flow, method, weights=weights)
        totals: dict[str, list[float]] = {}
        with torch.no_grad():
            for ex in dev:
                ids = torch.tensor([ex["input_ids"]], device=flow.device)
                logits = flow(input_ids=ids).logits[0, :-1].float()
                labels = torch.tensor(ex["labels"][1:], device=flow.device)
                keep = labels != -100
                losses = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="none")
                for t, loss in zip(labels[keep].tolist(), losses.tolist()):
                    kind = "end" if t == tok.eos_token_id else token_type(world, tok.convert_ids_to_tokens(t))
                    totals.setdefault(kind, []).append(loss)
        result[method] = {kind: round(sum(v) / len(v), 3) for kind, v in sorted(totals.items())}
    return result
