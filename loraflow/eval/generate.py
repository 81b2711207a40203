"""Batched greedy generation into a crash-safe, resumable `predictions.jsonl`.

Decoding follows SPEC §3 with real greedy search (`do_sample=False`; the original faked it with sampling at
temperature 1e-4): left padding, prompts cut to their last `max_prompt_tokens` tokens (a leading BOS is kept),
at most `max_new_tokens` new tokens, a row stops at an EOS id or at one of the configured stop strings.
Prompts are processed longest first, so a batch holds prompts of similar length (little padding) and an
out-of-memory error shows up in the first batch; results are handed back in the caller's order.

Every row of a batch is computed exactly as it would be alone: greedy decoding with a correct attention mask does
not depend on the other rows, and a row that stops early is filled with padding that is dropped afterwards.

`predictions.jsonl` is the contract between generation and scoring (DESIGN.md): one line per item with `id`,
`task`, `language`, `split`, `method`, `prompt`, `generation` (the new tokens up to EOS, decoded alone), and with
`DecodeConfig.original_view` also `generation_original`: the text the original harness scored (SPEC §3
"Decoding": the whole sequence decoded, the prompt string cut off when it is a prefix, so a leading space
survives). The faithful scorers read `generation_original` when it is there, the strict ones `generation`.
The model runs in its own dtype, never under an autocast. It is written one batch at a time (append, flush,
fsync), so a crash loses at most the batch in flight; a rerun skips every id already in the file, and drops a
last line that a crash cut short (the file is rewritten atomically without it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from loraflow.errors import LoraflowError
from loraflow.eval.predictions import PREDICTION_FIELDS, _dump, append_predictions, read_predictions
from loraflow.files import atomic_write_text

__all__ = ["PREDICTION_FIELDS", "DecodeConfig", "append_predictions", "generate", "generate_predictions",
           "generate_texts", "read_predictions"]


@dataclass(frozen=True)
class DecodeConfig:
    """How to decode. Defaults are the original harness's (SPEC §3)."""

    max_new_tokens: int = 512  # new tokens per item at most
    max_prompt_tokens: int = 2048  # longer prompts keep their last tokens (and a leading BOS)
    batch_size: int = 8  # prompts per forward; does not change the generations
    stop: tuple[str, ...] = ()  # a row also stops once its generated text contains one of these (cut before it)
    add_special_tokens: bool = True  # let the tokenizer add BOS (False when the prompt text already has it)
    # also record `generation_original`: the text as the original harness saw it (`decode_as_original`), which
    # the faithful scorers read; the original prompt style only
    original_view: bool = False

    def __post_init__(self):
        for name in ("max_new_tokens", "max_prompt_tokens", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise LoraflowError(f"{name} must be at least 1, got {getattr(self, name)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise LoraflowError(f"stop strings must be non-empty strings, got {list(self.stop)}")
        object.__setattr__(self, "stop", tuple(self.stop))


# ------------------------------------------------------------------------------------------------ tokens -> text

def encode_prompts(tokenizer, prompts: Sequence[str], max_prompt_tokens: int,
                   add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of each prompt, cut from the left to `max_prompt_tokens` (a leading BOS survives the cut)."""
    out = []
    bos = tokenizer.bos_token_id
    for prompt in prompts:
        ids = list(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
        if len(ids) > max_prompt_tokens:
            head = ids[:1] if bos is not None and ids[:1] == [bos] else []
            ids = head + ids[len(ids) - (max_prompt_tokens - len(head)):]
        out.append(ids)
    return out


def eos_ids(tokenizer, model=None) -> list[int]:
    """Every id that ends a generation: the tokenizer's EOS and the model's generation-config EOS (chat models
    often end a turn with a token of their own, e.g. `<|eot_id|>`)."""
    ids = []
    for source in (getattr(tokenizer, "eos_token_id", None),
                   getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for i in (source if isinstance(source, (list, tuple)) else [source]):
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise LoraflowError("the tokenizer has no EOS token and the model's generation config names none")
    return ids


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def _until_eos(new_ids: Sequence[int], eos: Sequence[int]) -> list[int]:
    new_ids = list(new_ids)
    ends = [new_ids.index(e) for e in eos if e in new_ids]
    return new_ids[:min(ends)] if ends else new_ids


def decode_generation(tokenizer, new_ids: Sequence[int], eos: Sequence[int], stop: Sequence[str]) -> str:
    """The text of one row's generated ids: up to the first EOS, special tokens dropped, cut at a stop string."""
    return cut_at_stop(tokenizer.decode(_until_eos(new_ids, eos), skip_special_tokens=True), stop)


def decode_as_original(tokenizer, prompt_ids: Sequence[int], new_ids: Sequence[int], prompt: str,
                       eos: Sequence[int], stop: Sequence[str]) -> str:
    """The generation as the original harness saw it (SPEC §3): the whole sequence decoded with special tokens
    dropped; the prompt string cut off when the text starts with it, else the whole text kept (prompt included).

    Decoding the prompt and the answer together keeps a leading space of the answer that decoding the new tokens
    alone drops (SentencePiece tokenizers strip the space of a sequence's first token).
    """
    text = tokenizer.decode(list(prompt_ids) + _until_eos(new_ids, eos), skip_special_tokens=True)
    return cut_at_stop(text[len(prompt):] if text.startswith(prompt) else text, stop)


def _stop_criterion(tokenizer, stop: Sequence[str], prompt_width: int):
    """A `StoppingCriteria` that marks a row done once its generated text contains a stop string.

    Only the last few tokens are decoded each step: a stop string of B bytes spans at most B tokens (every token is
    at least one byte), and it is caught at the step that completes it. Rows that are done get padding from
    `generate` from then on.
    """
    from transformers import StoppingCriteria

    window = max(len(s.encode("utf-8")) for s in stop) + 8

    class StopOnStrings(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            import torch

            generated = input_ids[:, prompt_width:]
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            for row in range(generated.shape[0]):
                tail = tokenizer.decode(generated[row, -window:].tolist(), skip_special_tokens=True)
                done[row] = any(s in tail for s in stop)
            return done

    return StopOnStrings()


def generate_batch(model, tokenizer, prompt_ids: Sequence[Sequence[int]], config: DecodeConfig,
                   prompts: Sequence[str] | None = None) -> list[str] | list[tuple[str, str]]:
    """Greedy generations for one left-padded batch of token-id prompts, in the given order; with `prompts` (the
    prompt strings), `(generation, generation as the original saw it)` pairs.

    The model runs in its own dtype: no autocast (the original ran fp32; a bf16 model is asked for with its dtype).
    """
    import torch
    from transformers import GenerationConfig, StoppingCriteriaList

    eos = eos_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    device = next(model.parameters()).device
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids):] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    # a fresh GenerationConfig: the model's own (e.g. Llama-2's temperature 0.6 / top_p 0.9) must not leak in
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=config.max_new_tokens, pad_token_id=pad,
                                  eos_token_id=eos, num_beams=1)
    criteria = StoppingCriteriaList([_stop_criterion(tokenizer, config.stop, width)] if config.stop else [])
    with torch.no_grad():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             generation_config=gen_config, stopping_criteria=criteria)
    return decode_rows(tokenizer, prompt_ids, [row[width:].tolist() for row in out.cpu()], eos, config.stop, prompts)


