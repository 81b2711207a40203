"""Train the LoRA-Flow gates of one language–task pair (the only trainable parameters; base and LoRAs frozen).

One process (CPU or one GPU):
    loraflow train --language zh --task math --base-model meta-llama/Llama-2-7b-hf \\
        --lora-root checkpoints/LoRAs --data-root data --out-dir checkpoints/gates
Two GPUs on one node (the original setup: preset zh_math = total batch 4 = 2 per GPU × 2 GPUs):
    torchrun --standalone --nproc_per_node=2 -m loraflow.cli train --language zh --task math --batch-per-device 2
Two nodes of 8 GPUs (run on each node, NODE_RANK 0 and 1):
    torchrun --nnodes=2 --node_rank=$NODE_RANK --master_addr=$MASTER_ADDR --master_port=12350 \\
        --nproc_per_node=8 -m loraflow.cli train --language es --task math --fsdp
CPU processes (gloo):  torchrun --nproc_per_node=2 -m loraflow.cli train ... --device cpu
The original shell interface:  CUDA_VISIBLE_DEVICES=0,1 bash scripts/train.sh zh math 1e-3 2 12350
Continue a killed run: the same command with --resume.

The recipe (`train`): setup (processes, config, tokenizer, data, model) → `fit` (the loop: token-normalised loss
over micro-batches and processes, AdamW on the gates, warm-up + cosine, dev loss and a gate after every epoch,
training state every --save-every steps) → save (final gate, best epoch exported) → cleanup. Rank 0 logs and
writes; train_state.py documents the files. Every input is checked before the first step.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from loraflow.data.records import IGNORE_INDEX, collate
from loraflow.devices import torch_dtype
from loraflow.errors import LoraflowError
from loraflow.files import atomic_write_json
from loraflow.fusion.layers import example_dropout_key
from loraflow.train.config import (
    TrainConfig,
    add_arguments,
    config_from_args,
    lr_at,
    original_steps,
    schedule_steps,
    upgrade_fields,
)
from loraflow.train.dev_metric import DevMetric, build_dev_metric
from loraflow.train.distributed import (
    DistInfo,
    all_reduce_gate_grads,
    all_reduce_sum,
    barrier,
    broadcast_params,
    cleanup_distributed,
    epoch_order,
    init_distributed,
    meta_base_model,
    micro_batches,
    shard_fsdp,
    step_batches,
)
from loraflow.train.state import (
    MetricsLog,
    export_gate,
    find_state,
    load_training_state,
    save_gate_folder,
    save_training_state,
    set_rng_state,
)
from loraflow.versions import versions

# Fields a resumed run may change; anything else must match the saved config (it changes the numbers).
RESUME_MAY_CHANGE = {"resume", "overwrite", "max_steps", "save_every", "log_every", "grad_ckpt", "out_dir", "device",
                     "dev_batch_size", "allow_code_execution"}

__all__ = ["TrainConfig", "add_arguments", "run", "train", "fit"]


def run(args) -> int:
    train(config_from_args(args))
    return 0


def train(cfg: TrainConfig) -> dict:
    """The whole recipe; returns the run summary (also written to OUT_DIR/RUN_NAME/summary.json)."""
    # ---- setup: processes, config, tokenizer, data, model
    info = init_distributed(cfg.device)
    try:
        cfg = cfg.resolve(info.world_size, info.device.type)
        torch.manual_seed(cfg.seed + info.rank)  # anything random beyond the dropout masks (keyed per example)
        run_dir = Path(cfg.out_dir) / cfg.run_name
        if not cfg.resume and (find_state(run_dir) or (run_dir / "summary.json").exists()):
            if not cfg.overwrite:
                raise LoraflowError(f"{run_dir} already holds a run: pass --resume to continue it, --overwrite to "
                                    "start it again, or another --run-name / --out-dir")
            if info.master:
                shutil.rmtree(run_dir)
            barrier()
        tokenizer = load_tokenizer(cfg)
        train_set, dev_set = load_examples(cfg, tokenizer)
        dev_metric = build_dev_metric(cfg, tokenizer)
        flow = load_model(cfg, info)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # ---- train and save
        return fit(cfg, info, flow, train_set, dev_set, pad_id, dev_metric=dev_metric)
    finally:
        # ---- cleanup
        cleanup_distributed()


def load_tokenizer(cfg: TrainConfig):
    from loraflow.bases import load_base_tokenizer

    if cfg.tokenizer:
        return load_base_tokenizer(cfg.tokenizer)
    return load_base_tokenizer(cfg.base_model, gguf_file=cfg.gguf_file)


def load_model(cfg: TrainConfig, info: DistInfo):
    """Base + LoRAs (frozen, in `cfg.dtype`) + fresh fp32 gates; FSDP-sharded with --fsdp."""
    return load_flow_model(cfg.base_model, cfg.lora_sources(), torch_dtype(cfg.dtype), info, fsdp=cfg.fsdp,
                           grad_ckpt=cfg.grad_ckpt, gguf_file=cfg.gguf_file)


def load_flow_model(base_model: str, loras: list, dtype: torch.dtype, info: DistInfo, fsdp: bool = False,
                    grad_ckpt: bool = False, gguf_file: str | None = None):
    """The training FlowModel on `info.device`. With `fsdp` only rank 0 reads the base weights; the other ranks
    build the base on the meta device and receive their shards from rank 0 (`shard_fsdp`)."""
    from loraflow.fusion.model import FlowModel

    if fsdp and not info.master:
        if gguf_file:
            raise LoraflowError("--fsdp with --gguf-file: convert the GGUF once (`loraflow convert base --from gguf`) "
                                "and train on the folder")
        base = meta_base_model(base_model, dtype)
        flow = FlowModel.from_pretrained(base, loras, torch_dtype=dtype, device=None)
    else:
        flow = FlowModel.from_pretrained(base_model, loras, torch_dtype=dtype, device=None if fsdp else info.device,
                                         gguf_file=gguf_file)
    flow.model.config.use_cache = False
    if grad_ckpt:
        flow.gradient_checkpointing_enable()
    if fsdp:
        shard_fsdp(flow, info)
    return flow


def load_examples(cfg: TrainConfig, tokenizer) -> tuple[list[dict], list[dict]]:
    """Tokenised (train, dev) examples, dicts of `input_ids` and `labels` (-100 on the prompt), via `data.py`.

    Train: --train-file (kind from its name `{lang}_{task}_train.jsonl`, else generic prompt/response), or
    DATA_ROOT/train/{language}_{task}_train.jsonl. Dev: --dev-file, or DATA_ROOT/dev/{language}_{task}_dev.jsonl when
    it exists (math dev: question → worked answer; code dev: MBPP text → code). Prompts: `cfg.prompt_style` with the
    pair's system prompt. Truncation to --max-len: `data.encode_example` (the prompt loses tokens from its left).
    """
    from loraflow.data.prompts import system_prompt
    from loraflow.data.records import (
        infer_kind,
        load_split,
        load_system_prompts,
        read_records,
        split_path,
        training_example,
    )

    def read(path):
        try:
            kind = infer_kind(path)
        except LoraflowError:
            kind = "generic"  # any other file name: {"prompt": ..., "response": ...} per line
        return read_records(path, kind)

    if cfg.train_file:
        train_records = read(cfg.train_file)
    else:
        train_records = load_split(cfg.data_root, cfg.language, cfg.task, "train")
    dev_records = []
    if cfg.dev_file and not cfg.no_dev:
        dev_records = read(cfg.dev_file)
    elif cfg.pair and not cfg.no_dev and split_path(cfg.data_root, cfg.language, cfg.task, "dev").is_file():
        dev_records = load_split(cfg.data_root, cfg.language, cfg.task, "dev")
    system = cfg.system_prompt
    if system is None:
        if cfg.pair is None:
            raise LoraflowError("--train-file without --language/--task: give the --system-prompt text too")
        prompts_file = Path(cfg.data_root) / "system_prompts.json"
        system = system_prompt(load_system_prompts(cfg.data_root) if prompts_file.is_file() else {},
                               cfg.language, cfg.task)

    def encode(records, limit):
        out = []
        for record in records[:limit]:
            try:
                out.append(training_example(tokenizer, record, records.kind, system, style=cfg.prompt_style,
                                            max_len=cfg.max_len, cot_suffix=cfg.cot_suffix))
            except LoraflowError as e:
                raise LoraflowError(f"{records.path}: record {record['id']}: {e}") from None
        return out

    return encode(train_records, cfg.limit), encode(dev_records, cfg.dev_limit)


def fit(cfg: TrainConfig, info: DistInfo, flow, train_set: list[dict], dev_set: list[dict], pad_id: int,
        dev_metric: DevMetric | None = None) -> dict:
    """Train `flow`'s gates on tokenised examples with a resolved config; writes everything under the run dir.
    `dev_metric` (`dev_metric.build_dev_metric`) also scores the dev set with the evaluation harness after each
    epoch."""
    master = info.master
    run_dir = Path(cfg.out_dir) / cfg.run_name
    log = print if master else (lambda *a, **k: None)
    if not train_set:
        raise LoraflowError("no training examples")
    for name, examples in (("training", train_set), ("dev", dev_set)):
        empty = [i for i, ex in enumerate(examples) if response_tokens(ex) == 0]
        if empty:
            raise LoraflowError(f"{len(empty)} {name} example(s) have no response token to learn from (first: "
                                f"#{empty[0]}); check the data and --max-len")
    params = flow.gate_parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)
    per_epoch, schedule = schedule_steps(len(train_set), cfg.total_batch, cfg.epochs)
    planned = cfg.epochs * per_epoch
    if cfg.schedule == "original":  # SPEC §2: the schedule's length is also where the loop stops
        schedule = original_steps(len(train_set), cfg.batch_per_device, cfg.world_size, cfg.epochs)
        planned = min(planned, schedule)
    total_steps = planned if cfg.max_steps is None else min(planned, cfg.max_steps)
    n_params = sum(p.numel() for p in params)
    fingerprint = data_fingerprint(train_set)
    start, history = 0, []  # optimizer steps done; [{"epoch", "dev_loss"}]
    if cfg.resume:
        trainer, rng = load_training_state(run_dir, info.rank, info.world_size)
        check_resumable(trainer, cfg, fingerprint, run_dir)
        with torch.no_grad():
            for p, saved in zip(params, trainer["gates"]):
                p.copy_(saved)
        optimizer.load_state_dict(trainer["optimizer"])
        start, history = trainer["step"], list(trainer["history"])
        set_rng_state(rng, info.device)
        log(f"[train] resumed {run_dir} at step {start}/{total_steps}")
    broadcast_params(params)  # every process starts from rank 0's gates
    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", {
            **cfg.to_dict(), "trainable_parameters": n_params, "train_examples": len(train_set),
            "dev_examples": len(dev_set), "steps_per_epoch": per_epoch, "schedule_steps": schedule,
            "data_fingerprint": fingerprint, "versions": versions()})
    metrics = MetricsLog(run_dir / "metrics.jsonl", master, resume_step=start if cfg.resume else None)
    log(f"[train] {cfg.run_name}: {len(train_set)} train / {len(dev_set)} dev examples, {info.world_size} "
        f"process(es) × batch {cfg.batch_per_device} × grad_accum {cfg.grad_accum} = total batch {cfg.total_batch}; "
        f"{per_epoch} steps/epoch × {cfg.epochs} epochs, lr {cfg.lr:g}, warm-up {cfg.warmup_ratio:g}")
    log(f"[train] trainable parameters: {n_params:,} (gates: {flow.num_layers} layers × k={flow.k} × "
        f"(hidden {flow.hidden_size} + 1))")
    autocast = (torch.autocast(info.device.type, dtype=torch_dtype(cfg.dtype)) if cfg.dtype != "float32"
                else nullcontext())

    def save_state(step: int) -> None:
        trainer = {"step": step, "optimizer": optimizer.state_dict(), "gates": [p.detach().cpu() for p in params],
                   "history": history, "config": cfg.to_dict(), "data_fingerprint": fingerprint}
        save_training_state(run_dir, trainer, info.rank, info.world_size, info.device)

    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=start, disable=not master, desc=cfg.run_name, dynamic_ncols=True)
    flow.train()
    flow.set_lora_dropout(cfg.lora_dropout)
    batches: list[list[int]] = []
    for step in range(start, total_steps):
        epoch, in_epoch = divmod(step, per_epoch)
        if in_epoch == 0 or step == start:
            batches = step_batches(epoch_order(len(train_set), cfg.seed, epoch), cfg.total_batch)
        lr = lr_at(step, cfg.lr, schedule, cfg.warmup_ratio)
        mine = micro_batches(batches[in_epoch], info.rank, info.world_size, cfg.grad_accum)
        # LoRA dropout keyed by (seed, step, position in the step's global batch): the same masks for any split
        positions = micro_batches(list(range(len(batches[in_epoch]))), info.rank, info.world_size, cfg.grad_accum)
        keys = [[example_dropout_key(cfg.seed, step, p) for p in ps] for ps in positions]
        t0 = time.perf_counter()
        stats = train_step(flow, optimizer, [[train_set[i] for i in ids] for ids in mine], pad_id, lr,
                           cfg.clip_grad, autocast, info, dropout_keys=keys)
        stats["tokens_per_s"] = stats["tokens"] / max(time.perf_counter() - t0, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{lr:.2e}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == total_steps:
            metrics.write(step=step + 1, epoch=epoch + 1, lr=lr, **stats)
        # end of an epoch (or, with the original schedule, where its step count stops the loop mid-epoch, as the
        # original saved that epoch's gate after the break): dev loss, epoch gate, best gate so far, state
        if in_epoch + 1 == per_epoch or step + 1 == planned:
            dev_loss = evaluate(flow, dev_set, cfg.batch_per_device, pad_id, autocast, info) if dev_set else None
            entry = {"epoch": epoch + 1, "dev_loss": dev_loss}
            if dev_metric is not None:
                entry["dev_metric"] = dev_metric(flow, info, run_dir / "dev" / f"epoch_{epoch + 1}")
                entry["dev_metric_name"] = dev_metric.name
            history.append(entry)
            metrics.write(step=step + 1, **entry)
            if master:
                shown = f", dev {dev_metric.name} {entry['dev_metric']:.4f}" if dev_metric is not None else ""
                bar.write(f"[train] epoch {epoch + 1}/{cfg.epochs} done at step {step + 1}: dev loss {dev_loss}{shown}")
                save_gate_folder(flow, run_dir / f"epoch_{epoch + 1}", epoch=epoch + 1, step=step + 1,
                                 dev_loss=dev_loss, train_config=cfg.to_dict(), temperature=inference_temperature(cfg))
                if best_epoch(history) == epoch + 1:
                    export_gate(run_dir / f"epoch_{epoch + 1}", Path(cfg.out_dir) / f"{cfg.run_name}.safetensors")
            save_state(step + 1)
        elif cfg.save_every and (step + 1) % cfg.save_every == 0:
            save_state(step + 1)
    bar.close()
    flow.eval()
    # ---- save: the final gate, the state (a longer --max-steps can continue), the summary (written last)
    if start < total_steps and total_steps % per_epoch and total_steps != planned:  # stopped by --max-steps
        save_state(total_steps)
    selected_by = (f"dev {dev_metric.name} (ties: dev loss)" if dev_metric is not None else
                   "dev loss" if dev_set else "last epoch (no dev set)")
    summary = {"run": cfg.run_name, "steps": total_steps, "epochs_done": len(history), "history": history,
               "best_epoch": best_epoch(history), "selected_by": selected_by, "trainable_parameters": n_params}
    if master:
        save_gate_folder(flow, run_dir / "final", step=total_steps, train_config=cfg.to_dict(),
                         temperature=inference_temperature(cfg))
        atomic_write_json(run_dir / "summary.json", summary)
        log(f"[train] done: gates in {run_dir}" + (f", best epoch {summary['best_epoch']} → "
                                                   f"{Path(cfg.out_dir) / cfg.run_name}.safetensors"
                                                   if summary["best_epoch"] else ""))
    return summary


def train_step(flow, optimizer, micro: list[list[dict]], pad_id: int, lr: float, clip: float, autocast,
               info: DistInfo, dropout_keys: list[list[int]] | None = None) -> dict:
    """One optimizer step over this process's micro-batches.

    The loss is the sum of the token losses of every response token of the step, on all processes, divided by
    their global count (all-reduced first), so the gradient does not depend on how the examples are split into
    processes and micro-batches. An empty micro-batch (a short last step) still runs a forward/backward on a
    one-token dummy, which FSDP's collectives need. `dropout_keys`: one LoRA dropout key per example of each
    micro-batch (`FlowModel.set_dropout_keys`); None draws random masks.
    """
    params = flow.gate_parameters()
    local = sum(response_tokens(ex) for batch in micro for ex in batch)
    n_tokens = all_reduce_sum(torch.tensor([float(local)], dtype=torch.float64, device=info.device)).item()
    loss_sum, seen = 0.0, 0
    for m, batch in enumerate(micro):
        inputs = batch_inputs(batch, pad_id, info.device)
        keys = dropout_keys[m] if dropout_keys is not None and batch else None
        flow.set_dropout_keys(None if keys is None else torch.tensor(keys, dtype=torch.int64))
        with autocast:
            out = flow(**model_inputs(inputs))
        token_loss = summed_token_loss(out.logits, inputs["labels"]) if batch else out.logits.sum() * 0.0
        (token_loss / n_tokens).backward()  # under activation checkpointing the recompute sees the same keys
        loss_sum += token_loss.item()
        seen += int(inputs["attention_mask"].sum()) if batch else 0
    flow.set_dropout_keys(None)
    reduced = all_reduce_gate_grads(params, torch.tensor([loss_sum, float(seen)], device=info.device))
    if clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": reduced[0].item() / n_tokens, "grad_norm": float(grad_norm), "tokens": int(reduced[1].item()),
            "response_tokens": int(n_tokens)}


@torch.no_grad()
def evaluate(flow, examples: list[dict], batch_size: int, pad_id: int, autocast, info: DistInfo) -> float:
    """Mean token loss over the response tokens of `examples` (split over processes; dropout off)."""
    was_training = flow.training
    flow.eval()
    mine = examples[info.rank::info.world_size]
    n_batches = -(-len(examples[0::info.world_size]) // batch_size)  # the same on every process (FSDP needs it)
    totals = torch.zeros(2, dtype=torch.float64, device=info.device)
    for b in range(n_batches):
        batch = mine[b * batch_size:(b + 1) * batch_size]
        inputs = batch_inputs(batch, pad_id, info.device)
        with autocast:
            logits = flow(**model_inputs(inputs)).logits
        if batch:
            totals[0] += summed_token_loss(logits, inputs["labels"]).double()
            totals[1] += sum(response_tokens(ex) for ex in batch)
    all_reduce_sum(totals)
    flow.train(was_training)
    return (totals[0] / totals[1]).item()


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropies of next-token predictions at labelled positions, in fp32."""
    labels = labels[:, 1:]
    keep = labels != IGNORE_INDEX  # (batch, seq - 1)
    return F.cross_entropy(logits[:, :-1][keep].float(), labels[keep], reduction="sum")


