"""Decoding speed, side by side: the base model, one LoRA (PEFT, unmerged and merged), loraflow `static` and `flow`
with two LoRAs, and PEFT's X-LoRA with the same two LoRAs (its own scaling head, untrained).

Every variant is a separate copy of the same random small Llama (`loraflow.tiny`), in one process, timed
interleaved (`bench.timing.interleaved`) on the same prompts: greedy, exactly `new_tokens` new tokens each (no early
stop), batch 1 and 8.
Reported as tokens/s and as ratios to the base model. X-LoRA cannot use the KV cache (peft forces
`use_cache=False`) and runs two forward passes per step, so it is timed in fewer rounds (`xlora_rounds`).

Model sizes are arguments (`ModelShape`); the default keeps the 7B's rank/width proportion (r = hidden / 64).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

DECODE_VARIANTS = ("base", "lora_unmerged", "lora_merged", "static", "flow", "xlora")


@dataclass
class ModelShape:
    hidden: int = 1024
    layers: int = 8
    heads: int = 8
    kv_heads: int = 8
    intermediate: int = 2752  # 1024 * 11008 / 4096, the 7B's ratio
    vocab: int = 4096
    rank: int = 16  # hidden / 64, as rank 64 on Llama-2-7B's 4096

    def config_kwargs(self, max_positions: int = 512) -> dict:
        return dict(hidden=self.hidden, layers=self.layers, heads=self.heads, kv_heads=self.kv_heads,
                    intermediate=self.intermediate, vocab=self.vocab, max_positions=max_positions)

    def projection_shapes(self) -> list[tuple[int, int]]:
        """(d_in, d_out) of the seven projections of one decoder layer."""
        h, kv, i = self.hidden, self.hidden // self.heads * self.kv_heads, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    def lora_flop_ratio(self, ranks: list[int]) -> float:
        """(model + LoRA FLOPs) / model FLOPs per token: the seven projections of every layer and the LM head;
        attention scores are left out (small at these lengths), which makes the floor slightly high."""
        shapes = self.projection_shapes()
        base = self.layers * sum(i * o for i, o in shapes) + self.hidden * self.vocab
        lora = self.layers * sum(ranks) * sum(i + o for i, o in shapes)
        return 1.0 + lora / base


def base_model(shape: ModelShape, device, dtype, max_positions: int = 512):
    from loraflow.tiny import tiny_model

    return tiny_model("llama", seed=0, dtype=dtype, **shape.config_kwargs(max_positions)).to(device)


def save_loras(shape: ModelShape, out_dir: Path, k: int = 2, dropout: float = 0.1) -> list[Path]:
    """k random PEFT LoRAs of rank `shape.rank` on all seven projections (A and B both random)."""
    from loraflow.tiny import tiny_lora, tiny_model

    paths = []
    for i in range(k):
        path = out_dir / f"lora{i}"
        tiny_lora(tiny_model("llama", seed=0, **shape.config_kwargs()), path, r=shape.rank, alpha=2.0 * shape.rank,
                  seed=i + 1, dropout=dropout, std=0.02)
        paths.append(path)
    return paths


def build_decode_variants(shape: ModelShape, loras: list[Path], device, dtype, max_positions: int = 512,
                          names=DECODE_VARIANTS) -> dict:
    """name -> model with `.generate`, each on its own copy of the same base."""
    from peft import PeftModel

    from loraflow.fusion.model import FlowModel
    from loraflow.tiny import randomize_gates

    out = {}
    if "base" in names:
        out["base"] = base_model(shape, device, dtype, max_positions)
    if "lora_unmerged" in names:
        out["lora_unmerged"] = PeftModel.from_pretrained(base_model(shape, device, dtype, max_positions),
                                                         str(loras[0]), autocast_adapter_dtype=False).eval()
    if "lora_merged" in names:
        out["lora_merged"] = PeftModel.from_pretrained(base_model(shape, device, dtype, max_positions),
                                                       str(loras[0]), autocast_adapter_dtype=False).merge_and_unload()
    if "static" in names:
        out["static"] = FlowModel.from_pretrained(base_model(shape, device, dtype, max_positions), loras,
                                                  mode="static", static_weights=[1.0 / len(loras)] * len(loras))
    if "flow" in names:
        flow = FlowModel.from_pretrained(base_model(shape, device, dtype, max_positions), loras)
        out["flow"] = randomize_gates(flow, seed=0, std=0.02)  # non-trivial (the cost does not depend on values)
    if "xlora" in names:
        out["xlora"] = xlora_model(base_model(shape, device, dtype, max_positions), loras, shape.hidden, device)
    return out


def xlora_model(model, loras: list[Path], hidden: int, device):
    """PEFT's X-LoRA over `loras` (depth-1 scaling head, untrained, softmax on). X-LoRA needs `use_cache=False`."""
    from peft import XLoraConfig, get_peft_model

    model.config.use_cache = False
    config = XLoraConfig(task_type="CAUSAL_LM", hidden_size=hidden, xlora_depth=1,
                         adapters={str(i): str(p) for i, p in enumerate(loras)})
    xlora = get_peft_model(model, config, autocast_adapter_dtype=False)
    return xlora.to(device).eval()


def prompts(batch: int, length: int, vocab: int, device, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, length), generator=gen)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def greedy(model, inputs: dict, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=3, eos_token_id=None, temperature=None, top_p=None, top_k=None)


def bench_decode(shape: ModelShape, batches: list[int], new_tokens: int, prompt_len: int, device, dtype,
                 rounds: int = 3, xlora_rounds: int = 1, variants=DECODE_VARIANTS,
                 xlora_batches: list[int] | None = None) -> dict:
    """Tokens/s of every variant per batch size, and ratios to the base model. X-LoRA runs only at
    `xlora_batches` (default: all): without a KV cache its cost grows with the square of the length."""
    from loraflow.bench.timing import interleaved

    max_positions = max(512, prompt_len + new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        loras = save_loras(shape, Path(tmp))
        models = build_decode_variants(shape, loras, device, dtype, max_positions, variants)
    rows = []
    for batch in batches:
        inputs = prompts(batch, prompt_len, shape.vocab, device)
        here = {name: m for name, m in models.items()
                if name != "xlora" or xlora_batches is None or batch in xlora_batches}
        fns = {name: (lambda m=m, inputs=inputs: greedy(m, inputs, new_tokens)) for name, m in here.items()}
        for model in here.values():  # warm up on a short run
            greedy(model, inputs, min(new_tokens, 8))
        seconds = interleaved(fns, device, rounds=rounds, warmup=0,
                              rounds_of={"xlora": min(rounds, xlora_rounds)})
        tps = {name: batch * new_tokens / s for name, s in seconds.items()}
        # tokens/s ratios are inverse time ratios, paired per round (see bench.timing.Timings.ratio)
        row = {"batch": batch, "new_tokens": new_tokens, "prompt_tokens": prompt_len, "seconds": dict(seconds),
               "tokens_per_s": tps, "over_base": {name: seconds.ratio("base", name) for name in tps}
               if "base" in tps else {}}
        if "flow" in tps and "xlora" in tps:
            row["flow_over_xlora"] = seconds.ratio("xlora", "flow")
        rows.append(row)
    return {"shape": asdict(shape), "k": 2, "lora_flop_ratio": shape.lora_flop_ratio([shape.rank] * 2),
            "rows": rows}
