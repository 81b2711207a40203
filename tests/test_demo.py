"""The embedded demo (loraflow/demo) and the gate-weight plots (loraflow/plots.py, `loraflow plot-gates`)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraflow.cli import main
from loraflow.demo.pipeline import LORA_NAMES, METHOD_LABELS, METHODS, DemoConfig
from loraflow.demo.training import LoopConfig, base_config, encode, pretrain_base, world_tokenizer
from loraflow.demo.world import ADD_VERBS, World, dataset
from loraflow.errors import LoraflowError

# ------------------------------------------------------------------------------------------------------ the world


def test_world_is_a_function_of_its_seed():
    a, b, c = World(0), World(0), World(1)
    assert a.lexicon == b.lexicon and a.lexicon != c.lexicon
    assert dataset(a, "math-xx", 5, seed=3) == dataset(b, "math-xx", 5, seed=3)
    assert len(set(a.lexicon.values())) == len(a.lexicon)  # a bijection: L is translatable back


def test_tokenizer_round_trips_every_kind_of_text():
    world = World(0)
    tok = world_tokenizer(world.vocabulary())
    for kind in ("plain-en", "plain-xx", "parallel", "chat-xx", "math-en", "math-xx"):
        for ex in dataset(world, kind, 20, seed=7):
            for text in (ex.get("text"), ex.get("prompt"), ex.get("response")):
                if text is None:
                    continue
                ids = tok(text, add_special_tokens=False)["input_ids"]
                assert tok.unk_token_id not in ids, text
                assert tok.decode(ids) == text


def test_chat_examples_use_the_chat_template_and_train_on_the_response_only():
    world = World(0)
    tok = world_tokenizer(world.vocabulary())
    ex = dataset(world, "math-xx", 1, seed=0)[0]
    enc = encode(tok, ex, 512)
    prompt_len = enc["labels"].count(-100)
    assert tok.decode(enc["input_ids"][:prompt_len]) == f"<s> [INST] {ex['prompt']} [/INST]"
    assert tok.decode(enc["labels"][prompt_len:]) == f"{ex['response']} </s>"


def test_composite_answers_need_both_skills_and_end_with_the_answer():
    """An L question writes its numbers as L words only (digits appear nowhere in it), so it is understood through
    L; the L answer holds L words (the language skill) and the equations in digits (the task skill), and ends with
    L's answer phrase and the answer as an L number word, which is what the composite scorer reads."""
    world = World(0)
    for ex in dataset(world, "math-xx", 50, seed=0):
        assert not any(w.isdigit() for w in ex["prompt"].split())
        words = ex["response"].split()
        assert any(world.language_of(w) == "xx" for w in words)
        assert not any(world.language_of(w) == "en" for w in words)
        assert "=" in words and ("+" in words or "-" in words)
        phrase = world.answer_phrase["xx"].split()  # L is verb-final: "<the> <answer> N <is> ."
        assert words[-3 - len(phrase):-3] == phrase and words[-3] == world.numerals[str(ex["answer"])]
        assert world.l_answer(ex["response"]) == ex["answer"]
        assert world.l_answer(f"the answer is {ex['answer']} .") is None  # a digit answer is no L answer
    en = dataset(world, "math-en", 1, seed=0)[0]
    assert en["response"].endswith(f"the answer is {en['answer']} .")


def test_l_answer_reads_the_last_l_number_word():
    world = World(0)
    three, five = world.numerals["3"], world.numerals["5"]
    assert world.l_answer(f"{three} + 2 = 5 . {five}") == 5
    assert world.l_answer(f"{five} 2 = 3 . {three} .") == 3
    assert world.l_answer("2 + 3 = 5 .") is None
    assert world.language_of(three) == "xx" and world.language_of("3") is None


def test_problems_are_consistent():
    world = World(0)
    rng = random.Random(0)
    for _ in range(200):
        p = world.sample_problem(rng)
        value = p.start
        for verb, n in p.steps:
            value += n if verb in ADD_VERBS else -n
            assert 0 <= value <= 20
        assert value == p.answer