def response_tokens(example: dict) -> int:
    """Tokens that carry loss (a label at position t is predicted from position t - 1, so the first never does)."""
    return sum(1 for label in example["labels"][1:] if label != IGNORE_INDEX)


def batch_inputs(batch: list[dict], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest example (`data.collate`); an empty one becomes one padding token."""
    if batch:
        inputs = collate(batch, pad_id, padding_side="right")
    else:
        inputs = {"input_ids": torch.full((1, 1), pad_id), "attention_mask": torch.ones(1, 1, dtype=torch.long),
                  "labels": torch.full((1, 1), IGNORE_INDEX), "position_ids": torch.zeros(1, 1, dtype=torch.long)}
    return {k: v.to(device) for k, v in inputs.items()}


def model_inputs(inputs: dict[str, torch.Tensor]) -> dict:
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
            "position_ids": inputs["position_ids"], "use_cache": False}


def best_epoch(history: list[dict]) -> int | None:
    """The epoch with the highest dev metric when there is one (ties: the lower dev loss, then the earlier epoch),
    else the lowest dev loss (the first on ties); the last epoch when there is neither."""
    if not history:
        return None
    measured = [h for h in history if h.get("dev_metric") is not None]
    if measured:
        def rank(h):
            return -h["dev_metric"], h["dev_loss"] if h["dev_loss"] is not None else math.inf, h["epoch"]

        return min(measured, key=rank)["epoch"]
    scored = [h for h in history if h["dev_loss"] is not None]
    if not scored:
        return history[-1]["epoch"]
    return min(scored, key=lambda h: h["dev_loss"])["epoch"]


def data_fingerprint(examples: list[dict]) -> str:
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(repr((ex["input_ids"], ex["labels"])).encode())
    return digest.hexdigest()[:16]


def check_resumable(trainer: dict, cfg: TrainConfig, fingerprint: str, run_dir: Path) -> None:
    saved, now = upgrade_fields(trainer["config"]), cfg.to_dict()
    changed = sorted(k for k in now if k not in RESUME_MAY_CHANGE and saved.get(k) != now[k])
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise LoraflowError(f"--resume: the run in {run_dir} was started with other settings ({detail}); resume "
                            "with the same ones, or start a new run")
    if trainer.get("data_fingerprint") != fingerprint:
        raise LoraflowError(f"--resume: the training data differ from those the run in {run_dir} started with")


def inference_temperature(cfg: TrainConfig) -> float:
    """The temperature a trained gate records for inference (gate.json): the pair's evaluation default from the
    registry (1.1 for zh/ru math, as the original evaluated those gates), 1.0 without a pair. Training itself runs
    the gates at T = 1; `eval` and `plot-gates` then read the recorded value (the one temperature rule)."""
    from loraflow.eval.registry import default_temperature

    return default_temperature(cfg.language, cfg.task) if cfg.pair else 1.0
