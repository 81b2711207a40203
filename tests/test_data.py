"""The data layer: schemas and ids on the real release, exact prompt strings, loss masks, padding, prepare_data.sh."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraflow import cli
from loraflow.data import records as D
from loraflow.data.prompts import COT_SUFFIX, eval_prompt, training_texts
from loraflow.errors import LoraflowError
from loraflow.tiny import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
LANGS = ("zh", "ru", "es")
# (split, task) -> records per language; zh and es code dev list one MBPP problem twice (dropped as a repeat)
COUNTS = {("train", "math"): 200, ("train", "code"): 200, ("dev", "math"): 100, ("test", "math"): 250,
          ("test", "code"): 164, ("dev", "code"): {"zh": 19, "ru": 20, "es": 19}}


@pytest.fixture(scope="module")
def mgsm_src(shared_data) -> Path:
    """The folder of mgsm_{lang}.tsv (absent when the tests found only a prepared data/)."""
    if not (shared_data / "mgsm").is_dir():
        pytest.skip("no mgsm/ folder next to the LoRA-Flow data")
    return shared_data / "mgsm"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines),
                    encoding="utf-8")
    return path


# ---- the real files -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("split,task", list(COUNTS))
def test_release_files_validate_with_expected_counts(loraflow_data, split, task):
    for lang in LANGS:
        records = D.load_split(loraflow_data, lang, task, split)
        expected = COUNTS[split, task]
        assert records.kind == f"{split}-{task}"
        assert len(records) == (expected[lang] if isinstance(expected, dict) else expected)
        assert len({r["id"] for r in records}) == len(records)
        assert all(isinstance(r["id"], str) for r in records)


def test_ids_follow_the_contract(loraflow_data, mgsm_src):
    humaneval = D.load_split(loraflow_data, "zh", "code", "test")
    assert [r["id"] for r in humaneval] == [f"HumanEval/{i}" for i in range(164)]
    mgsm = D.read_mgsm_tsv(mgsm_src / "mgsm_en.tsv")
    assert [r["id"] for r in mgsm] == [str(i) for i in range(250)]
    assert mgsm[0]["answer"] == "18" and mgsm[0]["question"].startswith("Janet")
    assert [r["id"] for r in D.load_split(loraflow_data, "ru", "math", "test")][:3] == ["0", "1", "2"]
    first_train = json.loads((loraflow_data / "train" / "zh_math_train.jsonl").open().readline())
    assert D.load_split(loraflow_data, "zh", "math", "train")[0]["id"] == str(first_train["id"])
    mbpp = D.load_split(loraflow_data, "zh", "code", "dev")
    assert mbpp[0]["id"] == "555" and mbpp[0]["test_setup_code"] == "" and mbpp.notes  # line 7 repeats line 1


def test_record_io_by_kind(loraflow_data):
    code = D.load_split(loraflow_data, "es", "code", "train")
    assert D.record_io(code[0], code.kind) == (code[0]["data"][0].strip(), code[0]["data"][1].strip())
    math = D.load_split(loraflow_data, "zh", "math", "train")
    assert D.record_io(math[0], math.kind) == (math[0]["query"], math[0]["response"])
    assert D.record_io({"prompt": " p ", "response": "r\n"}, "generic") == ("p", "r")
    with pytest.raises(LoraflowError, match="no \\(input, output\\)"):
        D.record_io({"question": "q", "answer": "1"}, "test-math")


# ---- schema errors ------------------------------------------------------------------------------------------------

GOOD = {"train-math": {"id": 1, "query": "q", "response": "r"}, "train-code": {"id": "c0", "data": ["q", "a"]},
        "dev-code": {"task_id": 1, "text": "t", "code": "c", "test_list": ["assert 1"]},
        "test-code": {"task_id": "HumanEval/0", "prompt": "p", "entry_point": "f", "canonical_solution": "s",
                      "test": "t"}, "generic": {"prompt": "p", "response": "r"}}


@pytest.mark.parametrize("kind,line,message", [
    ("train-math", '{"id": 2, "query": "q"', "invalid JSON"),
    ("train-math", {"id": 2, "query": "q"}, "missing field 'response'"),
    ("train-math", {"id": 2, "query": "q", "response": "  \n"}, "field 'response' is empty"),
    ("train-math", {"id": 2.5, "query": "q", "response": "r"}, "field 'id' must be a string or integer"),
    ("train-code", {"id": "c1", "data": ["q", "a", "x"]}, "field 'data' must be a list of 2 strings"),
    ("train-code", {"id": "c1", "data": ["q", ""]}, "field 'data' is empty"),
    ("dev-code", {"task_id": 2, "text": "t", "code": "c", "test_list": "assert 1"}, "'test_list' must be a list"),
    ("dev-code", {"task_id": 2, "text": "t", "code": "c", "test_list": [], "test_setup_code": ""}, "'test_list' is"),
    ("test-code", {**GOOD["test-code"], "test": 3}, "field 'test' must be a string, got int"),
    ("test-code", {**GOOD["test-code"], "prompt": "other"}, "already used at line 1"),
    ("generic", [1, 2], "expected a JSON object"),
])
def test_schema_errors_name_file_line_and_field(tmp_path, kind, line, message):
    path = write(tmp_path / "bad.jsonl", [GOOD[kind], line])
    with pytest.raises(LoraflowError) as e:
        D.read_records(path, kind)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)


@pytest.mark.parametrize("text,line,message", [
    ("q1\t1\nq2 no tab\n", 2, "found 0 tabs"),
    ("q1\t1\n\nq3\t2\t3\n", 3, "found 2 tabs"),
    ("q1\t1\nq2\t\n", 2, "field 'answer' is empty"),
])
def test_mgsm_tsv_errors_name_file_line(tmp_path, text, line, message):
    path = tmp_path / "mgsm_xx.tsv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(LoraflowError, match=f"^{path}:{line}: .*{message}"):
        D.read_records(path)


def test_kind_inference_and_unknown_names(tmp_path):
    assert D.infer_kind("x/zh_math_train.jsonl") == "train-math"
    assert D.infer_kind("pt-br_code_test.jsonl") == "test-code"
    assert D.infer_kind("mgsm_de.tsv") == "test-math"
    with pytest.raises(LoraflowError, match="pass a kind: train-math, .*generic"):
        D.infer_kind("my_data.jsonl")
    with pytest.raises(LoraflowError, match="unknown record kind 'chat'"):
        D.read_records(write(tmp_path / "a.jsonl", [{"prompt": "p", "response": "r"}]), "chat")


def test_missing_split_lists_what_exists(tmp_path):
    write(tmp_path / "test" / "en_math_test.jsonl", [{"question": "q", "answer": "1"}])
    (tmp_path / "system_prompts.json").write_text('{"en_math": "be brief"}')
    assert D.load_split(tmp_path, "en", "math", "test")[0] == {"question": "q", "answer": "1", "id": "0"}
    assert D.load_system_prompts(tmp_path) == {"en_math": "be brief"}
    with pytest.raises(LoraflowError, match="no de_math_test data.*there is: en_math_test"):
        D.load_split(tmp_path, "de", "math", "test")
    with pytest.raises(LoraflowError, match="unknown split 'valid'"):
        D.load_split(tmp_path, "en", "math", "valid")
    (tmp_path / "system_prompts.json").write_text('{"en_math": ""}')
    with pytest.raises(LoraflowError, match="'en_math' must be a non-empty string"):
        D.load_system_prompts(tmp_path)


# ---- prompts: exact strings -----------------------------------------------------------------------------------------

def test_training_prompt_is_the_spec_string(loraflow_data):
    system = D.load_system_prompts(loraflow_data)["zh_math"]
    record = D.load_split(loraflow_data, "zh", "math", "train")[0]
    prompt, response = training_texts(system, *D.record_io(record, "train-math"))
    assert prompt == "<s>[INST] <<SYS>>\n" + system + "\n<</SYS>>\n\n" + record["query"] + " [/INST]"
    assert response == record["response"] + " </s>"
    faithful, _ = training_texts(system, *D.record_io(record, "train-math"), cot_suffix=True)
    assert faithful == prompt + "让我们一步一步地思考。" and COT_SUFFIX == "让我们一步一步地思考。"


def test_chat_template_style_uses_the_tokenizer(tok):
    prompt, response = training_texts("S", "U", "R", style="chat-template", tokenizer=tok)
    assert prompt == tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                                             tokenize=False, add_generation_prompt=True)
    assert response == "R</s>"
    with pytest.raises(LoraflowError, match="unknown prompt style"):
        training_texts("S", "U", "R", style="alpaca")


def test_eval_prompts_are_the_original_strings(loraflow_data):
    prompts = D.load_system_prompts(loraflow_data)
    mgsm = D.load_split(loraflow_data, "zh", "math", "test")[0]
    assert eval_prompt(mgsm, "math", "test", "zh", system_prompts=prompts) == (
        "[INST] <<SYS>>\n" + prompts["zh_math"] + "\n<</SYS>>\n\n" + mgsm["question"] + " [/INST]")
    dev = D.load_split(loraflow_data, "es", "math", "dev")[0]
    assert eval_prompt(dev, "math", "dev", "es", system_prompts=prompts).endswith(dev["question"] + " [/INST]")
    for lang in LANGS:  # the HumanEval instruction is the release's code system prompt
        he = D.load_split(loraflow_data, lang, "code", "test")[0]
        body = he["prompt"].strip().replace("    ", "\t")
        expected = "[INST]" + prompts[f"{lang}_code"] + ":\n" + body + "\n\n[/INST]"
        assert eval_prompt(he, "code", "test", lang) == expected
    he = {r["id"]: r for r in D.load_split(loraflow_data, "ru", "code", "test")}["HumanEval/0"]
    ru = eval_prompt(he, "code", "test", "ru")
    assert ru.startswith("[INST]Создайте Python скрипт для этой задачи.:\nиз typing импортировать List\n\n\ndef ")
    assert '\t"""' in ru and "    " not in ru and ru.endswith('\t"""\n\n[/INST]')
    mbpp = D.load_split(loraflow_data, "ru", "code", "dev")[0]
    assert eval_prompt(mbpp, "code", "dev", "ru") == ('"""[INST]Создайте Python скрипт для этой задачи: ' + mbpp["text"]
                                                    + "[/INST]\n" + "\n".join(mbpp["test_list"]) + '"""')


