"""Batched greedy generation (order, stop strings, truncation) and the crash-safe, resumable predictions file."""

from __future__ import annotations

import json

import pytest

from loraflow import FlowModel, LoraflowError
from loraflow.eval import generate as gen
from loraflow.eval.generate import (
    DecodeConfig,
    cut_at_stop,
    encode_prompts,
    generate_predictions,
    generate_texts,
    read_predictions,
)
from loraflow.tiny import randomize_gates, tiny_model, tiny_tokenizer

PROMPTS = ["Question: how many legs do three spiders have? Answer:", "hi", "Écrivez une fonction.",
           "2 + 2 =", "写一个函数，返回列表中最大的数。" * 2]


@pytest.fixture(scope="module")
def flow(tiny_pair):
    _, loras = tiny_pair
    return randomize_gates(FlowModel.from_pretrained(tiny_model("llama", seed=0), loras), seed=1)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _stops_that_cut_some_rows(texts: list[str]) -> tuple[str, ...]:
    """Printable stop strings (two characters if possible) that occur after the start of some generations but
    not all: random tiny models write mostly odd bytes, so the stops are taken from what they wrote."""
    for width in (2, 1):
        for text in texts:
            for i in range(1, len(text) - width + 1):
                cand = text[i:i + width]
                if cand.isascii() and cand.isprintable() and not all(cand in t for t in texts):
                    return (cand,)
    raise AssertionError(f"no printable stop string in {texts}")


def test_batched_with_stops_equals_one_at_a_time(flow, tok):
    plain = DecodeConfig(max_new_tokens=16, batch_size=1)
    reference = [generate_texts(flow, tok, [p], plain)[0] for p in PROMPTS]
    # stop strings that really occur mid-generation in some rows, so rows of one batch stop at different steps
    stops = _stops_that_cut_some_rows(reference)
    expected = [cut_at_stop(text, stops) for text in reference]
    assert any(e != r for e, r in zip(expected, reference)), "the stop strings should cut at least one row"
    assert any(e == r for e, r in zip(expected, reference)), "and leave at least one row to run to the end"
    config = DecodeConfig(max_new_tokens=16, batch_size=3, stop=stops)  # 5 prompts: batches of 3 and 2
    assert generate_texts(flow, tok, PROMPTS, config) == expected


def test_longest_prompts_go_first_and_results_come_back_in_order(flow, tok):
    config = DecodeConfig(max_new_tokens=2, batch_size=2)
    seen = [index for batch in gen.generate(flow, tok, PROMPTS, config) for index, _ in batch]
    lengths = [len(tok(p)["input_ids"]) for p in PROMPTS]
    assert sorted(seen) == list(range(len(PROMPTS)))
    assert [lengths[i] for i in seen] == sorted(lengths, reverse=True)


def test_prompts_keep_their_last_tokens_and_bos(tok):
    ids = encode_prompts(tok, ["<s>abcdefgh", "abcdefgh"], max_prompt_tokens=4, add_special_tokens=False)
    assert ids[0] == [tok.bos_token_id] + tok("fgh", add_special_tokens=False)["input_ids"]
    assert ids[1] == tok("efgh", add_special_tokens=False)["input_ids"]


def test_eos_ends_a_generation_and_stop_strings_are_cut_off(tok):
    eos = [tok.eos_token_id]
    ids = tok("abc", add_special_tokens=False)["input_ids"] + eos + tok("xyz", add_special_tokens=False)["input_ids"]
    assert gen.decode_generation(tok, ids, eos, ()) == "abc"
    assert gen.decode_generation(tok, ids[:3], eos, ("bc",)) == "a"
    assert cut_at_stop("one\n\nQuestion: two [INST]", ("[INST]", "Question:")) == "one\n\n"


# ------------------------------------------------------------------------------------------ predictions.jsonl

def _items(n=5):
    return [{"id": f"item-{i}", "task": "mgsm", "language": "zh", "split": "test", "method": "flow",
             "prompt": PROMPTS[i % len(PROMPTS)] + f" #{i}"} for i in range(n)]


