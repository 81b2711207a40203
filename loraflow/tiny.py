"""Tiny random models, LoRAs and a byte-level tokenizer, built in-process with no download.

For tests, the quickstart demo and benchmarks: every size is an argument, and the same code builds Llama-,
Mistral- and Qwen2-shaped models so the fusion is exercised on each decoder family.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

ARCHS = ("llama", "mistral", "qwen2")
SEVEN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPECIAL_TOKENS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}


def tiny_config(arch: str = "llama", hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                intermediate: int | None = None, vocab: int = 260, max_positions: int = 512):
    """A small config of one of `ARCHS`; `vocab=260` fits `tiny_tokenizer()` (256 bytes + 4 specials)."""
    import transformers

    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[arch]
    kwargs = dict(hidden_size=hidden, intermediate_size=intermediate or 2 * hidden + hidden // 2,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  vocab_size=vocab, max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2,
                  pad_token_id=3, tie_word_embeddings=False)
    if arch == "mistral":
        kwargs["sliding_window"] = None
    return cls(**kwargs)


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A randomly initialised causal LM (eval mode) from `tiny_config`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **config_kwargs), dtype=dtype)
    return model.eval()


def tiny_lora(model, out_dir: str | os.PathLike | None = None, r: int = 4, alpha: float = 16.0, seed: int = 0,
              target_modules=SEVEN_PROJECTIONS, dropout: float = 0.1, use_rslora: bool = False,
              std: float = 0.1, rank_pattern: dict | None = None):
    """Make a PEFT LoRA for `model` with random A *and* B (PEFT would zero B), optionally saved to `out_dir`.

    `dropout` defaults to the released LoRAs' 0.1, so inference paths are tested with the real setting.
    Returns the `PeftModel` (the base model is wrapped in place; pass a fresh model if that matters).
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        use_rslora=use_rslora, task_type="CAUSAL_LM", init_lora_weights=False,
                        rank_pattern=rank_pattern or {})
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    if out_dir is not None:
        peft_model.save_pretrained(str(out_dir))
    return peft_model.eval()


def save_tiny_loras(model_factory, out_dir: str | os.PathLike, names_ranks: dict[str, int], seed: int = 0,
                    **lora_kwargs) -> list[Path]:
    """Save one PEFT LoRA per `{name: rank}` under `out_dir/name`, each on a fresh base from `model_factory()`."""
    paths = []
    for i, (name, r) in enumerate(names_ranks.items()):
        path = Path(out_dir) / name
        tiny_lora(model_factory(), path, r=r, seed=seed + 1000 * (i + 1), **lora_kwargs)
        paths.append(path)
    return paths


def randomize_gates(flow, seed: int = 0, std: float = 1.0):
    """Give every gate of a FlowModel a random W (normal, `std`), layer by layer from one seeded generator, so
    its fusion weights vary per token; returns `flow`."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in flow.gates():
            weight = torch.randn(gate.weight.shape, generator=gen)
            gate.weight.copy_(weight if std == 1.0 else weight * std)
    return flow


def tiny_original_gate(layers: int = 2, k: int = 2, hidden: int = 64, seed: int = 0,
                       std: float = 1.0) -> dict[str, torch.Tensor]:
    """A random gate in the released LoRA-Flow `.pt` layout (fp16 `lora_fusion_gate.weight` and `weight_bias`);
    `std` scales W (a real model's hidden states are large: a small W keeps its softmax from saturating)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(layers):
        weight = torch.randn(k, hidden, generator=gen)
        out[f"encoder.layers.{i}.lora_fusion_gate.weight"] = (weight if std == 1.0 else weight * std).half()
        out[f"encoder.layers.{i}.weight_bias"] = torch.randn(1, k, generator=gen).half()
    return out


def tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens + <unk> <s> </s> <pad>): handles any language, needs no training.

    Ids: bytes are 4..259 in `tokenizers`' byte-to-unicode order, <unk>=0, <s>=1, </s>=2, <pad>=3, matching
    `tiny_config()`'s bos/eos/pad ids. Comes with a Llama-2-style chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {SPECIAL_TOKENS[k]: i for i, k in enumerate(("unk", "bos", "eos", "pad"))}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>>\n{{ m['content'] }}\n<</SYS>>\n\n"
        "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}</s>"
        "{% endif %}{% endfor %}"
    )
    return fast


def save_tiny_flow(root: str | os.PathLike, arch: str = "llama", ranks: dict[str, int] | None = None,
                   seed: int = 0, dropout: float = 0.1, **config_kwargs) -> tuple[Path, list[Path], Path]:
    """A tiny base (with `tiny_tokenizer()`), one PEFT LoRA per `{name: rank}` (dropout 0.1 as the released ones)
    and an original-format fp16 gate, under `root`: (base_dir, lora_dirs, gate .pt path)."""
    root = Path(root)
    ranks = ranks or {"lang_lora": 4, "task_lora": 8}
    base = tiny_model(arch, seed=seed, **config_kwargs)
    base.save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    loras = save_tiny_loras(lambda: tiny_model(arch, seed=seed, **config_kwargs), root, ranks, seed=seed,
                            dropout=dropout)
    config = base.config
    gate = root / "gate.pt"
    torch.save(tiny_original_gate(config.num_hidden_layers, len(ranks), config.hidden_size, seed=seed), gate)
    return root / "base", loras, gate