def test_eval_prompts_for_other_languages():
    q = {"question": "2+2?", "answer": "4"}
    assert "You are an English AI assistant" in eval_prompt(q, "math", "test", "en", system_prompts={})
    assert eval_prompt(q, "math", "test", "de", system="Sei kurz.").startswith("[INST] <<SYS>>\nSei kurz.\n")
    with pytest.raises(LoraflowError, match="no system prompt for 'de_math'"):
        eval_prompt(q, "math", "test", "de", system_prompts={"zh_math": "x"})
    he = {"prompt": "def f():\n    pass\n"}
    assert eval_prompt(he, "code", "test", "en") == (
        "[INST]Create a Python script for this problem:\ndef f():\n\tpass\n\n[/INST]")
    with pytest.raises(LoraflowError, match="no humaneval instruction for language 'de'"):
        eval_prompt(he, "code", "test", "de")
    with pytest.raises(LoraflowError, match="a mbpp prompt needs field 'text'"):
        eval_prompt(he, "code", "dev", "en")


# ---- tokenisation, loss mask, collation -------------------------------------------------------------------------

def test_loss_mask_covers_exactly_the_prompt(tok):
    prompt, response = training_texts("系统", "问题", "回答 42")
    ex = D.encode_example(tok, prompt, response, max_len=4096)
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == p + r
    assert ex["labels"] == [D.IGNORE_INDEX] * len(p) + r
    assert ex["input_ids"].count(tok.bos_token_id) == 1 and ex["input_ids"][0] == tok.bos_token_id
    assert ex["labels"][-1] == tok.eos_token_id and tok.decode(r) == "回答 42 </s>"


