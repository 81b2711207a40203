"""`scripts/gpu_check.sh`: one command that exercises the CUDA paths the CPU test suite cannot, on one GPU.

    python -m loraflow.gpu_check              # on a CUDA machine: every check, about 8 minutes (limits: see LIMITS)
    python -m loraflow.gpu_check --dry-run    # the CPU-safe parts on the CPU (CI runs this)

Checks, each with its own time limit, then one summary table; the exit status is 1 if any check failed:
- `gate_step`: one `train_step` (the training recipe's code) with the base in bf16 under autocast equals the same
  step in fp32 within bf16's tolerance: the loss, and the gate update (plain SGD, no clipping, LoRA dropout off, so
  the update *is* the gradient);
- `generate`: greedy flow generation with the base in bf16 and in fp32; reports the top-1 agreement of the
  teacher-forced next-token predictions over the fp32 generations, and how many generations are identical;
- `fsdp`: FSDP2 (`shard_fsdp`) on one GPU under torchrun (nccl; gloo in the dry run): the sharded step equals the
  unsharded one;
- `bench`: `loraflow bench all --quick` on CUDA (the dry run: the `layer` part only, on the CPU);
- `vllm`: when vLLM is installed, `python -m loraflow.vllm.check selftest` (vLLM's greedy tokens equal
  FlowModel's) at TP = 1 and, on two or more GPUs, TP = 2; then `loraflow bench vllm` on a random Llama
  (`VLLM_BENCH_SHAPE`): flow/base in vLLM and vLLM/HF, the speed targets' GPU numbers. Skipped without vLLM.

The models are tiny random Llamas with two random LoRAs built in-process (`loraflow.tiny`): nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# Tolerances. bf16 keeps 8 bits of mantissa (relative rounding error 2^-9), and the gate's gradient is a sum over
# tokens and projections with much cancellation: on the CPU's bf16 the step's update is off by ~11% (cosine 0.994)
# even against an fp32 model holding the same bf16-rounded weights. A wrong cast or a lost gradient path is far
# outside these; NaN fails them all.
LOSS_RTOL, UPDATE_RTOL, MIN_COSINE, MIN_AGREEMENT, FSDP_RTOL = 2e-2, 0.2, 0.98, 0.9, 1e-4
LIMITS = {"fsdp": 180, "bench": 300, "vllm": 300}  # seconds, for the checks run as subprocesses (vllm: each)
VLLM_BENCH_SHAPE = "hidden=1024,layers=8,heads=16,kv_heads=4,vocab=32000"  # about 0.1B parameters
MODEL = dict(hidden=256, layers=4, heads=4, kv_heads=2, vocab=260)


@dataclass
class Result:
    check: str
    status: str  # ok | FAIL | skip
    seconds: float
    detail: str


# ------------------------------------------------------------------------------------------------ tiny world
def make_loras(folder: Path) -> list[Path]:
    from loraflow.tiny import save_tiny_loras, tiny_model

    return save_tiny_loras(lambda: tiny_model("llama", seed=0, **MODEL), folder, {"lang": 8, "task": 16},
                           dropout=0.1)


def make_flow(loras: list[Path], device: torch.device, dtype: torch.dtype, rounded_to: torch.dtype | None = None):
    """The same FlowModel (seeded base, LoRAs, gates with per-token varying weights) in `dtype` on `device`.
    `rounded_to`: the frozen weights rounded to that dtype first, so that an fp32 reference holds exactly the
    weights a bf16 model holds and the comparison measures the arithmetic alone."""
    from loraflow.fusion.model import FlowModel, is_gate_parameter
    from loraflow.tiny import randomize_gates, tiny_model

    base = tiny_model("llama", seed=0, **MODEL).to(device=device, dtype=dtype)
    base.config.use_cache = True
    flow = FlowModel.from_pretrained(base, [str(p) for p in loras])
    randomize_gates(flow, seed=0, std=0.2)
    flow.set_lora_dropout(False)  # deterministic, so that two dtypes or layouts can be compared
    if rounded_to is not None:
        with torch.no_grad():
            for name, t in [*flow.named_parameters(), *flow.named_buffers()]:
                if t.is_floating_point() and not is_gate_parameter(name):
                    t.copy_(t.to(rounded_to).to(t.dtype))
    return flow.to(device)


def examples(batch: int = 2, seq: int = 64) -> list[dict]:
    ids = torch.randint(4, MODEL["vocab"], (batch, seq), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row.tolist(), "labels": [-100] * (seq // 2) + row.tolist()[seq // 2:]} for row in ids]


def autocast_for(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def sgd_step(flow, device: torch.device, dtype: torch.dtype, info=None) -> tuple[float, torch.Tensor]:
    """One `train_step` with SGD at lr 1 and no clipping: (loss, the gate update = minus the gradient)."""
    from loraflow.train.distributed import DistInfo
    from loraflow.train.recipe import train_step

    flow.train()
    params = flow.gate_parameters()
    before = torch.cat([p.detach().flatten().float().cpu() for p in params])
    optimizer = torch.optim.SGD(params, lr=1.0)
    info = info or DistInfo(0, 1, 0, device)
    out = train_step(flow, optimizer, [examples()], pad_id=3, lr=1.0, clip=0.0, autocast=autocast_for(device, dtype),
                     info=info)
    after = torch.cat([p.detach().flatten().float().cpu() for p in params])
    return out["loss"], after - before


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


# ---------------------------------------------------------------------------------------------------- checks
def check_gate_step(device: torch.device, low: torch.dtype, tmp: Path) -> str:
    loras = make_loras(tmp / "loras")
    loss32, update32 = sgd_step(make_flow(loras, device, torch.float32, rounded_to=low), device, torch.float32)
    flow = make_flow(loras, device, low)
    dtypes = {p.dtype for p in flow.gate_parameters()}
    assert dtypes == {torch.float32}, f"gates are {dtypes} with a {low} base (must stay fp32)"
    loss16, update16 = sgd_step(flow, device, low)
    loss_err, update_err = abs(loss16 - loss32) / abs(loss32), _rel(update16, update32)
    cosine = float(torch.nn.functional.cosine_similarity(update16, update32, dim=0))
    detail = (f"loss {loss32:.4f} vs {loss16:.4f} (rel {loss_err:.1e}); gate update rel err {update_err:.1e}, "
              f"cosine {cosine:.4f}")
    assert torch.isfinite(update16).all(), "non-finite gate update: " + detail
    assert loss_err < LOSS_RTOL and update_err < UPDATE_RTOL and cosine > MIN_COSINE, (
        detail + f" (tolerances: loss {LOSS_RTOL}, update {UPDATE_RTOL}, cosine > {MIN_COSINE})")
    return detail


@torch.no_grad()
def check_generate(device: torch.device, low: torch.dtype, tmp: Path, new_tokens: int = 24) -> str:
    loras = make_loras(tmp / "loras")
    prompts = torch.randint(4, MODEL["vocab"], (4, 12), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones_like(prompts)
    flows = {"fp32": make_flow(loras, device, torch.float32).eval(), "low": make_flow(loras, device, low).eval()}
    runs = {}
    for name, flow in flows.items():
        with autocast_for(device, low if name == "low" else torch.float32):
            runs[name] = flow.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=new_tokens,
                                       do_sample=False, pad_token_id=3)
    seq = runs["fp32"]
    with autocast_for(device, low):
        low_logits = flows["low"](input_ids=seq).logits.float()
    fp32_logits = flows["fp32"](input_ids=seq).logits.float()
    positions = slice(prompts.shape[1] - 1, seq.shape[1] - 1)  # the predictions of the generated tokens
    agree = (low_logits[:, positions].argmax(-1) == fp32_logits[:, positions].argmax(-1)).float().mean().item()
    same = sum(bool(torch.equal(a, b)) for a, b in zip(runs["low"], runs["fp32"]))
    detail = (f"top-1 agreement {agree:.3f} over {seq.shape[0]}x{new_tokens} generated tokens; "
              f"{same}/{seq.shape[0]} generations identical")
    assert agree >= MIN_AGREEMENT, detail + f" (needs >= {MIN_AGREEMENT})"
    return detail


def fsdp_worker(device_name: str, out: Path, loras_dir: Path) -> None:
    """Run under torchrun with one process: the unsharded step, then the same step on an FSDP2-sharded copy."""
    from loraflow.train.distributed import cleanup_distributed, init_distributed, shard_fsdp

    info = init_distributed(device_name)
    try:
        loras = make_loras(loras_dir)
        dtype = torch.bfloat16 if info.device.type == "cuda" else torch.float32  # as training runs it
        loss_plain, update_plain = sgd_step(make_flow(loras, info.device, dtype), info.device, dtype, info)
        flow = make_flow(loras, torch.device("cpu"), dtype)  # shard_fsdp moves the shards to the device
        shard_fsdp(flow, info)
        loss_fsdp, update_fsdp = sgd_step(flow, info.device, dtype, info)
        out.write_text(json.dumps({"loss": [loss_plain, loss_fsdp], "update_rel_err": _rel(update_fsdp, update_plain),
                                   "world_size": info.world_size, "device": str(info.device)}))
    finally:
        cleanup_distributed()


def check_fsdp(device: torch.device, tmp: Path) -> str:
    out = tmp / "fsdp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
           "loraflow.gpu_check", "--fsdp-worker", str(out), "--device", device.type, "--tmp", str(tmp)]
    _run(cmd, LIMITS["fsdp"])
    result = json.loads(out.read_text())
    (loss_plain, loss_fsdp), err = result["loss"], result["update_rel_err"]
    detail = (f"world size {result['world_size']} on {result['device']}: loss {loss_plain:.5f} vs {loss_fsdp:.5f}, "
              f"gate update rel err {err:.1e}")
    assert abs(loss_plain - loss_fsdp) <= FSDP_RTOL * abs(loss_plain) and err <= FSDP_RTOL, detail
    return detail


def check_bench(device: torch.device, tmp: Path, dry_run: bool) -> str:
    out = tmp / "bench.json"
    parts = ["--parts", "layer"] if dry_run else []
    _run([sys.executable, "-m", "loraflow.cli", "bench", "all", "--quick", "--device", device.type, *parts,
          "--json", str(out)], LIMITS["bench"])
    result = json.loads(out.read_text())
    return f"bench all --quick{' --parts layer' if dry_run else ''}: {', '.join(sorted(result.get('parts', {})))}"


def vllm_commands(tmp: Path, gpus: int) -> dict[str, list[str]]:
    """The vLLM checks of a CUDA machine, by name: the selftest (vLLM's greedy tokens equal FlowModel's on a tiny
    flow model) at TP = 1, and at TP = 2 where there are two GPUs; then `loraflow bench vllm` on a random Llama of
    `VLLM_BENCH_SHAPE` (base vs flow in vLLM at batch 1 and 16, vLLM vs the HF path on the GPU at batch 16)."""
    check = [sys.executable, "-m", "loraflow.vllm.check", "selftest"]
    commands = {"TP=1": check}
    if gpus >= 2:
        commands["TP=2"] = [*check, "--tensor-parallel-size", "2"]
    commands["bench"] = [sys.executable, "-m", "loraflow.vllm.bench", "--random-shape", VLLM_BENCH_SHAPE,
                         "--batches", "1,16", "--new-tokens", "64", "--rounds", "3",
                         "--json", str(tmp / "vllm-bench.json")]
    return commands


def check_vllm(dry_run: bool, tmp: Path) -> str | None:
    """None (skipped) unless vLLM and loraflow.vllm are installed and a GPU is there; else each of
    `vllm_commands`' results in one line (a selftest mismatch exits 1, which fails the check)."""
    if dry_run:
        return None
    if importlib.util.find_spec("vllm") is None:
        return None
    try:
        if importlib.util.find_spec("loraflow.vllm.check") is None:
            return None
    except ModuleNotFoundError:
        return None
    details = []
    for name, cmd in vllm_commands(tmp, torch.cuda.device_count()).items():
        out = _run(cmd, LIMITS["vllm"])
        if name == "bench":
            result = json.loads((tmp / "vllm-bench.json").read_text())
            ratios = result["flow_over_base"]
            details.append("bench: flow/base " + " / ".join(f"{ratios[b]:.2f} (batch {b})" for b in ratios)
                           + "".join(f", vLLM/HF {v:.1f}x (batch {b})" for b, v in result.get("vllm_over_hf",
                                                                                             {}).items()))
        else:
            details.append(out.strip().splitlines()[-1].removeprefix("loraflow vLLM selftest ")[:120])
    return "; ".join(details)


