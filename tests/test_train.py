"""Gate training in one process: config and presets, schedule, data order, a gate that learns to route, gradient
accumulation equivalence, parameter counts, and inputs refused before the first step."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from train_world import assert_same_gate, build_world, read_metrics, write_jsonl

from loraflow import FlowModel, LoraflowError, cli
from loraflow.tiny import tiny_lora, tiny_model
from loraflow.train.config import PRESETS, TrainConfig, add_arguments, config_from_args, lr_at, schedule_steps
from loraflow.train.distributed import epoch_order, micro_batches, step_batches
from loraflow.train.recipe import best_epoch, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("train_world"))


# ---- config ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pair,world_size,grad_accum,expect", [
    ("zh_math", 2, 1, (2, 4, 1e-3, 0.2)),   # the original: 2 GPUs × 2
    ("zh_math", 1, 2, (2, 4, 1e-3, 0.2)),   # 1 GPU × 2 × FREQ 2
    ("es_math", 4, 1, (4, 16, 1e-4, 0.2)),
    ("ru_code", 8, 2, (1, 16, 1e-4, 0.4)),  # ru-code warms up over 40% of the steps
])
def test_presets_fill_lr_batch_and_warmup(pair, world_size, grad_accum, expect):
    language, task = pair.split("_")
    cfg = TrainConfig(language=language, task=task, grad_accum=grad_accum).resolve(world_size, "cpu")
    assert (cfg.batch_per_device, cfg.total_batch, cfg.lr, cfg.warmup_ratio) == expect
    assert cfg.preset == pair and cfg.run_name == pair and cfg.dtype == "float32"
    assert cfg.lora_sources() == [f"checkpoints/LoRAs/{language}_lora", f"checkpoints/LoRAs/{task}_lora"]


def test_batch_split_that_does_not_divide_is_refused():
    with pytest.raises(LoraflowError, match="total batch 4 cannot be split over 3 process"):
        TrainConfig(language="zh", task="math").resolve(3, "cuda")
    with pytest.raises(LoraflowError, match="= 6, not the total batch 4"):
        TrainConfig(language="zh", task="math", batch_per_device=3, total_batch=4).resolve(2, "cpu")
    cfg = TrainConfig(language="zh", task="math", lr=1e-3, batch_per_device=3).resolve(3, "cuda")
    assert (cfg.total_batch, cfg.dtype) == (9, "bfloat16")  # batch per device given: total follows


@pytest.mark.parametrize("kwargs,message", [
    ({"language": "zh"}, "--language and --task"),
    ({"language": "fr", "task": "math"}, "no preset for 'fr_math'"),
    ({"language": "zh", "task": "math", "epochs": 0}, "epochs must be at least 1"),
    ({"language": "zh", "task": "math", "lr": -1.0}, "lr must be > 0"),
    ({"language": "zh", "task": "math", "warmup_ratio": 1.0}, r"warmup_ratio must be in \[0, 1\)"),
    ({"language": "zh", "task": "math", "prompt_style": "alpaca"}, "prompt_style 'alpaca'"),
    ({"language": "zh/..", "task": "math"}, "language 'zh/..'"),
    ({"train_file": "x.jsonl", "lr": 1e-3, "total_batch": 4}, "give --loras"),
    ({"language": "zh", "task": "code", "select": "dev-metric"},
     r"--select dev-metric \(or --select dev-loss\): code-dev is scored by running the programs"),
    ({"language": "zh", "task": "math", "select": "dev-metric", "fsdp": True}, "does not work with --fsdp"),
    ({"language": "zh", "task": "poetry", "lr": 1e-3, "total_batch": 4, "select": "dev-metric-strict"},
     "no dev benchmark for task 'poetry'"),
    ({"train_file": "x.jsonl", "loras": ["a"], "lr": 1e-3, "total_batch": 4, "select": "dev-metric"},
     "--select dev-metric needs --language and --task"),
    ({"language": "zh", "task": "math", "select": "best"}, "select 'best'"),
    ({"language": "zh", "task": "math", "schedule": "bmtrain"}, "schedule 'bmtrain'"),
    ({"language": "zh", "task": "math", "dev_max_new_tokens": 0}, "dev_max_new_tokens must be at least 1"),
])
def test_invalid_config_raises(kwargs, message):
    with pytest.raises(LoraflowError, match=message):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_and_flags(tmp_path, suffix):
    values = {"language": "ru", "task": "code", "lr": "2e-4", "grad-accum": 2, "lora_dropout": False}
    path = tmp_path / f"run{suffix}"
    if suffix == ".yaml":
        path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()).replace('"2e-4"', "2e-4"))
    else:
        path.write_text(json.dumps(values))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--config", str(path), "--epochs", "2", "--lora-dropout"]))
    assert (cfg.language, cfg.lr, cfg.grad_accum, cfg.epochs) == ("ru", 2e-4, 2, 2)
    assert cfg.lora_dropout is True  # the flag wins over the file
    assert (cfg.total_batch, cfg.warmup_ratio) == (PRESETS["ru_code"].total_batch, 0.4)
    (tmp_path / "bad.json").write_text(json.dumps({"learning_rate": 1}))
    with pytest.raises(LoraflowError, match="unknown field 'learning_rate'"):
        config_from_args(parser.parse_args(["--config", str(tmp_path / "bad.json")]))


# ---- schedule and data order ---------------------------------------------------------------------------------------

def test_schedule_is_the_papers():
    assert schedule_steps(200, 4, 5) == (50, 5 * 200 // 4 + 1)  # SPEC §2: epochs × N / total_batch + 1
    assert schedule_steps(200, 16, 5) == (13, 66)  # the last partial batch of each epoch is kept
    lrs = [lr_at(s, 1e-3, 1251, 0.2) for s in range(1250)]
    warmup = int(0.2 * 1251)
    assert lrs[0] == pytest.approx(1e-3 / warmup) and lrs[warmup - 1] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:warmup], lrs[1:warmup]))
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))
    assert 0 < lrs[-1] < 1e-7 and lr_at(1251, 1e-3, 1251, 0.2) == 0.0


@pytest.mark.parametrize("world_size,grad_accum", [(1, 1), (2, 1), (1, 2), (2, 2), (3, 1)])
def test_every_split_of_a_step_covers_the_same_examples(world_size, grad_accum):
    order = epoch_order(13, seed=0, epoch=1)
    assert sorted(order) == list(range(13)) and order == epoch_order(13, 0, 1) != epoch_order(13, 0, 2)
    for step in step_batches(order, 6):
        parts = [mb for r in range(world_size) for mb in micro_batches(step, r, world_size, grad_accum)]
        assert sorted(i for mb in parts for i in mb) == sorted(step)


# ---- parameter count -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers,hidden,k", [(2, 64, 2), (3, 32, 3)])
def test_trainable_parameter_count(tmp_path, layers, hidden, k):
    loras = [tmp_path / f"lora{i}" for i in range(k)]
    for i, path in enumerate(loras):
        tiny_lora(tiny_model("llama", layers=layers, hidden=hidden), path, r=2, seed=i)
    flow = FlowModel.from_pretrained(tiny_model("llama", layers=layers, hidden=hidden), loras)
    trainable = sum(p.numel() for p in flow.parameters() if p.requires_grad)
    assert trainable == layers * k * (hidden + 1)  # per layer: W (k × hidden) + b (k)


# ---- training ----------------------------------------------------------------------------------------------------

def test_run_writes_checkpoints_and_loss_decreases(world, tmp_path):
    summary = train(world.config(tmp_path))
    run = tmp_path / "zh_math"
    for name in ("config.json", "metrics.jsonl", "summary.json", "state/trainer.pt", "state/rng_rank0.pt",
                 *(f"epoch_{e}/gate.{ext}" for e in (1, 2, 3) for ext in ("safetensors", "json")),
                 "final/gate.safetensors"):
        assert (run / name).is_file(), name
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*.old"))
    config = json.loads((run / "config.json").read_text())
    assert (config["world_size"], config["batch_per_device"], config["trainable_parameters"]) == (1, 4, 260)
    rows = read_metrics(run)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    epoch_loss = [sum(r["loss"] for r in steps if r["epoch"] == e) / 2 for e in (1, 2, 3)]
    assert epoch_loss[2] < epoch_loss[0], epoch_loss
    dev = [r["dev_loss"] for r in rows if "dev_loss" in r]
    assert len(dev) == 3 and summary["best_epoch"] == 1 + dev.index(min(dev))
    assert_same_gate(tmp_path / "zh_math.safetensors", run / f"epoch_{summary['best_epoch']}", atol=0, rtol=0)
    gate_json = json.loads((tmp_path / "zh_math.json").read_text())
    assert gate_json["lora_names"] == ["zh_lora", "math_lora"] and gate_json["epoch"] == summary["best_epoch"]
    loaded = FlowModel.from_pretrained(world.base, [world.lora_root / "zh_lora", world.lora_root / "math_lora"],
                                       gate=tmp_path / "zh_math.safetensors")
    assert loaded.gates()[0].weight.abs().sum() > 0
    with pytest.raises(LoraflowError, match="already holds a run"):
        train(world.config(tmp_path))


def test_defaults_and_optimizer_follow_the_original_recipe(world, tmp_path):
    """SPEC §2: AdamW (decoupled weight decay 0.1, betas 0.9/0.95, eps 1e-5) on the gates only, clipping 1.0, 5 epochs,
    seed 0, max length 4096, LoRA dropout on; metrics.jsonl has step, loss, lr, grad norm and tokens/s."""
    cfg = TrainConfig(language="zh", task="math")
    assert (cfg.weight_decay, cfg.beta1, cfg.beta2, cfg.eps, cfg.clip_grad) == (0.1, 0.9, 0.95, 1e-5, 1.0)
    assert (cfg.epochs, cfg.seed, cfg.max_len, cfg.lora_dropout, cfg.grad_accum) == (5, 0, 4096, True, 1)
    assert (cfg.prompt_style, cfg.cot_suffix, cfg.grad_ckpt, cfg.fsdp) == ("faithful", True, False, False)
    # the epoch is chosen by the dev metric when the pair has dev data (the original), else by dev loss
    assert TrainConfig(language="zh", task="math", data_root=str(world.data_root)).select == "dev-metric"
    assert TrainConfig(language="zh", task="math", data_root=str(world.data_root), no_dev=True).select == "dev-loss"
    assert TrainConfig(language="zh", task="math", data_root=str(tmp_path)).select == "dev-loss"
    train(world.config(tmp_path, max_steps=2))  # the world's config leaves every optimizer knob at its default
    state = torch.load(tmp_path / "zh_math" / "state" / "trainer.pt", weights_only=True)
    (group,) = state["optimizer"]["param_groups"]
    assert (group["weight_decay"], tuple(group["betas"]), group["eps"]) == (0.1, (0.9, 0.95), 1e-5)
    assert group["decoupled_weight_decay"] is True  # AdamW, not Adam with L2
    assert len(group["params"]) == 2 * 2  # two layers × (W, b): nothing but the gates
    rows = [r for r in read_metrics(tmp_path / "zh_math") if "loss" in r]
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "response_tokens", "tokens_per_s"} <= set(rows[0])
    _, schedule = schedule_steps(8, 4, 3)
    assert [r["lr"] for r in rows] == pytest.approx([lr_at(s, 5e-2, schedule, 0.2) for s in range(2)])
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in rows)


def test_lora_dropout_is_active_while_training_and_switchable(world, tmp_path):
    """With dropout on, a step sees dropped LoRA activations (another gate than without), reproducibly (seeded)."""
    from train_world import read_gate

    for name, dropout in (("on", True), ("on_again", True), ("off", False)):
        train(world.config(tmp_path / name, max_steps=1, lora_dropout=dropout))
    on, again, off = (read_gate(tmp_path / name / "zh_math" / "final") for name in ("on", "on_again", "off"))
    assert all(torch.equal(on[k], again[k]) for k in on)
    assert any(not torch.allclose(on[k], off[k], atol=1e-7) for k in on)


def test_best_epoch_prefers_the_dev_metric():
    history = [{"epoch": 1, "dev_loss": 1.0, "dev_metric": 0.2}, {"epoch": 2, "dev_loss": 0.5, "dev_metric": 0.1},
               {"epoch": 3, "dev_loss": 0.9, "dev_metric": 0.2}]
    assert best_epoch(history) == 3  # the highest metric; between equal metrics, the lower dev loss
    assert best_epoch([{**h, "dev_metric": None} for h in history]) == 2  # no metric: the lowest dev loss
    assert best_epoch([{"epoch": e, "dev_loss": None} for e in (1, 2)]) == 2  # neither: the last epoch


def test_dev_metric_scores_every_epoch_with_the_eval_harness(world, tmp_path, monkeypatch):
    """--dev-metric: after each epoch the dev set is generated and scored as `loraflow score` does; the best epoch
    (the gate exported beside the run) is the one with the highest metric, whatever the dev loss says."""
    from loraflow.eval import score as scoring

    real, calls = scoring.score_predictions, []
    planted = [0.0, 1.0, 0.5]  # a random tiny model scores 0 everywhere: plant metrics that pick epoch 2

    def score(*args, **kwargs):
        results = real(*args, **kwargs)
        calls.append(results)
        return {**results, "metrics": {**results["metrics"], "accuracy": planted[len(calls) - 1]}}

    monkeypatch.setattr(scoring, "score_predictions", score)
    from loraflow.eval import generate as gen

    real_texts, seen = gen.generate_texts, []

    def texts(flow, *args, **kwargs):
        seen.append((flow.temperature, {p.dtype for p in flow.parameters()}))
        return real_texts(flow, *args, **kwargs)

    monkeypatch.setattr(gen, "generate_texts", texts)
    summary = train(world.config(tmp_path, select="dev-metric", dev_max_new_tokens=4, dev_batch_size=2))
    assert seen == [(1.1, {torch.float32})] * 3  # zh math: T = 1.1, fp32, as the original evaluated
    run = tmp_path / "zh_math"
    for epoch, results in enumerate(calls, 1):
        folder = run / "dev" / f"epoch_{epoch}"
        rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == ["0", "1", "2"] and all(r["split"] == "dev" for r in rows)
        assert rows[0]["prompt"].startswith("[INST] <<SYS>>\n你是中文助手。")  # the eval prompt, SPEC §3
        assert "generation_original" in rows[0]  # what the faithful scorer reads
        saved = json.loads((folder / "results.json").read_text())
        assert saved["task"] == "math-dev" and saved["counts"]["ids_scored"] == 3 and saved == results
        assert (saved["config"]["temperature"], saved["config"]["temperature_source"]) == (1.1, "default for zh_math")
    assert len(calls) == 3
    assert [h["dev_metric"] for h in summary["history"]] == planted
    assert summary["best_epoch"] == 2 and summary["selected_by"].startswith("dev accuracy")
    assert_same_gate(tmp_path / "zh_math.safetensors", run / "epoch_2", atol=0, rtol=0)
    epoch_rows = [r for r in read_metrics(run) if "dev_metric" in r]
    assert [r["dev_metric"] for r in epoch_rows] == planted and epoch_rows[0]["dev_metric_name"] == "accuracy"


CODE_DEV = [  # (text, code, tests): MBPP-like dev items whose planted completions are right
    ("写一个函数，求和。", "def add(a, b):\n    return a + b", ["assert add(2, 3) == 5", "assert add(0, 1) == 1"]),
    ("写一个函数，返回列表的最大值。", "def biggest(xs):\n    return max(xs)", ["assert biggest([1, 5, 2]) == 5"]),
    ("写一个函数，把字符串反转。", "def rev(s):\n    return s[::-1]", ["assert rev('abc') == 'cba'"]),
]


def test_dev_metric_on_code_scores_every_epoch_in_the_sandbox(world, tmp_path, monkeypatch):
    """--dev-metric on code runs the sandbox once per epoch in one process: with right completions planted, every
    epoch's dev pass@1 is 1.0 (a fork server lost between two epochs' `run_many` calls used to fail programs)."""
    from loraflow.eval import generate

    data = tmp_path / "data"
    write_jsonl(data / "train" / "zh_code_train.jsonl",
                [{"id": f"zh_code_{i}", "data": [text, code]} for i, (text, code, _) in enumerate(CODE_DEV * 2)])
    write_jsonl(data / "dev" / "zh_code_dev.jsonl",
                [{"task_id": i, "text": text, "code": code, "test_list": tests, "test_setup_code": "",
                  "challenge_test_list": []} for i, (text, code, tests) in enumerate(CODE_DEV)])
    (data / "system_prompts.json").write_text(json.dumps({"zh_code": "你是中文助手。"}, ensure_ascii=False))
    completions = {text: code for text, code, _ in CODE_DEV}

    def planted(flow, tokenizer, prompts, decode):
        # the original's dev rule keeps generation.split("\n\n")[1]: a line, a blank line, then the program
        return ["Here it is:\n\n" + next(c for t, c in completions.items() if t in p) for p in prompts]

    monkeypatch.setattr(generate, "generate_texts", planted)
    loras = [str(world.lora_root / "zh_lora"), str(world.lora_root / "math_lora")]
    summary = train(world.config(tmp_path / "out", task="code", loras=loras, data_root=str(data), select="dev-metric",
                                 allow_code_execution=True, lr=1e-3, total_batch=2))
    assert [h["dev_metric"] for h in summary["history"]] == [1.0, 1.0, 1.0]
    for epoch in (1, 2, 3):
        results = json.loads((tmp_path / "out" / "zh_code" / "dev" / f"epoch_{epoch}" / "results.json").read_text())
        assert results["task"] == "code-dev" and results["metrics"]["pass@1"] == 1.0


def test_gradient_accumulation_equals_a_bigger_batch(world, tmp_path):
    train(world.config(tmp_path / "b4", batch_per_device=4, total_batch=None))
    train(world.config(tmp_path / "b2x2", batch_per_device=2, grad_accum=2, total_batch=None))
    assert_same_gate(tmp_path / "b2x2" / "zh_math" / "final", tmp_path / "b4" / "zh_math" / "final")


def test_max_steps_stop_resumes_and_checkpointing_changes_nothing(world, tmp_path):
    # LoRA dropout on: the checkpointed recompute in backward sees the same (keyed) masks as the forward
    train(world.config(tmp_path / "straight", lora_dropout=True))
    first = train(world.config(tmp_path / "split", max_steps=3, grad_ckpt=True, lora_dropout=True))  # mid-epoch 2
    assert first["steps"] == 3 and first["epochs_done"] == 1
    assert (tmp_path / "split" / "zh_math" / "final").is_dir()
    train(world.config(tmp_path / "split", resume=True, lora_dropout=True))
    assert_same_gate(tmp_path / "split" / "zh_math" / "final", tmp_path / "straight" / "zh_math" / "final")
    with pytest.raises(LoraflowError, match=r"other settings \(lr: 0.05 -> 0.01\)"):
        train(world.config(tmp_path / "split", resume=True, lr=1e-2, lora_dropout=True))


def test_bf16_autocast_runs(world, tmp_path):
    summary = train(world.config(tmp_path, dtype="bfloat16", max_steps=2))
    loss = [r["loss"] for r in read_metrics(tmp_path / "zh_math") if "loss" in r]
    assert summary["steps"] == 2 and all(math.isfinite(x) for x in loss)
    assert json.loads((tmp_path / "zh_math" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.slow
def test_gate_learns_to_route_tokens_to_the_right_lora(tmp_path):
    """Two token sets A and B; LoRA 0 is fine-tuned (peft) on A-sequences, LoRA 1 on B-sequences. Trained on a mix,
    the gate must beat both single LoRAs and their static average on held-out sequences of both kinds."""
    from peft import LoraConfig, get_peft_model

    from loraflow.tiny import SEVEN_PROJECTIONS
    from loraflow.train.distributed import DistInfo
    from loraflow.train.recipe import fit

    sets = {"A": torch.arange(10, 40), "B": torch.arange(140, 170)}

    def base():
        # A random tiny model's logits and hidden states are tiny (init std 0.02, and the final norm caps the
        # residual), so scale the embeddings and head to give LoRAs and gates something to work with; the two sets
        # differ along one embedding direction, the kind of feature a gate reads.
        model = tiny_model("llama", seed=0)
        with torch.no_grad():
            model.lm_head.weight.mul_(25)
            model.model.embed_tokens.weight.mul_(50)
            u = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(5)), dim=0)
            model.model.embed_tokens.weight[sets["A"]] += 4 * u
            model.model.embed_tokens.weight[sets["B"]] -= 4 * u
        return model

    def sequences(kind, n, seed):
        s = sets[kind]
        return s[torch.randint(0, len(s), (n, 16), generator=torch.Generator().manual_seed(seed))]

    for i, kind in enumerate("AB"):
        peft_model = get_peft_model(base(), LoraConfig(r=8, lora_alpha=16, target_modules=list(SEVEN_PROJECTIONS)))
        opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=3e-2)
        peft_model.train()
        for step in range(30):
            x = sequences(kind, 8, seed=100 * i + step)
            peft_model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
        peft_model.save_pretrained(tmp_path / f"lora_{kind}")
    flow = FlowModel.from_pretrained(base(), [tmp_path / "lora_A", tmp_path / "lora_B"])
    held_out = torch.cat([sequences("A", 32, seed=2000), sequences("B", 32, seed=2001)])

    def held_out_loss(mode, **kwargs):
        flow.set_mode(mode, **kwargs)
        flow.eval()
        with torch.no_grad():
            return flow(input_ids=held_out, labels=held_out).loss.item()

    before = {"lora A": held_out_loss("single", lora=0), "lora B": held_out_loss("single", lora=1),
              "average": held_out_loss("static", weights=[0.5, 0.5])}
    mix = torch.cat([sequences("A", 32, seed=1000), sequences("B", 32, seed=1001)])
    examples = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in mix]
    cfg = TrainConfig(language="syn", task="mix", loras=["A", "B"], lr=3e-2, total_batch=8, epochs=4,
                      warmup_ratio=0.1, out_dir=str(tmp_path / "gates")).resolve(1, "cpu")
    flow.set_mode("flow")
    fit(cfg, DistInfo(0, 1, 0, torch.device("cpu")), flow, examples, [], pad_id=3)
    flow_loss = held_out_loss("flow")
    assert flow_loss < min(before.values()) - 0.5, (flow_loss, before)


# ---- bad input: a clear error and exit status 2 before any step ------------------------------------------------------

def _fails(world, tmp_path, capsys, *extra):
    code = cli.main(["train", *world.flags(tmp_path / "out", *extra)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not (tmp_path / "out").exists()  # nothing written: the error came before the first step
    return err


def test_malformed_and_empty_data_fail_with_file_and_line(world, tmp_path, capsys):
    lines = [{"id": 0, "query": "q", "response": "r"}, '{"id": 1, "query": "q", ', {"id": 2, "query": "q"}]
    bad = write_jsonl(tmp_path / "zh_math_train.jsonl", lines)
    assert f"{bad}:2: invalid JSON" in _fails(world, tmp_path, capsys, "--train-file", str(bad))
    write_jsonl(bad, [lines[0], {"id": 1, "query": "q", "response": "  "}])
    assert f"{bad}:2: field 'response' is empty" in _fails(world, tmp_path, capsys, "--train-file", str(bad))
    generic = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": "p", "response": "r"}, {"prompt": "p"}])
    assert f"{generic}:2: missing field 'response'" in _fails(world, tmp_path, capsys, "--train-file", str(generic))
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    assert "no records" in _fails(world, tmp_path, capsys, "--train-file", str(empty))
    missing = tmp_path / "nope.jsonl"
    assert f"{missing}: file not found" in _fails(world, tmp_path, capsys, "--train-file", str(missing))


def test_unknown_pair_and_impossible_batch_fail(world, tmp_path, capsys):
    err = _fails(world, tmp_path, capsys, "--total-batch", "4", "--language", "fr")
    assert "no fr_math_train data" in err and "zh_math_train" in err
    assert "total batch 4 cannot be split" in _fails(world, tmp_path, capsys, "--grad-accum", "3")


def test_lora_that_does_not_fit_the_base_fails_naming_the_key(world, tmp_path, capsys):
    tiny_lora(tiny_model("llama", hidden=32), tmp_path / "small_lora", r=4)
    err = _fails(world, tmp_path, capsys, "--loras", str(world.lora_root / "zh_lora"), str(tmp_path / "small_lora"))
    assert "LoRA small_lora: model.layers.0." in err and "has shape (4, 80), but the base module needs (4, 160)" in err


def test_original_schedule_stops_where_the_original_did(world, tmp_path):
    """--schedule original: int(E·N/B) + 1 steps with B = batch per device × processes (SPEC §2). 8 examples,
    batch 5, 3 epochs: 2 batches per epoch, int(24 / 5) + 1 = 5 steps, so the run stops after the first batch of
    epoch 3 and saves that epoch's gate there; the lr schedule is 5 steps long."""
    summary = train(world.config(tmp_path, total_batch=5, schedule="original"))
    run = tmp_path / "zh_math"
    config = json.loads((run / "config.json").read_text())
    assert summary["steps"] == 5 and config["schedule_steps"] == 5 and config["steps_per_epoch"] == 2
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]
    assert all((run / f"epoch_{e}" / "gate.safetensors").is_file() for e in (1, 2, 3))
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert [r["lr"] for r in rows] == pytest.approx([lr_at(s, 5e-2, 5, 0.2) for s in range(5)])
    loraflow_run = train(world.config(tmp_path / "ours", total_batch=5))
    assert loraflow_run["steps"] == 6  # every epoch sees every example


def test_dev_pass_runs_in_fp32_at_the_eval_temperature_and_restores(tiny_pair):
    """The dev metric generates as the original evaluated: a bf16 base cast to fp32 (the same Parameter objects,
    exactly the same values after), the gate temperature of evaluation, both restored after."""
    from loraflow.train.dev_metric import gate_temperature, running_in

    _, loras = tiny_pair
    flow = FlowModel.from_pretrained(tiny_model("llama", seed=0), loras, torch_dtype=torch.bfloat16)
    before = {n: (p, p.detach().clone()) for n, p in flow.named_parameters()}
    with running_in(flow, torch.float32), gate_temperature(flow, 1.1):
        assert {p.dtype for p in flow.parameters()} == {torch.float32}
        assert flow.temperature == 1.1
    assert flow.temperature == 1.0
    for name, (param, value) in before.items():
        now = dict(flow.named_parameters())[name]
        assert now is param and now.dtype == value.dtype and torch.equal(now, value), name