def test_truncation_keeps_bos_and_the_whole_response(tok):
    prompt, response = "<s>" + "p" * 50, "answer</s>"
    ex = D.encode_example(tok, prompt, response, max_len=20)
    assert len(ex["input_ids"]) == 20 and ex["input_ids"][0] == tok.bos_token_id
    assert tok.decode(ex["input_ids"][1:]) == "p" * 12 + "answer</s>"  # 1 + 12 + 7 tokens
    assert ex["labels"] == [D.IGNORE_INDEX] * 13 + ex["input_ids"][13:]
    long = D.encode_example(tok, prompt, "r" * 30 + "</s>", max_len=20)  # the response alone does not fit
    assert long["input_ids"] == [tok.bos_token_id] + tok("r" * 19)["input_ids"]
    assert long["labels"] == [D.IGNORE_INDEX] + long["input_ids"][1:]


def test_training_example_end_to_end_and_eos_check(loraflow_data, tok):
    record = D.load_split(loraflow_data, "ru", "code", "train")[0]
    ex = D.training_example(tok, record, "train-code", "sys")
    n_prompt = ex["labels"].count(D.IGNORE_INDEX)
    assert tok.decode(ex["input_ids"][:n_prompt]).endswith(" [/INST]")
    assert tok.decode(ex["labels"][n_prompt:]) == record["data"][1].strip() + " </s>"
    chat = D.training_example(tok, record, "train-code", "sys", style="chat-template", cot_suffix=True)
    assert tok.decode(chat["input_ids"]).startswith("<<SYS>>\nsys\n") and chat["labels"][-1] == tok.eos_token_id
    other = tiny_tokenizer()
    other.eos_token = "<pad>"  # a tokenizer whose eos is not `</s>`: llama2-chat's ` </s>` is not its eos
    with pytest.raises(LoraflowError, match="use style 'chat-template'"):
        D.training_example(other, record, "train-code", "sys")


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate_pads_per_batch(side):
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = D.collate(batch, pad_id=3, padding_side=side)
    assert out["input_ids"].shape == (2, 3) and out["input_ids"].dtype == torch.long
    if side == "left":
        assert out["input_ids"][1].tolist() == [3, 3, 8] and out["attention_mask"][1].tolist() == [0, 0, 1]
        assert out["labels"][1].tolist() == [-100, -100, 8] and out["position_ids"][1].tolist() == [0, 0, 0]
    else:
        assert out["input_ids"][1].tolist() == [8, 3, 3] and out["attention_mask"][1].tolist() == [1, 0, 0]
        assert out["labels"][1].tolist() == [8, -100, -100]
    assert out["input_ids"][0].tolist() == [5, 6, 7] and out["position_ids"][0].tolist() == [0, 1, 2]
    assert D.collate(batch, 3, side, pad_to_multiple_of=8)["input_ids"].shape == (2, 8)


