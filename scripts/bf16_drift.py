"""How much bf16 changes greedy generations against fp32 (no autocast), on a tiny random LoRA-Flow model.

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/bf16_drift.py [--prompts 200] [--new-tokens 64]

Builds a tiny Llama (`loraflow.tiny`, 4 layers, hidden 128) with two rank-8 LoRAs and random gates, generates
greedily from the MGSM English questions (or numbered filler prompts when the data is absent) in fp32 and in bf16,
and prints how many generations differ, where the first differing token is, and the weight memory of each.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from loraflow import FlowModel
from loraflow.eval.generate import DecodeConfig, encode_prompts, generate_texts
from loraflow.tiny import randomize_gates, save_tiny_loras, tiny_model, tiny_tokenizer

MGSM_EN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mgsm" / "mgsm_en.tsv"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    shape = dict(hidden=128, layers=4, heads=4, kv_heads=2)
    tok = tiny_tokenizer()
    if MGSM_EN.is_file():
        questions = [line.split("\t")[0] for line in MGSM_EN.read_text(encoding="utf-8").splitlines() if line]
    else:
        questions = [f"Question {i}: what is {i} + {i}?" for i in range(args.prompts)]
    prompts = [q[-200:] for q in questions[:args.prompts]]  # the tiny model's context is 512 positions
    with tempfile.TemporaryDirectory() as tmp:
        loras = save_tiny_loras(lambda: tiny_model("llama", seed=0, **shape), Path(tmp), {"a": 8, "b": 8})
        outputs, memory = {}, {}
        for dtype in (torch.float32, torch.bfloat16):
            # as `loraflow eval --dtype` loads it: the base and LoRAs in `dtype`; the same seeded random gates
            flow = randomize_gates(FlowModel.from_pretrained(tiny_model("llama", seed=0, **shape), loras,
                                                             torch_dtype=dtype), seed=1)
            memory[dtype] = sum(t.numel() * t.element_size() for t in flow.parameters())
            outputs[dtype] = generate_texts(flow, tok, prompts, DecodeConfig(max_new_tokens=args.new_tokens))
    a, b = outputs[torch.float32], outputs[torch.bfloat16]
    ids = [encode_prompts(tok, [x], 10**6, add_special_tokens=False)[0] for x in a]
    ids_b = [encode_prompts(tok, [x], 10**6, add_special_tokens=False)[0] for x in b]
    first = [next((k for k, (x, y) in enumerate(zip(s, t)) if x != y), min(len(s), len(t)))
             for s, t in zip(ids, ids_b) if s != t]
    print(f"{len(a)} prompts, {args.new_tokens} new tokens, greedy: {len(first)} generations differ in bf16 "
          f"({100 * len(first) / len(a):.0f}%)" + (f"; first differing token: median {statistics.median(first)}, "
                                                   f"min {min(first)}" if first else ""))
    print(f"weights: fp32 {memory[torch.float32] / 2**20:.2f} MiB, bf16 {memory[torch.bfloat16] / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
