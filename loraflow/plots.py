"""Gate-weight plots: where a LoRA-Flow model puts each LoRA, per layer and per token.

    loraflow plot-gates --base-model BASE --loras LANG_LORA TASK_LORA --gate GATE --prompt "..." --out-dir plots/
    loraflow plot-gates --base-model BASE --loras ... --gate GATE --predictions predictions.jsonl --out-dir plots/

- `gate_heatmap`: one panel per LoRA, rows = decoder layers, columns = generated tokens (labelled on the x axis);
  column j is the weight the gate gave that LoRA *while predicting* token j (the gate reads the layer input of the
  previous position, so this is the weight that produced the token).
- `layer_bars`: each LoRA's weight per layer, averaged over the response tokens of a whole data set.

Both record the weights with `FlowModel.record_gates()`; matplotlib (the `plot` extra) draws with the Agg backend,
so no display is needed.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from loraflow.devices import add_device_arguments
from loraflow.errors import LoraflowError
from loraflow.files import atomic_path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise LoraflowError("plots need matplotlib, which is not installed: pip install 'loraflow[plot]' "
                            "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------------------------- recording
def _prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """The prompt's ids; the tokenizer adds BOS unless the text already starts with it (chat-template prompts)."""
    bos = getattr(tokenizer, "bos_token", None)
    has_bos = bool(bos) and prompt.startswith(bos)
    return tokenizer(prompt, add_special_tokens=not has_bos, return_tensors="pt")["input_ids"]


@torch.no_grad()
def record_generation(flow, tokenizer, prompt: str, max_new_tokens: int = 64,
                      return_ids: bool = False) -> tuple[torch.Tensor, list[str]]:
    """Greedy-generate from `prompt`; return (weights (layers, new tokens, k), the new tokens as strings) -- and
    the new token ids third with `return_ids=True`.

    Weights column j = the gate output at the position whose next-token prediction is new token j.
    """
    from transformers import GenerationConfig

    from loraflow.eval.generate import eos_ids

    flow.eval()
    ids = _prompt_ids(tokenizer, prompt).to(flow.device)
    eos = eos_ids(tokenizer, flow.model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                              num_beams=1)
    with flow.record_gates() as rec:
        out = flow.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    new = out[0, ids.shape[1]:].tolist()
    weights = rec.weights(row=0)  # (layers, positions the model ran on, k)
    start = ids.shape[1] - 1
    weights = weights[:, start:start + len(new)].float().cpu()
    tokens = [tokenizer.decode([t]) for t in new]
    return (weights, tokens, new) if return_ids else (weights, tokens)


@torch.no_grad()
def record_teacher_forced(flow, tokenizer, prompt: str,
                          response: str | Sequence[int]) -> tuple[torch.Tensor, list[str]]:
    """Run `prompt + response` (text, or token ids) in one forward; return (weights (layers, response tokens, k),
    response tokens), aligned as in `record_generation` (the weights that predicted each response token)."""
    flow.eval()
    p_ids = _prompt_ids(tokenizer, prompt)[0]
    if isinstance(response, str):
        r_ids = tokenizer(response, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    else:
        r_ids = torch.as_tensor(list(response), dtype=torch.long)
    if len(r_ids) == 0:
        raise LoraflowError("empty response: nothing to plot")
    ids = torch.cat([p_ids, r_ids])[None].to(flow.device)
    with flow.record_gates() as rec:
        flow(input_ids=ids)
    weights = rec.weights(row=0)[:, len(p_ids) - 1:ids.shape[1] - 1].float().cpu()
    return weights, [tokenizer.decode([t]) for t in r_ids.tolist()]


def mean_layer_weights(flow, tokenizer, items: Sequence[dict]) -> torch.Tensor:
    """(layers, k): each LoRA's gate weight per layer, averaged over every response token of `items`
    (dicts with "prompt" and "generation" or "response")."""
    total, count = None, 0
    for it in items:
        response = it.get("generation", it.get("response"))
        if not response or not response.strip():
            continue
        w, _ = record_teacher_forced(flow, tokenizer, it["prompt"], response)
        total = w.sum(1) if total is None else total + w.sum(1)
        count += w.shape[1]
    if total is None:
        raise LoraflowError("no item with a non-empty response to average the gate weights over")
    return total / count


# ------------------------------------------------------------------------------------------------- drawing
def gate_heatmap(weights: torch.Tensor, tokens: Sequence[str], lora_names: Sequence[str],
                 path: str | os.PathLike, title: str = "") -> Path:
    """weights (layers, tokens, k) -> a PNG with one heatmap per LoRA (rows = layers, columns = tokens)."""
    plt = _pyplot()
    layers, n, k = weights.shape
    if n != len(tokens) or k != len(lora_names):
        raise LoraflowError(f"gate_heatmap: weights {tuple(weights.shape)} vs {len(tokens)} tokens and "
                            f"{len(lora_names)} LoRA names")
    w = weights.float().numpy()
    vmin, vmax = min(0.0, float(w.min())), max(1.0, float(w.max()))
    fig, axes = plt.subplots(k, 1, figsize=(max(6.0, 0.32 * n + 1.5), 1.0 + k * (0.35 * layers + 0.9)),
                             squeeze=False)
    for i, ax in enumerate(axes[:, 0]):
        im = ax.imshow(w[:, :, i], aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_ylabel(f"{lora_names[i]}\nlayer")
        ax.set_yticks(range(layers))
        ax.set_xticks(range(n))
        ax.set_xticklabels(tokens if i == k - 1 else [""] * n, rotation=90, fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    if title:
        axes[0, 0].set_title(title, fontsize=10)
    return _save_figure(plt, fig, path)


def _save_figure(plt, fig, path: str | os.PathLike) -> Path:
    """Lay out, write atomically (temp file, then rename; the format from the name, PNG by default), close."""
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".").lower() or "png")
    plt.close(fig)
    return path


def layer_bars(mean_weights: torch.Tensor, lora_names: Sequence[str], path: str | os.PathLike,
               title: str = "") -> Path:
    """mean_weights (layers, k) -> a PNG bar chart, one group of k bars per layer."""
    plt = _pyplot()
    layers, k = mean_weights.shape
    w = mean_weights.float().numpy()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * layers * k + 1.5), 3.2))
    width = 0.8 / k
    for i in range(k):
        ax.bar([layer + (i - (k - 1) / 2) * width for layer in range(layers)], w[:, i], width, label=lora_names[i])
    ax.set_xticks(range(layers))
    ax.set_xlabel("layer")
    ax.set_ylabel("mean gate weight")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save_figure(plt, fig, path)