# ---- loraflow data check / scripts/prepare_data.sh ---------------------------------------------------------------

def test_data_check_command(loraflow_data, tmp_path, capsys):
    assert cli.main(["data", "check", str(loraflow_data / "test" / "es_code_test.jsonl")]) == 0
    assert "test-code, 164 records, OK" in capsys.readouterr().out
    bad = write(tmp_path / "zh_math_dev.jsonl", [{"question": "q", "answer": "a"}, {"question": "q"}])
    assert cli.main(["data", "check", str(bad)]) == 2
    assert f"error: {bad}:2: missing field 'answer'" in capsys.readouterr().err
    assert cli.main(["data", "check", str(bad), "--kind", "generic"]) == 2
    assert "missing field 'prompt'" in capsys.readouterr().err


def prepare(out: Path, src: Path, mgsm: Path, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "DATA_SRC": str(src), "MGSM_SRC": str(mgsm), "OUT": str(out),
           **env}
    return subprocess.run(["bash", str(ROOT / "scripts" / "prepare_data.sh")], env=env, capture_output=True,
                          text=True, timeout=120)


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_prepare_data_builds_a_valid_tree_and_reruns(loraflow_data, mgsm_src, tmp_path):
    out = tmp_path / "data"
    first = prepare(out, loraflow_data, mgsm_src)
    assert first.returncode == 0, first.stderr
    assert "+ " in first.stderr and "data prepare" in first.stderr  # the command is echoed
    assert len(digests(out)) == 20 and (out / "test" / "en_math_test.jsonl").is_file()
    assert [r["id"] for r in D.read_records(out / "test" / "en_math_test.jsonl")][-1] == "249"
    for path in (loraflow_data / "train").iterdir():  # the release's files are copied byte for byte
        assert (out / "train" / path.name).read_bytes() == path.read_bytes()
    assert "test/en_math_test.jsonl    test-math         250  converted" in first.stdout
    again = prepare(out, loraflow_data, mgsm_src)
    assert again.returncode == 0 and again.stdout.count("unchanged") == 20
    assert cli.main(["data", "check", str(out)]) == 0


