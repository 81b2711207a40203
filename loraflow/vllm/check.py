"""Run LoRA-Flow model folders in vLLM and compare them with `FlowModel.generate` (greedy token ids).

  python -m loraflow.vllm.check run --model OUT [--model OUT2 ...] --prompts prompts.json --out result.json
  python -m loraflow.vllm.check selftest [--tensor-parallel-size 2] [--dtype float32] [--compile]

`run`: one engine per folder, in turn, in this process; prompts.json is a list of token-id lists (or strings); the
result maps each folder to `[{"token_ids": [...], "logprob": first token's logprob}]` per prompt.
`selftest`: builds a tiny Llama (head_dim 32) with LoRAs of ranks 4 and 8 (dropout 0.1) and an original-format fp16
gate, exports it in flow mode (T = 1.1), and checks vLLM's greedy tokens against FlowModel's for 8 prompts; exits
1 on a mismatch. This is the check scripts/gpu_check.sh runs, e.g. at TP = 2 on two GPUs.
`--compile` (both): vLLM's torch.compile mode on CPU instead of eager, where the engines run eagerly by default.
vLLM spawns engine processes, so everything here runs under `if __name__ == "__main__":`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

DEFAULT_MAX_MODEL_LEN = 512


def engine(folder: str | os.PathLike, dtype: str = "float32", tensor_parallel_size: int = 1,
           max_model_len: int = DEFAULT_MAX_MODEL_LEN, compiled: bool = False, **kwargs):
    """A vLLM `LLM` for a model folder: eager on CPU unless `compiled` (vLLM's CPU backend compiles with inductor,
    which costs about a minute more per engine and pays off only for a long-lived one: `loraflow bench vllm
    --compile`); vLLM's default (compiled, CUDA graphs) on GPUs."""
    from vllm import LLM

    from loraflow.vllm import register

    register()  # the entry point does this too; explicit for a loraflow checkout that is not pip-installed
    import torch

    if not compiled and not torch.cuda.is_available():
        kwargs.setdefault("enforce_eager", True)
    if tensor_parallel_size == 1:  # the worker in this process: one vLLM import instead of three (spawned) ones
        kwargs.setdefault("distributed_executor_backend", "uni")
    return LLM(model=str(folder), dtype=dtype, tensor_parallel_size=tensor_parallel_size,
               max_model_len=max_model_len, seed=0, **kwargs)


def greedy(llm, prompts: Sequence, max_tokens: int) -> list[dict]:
    """Greedy continuations of token-id lists (or strings), all in one batch."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=1)
    inputs = [{"prompt_token_ids": list(p)} if not isinstance(p, str) else p for p in prompts]
    outputs = llm.generate(inputs, params, use_tqdm=False)
    rows = []
    for out in outputs:
        completion = out.outputs[0]
        first = completion.logprobs[0][completion.token_ids[0]].logprob if completion.logprobs else None
        rows.append({"token_ids": list(completion.token_ids), "text": completion.text, "logprob": first})
    return rows


def shutdown(llm) -> None:
    """Stop an engine's processes now, so the next one can start in the same process."""
    import gc

    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


def run_folders(folders: Sequence[str], prompts: Sequence, max_tokens: int, **engine_kwargs) -> dict[str, list]:
    """Each folder's greedy generations, one engine after another (the engine core runs in this process)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    results = {}
    for folder in folders:
        llm = engine(folder, **engine_kwargs)
        try:
            results[str(folder)] = greedy(llm, prompts, max_tokens)
        finally:
            shutdown(llm)
    return results


def flow_reference(folder: str | os.PathLike, prompts: Sequence[Sequence[int]], max_tokens: int,
                   dtype: str = "float32", device: str | None = None, mode: str | None = None) -> list[list[int]]:
    """FlowModel.generate's greedy new token ids for each prompt (one at a time: no padding); `mode` overrides the
    folder's."""
    import torch

    from loraflow.fusion.model import FlowModel

    flow = FlowModel.from_pretrained(folder, torch_dtype=getattr(torch, dtype), device=device, mode=mode)
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([list(ids)], device=flow.device)
            gen = flow.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                                do_sample=False, pad_token_id=flow.config.pad_token_id)
            out.append(gen[0, x.shape[1]:].tolist())
    return out


def prompt_ids(n: int = 8, vocab: int = 260, seed: int = 0) -> list[list[int]]:
    """n prompts of different lengths (3, 7, 11, ...) of random non-special token ids."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(3 + 4 * i)] for i in range(n)]


def selftest(tensor_parallel_size: int = 1, dtype: str = "float32", max_tokens: int = 16,
             compiled: bool = False) -> int:
    from loraflow.eval.registry import default_temperature
    from loraflow.fusion.folder import export_model_folder
    from loraflow.tiny import save_tiny_flow

    with tempfile.TemporaryDirectory() as tmp:
        base, loras, gate = save_tiny_flow(tmp, hidden=128, heads=4, kv_heads=2, layers=2)
        folder = export_model_folder(Path(tmp) / "flow", str(base), [str(p) for p in loras], gate=gate,
                                     temperature=default_temperature("zh", "math"))  # a T != 1 gate
        prompts = prompt_ids()
        got = run_folders([folder], prompts, max_tokens, dtype=dtype, compiled=compiled,
                          tensor_parallel_size=tensor_parallel_size)[str(folder)]
        device = "cuda" if tensor_parallel_size > 1 or _cuda() else None
        want = flow_reference(folder, prompts, max_tokens, dtype=dtype, device=device)
    same = sum(g["token_ids"] == w for g, w in zip(got, want))
    print(f"loraflow vLLM selftest (TP={tensor_parallel_size}, {dtype}): {same}/{len(want)} prompts give "
          "FlowModel's greedy tokens")
    return 0 if same == len(want) else 1


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loraflow.vllm.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="greedy generations of model folders")
    r.add_argument("--model", action="append", required=True, help="a model folder (repeatable)")
    r.add_argument("--prompts", required=True, help="JSON list of token-id lists or strings")
    r.add_argument("--out", required=True, help="where to write the JSON result")
    r.add_argument("--max-tokens", type=int, default=16)
    s = sub.add_parser("selftest", help="tiny flow model: vLLM vs FlowModel")
    for q in (r, s):
        q.add_argument("--tensor-parallel-size", type=int, default=1)
        q.add_argument("--dtype", default="float32")
        q.add_argument("--compile", action="store_true",
                       help="CPU: vLLM's torch.compile mode (inductor) instead of eager (GPUs always compile)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "selftest":
        return selftest(args.tensor_parallel_size, args.dtype, compiled=args.compile)
    from loraflow.files import atomic_write_json, read_json

    result = run_folders(args.model, read_json(args.prompts), args.max_tokens, dtype=args.dtype,
                         tensor_parallel_size=args.tensor_parallel_size, compiled=args.compile)
    atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