def _run(cmd: list[str], timeout: int) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                     os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"`{' '.join(cmd[1:4])} ...` ran past {timeout} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise AssertionError(f"`{' '.join(cmd[1:5])} ...` exited {proc.returncode}: {' | '.join(tail)}")
    return proc.stdout


# ------------------------------------------------------------------------------------------------------- run
def run_checks(dry_run: bool, skip: set[str] = frozenset()) -> list[Result]:
    device = torch.device("cpu" if dry_run else "cuda")
    low = torch.bfloat16
    results = []
    with tempfile.TemporaryDirectory(prefix="loraflow-gpu-check-") as tmp:
        tmp = Path(tmp)
        checks = {
            "gate_step": lambda: check_gate_step(device, low, tmp),
            "generate": lambda: check_generate(device, low, tmp),
            "fsdp": lambda: check_fsdp(device, tmp),
            "bench": lambda: check_bench(device, tmp, dry_run),
            "vllm": lambda: check_vllm(dry_run, tmp),
        }
        for name, check in checks.items():
            start = time.monotonic()
            if name in skip:
                results.append(Result(name, "skip", 0.0, "--skip"))
                continue
            try:
                detail = check()
                status = "ok" if detail is not None else "skip"
                detail = detail if detail is not None else _why_skipped(name, dry_run)
            except Exception as e:  # a failed check is reported; the others still run
                status = "FAIL"
                detail = str(e) or "".join(traceback.format_exception_only(type(e), e)).strip()
            results.append(Result(name, status, round(time.monotonic() - start, 1), detail))
    return results


def _why_skipped(name: str, dry_run: bool) -> str:
    if dry_run:
        return "needs CUDA"
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed"
    return "loraflow.vllm.check is not in this version of loraflow"


def summary_table(results: list[Result], device: str) -> str:
    lines = [f"loraflow GPU check on {device}", "", "| check | result | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {r.check} | {r.status} | {r.seconds:.1f} | {r.detail.replace('|', '/')} |" for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the CPU-safe parts, on the CPU (no GPU needed)")
    p.add_argument("--skip", default="", help="comma list of checks to leave out (gate_step,generate,fsdp,bench,vllm)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--fsdp-worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.fsdp_worker:
        fsdp_worker(args.device, args.fsdp_worker, args.tmp / "fsdp-loras")
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        print("error: torch sees no CUDA GPU (torch.cuda.is_available() is False); run with --dry-run for the "
              "CPU-safe parts", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    results = run_checks(args.dry_run, {s for s in args.skip.split(",") if s})
    device = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(0)
    print(summary_table(results, device))
    if args.json:
        from loraflow.files import atomic_write_json

        atomic_write_json(args.json, {"device": device, "torch": torch.__version__,
                                      "results": [asdict(r) for r in results]})
    return 1 if any(r.status == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