@pytest.mark.parametrize("damage,line,message", [
    (lambda lines: lines[:4] + ['{"id": 1, "query": "broken'] + lines[5:], 5, "invalid JSON"),
    (lambda lines: lines[:9] + [json.dumps({"id": 1, "query": "q"})] + lines[10:], 10, "missing field 'response'"),
])
def test_prepare_data_refuses_a_corrupted_source_and_keeps_the_output(loraflow_data, mgsm_src, tmp_path,
                                                                      damage, line, message):
    src, out = tmp_path / "src", tmp_path / "data"
    shutil.copytree(loraflow_data, src)
    assert prepare(out, src, mgsm_src).returncode == 0
    before = digests(out)
    bad = src / "train" / "es_math_train.jsonl"
    bad.write_text("\n".join(damage(bad.read_text(encoding="utf-8").split("\n"))), encoding="utf-8")
    result = prepare(out, src, mgsm_src, FORCE="1")
    assert result.returncode != 0 and f"{bad}:{line}: {message}" in result.stderr
    assert digests(out) == before


def test_prepare_data_never_clobbers_a_different_file(loraflow_data, mgsm_src, tmp_path):
    out = tmp_path / "data"
    target = out / "dev" / "zh_math_dev.jsonl"
    write(target, [{"question": "mine", "answer": "1"}])
    result = prepare(out, loraflow_data, mgsm_src)
    assert result.returncode != 0 and str(target) in result.stderr and "FORCE=1" in result.stderr
    assert not (out / "train").exists() and D.read_records(target)[0]["question"] == "mine"
    forced = prepare(out, loraflow_data, mgsm_src, FORCE="1")
    assert forced.returncode == 0 and "overwritten" in forced.stdout and len(D.read_records(target)) == 100


def test_prepare_data_download_failure_is_explained(tmp_path):
    env = {"DATA_SRC": "", "MGSM_LANGS": "", "LORAFLOW_REPO": str(tmp_path / "no-such-repo")}
    result = prepare(tmp_path / "data", Path(), Path(), **env)
    assert result.returncode != 0 and "could not download" in result.stderr and "DATA_SRC=" in result.stderr
    assert not (tmp_path / "data").exists()


def test_kinds_table_is_documented():
    assert set(D.KINDS) == {"train-math", "train-code", "dev-math", "dev-code", "test-math", "test-code", "generic"}
    assert all(k.doc for k in D.KINDS.values())