def test_composite_answer_tokens_each_come_from_one_skill():
    """The English solution is the equations and "the answer is N"; the L solution is the same equations and L's
    answer phrase with the L number word: no L word outside the answer phrase, no digit outside the equations."""
    world = World(0)
    rng = random.Random(0)
    for _ in range(20):
        p = world.sample_problem(rng)
        equations = [w for eq in p.equations for w in (*eq.words(), ".")]
        en = world.realize(world.solution(p), "en").split()
        xx = world.realize(world.solution(p), "xx").split()
        assert en == [*equations, "the", "answer", "is", str(p.answer), "."]
        assert xx[:len(equations)] == equations
        tail = xx[len(equations):-1]
        assert all(world.language_of(w) == "xx" for w in tail) and world.numerals[str(p.answer)] in tail
        assert world.l_answer(" ".join(xx)) == p.answer


def test_pretrained_base_reads_l_words_with_their_english_words_vectors():
    """`shared_inputs`: each L word's input embedding is its English word's from start to end of the pretraining
    (the rows stay bit-identical), while the output embeddings are trained apart, so the base still writes either."""
    world = World(0)
    tok = world_tokenizer(world.vocabulary())
    vocab = tok.get_vocab()
    pairs = [(vocab[en], vocab[xx]) for en, xx in world.translation_pairs()]
    corpus = dataset(world, "plain-en", 16, seed=0) + dataset(world, "plain-xx", 16, seed=0)
    config = base_config(len(tok), 32, 1, 2)
    model, losses = pretrain_base(config, corpus, tok, LoopConfig(6, 8, 3e-3, seed=0), shared_inputs=pairs)
    first, second = (torch.tensor(ids) for ids in zip(*pairs))
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert torch.equal(emb[first], emb[second])
    assert not torch.equal(out[first], out[second])
    plain, _ = pretrain_base(config, corpus, tok, LoopConfig(6, 8, 3e-3, seed=0))
    assert not torch.equal(plain.get_input_embeddings().weight[first], plain.get_input_embeddings().weight[second])
    assert not torch.equal(plain.get_input_embeddings().weight, emb)  # the tie changed what was trained
    assert len(losses) == 6


def test_demo_config_refuses_bad_values():
    with pytest.raises(LoraflowError, match="demo size"):
        DemoConfig.of_size("huge")
    with pytest.raises(LoraflowError, match="hidden"):
        DemoConfig(hidden=30, heads=4)


# ---------------------------------------------------------------------------------------------- the small demo


