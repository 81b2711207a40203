"""One flag per concept across commands: `--base-model`, `--out-dir`, `--dtype`, `--device` mean the same in every
command; the old spellings the scripts or the README used still parse (hidden from --help) for one release."""

from __future__ import annotations

import argparse
import importlib

import pytest

from loraflow.cli import COMMANDS
from loraflow.devices import canonical_dtype, check_device, resolve_dtype
from loraflow.errors import LoraflowError


def parser_of(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"loraflow {command}")
    importlib.import_module(COMMANDS[command][0]).add_arguments(p)
    return p


def help_of(command: str, *sub: str) -> str:
    p = parser_of(command)
    for name in sub:
        p = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return p.format_help()


EVAL = ["--task", "math", "--language", "zh", "--method", "base"]
PLOT = ["--loras", "a", "--gate", "g", "--prompt", "x"]
# command, arguments before the flag, new spelling, old spelling, value, attribute it sets
ALIASES = [
    ("eval", EVAL, "--base-model", "--base", "m", "base_model"),
    ("plot-gates", PLOT, "--base-model", "--base", "m", "base"),
    ("plot-gates", PLOT + ["--base-model", "m"], "--out-dir", "--out", "o", "out"),
    ("demo", [], "--out-dir", "--out", "o", "out"),
    ("data", ["prepare", "--src", "s"], "--out-dir", "--out", "o", "out"),
    ("eval", EVAL, "--dtype", "--precision", "bfloat16", "dtype"),
    ("plot-gates", PLOT, "--dtype", "--precision", "float16", "dtype"),
    ("train", ["--language", "zh", "--task", "math"], "--dtype", "--precision", "bfloat16", "dtype"),
]


@pytest.mark.parametrize("command,before,new,old,value,dest", ALIASES, ids=[f"{a[0]} {a[3]}" for a in ALIASES])
def test_old_spellings_are_hidden_aliases_of_the_new_ones(command, before, new, old, value, dest):
    p = parser_of(command)
    assert getattr(p.parse_args([*before, new, value]), dest) == value
    assert getattr(p.parse_args([*before, old, value]), dest) == value
    text = help_of(command, *(before[:1] if command == "data" else ()))
    assert new in text and f"{old} " not in text.replace(new, "")


def test_old_precision_values_mean_the_dtypes():
    """`--precision bf16` (train's old flag and values) is `--dtype bfloat16`, in flags and in --config files."""
    from loraflow.train.config import TrainConfig, config_from_args

    args = parser_of("train").parse_args(["--language", "zh", "--task", "math", "--precision", "bf16"])
    assert config_from_args(args).dtype == "bfloat16"
    assert TrainConfig(language="zh", task="math", prompt_style="llama2-chat").prompt_style == "faithful"
    assert {canonical_dtype(a) for a in ("fp32", "float32")} == {"float32"}
    with pytest.raises(LoraflowError, match="dtype 'fp8'"):
        canonical_dtype("fp8")


def test_old_config_files_still_read(tmp_path):
    from loraflow.train.config import config_from_args

    path = tmp_path / "run.json"
    path.write_text('{"language": "zh", "task": "math", "precision": "fp32", "prompt_style": "llama2-chat"}')
    cfg = config_from_args(argparse.Namespace(config=str(path)))
    assert (cfg.dtype, cfg.prompt_style) == ("float32", "faithful")


def test_device_and_dtype_mean_the_same_everywhere():
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        assert check_device(device) == device
    for bad in ("gpu", "cuda:x", "cpu:0"):
        with pytest.raises(LoraflowError, match=f"device '{bad}'"):
            check_device(bad)
    assert resolve_dtype("auto", "cuda:0") == "bfloat16" and resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("fp16", "cpu") == "float16"
    for command in ("eval", "plot-gates", "train"):
        text = help_of(command)
        assert "--device" in text and "--dtype" in text, command
    assert "cuda:N" in help_of("eval") and "cuda:N" in help_of("train") and "cuda:N" in help_of("plot-gates")


def test_a_missing_base_model_is_a_clear_error(capsys):
    from loraflow.cli import main

    assert main(["eval", *EVAL]) == 2
    assert "--base-model is required" in capsys.readouterr().err
