"""LoRA-Hub: the search beats the average on a synthetic case, is deterministic, and its weights file is reused."""

from __future__ import annotations

import json

import pytest
import torch

from loraflow import FlowModel, LoraflowError
from loraflow.tiny import tiny_model
from loraflow.train.lorahub import (
    IGNORE_INDEX,
    LoraHubConfig,
    load_weights,
    lorahub_search,
    lorahub_weights,
    mean_example_loss,
)

pytest.importorskip("nevergrad")
TEACHER = [1.3, -0.6]  # the static fusion that wrote the examples


@pytest.fixture(scope="module")
def flow(tiny_pair):
    _, loras = tiny_pair
    return FlowModel.from_pretrained(tiny_model("llama", seed=0), loras, mode="static", static_weights=[0.5, 0.5])


@pytest.fixture(scope="module")
def examples(flow):
    """Prompts of random bytes continued greedily by the teacher fusion: the loss is lowest near TEACHER."""
    flow.set_mode("static", weights=TEACHER)
    g = torch.Generator().manual_seed(0)
    out = []
    with torch.no_grad():
        for n in (5, 9, 7, 6):
            prompt = torch.randint(4, 260, (1, n), generator=g)
            full = flow.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, pad_token_id=3)[0].tolist()
            out.append({"input_ids": full, "labels": [IGNORE_INDEX] * n + full[n:]})
    return out


def _loss(flow, examples, weights):
    flow.set_mode("static", weights=weights)
    return mean_example_loss(flow, examples)


def test_search_is_no_worse_than_the_average(flow, examples):
    config = LoraHubConfig(budget=10, seed=0)
    result = lorahub_search(flow, examples, config)
    average = _loss(flow, examples, [0.5, 0.5])
    assert result.loss < average - 0.1  # the teacher's weights are far from the average: a clear gain
    assert result.objective <= average + config.l1 * 1.0
    assert len(result.history) == 10 and result.history[0]["weights"] == [0.5, 0.5]  # starts from the average
    assert all(abs(w) <= config.bound for h in result.history for w in h["weights"])
    assert result.loss == pytest.approx(_loss(flow, examples, result.weights))
    assert flow.mode == "static"


def test_search_is_deterministic(flow, examples):
    config = LoraHubConfig(budget=6, seed=3)
    assert lorahub_search(flow, examples, config).history == lorahub_search(flow, examples, config).history


def test_loss_ignores_prompt_tokens_and_padding(flow, examples):
    flow.set_mode("static", weights=[0.5, 0.5])
    one_by_one = sum(mean_example_loss(flow, [ex]) for ex in examples) / len(examples)
    assert mean_example_loss(flow, examples, batch_size=4) == pytest.approx(one_by_one, rel=1e-5)
    changed = [{**ex, "input_ids": [7] + ex["input_ids"][1:]} for ex in examples]  # a prompt token, unlabelled
    assert mean_example_loss(flow, changed) != pytest.approx(one_by_one)  # it is context...
    unlabelled = [{**ex, "labels": [IGNORE_INDEX] * len(ex["labels"])} for ex in examples[:1]]
    with pytest.raises(LoraflowError, match="no labelled tokens"):
        mean_example_loss(flow, unlabelled)


def test_weights_file_is_saved_and_reused(flow, examples, tmp_path):
    path = tmp_path / "lorahub_zh_math.json"
    calls = []

    def make_examples():
        calls.append(1)
        return examples

    weights, reused = lorahub_weights(flow, make_examples, path, LoraHubConfig(budget=3), language="zh")
    saved = json.loads(path.read_text())
    assert not reused and calls == [1] and saved["weights"] == weights
    assert saved["lora_names"] == flow.lora_names and saved["config"]["budget"] == 3 and saved["language"] == "zh"
    again, reused = lorahub_weights(flow, make_examples, path, LoraHubConfig(budget=3))
    assert reused and again == weights and calls == [1]  # nothing tokenised or searched
    with pytest.raises(LoraflowError, match="delete the file"):
        load_weights(path, ["zh_lora", "code_lora"])


@pytest.mark.parametrize("kwargs", [{"budget": 0}, {"bound": 0}, {"l1": -1}, {"init": "random"}])
def test_config_is_validated(kwargs):
    with pytest.raises(LoraflowError):
        LoraHubConfig(**kwargs)