ROOT = Path(__file__).resolve().parents[1]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    """`DEMO_SIZE=small bash scripts/demo.sh` in a fresh git repository holding this checkout's files (tracked
    and untracked, not ignored), with this interpreter (SETUP=0: no venv); returns (clone, its output folder)."""
    clone = tmp_path_factory.mktemp("demo") / "clone"
    files = _git(ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    _git(clone, "init", "-q")
    _git(clone, "add", "-A")
    _git(clone, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "snapshot")
    env = {**os.environ, "SETUP": "0", "PYTHON": sys.executable, "DEMO_SIZE": "small", "PYTHONPATH": ""}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", "scripts/demo.sh"], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return clone, clone / "outputs" / "demo-small", proc


@pytest.mark.slow
def test_small_demo_leaves_the_checkout_clean(small_demo):
    """The run writes under its output folder (ignored by git) only: no tracked file changes, nothing new."""
    clone, root, _ = small_demo
    assert _git(clone, "status", "--porcelain", "--untracked-files=all") == ""
    assert (root / "seed-0" / "report" / "gate_heatmap.png").is_file()  # drawn, into the output folder


@pytest.mark.slow
def test_small_demo_end_to_end_table_and_files(small_demo):
    _, root, proc = small_demo
    assert "OMP_NUM_THREADS=1 " in proc.stderr  # demo.sh's default
    out = root / "seed-0"
    results = json.loads((out / "report" / "results.json").read_text())
    assert set(results["results"]) == set(METHODS)
    for method in METHODS:
        r = results["results"][method]
        assert 0 <= r["composite_accuracy"] <= 1 and 0 <= r["english_accuracy"] <= 1
        for lang in ("xx", "en"):  # loraflow score's outputs (xx: rescored by the L answer), one line per item
            scored = [json.loads(s) for s in
                      (out / f"eval_{method}" / lang / "predictions.scored.jsonl").read_text().splitlines()]
            assert len(scored) == (16 if lang == "xx" else 8) and all("correct" in s for s in scored)
        assert r["composite_accuracy"] == sum(s["correct"] for s in scored_xx(out, method)) / 16
    for png in (out / "report" / "gate_heatmap.png", out / "report" / "gate_layers.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (root / "seed-1" / "report" / "gate_heatmap.png").exists()  # plots: the first seed only
    gate = json.loads((out / "gate" / "gate.json").read_text())
    assert gate["lora_names"] == list(LORA_NAMES)
    assert (out / "gate" / "gate" / "summary.json").is_file()  # the `loraflow train` run itself
    weights = json.loads((out / "lorahub" / "weights.json").read_text())
    assert len(weights["weights"]) == 2 and len(weights["history"]) == DemoConfig.of_size("small").lorahub_budget
    mean = results["mean_gate_weight_per_layer"]
    assert set(mean) == set(LORA_NAMES) and all(len(v) == 2 for v in mean.values())
    assert json.loads((root / "seed-1" / "data" / "world.json").read_text())["seed"] == 1  # its own world


def scored_xx(out: Path, method: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"eval_{method}" / "xx" / "predictions.scored.jsonl").open()]


@pytest.mark.slow
def test_small_demo_report_over_seeds_is_made_from_the_numbers(small_demo):
    """report/: a table of mean ± sd per method over the 2 seeds, each seed's composite accuracy, and a claim
    sentence that `claim_of` writes from the seeds' own results files (not text written by hand)."""
    from loraflow.demo.seeds import COLUMNS, claim_of, format_table

    _, root, proc = small_demo
    report = json.loads((root / "report" / "results.json").read_text())
    assert report["seeds"] == [0, 1]
    per_seed = {s: json.loads((root / f"seed-{s}" / "report" / "results.json").read_text())["results"]
                for s in (0, 1)}
    assert report["per_seed"] == {str(s): r for s, r in per_seed.items()}
    table = (root / "report" / "table.md").read_text()
    assert table == format_table(per_seed)
    lines = table.splitlines()
    assert lines[0] == "| Method | " + " | ".join(t for _, t, _ in COLUMNS) + " |"
    for line, method in zip(lines[2:2 + len(METHODS)], METHODS):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == METHOD_LABELS[method]
        values = [100 * per_seed[s][method]["composite_accuracy"] for s in (0, 1)]
        mean, sd = cells[1].split(" ± ")
        assert float(mean) == pytest.approx(sum(values) / 2, abs=0.051)
        assert float(sd) == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5, abs=0.051)
    claim = claim_of(per_seed)
    assert report["claim"]["sentence"] == claim["sentence"] == (root / "report" / "claim.txt").read_text().strip()
    assert claim["sentence"] in proc.stdout


def _results(flow: list[float], rival: list[float]) -> dict[int, dict[str, dict]]:
    """Per-seed results where every method but LoRA-Flow scores `rival[s]` (task LoRA) or 0."""
    out = {}
    for s, (f, r) in enumerate(zip(flow, rival)):
        out[s] = {m: {"composite_accuracy": 0.0} for m in METHODS}
        out[s]["flow"]["composite_accuracy"], out[s]["task"]["composite_accuracy"] = f, r
    return out