@pytest.fixture
def counting(monkeypatch):
    """Count the prompts each generate_batch call gets; optionally crash on the n-th call."""
    calls, real = [], gen.generate_batch
    state = {"crash_on": None}

    def counted(model, tokenizer, prompt_ids, config, **kwargs):
        calls.append(len(prompt_ids))
        if state["crash_on"] == len(calls):
            raise KeyboardInterrupt("simulated crash")
        return real(model, tokenizer, prompt_ids, config, **kwargs)

    monkeypatch.setattr(gen, "generate_batch", counted)
    return calls, state


def _lines(path):
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_resume_after_a_crash_mid_write_recomputes_only_missing_items(flow, tok, tmp_path, counting):
    calls, _ = counting
    config = DecodeConfig(max_new_tokens=4, batch_size=2)
    full = generate_predictions(flow, tok, _items(), tmp_path / "full.jsonl", config, progress=False)
    assert sum(calls) == 5 and [r["id"] for r in full] == [f"item-{i}" for i in range(5)]
    assert set(full[0]) == set(gen.PREDICTION_FIELDS)

    # a crash while writing: three lines on disk, the fourth cut short
    lines = (tmp_path / "full.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    path = tmp_path / "crashed.jsonl"
    path.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2], encoding="utf-8")
    calls.clear()
    rows = generate_predictions(flow, tok, _items(), path, config, progress=False)
    assert sum(calls) == 2  # only items 3 and 4
    assert rows == full
    assert _lines(path) == full  # valid JSONL, each id once, in the items' order


def test_resume_after_an_interrupted_run(flow, tok, tmp_path, counting):
    calls, state = counting
    config = DecodeConfig(max_new_tokens=4, batch_size=2)
    path = tmp_path / "predictions.jsonl"
    state["crash_on"] = 2
    with pytest.raises(KeyboardInterrupt):
        generate_predictions(flow, tok, _items(), path, config, progress=False)
    assert len(_lines(path)) == 2  # the first batch survived
    state["crash_on"] = None
    calls.clear()
    rows = generate_predictions(flow, tok, _items(), path, config, progress=False)
    assert sum(calls) == 3
    assert [r["id"] for r in _lines(path)] == [f"item-{i}" for i in range(5)] == [r["id"] for r in rows]
    calls.clear()
    generate_predictions(flow, tok, _items(), path, config, progress=False)
    assert calls == []  # all done: nothing is generated again


