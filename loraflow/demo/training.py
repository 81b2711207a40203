"""The demo's tokenizer, base model and LoRAs: built and trained on the spot, in minutes on a CPU.

- `world_tokenizer`: a word-level tokenizer over `World.vocabulary()` (a couple of hundred words) with a
  Llama-2-style chat template (`<s>[INST] {user} [/INST] `). The byte-level `loraflow.tiny.tiny_tokenizer()` would
  work too, but it makes every sequence ~5x longer and makes the tiny model spell invented words letter by letter;
  one token per word leaves its capacity for the two skills.
- `pretrain_base`: a small `LlamaForCausalLM` trained from scratch on plain text (English, some of the other
  language, a little parallel text) -- no chat, no word problems -- with each L word's input embedding shared with
  its English word's.
- `train_lora`: a PEFT LoRA on all seven projections, trained on one skill's chat data, saved in PEFT format.

Chat examples go through loraflow's own data layer (`data.training_example` with the `chat-template` prompt
style, loss on the response only), exactly as `loraflow train` encodes the gate's training data.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from loraflow.data.records import collate, training_example

# The Llama-2 chat frame, as words of the world's tokenizer; no system prompt (the demo trains with "").
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
                 "[/INST] {% endif %}{% endfor %}")


def world_tokenizer(vocabulary: Sequence[str]):
    """A `PreTrainedTokenizerFast` with one id per word of `vocabulary` (split on whitespace; <unk>=0 <s>=1 </s>=2
    <pad>=3) and the chat template above; plain encoding adds `<s>` in front unless `add_special_tokens=False`.
    Decoding joins words with single spaces, so pre-tokenised world text round-trips exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    out.chat_template = CHAT_TEMPLATE
    return out


def encode(tokenizer, example: dict, max_len: int) -> dict[str, list[int]]:
    """`{"input_ids", "labels"}`: `<s> text </s>` with every token a label (pretraining text), or a chat example
    (`prompt`, `response`) through `loraflow.data.records.training_example` (labels on the response and `</s>` only)."""
    if "text" in example:
        ids = [tokenizer.bos_token_id, *tokenizer(example["text"], add_special_tokens=False)["input_ids"],
               tokenizer.eos_token_id][:max_len]
        return {"input_ids": ids, "labels": list(ids)}
    return training_example(tokenizer, example, "generic", "", style="chat-template", max_len=max_len)


def device_and_autocast():
    """(device, autocast context factory): CUDA with bf16 autocast when a GPU is there, else CPU in fp32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.device("cpu"), nullcontext


@dataclass
class LoopConfig:
    """One plain AdamW loop: linear warm-up, cosine decay to 10% of `lr`."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of the steps
    max_len: int = 160
    seed: int = 0


def lr_at(step: int, cfg: LoopConfig) -> float:
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_loop(model, params, examples: Sequence[dict], tokenizer, cfg: LoopConfig, desc: str) -> list[float]:
    """`cfg.steps` AdamW steps on `params`, batches drawn by a seeded shuffle of `examples`; returns the losses.
    The model is moved to the GPU when there is one (and left there)."""
    device, autocast = device_and_autocast()
    model.to(device)
    rng = random.Random(cfg.seed)
    encoded = [encode(tokenizer, ex, cfg.max_len) for ex in examples]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    order: list[int] = []
    losses = []
    model.train()
    bar = tqdm(range(cfg.steps), desc=desc, unit="step", mininterval=5, dynamic_ncols=True)
    for step in bar:
        if len(order) < cfg.batch_size:
            order += rng.sample(range(len(encoded)), len(encoded))
        batch = collate([encoded[i] for i in order[:cfg.batch_size]], tokenizer.pad_token_id, padding_side="right")
        del order[:cfg.batch_size]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with autocast():
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    bar.close()
    model.eval()
    return losses


def base_config(vocab_size: int, hidden: int, layers: int, heads: int, max_positions: int = 256):
    """A small Llama config (untied embeddings, GQA with 2 query heads per KV head, SwiGLU 2.5x)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 5 // 2,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                       max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                       tie_word_embeddings=False, rms_norm_eps=1e-5)


def pretrain_base(config, corpus: Sequence[dict], tokenizer, loop: LoopConfig,
                  shared_inputs: Sequence[tuple[int, int]] = ()):
    """A randomly initialised LlamaForCausalLM trained on `corpus` (dicts with "text"); returns (model, losses).

    `shared_inputs`: (id, id) pairs whose input embeddings are one vector, from the start to the end of the training
    (both rows get the sum of their gradients, so AdamW moves them alike); the output embeddings stay apart, so the
    model still chooses which of the two to write. The demo pairs every L word with its English word: the base then
    reads L word by word as English, and what it learns to read in one language it reads in the other."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(loop.seed)
    model = LlamaForCausalLM(config)
    handle = None
    if shared_inputs:
        first, second = (torch.tensor(ids) for ids in zip(*shared_inputs))
        weight = model.get_input_embeddings().weight
        with torch.no_grad():
            weight[second] = weight[first]

        def tie(grad):
            grad = grad.clone()
            grad[first] += grad[second]
            grad[second] = grad[first]
            return grad

        handle = weight.register_hook(tie)
    try:
        losses = train_loop(model, list(model.parameters()), corpus, tokenizer, loop, "pretrain base")
    finally:
        if handle is not None:
            handle.remove()
    return model.cpu(), losses


def train_lora(base_factory: Callable[[], torch.nn.Module], examples: Sequence[dict], tokenizer, loop: LoopConfig,
               r: int, alpha: float, dropout: float, out_dir, desc: str) -> list[float]:
    """Train a PEFT LoRA (all seven projections) on `examples` on a fresh copy of the base and save it (PEFT
    format: adapter_config.json + adapter_model.safetensors) to `out_dir`; returns the losses."""
    from peft import LoraConfig, get_peft_model

    from loraflow.tiny import SEVEN_PROJECTIONS

    torch.manual_seed(loop.seed)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(SEVEN_PROJECTIONS),
                        task_type="CAUSAL_LM")
    model = get_peft_model(base_factory(), config)
    params = [p for p in model.parameters() if p.requires_grad]
    losses = train_loop(model, params, examples, tokenizer, loop, desc)
    model.cpu().save_pretrained(str(out_dir))
    return losses