def test_claim_sentence_follows_the_numbers():
    from loraflow.demo.seeds import claim_of

    holds = claim_of(_results([0.40, 0.42, 0.38], [0.20, 0.22, 0.21]))
    assert holds["holds"] and holds["sentence"].startswith("LoRA-Flow beats every other method")
    assert "by 17.0 points at least and 19.0 on average" in holds["sentence"]
    lost = claim_of(_results([0.40, 0.20, 0.38], [0.20, 0.25, 0.21]))
    assert not lost["holds"] and "seed 1: Single LoRA: task 25.0 against LoRA-Flow 20.0" in lost["sentence"]
    # every seed won, but by less than the seeds spread: not a clear margin
    close = claim_of(_results([0.30, 0.60, 0.31], [0.29, 0.58, 0.30]))
    assert not close["holds"] and "is not larger than the largest spread" in close["sentence"]


@pytest.mark.slow
def test_small_demo_rerun_skips_every_finished_stage(small_demo, capsys, monkeypatch, tmp_path):
    """A rerun in-process, one seed after the other, with another OMP_NUM_THREADS: every stage is cached, the
    report is the same; and --update-assets is the one way to write the heatmap outside the output folder."""
    _, root, _ = small_demo
    before = (root / "report" / "table.md").read_text()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert main(["demo", "--size", "small", "--out-dir", str(root), "--jobs", "1",
                 "--update-assets", str(tmp_path / "assets")]) == 0
    assert torch.get_num_threads() == 1  # the demo fixed its own thread count
    printed = capsys.readouterr().out
    assert printed.count("done already") == 2 * (6 + len(METHODS))
    assert (root / "report" / "table.md").read_text() == before
    asset = tmp_path / "assets" / "demo_gate_heatmap.png"
    assert asset.read_bytes() == (root / "seed-0" / "report" / "gate_heatmap.png").read_bytes()


# ------------------------------------------------------------------------------------------------------- plots


@pytest.fixture(scope="module")
def tiny_flow_files(tiny_pair, tmp_path_factory):
    """The tiny pair plus a gate with non-trivial weights and a tokenizer saved beside the base."""
    from loraflow import FlowModel
    from loraflow.tiny import tiny_tokenizer

    base, loras = tiny_pair
    root = tmp_path_factory.mktemp("plots")
    tok_dir = root / "tok"
    tiny_tokenizer().save_pretrained(str(tok_dir))
    flow = FlowModel.from_pretrained(str(base), loras=[str(p) for p in loras])
    torch.manual_seed(0)
    with torch.no_grad():
        for p in flow.gate_parameters():
            p.normal_(0, 1.0)
    flow.save_gate(root / "gate")
    return base, loras, root / "gate", tok_dir, flow