def test_read_predictions_repairs_only_the_last_line(tmp_path):
    good = [{"id": "a", "generation": "x"}, {"id": "b", "generation": "y"}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"id": "c", "gener', encoding="utf-8")
    assert read_predictions(path) == good
    assert _lines(path) == good
    path.write_text(json.dumps(good[0]) + "\n" + json.dumps(good[0]) + "\n" + json.dumps(good[1]), encoding="utf-8")
    assert read_predictions(path) == good  # a repeated id and a last line without its newline
    assert _lines(path) == good
    path.write_text(json.dumps(good[0]) + "\n{oops\n" + json.dumps(good[1]) + "\n", encoding="utf-8")
    with pytest.raises(LoraflowError, match=r"p\.jsonl:2: not a prediction line"):
        read_predictions(path)


def test_a_file_from_other_prompts_is_refused(flow, tok, tmp_path):
    path = tmp_path / "p.jsonl"
    config = DecodeConfig(max_new_tokens=2, batch_size=4)
    generate_predictions(flow, tok, _items(2), path, config, progress=False)
    other = [{**item, "prompt": "something else"} for item in _items(2)]
    with pytest.raises(LoraflowError, match="another prompt"):
        generate_predictions(flow, tok, other, path, config, progress=False)


@pytest.mark.parametrize("kwargs", [{"max_new_tokens": 0}, {"batch_size": 0}, {"stop": ("",)}])
def test_decode_config_is_validated(kwargs):
    with pytest.raises(LoraflowError):
        DecodeConfig(**kwargs)


class SentencePieceLike:
    """A tokenizer whose decode drops the space before a sequence's first word, as Llama-2's does; ids are
    indices into `pieces` ("▁" = a space), 0 is BOS (special)."""

    pieces = ["<s>", "▁[INST]", "▁hi", "▁[/INST]", "▁def", "▁f", "():", "\n", "▁return"]

    def decode(self, ids, skip_special_tokens=True):
        text = "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i == 0)).replace("▁", " ")
        return text[1:] if text.startswith(" ") else text


@pytest.mark.parametrize("prompt_ids,prompt,new_ids,alone,original", [
    # the answer's leading space survives when decoded with the prompt, and the prompt string is cut off
    ([0, 1, 2, 3], "[INST] hi [/INST]", [4, 5, 6], "def f():", " def f():"),
    # a prompt string that does not round-trip through the tokenizer stays in (SPEC §3)
    ([0, 1, 2, 3], "[INST]  hi [/INST]", [4, 5, 6], "def f():", "[INST] hi [/INST] def f():"),
    # up to the first EOS (id 7 here), as the decoded new tokens
    ([0, 1, 2, 3], "[INST] hi [/INST]", [8, 7, 4], "return", " return"),
])
def test_the_generation_as_the_original_saw_it(prompt_ids, prompt, new_ids, alone, original):
    tok = SentencePieceLike()
    assert gen.decode_generation(tok, new_ids, [7], ()) == alone
    assert gen.decode_as_original(tok, prompt_ids, new_ids, prompt, [7], ()) == original


def test_original_view_is_recorded_beside_the_generation(flow, tok, tmp_path):
    items = [{"id": str(i), "prompt": p} for i, p in enumerate(PROMPTS[:3])]
    config = DecodeConfig(max_new_tokens=4, batch_size=2, original_view=True)
    rows = generate_predictions(flow, tok, items, tmp_path / "p.jsonl", config, progress=False)
    plain = generate_texts(flow, tok, PROMPTS[:3], DecodeConfig(max_new_tokens=4, batch_size=2))
    assert [r["generation"] for r in rows] == plain
    for row, ids in zip(rows, encode_prompts(tok, PROMPTS[:3], 2048)):
        full = tok.decode(ids + tok(row["generation"], add_special_tokens=False)["input_ids"],
                          skip_special_tokens=True)
        assert row["generation_original"] == (full[len(row["prompt"]):] if full.startswith(row["prompt"]) else full)


def test_no_autocast_the_model_runs_in_its_dtype(flow, tok, monkeypatch):
    """The original evaluated in fp32: generation never enters torch.autocast, whatever the device."""
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError(f"torch.autocast entered with {args} {kwargs}")

    monkeypatch.setattr(torch, "autocast", refuse)
    monkeypatch.setattr(torch.amp, "autocast", refuse)
    assert len(generate_texts(flow, tok, PROMPTS[:2], DecodeConfig(max_new_tokens=3))) == 2


def test_eval_dtype_defaults_to_fp32_and_is_the_one_that_ran(tiny_pair):
    import argparse

    import torch

    from loraflow.eval import run as eval_run

    p = argparse.ArgumentParser()
    eval_run.add_arguments(p)
    args = p.parse_args(["--task", "mgsm", "--language", "zh", "--method", "average", "--base", "x"])
    cfg = eval_run.EvalConfig.from_args(args)
    assert cfg.dtype == "float32" and eval_run.EvalConfig.dtype == "float32"  # the CLI and the API: fp32, even on CUDA
    _, loras = tiny_pair
    for dtype in (torch.float32, torch.bfloat16):
        model = FlowModel.from_pretrained(tiny_model("llama", seed=0), loras, torch_dtype=dtype)
        assert eval_run.base_dtype(model) == str(dtype).removeprefix("torch.")