def decode_rows(tokenizer, prompt_ids: Sequence[Sequence[int]], new_ids: Sequence[Sequence[int]], eos: Sequence[int],
                stop: Sequence[str], prompts: Sequence[str] | None = None) -> list[str] | list[tuple[str, str]]:
    """The texts of a batch's generated ids (whatever engine generated them); with `prompts`, `(generation,
    generation as the original saw it)` pairs."""
    texts = [decode_generation(tokenizer, row, eos, stop) for row in new_ids]
    if prompts is None:
        return texts
    return [(text, decode_as_original(tokenizer, ids, row, prompt, eos, stop))
            for text, ids, row, prompt in zip(texts, prompt_ids, new_ids, prompts, strict=True)]


def generate(model, tokenizer, prompts: Sequence[str], config: DecodeConfig,
             progress: bool = False) -> Iterator[list[tuple[int, str]]]:
    """Yield `[(index into prompts, generation), ...]` one batch at a time, longest prompts first; with
    `config.original_view` each generation is a `(generation, generation_original)` pair."""
    from tqdm.auto import tqdm

    encoded = encode_prompts(tokenizer, prompts, config.max_prompt_tokens, config.add_special_tokens)
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with tqdm(total=len(order), desc="generating", unit="item", disable=not progress) as bar:
            for start in range(0, len(order), config.batch_size):
                batch = order[start:start + config.batch_size]
                ids = [encoded[i] for i in batch]
                texts_of = [prompts[i] for i in batch] if config.original_view else None
                engine_batch = getattr(model, "loraflow_generate_batch", None)  # another engine: loraflow.vllm.engine
                if engine_batch is not None:  # it returns each row's new token ids; both views are decoded here
                    texts = decode_rows(tokenizer, ids, engine_batch(tokenizer, ids, config), eos_ids(tokenizer, model),
                                        config.stop, texts_of)
                else:
                    texts = generate_batch(model, tokenizer, ids, config, prompts=texts_of)
                bar.update(len(batch))
                yield list(zip(batch, texts))
    finally:
        model.train(was_training)