def test_teacher_forced_weights_are_the_ones_that_generated_the_tokens(tiny_flow_files):
    """Column j of the heatmap = the gate weights while predicting token j, the same whether recorded during
    generation or by one forward pass over prompt + generation."""
    from loraflow.plots import record_generation, record_teacher_forced
    from loraflow.tiny import tiny_tokenizer

    *_, flow = tiny_flow_files
    tok = tiny_tokenizer()
    w_gen, tokens, ids = record_generation(flow, tok, "abc", max_new_tokens=6, return_ids=True)
    w_tf, tokens_tf = record_teacher_forced(flow, tok, "abc", ids)
    assert tokens_tf == tokens and w_gen.shape == w_tf.shape == (flow.num_layers, len(tokens), flow.k)
    torch.testing.assert_close(w_gen, w_tf, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(w_gen[:, 0], w_gen[:, -1])  # the weights change from token to token


@pytest.mark.slow
def test_plot_gates_command_prompt_and_predictions(tiny_flow_files, tmp_path):
    base, loras, gate, tok_dir, _ = tiny_flow_files
    common = ["plot-gates", "--base-model", str(base), "--loras", *map(str, loras), "--gate", str(gate),
              "--tokenizer", str(tok_dir)]
    assert main([*common, "--prompt", "hello", "--max-new-tokens", "5", "--out-dir", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "gate_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    preds = tmp_path / "predictions.jsonl"
    preds.write_text("".join(json.dumps({"id": str(i), "prompt": f"q{i}", "generation": f" answer {i}"}) + "\n"
                             for i in range(3)))
    assert main([*common, "--predictions", str(preds), "--item", "1", "--out-dir", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "gate_heatmap.png").is_file() and (tmp_path / "b" / "gate_layers.png").is_file()
    assert main([*common, "--predictions", str(preds), "--item", "7", "--out-dir", str(tmp_path / "c")]) == 2


def test_plot_gates_without_matplotlib_is_a_clear_error(monkeypatch, tiny_flow_files, capsys, tmp_path):
    base, loras, gate, tok_dir, _ = tiny_flow_files
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    code = main(["plot-gates", "--base-model", str(base), "--loras", *map(str, loras), "--gate", str(gate),
                 "--prompt", "x", "--out-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "loraflow[plot]" in err


def test_heatmap_refuses_mismatched_labels(tmp_path):
    from loraflow.plots import gate_heatmap

    with pytest.raises(LoraflowError, match="3 tokens"):
        gate_heatmap(torch.rand(2, 4, 2), ["a", "b", "c"], ["x", "y"], tmp_path / "h.png")


# ------------------------------------------------------------------------------------- scripts/eval.sh on the demo


def _eval_sh(clone: Path, out: Path, tmp_path: Path, method: str = "flow", **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "BASE_MODEL": str(out / "base"), "LORA_ROOT": str(out),
           "LANG_LORA": "lang_lora", "TASK_LORA": "task_lora", "DATA_ROOT": str(out / "data"),
           "OUT_DIR": str(tmp_path / "eval"), "PROMPT_STYLE": "chat-template", "MAX_NEW_TOKENS": "40",
           "LIMIT": "4", "METHOD": method, **env}
    gate = str(out / "gate" / "gate.safetensors") if method == "flow" else "-"
    return subprocess.run(["bash", str(clone / "scripts" / "eval.sh"), "0", "0", "xx", "math", gate], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_eval_sh_evaluates_the_small_demos_gate(small_demo, tmp_path):
    """The README's command: the demo's own gate, base and LoRAs (names under LORA_ROOT) through scripts/eval.sh."""
    clone, root, _ = small_demo
    out = root / "seed-0"
    proc = _eval_sh(clone, out, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"--lang-lora {out / 'lang_lora'} --task-lora {out / 'task_lora'}" in proc.stderr
    results = json.loads((tmp_path / "eval" / "mgsm_xx" / "flow" / "results.json").read_text())
    assert results["counts"]["scored"] == 4 and 0 <= results["metrics"]["accuracy"] <= 1
    assert results["config"]["loras"] == [str(out / "lang_lora"), str(out / "task_lora")]


@pytest.mark.slow
def test_eval_sh_renamed_loras_need_no_check_lora_names(small_demo, tmp_path):
    """Copies under other names (LANG_LORA / TASK_LORA as paths): the gate names lang_lora, task_lora, so loading
    it is refused with a one-line error, unless CHECK_LORA_NAMES=0 (`--no-check-lora-names`)."""
    clone, root, _ = small_demo
    out = root / "seed-0"
    for src, dst in (("lang_lora", "xx_lora"), ("task_lora", "math_lora")):
        shutil.copytree(out / src, tmp_path / "copies" / dst)
    paths = {"LANG_LORA": str(tmp_path / "copies" / "xx_lora"), "TASK_LORA": str(tmp_path / "copies" / "math_lora")}
    refused = _eval_sh(clone, out, tmp_path, **paths)
    assert refused.returncode == 2
    assert "trained on LoRAs ['lang_lora', 'task_lora']" in refused.stderr.strip().splitlines()[-1]
    proc = _eval_sh(clone, out, tmp_path, CHECK_LORA_NAMES="0", **paths)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--no-check-lora-names" in proc.stderr
    assert (tmp_path / "eval" / "mgsm_xx" / "flow" / "results.json").is_file()
