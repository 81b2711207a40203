"""What one gate-training step costs, next to a plain forward+backward of the base model on the same tokens.

Variants, all on the same (batch, seq) random tokens with the loss on every token, timed interleaved
(`bench.timing.interleaved`):
- `base_act`: the plain base, forward + backward to the input embeddings only (activation gradients through every
  layer, no weight gradients: the least any gate training has to do);
- `base_full`: the plain base, forward + backward with every weight trainable (full fine-tuning, no optimizer);
- `gate_step`: `loraflow.train.recipe.train_step`, i.e. FlowModel forward (k LoRAs, LoRA dropout on) + backward to the
  gates + gradient clipping + AdamW, as in a real run;
- `gate_step_nodrop`: the same with LoRA dropout off (what the dropout masks cost);
- `gate_step_ckpt`: `gate_step` with gradient checkpointing.

Peak memory of one step, model excluded: on CUDA `max_memory_allocated` minus what was allocated before the step;
on CPU (Linux) the rise of the peak resident set (VmHWM, reset through /proc/self/clear_refs) over the resident set
before the step, each variant in a fresh spawned process whose glibc maps every allocation over 64 KiB on its own
(so freed tensors leave the resident set; a forked child of a process that has run OpenMP work can hang, hence
spawn).

Host memory with and without `--fsdp` (`fsdp_memory`): 2 gloo processes, each loads the model as the recipe does
(`load_flow_model`; with FSDP only rank 0 reads the base, the others build it on the meta device and receive their
shards) and runs one gate step; per process, the peak resident set rise from just before loading.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch

from loraflow.bench.decode import ModelShape, base_model, save_loras

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
TRAIN_VARIANTS = ("base_act", "base_full", "gate_step", "gate_step_nodrop", "gate_step_ckpt")


def _examples(shape: ModelShape, batch: int, seq: int, device):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, shape.vocab, (batch, seq), generator=gen)
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids], ids.to(device)


def make_step(name: str, shape: ModelShape, loras: list[Path], batch: int, seq: int, device):
    """A zero-argument function running one step of variant `name` (the model is built here, once)."""
    from loraflow.fusion.layers import example_dropout_key
    from loraflow.fusion.model import FlowModel
    from loraflow.train.distributed import DistInfo
    from loraflow.train.recipe import train_step

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    examples, ids = _examples(shape, batch, seq, device)
    model = base_model(shape, device, dtype, max_positions=max(512, seq))
    model.config.use_cache = False
    if name.startswith("base"):
        model.train()
        model.requires_grad_(name == "base_full")

        def base_step():
            if name == "base_full":
                model(input_ids=ids, labels=ids).loss.backward()
                model.zero_grad(set_to_none=True)
            else:
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                model(inputs_embeds=embeds, labels=ids).loss.backward()
        return base_step
    flow = FlowModel.from_pretrained(model, loras)
    if name == "gate_step_ckpt":
        flow.gradient_checkpointing_enable()
    if name == "gate_step_nodrop":
        flow.set_lora_dropout(False)
    flow.train()
    optimizer = torch.optim.AdamW(flow.gate_parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    info = DistInfo(0, 1, 0, device)
    keys = [[example_dropout_key(0, 0, position) for position in range(batch)]]  # as the recipe keys its masks

    def gate_step():
        train_step(flow, optimizer, [examples], pad_id=3, lr=1e-4, clip=1.0, autocast=autocast, info=info,
                   dropout_keys=keys)
    return gate_step


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _cpu_peak_child(name, shape, loras, batch, seq, threads, queue) -> None:
    try:
        torch.set_num_threads(threads)
        step = make_step(name, shape, loras, batch, seq, torch.device("cpu"))
        step()  # first step: AdamW state, lazy initialisations; measure the next one
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        step()
        queue.put((_status_kib("VmHWM") - before) * 1024)
    except Exception as e:  # reported in the results, never hangs the parent
        queue.put(f"{type(e).__name__}: {e}")


@contextlib.contextmanager
def _small_mmap_threshold():
    """Children started inside inherit MALLOC_MMAP_THRESHOLD_=64 KiB. glibc then gives every allocation over 64 KiB
    its own mapping, returned to the system when freed, so the resident set follows the live tensors instead of
    keeping freed heap from the warm-up step."""
    saved = os.environ.get(MMAP_ENV)
    os.environ[MMAP_ENV] = "65536"
    try:
        yield
    finally:
        if saved is None:
            del os.environ[MMAP_ENV]
        else:
            os.environ[MMAP_ENV] = saved


def peak_memory(shape: ModelShape, loras: list[Path], batch: int, seq: int, device,
                variants=TRAIN_VARIANTS) -> dict:
    """Bytes above the resident model that one step of each variant needs at its peak (see the module doc)."""
    out = {}
    for name in variants:
        if device.type == "cuda":
            step = make_step(name, shape, loras, batch, seq, device)
            step()
            torch.cuda.synchronize(device)
            resident = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize(device)
            out[name] = torch.cuda.max_memory_allocated(device) - resident
            del step
            torch.cuda.empty_cache()
        else:
            ctx = multiprocessing.get_context("spawn")
            queue = ctx.Queue()
            proc = ctx.Process(target=_cpu_peak_child,
                               args=(name, shape, loras, batch, seq, torch.get_num_threads(), queue))
            with _small_mmap_threshold():
                proc.start()
            try:
                value = queue.get(timeout=900)
            finally:
                proc.join(timeout=60)
                if proc.is_alive():
                    proc.kill()
            out[name] = value if isinstance(value, int) else None
            if not isinstance(value, int):
                out[f"{name}_error"] = value
    method = "cuda max_memory_allocated" if device.type == "cuda" else "cpu peak RSS rise (VmHWM), spawned process"
    mib = {k: round(v / 2**20, 1) for k, v in out.items() if isinstance(v, int)}
    return {"method": method, "bytes": out, "MiB": mib}


def _fsdp_child(rank, world, port, shape, base_dir, loras, batch, seq, fsdp, queue) -> None:
    from loraflow.train.distributed import cleanup_distributed, init_distributed

    try:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        torch.set_num_threads(1)
        from loraflow.fusion.layers import example_dropout_key
        from loraflow.train.distributed import meta_base_model
        from loraflow.train.recipe import load_flow_model, train_step

        info = init_distributed("cpu")
        meta_base_model(str(base_dir), torch.float32)  # imports the model code first: it is not the model's memory
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS: the peak from here on, loading included
        flow = load_flow_model(str(base_dir), [str(p) for p in loras], torch.float32, info, fsdp=fsdp)
        loaded = (_status_kib("VmHWM") - before) * 1024  # the peak of loading (and sharding) alone
        flow.train()
        optimizer = torch.optim.AdamW(flow.gate_parameters(), lr=1e-4)
        examples, _ = _examples(shape, batch, seq, info.device)
        keys = [[example_dropout_key(0, 0, p) for p in range(rank, batch, world)]]
        train_step(flow, optimizer, [examples[rank::world]], pad_id=3, lr=1e-4, clip=1.0, autocast=nullcontext(),
                   info=info, dropout_keys=keys)
        queue.put((rank, [loaded, (_status_kib("VmHWM") - before) * 1024]))
    except Exception as e:  # reported in the results, never hangs the parent
        queue.put((rank, f"{type(e).__name__}: {e}"))
    finally:
        cleanup_distributed()


def fsdp_memory(shape: ModelShape, loras: list[Path], batch: int, seq: int, processes: int = 2) -> dict:
    """Peak host memory per process of loading + one gate step on `processes` gloo processes, without and with
    FSDP (see the module doc): per rank, the peak of loading alone (`load_MiB`) and with the step (`MiB`), and the
    sum of the latter."""
    ctx = multiprocessing.get_context("spawn")
    out: dict = {"processes": processes, "method": "cpu peak RSS rise (VmHWM) from before loading, per process"}
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp) / "base"
        base_model(shape, torch.device("cpu"), torch.float32, max_positions=max(512, seq)).save_pretrained(base_dir)
        out["model_MiB"] = round(sum(f.stat().st_size for f in base_dir.glob("*.safetensors")) / 2**20, 1)
        for name, fsdp in (("no_fsdp", False), ("fsdp", True)):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            queue = ctx.Queue()
            procs = [ctx.Process(target=_fsdp_child, args=(rank, processes, port, shape, base_dir, loras, batch, seq,
                                                           fsdp, queue)) for rank in range(processes)]
            with _small_mmap_threshold():  # as in peak_memory: freed tensors leave the resident set
                for proc in procs:
                    proc.start()
            try:
                results = dict(queue.get(timeout=900) for _ in procs)
            finally:
                for proc in procs:
                    proc.join(timeout=60)
                    if proc.is_alive():
                        proc.kill()
            per_rank = [results.get(rank) for rank in range(processes)]
            errors = [v for v in per_rank if not isinstance(v, list)]
            out[name] = {"bytes": per_rank, "errors": errors} if errors else {
                "bytes": [v[1] for v in per_rank], "load_bytes": [v[0] for v in per_rank],
                "load_MiB": [round(v[0] / 2**20, 1) for v in per_rank],
                "MiB": [round(v[1] / 2**20, 1) for v in per_rank],
                "total_MiB": round(sum(v[1] for v in per_rank) / 2**20, 1)}
    return out


def bench_train(shape: ModelShape, batch: int, seq: int, device, rounds: int = 3, k: int = 2,
                memory: bool = True) -> dict:
    from loraflow.bench.timing import interleaved

    with tempfile.TemporaryDirectory() as tmp:
        loras = save_loras(shape, Path(tmp), k=k, dropout=0.1)
        steps = {name: make_step(name, shape, loras, batch, seq, device) for name in TRAIN_VARIANTS}
        seconds = interleaved(steps, device, rounds=rounds, warmup=1)
        del steps
        mem = peak_memory(shape, loras, batch, seq, device) if memory else None
        fsdp_mem = fsdp_memory(shape, loras, batch, seq) if memory else None
    floor = shape.lora_flop_ratio([shape.rank] * k)
    return {"shape": shape.__dict__.copy(), "k": k, "batch": batch, "seq": seq, "seconds": dict(seconds),
            "tokens_per_s": {n: batch * seq / s for n, s in seconds.items()},
            "over_base_act": {n: seconds.ratio(n, "base_act") for n in seconds},
            "gate_step_over_base_act": seconds.ratio("gate_step", "base_act"),
            "gate_step_over_base_full": seconds.ratio("gate_step", "base_full"),
            "ckpt_over_no_ckpt": seconds.ratio("gate_step_ckpt", "gate_step"),
            "lora_flop_ratio": floor, "peak_memory": mem, "fsdp_memory": fsdp_mem}