# ----------------------------------------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    p.add_argument("--base-model", dest="base", help="base model (folder or hub id) [required]")
    p.add_argument("--base", dest="base", help=argparse.SUPPRESS)  # the old spelling, for one release
    p.add_argument("--loras", nargs="+", required=True, help="LoRA folders or hub ids, in fusion order")
    p.add_argument("--gate", required=True, help="gate: loraflow folder / .safetensors, or an original .pt")
    p.add_argument("--gguf-file", help="the base is this GGUF file in the --base-model folder or hub repo")
    p.add_argument("--tokenizer", help="tokenizer (default: --base-model's)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="plot the weights while generating from this prompt")
    src.add_argument("--predictions", help="predictions.jsonl (prompt + generation): heatmap of one item, "
                                           "per-layer bars averaged over all")
    p.add_argument("--item", type=int, default=0, help="which predictions line to draw as a heatmap (0-based)")
    p.add_argument("--limit", type=int, default=200, help="average the bars over at most this many items")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, help="gate temperature (default: the gate file's; for an original "
                                                     ".pt, 1.1 for zh/ru math by its name, else 1.0)")
    p.add_argument("--no-check-lora-names", dest="check_lora_names", action="store_false",
                   help="load a gate whose gate.json names other LoRAs (same count and shapes, e.g. renamed copies)")
    add_device_arguments(p)
    p.add_argument("--out-dir", dest="out", default="plots", help="output folder (gate_heatmap.png, gate_layers.png)")
    p.add_argument("--out", dest="out", help=argparse.SUPPRESS)  # the old spelling, for one release


def run(args) -> int:
    from loraflow.bases import load_base_tokenizer
    from loraflow.devices import resolve_device, resolve_dtype, torch_dtype
    from loraflow.eval.registry import resolve_temperature
    from loraflow.files import read_jsonl
    from loraflow.fusion.model import FlowModel

    if not args.base:
        raise LoraflowError("--base-model is required: the base model, a folder or hub id")
    _pyplot()  # fail before loading a model when matplotlib is missing
    device = resolve_device(args.device)
    temperature, source = resolve_temperature(args.temperature, args.gate)
    print(f"gate temperature {temperature} ({source})")
    flow = FlowModel.from_pretrained(args.base, loras=args.loras, gate=args.gate, temperature=temperature,
                                     device=device, torch_dtype=torch_dtype(resolve_dtype(args.dtype, device)),
                                     check_lora_names=args.check_lora_names,
                                     gguf_file=args.gguf_file)
    tok = load_base_tokenizer(args.tokenizer) if args.tokenizer else load_base_tokenizer(args.base, args.gguf_file)
    out = Path(args.out)
    if args.prompt is not None:
        weights, tokens = record_generation(flow, tok, args.prompt, args.max_new_tokens)
        print(gate_heatmap(weights, tokens, flow.lora_names, out / "gate_heatmap.png", "gate weights per token"))
        return 0
    items = read_jsonl(args.predictions)[: args.limit]
    if not items:
        raise LoraflowError(f"{args.predictions}: no predictions")
    if not 0 <= args.item < len(items):
        raise LoraflowError(f"--item {args.item}: {args.predictions} has {len(items)} items (within --limit)")
    it = items[args.item]
    weights, tokens = record_teacher_forced(flow, tok, it["prompt"], it.get("generation", it.get("response", "")))
    print(gate_heatmap(weights, tokens, flow.lora_names, out / "gate_heatmap.png",
                       f"gate weights, item {it.get('id', args.item)}"))
    mean = mean_layer_weights(flow, tok, items)
    print(layer_bars(mean, flow.lora_names, out / "gate_layers.png", f"mean gate weight over {len(items)} items"))
    return 0
