"""A tiny training world for the gate-training tests: a saved base with its tokenizer, two LoRAs, and a data root in
the release's layout (train/dev JSONL in the original formats + system_prompts.json), all small enough that a run
takes a second."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from loraflow.tiny import save_tiny_loras, tiny_model, tiny_tokenizer
from loraflow.train.config import TrainConfig

TRAIN = [  # (query, response): translated-MetaMathQA-like records, short so that runs stay fast
    ("2 加 3 等于几？", "2 + 3 = 5。答案是：5"),
    ("小明有 4 个苹果，吃了 1 个，还剩几个？", "4 - 1 = 3。答案是：3"),
    ("一周有几天？", "一周有 7 天。答案是：7"),
    ("6 乘以 7 是多少？", "6 × 7 = 42。答案是：42"),
    ("10 除以 2 等于？", "10 ÷ 2 = 5。答案是：5"),
    ("三角形有几条边？", "三角形有 3 条边。答案是：3"),
    ("9 减 4 等于几？", "9 - 4 = 5。答案是：5"),
    ("一打是多少个？", "一打是 12 个。答案是：12"),
]
DEV = [("1 加 1 等于几？", "1 + 1 = 2。答案是：2"), ("5 乘以 2 是多少？", "5 × 2 = 10。答案是：10"),
       ("正方形有几个角？", "正方形有 4 个角。答案是：4")]


@dataclass
class World:
    root: Path
    base: Path
    lora_root: Path
    data_root: Path

    def config(self, out_dir, **overrides) -> TrainConfig:
        """zh-math on this world: total batch 4 per step, 2 steps per epoch, 3 epochs, no LoRA dropout; the epoch
        chosen by dev loss (the dev-metric tests ask for it: generating after every epoch costs time)."""
        kwargs = dict(language="zh", task="math", base_model=str(self.base), lora_root=str(self.lora_root),
                      data_root=str(self.data_root), out_dir=str(out_dir), lr=5e-2, total_batch=4, epochs=3,
                      max_len=256, lora_dropout=False, device="cpu", select="dev-loss")
        kwargs.update(overrides)
        return TrainConfig(**kwargs)

    def flags(self, out_dir, *extra: str) -> list[str]:
        return ["--language", "zh", "--task", "math", "--base-model", str(self.base), "--lora-root",
                str(self.lora_root), "--data-root", str(self.data_root), "--out-dir", str(out_dir), "--lr", "5e-2",
                "--epochs", "3", "--max-len", "256", "--device", "cpu", "--select", "dev-loss", *extra]


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def build_world(root: Path) -> World:
    base = root / "base"
    tiny_model("llama", seed=0).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    lora_root = root / "LoRAs"
    save_tiny_loras(lambda: tiny_model("llama", seed=0), lora_root, {"zh_lora": 4, "math_lora": 8}, dropout=0.1)
    data = root / "data"
    write_jsonl(data / "train" / "zh_math_train.jsonl",
                [{"id": i, "type": "GSM", "query": q, "response": r} for i, (q, r) in enumerate(TRAIN)])
    write_jsonl(data / "dev" / "zh_math_dev.jsonl", [{"question": q, "answer": a} for q, a in DEV])
    (data / "system_prompts.json").write_text(json.dumps({"zh_math": "你是中文助手。"}, ensure_ascii=False),
                                               encoding="utf-8")
    return World(root, base, lora_root, data)


def read_gate(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a gate folder or `X.safetensors`."""
    path = Path(path)
    return load_file(str(path / "gate.safetensors" if path.is_dir() else path))


def assert_same_gate(a: Path, b: Path, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    ta, tb = read_gate(a), read_gate(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], atol=atol, rtol=rtol, msg=lambda m, k=key: f"{k}: {m}")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