def generate_texts(model, tokenizer, prompts: Sequence[str], config: DecodeConfig) -> list[str]:
    """All generations, in the order of `prompts`."""
    texts: list[str | None] = [None] * len(prompts)
    for batch in generate(model, tokenizer, prompts, config):
        for index, text in batch:
            texts[index] = text
    return texts


# ---------------------------------------------------------------------------------------------- predictions.jsonl

def generate_predictions(model, tokenizer, items: Sequence[dict], path: str | os.PathLike, config: DecodeConfig,
                         progress: bool = True) -> list[dict]:
    """Generate for every item whose id is not in `path` yet, appending one batch at a time; return all rows.

    items: dicts with `id` and `prompt` plus the other prediction fields (`task`, `language`, `split`, `method`).
    An id already in the file whose stored prompt differs from the item's is an error (the file belongs to another
    configuration). When every item is done the file is put in the items' order (atomically).
    """
    path = Path(path)
    ids = [str(item["id"]) for item in items]
    if len(set(ids)) != len(ids):
        raise LoraflowError("item ids must be unique")
    done = {row["id"]: row for row in read_predictions(path)}  # file order (dicts keep insertion order)
    for item in items:
        old = done.get(str(item["id"]))
        if old is not None and "prompt" in old and old["prompt"] != item["prompt"]:
            raise LoraflowError(f"{path}: item {item['id']!r} was generated from another prompt (a different prompt "
                                "style, template or data file); use another output folder or delete the file")
    todo = [item for item in items if str(item["id"]) not in done]
    if todo:
        path.parent.mkdir(parents=True, exist_ok=True)
        for batch in generate(model, tokenizer, [item["prompt"] for item in todo], config, progress=progress):
            rows = [{**{f: todo[i].get(f) for f in PREDICTION_FIELDS if f != "generation"},
                     "id": str(todo[i]["id"]),
                     **({"generation": text[0], "generation_original": text[1]} if config.original_view
                        else {"generation": text})} for i, text in batch]
            append_predictions(path, rows)
            done.update((r["id"], r) for r in rows)
    wanted = set(ids)
    in_order = [done[i] for i in ids] + [row for key, row in done.items() if key not in wanted]  # extras last
    if list(done) != [r["id"] for r in in_order]:
        atomic_write_text(path, "".join(_dump(r) for r in in_order))
    return [done[i] for i in ids]
