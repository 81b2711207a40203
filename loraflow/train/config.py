"""`TrainConfig`: every knob of gate training in one dataclass, its presets, and its command line.

The dataclass *is* the CLI: each field's `help` becomes a `loraflow train --flag`, and a YAML/JSON file given
with `--config` may set any field by name (flags on the command line win over the file). `__post_init__`
validates what can be checked without knowing the number of processes; `resolve(world_size)` fills in the
batch split once it is known and raises when the split asked for is impossible.

Batch sizes. One optimizer step sees `total_batch` examples:

    total_batch = batch_per_device × world_size (processes) × grad_accum (FREQ in scripts/train.sh)

Give either `batch_per_device` (the original `train.sh` interface; total_batch follows) or `total_batch` (then
batch_per_device = total_batch / (world_size × grad_accum), which must divide exactly). With neither, the preset's
published total batch is used, e.g. `zh_math` = 4: 2 GPUs × 2 per device, or 1 GPU × 4, or 1 GPU × 2 × FREQ 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraflow.data.prompts import FAITHFUL, STYLE_ALIASES, STYLES, canonical_style
from loraflow.devices import DEVICE_HELP, DTYPE_HELP, DTYPES, canonical_dtype, check_device, resolve_dtype
from loraflow.errors import LoraflowError


@dataclass(frozen=True)
class Preset:
    """The published best hyper-parameters of one language–task pair (SPEC §2)."""

    total_batch: int
    lr: float
    warmup_ratio: float = 0.2


PRESETS: dict[str, Preset] = {
    "zh_math": Preset(4, 1e-3),
    "ru_math": Preset(4, 1e-3),
    "es_math": Preset(16, 1e-4),
    "zh_code": Preset(4, 1e-3),
    "ru_code": Preset(16, 1e-4, warmup_ratio=0.4),
    "es_code": Preset(4, 1e-3),
}
# How the best epoch is chosen (the gate exported as OUT_DIR/RUN_NAME.safetensors):
#   dev-metric         the original: generate on the dev set after each epoch, score it as the original did (SPEC §3)
#   dev-metric-strict  the same generations scored by the strict scorers (fixed golds, robust code extraction)
#   dev-loss           the response-token loss on the dev set: no generation, ~100x cheaper
#   auto               dev-metric when the pair has a dev benchmark and dev data, else dev-loss
SELECTIONS = ("auto", "dev-metric", "dev-metric-strict", "dev-loss")
SCHEDULES = ("loraflow", "original")
# Fields renamed for one flag per concept across commands; their old names (and values) are still read, for one
# release: as flags (hidden), in --config files, and in the config.json of a run being resumed.
RENAMED_FIELDS = {"precision": "dtype"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def opt(default: Any, help: str, **argparse_kwargs) -> Any:
    """A dataclass field that is also a command-line flag (`argparse_kwargs`: type, nargs, choices, ...)."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class TrainConfig:
    # ---- what to train: the pair, the base, the LoRAs (in fusion order: language first, task second)
    language: str | None = opt(None, "language of the pair (zh, ru, es, ...): picks data, system prompt, preset")
    task: str | None = opt(None, "task of the pair (math, code, ...)")
    base_model: str = opt("meta-llama/Llama-2-7b-hf", "base causal LM: a folder or a hub id")
    gguf_file: str | None = opt(None, "the base is this GGUF file in the --base-model folder or hub repo "
                                      "(dequantized on load; needs `pip install gguf`)")
    tokenizer: str | None = opt(None, "tokenizer folder or hub id (default: the base model's)")
    loras: list[str] | None = opt(None, "LoRA folders or hub ids in fusion order "
                                        "(default: LORA_ROOT/{language}_lora LORA_ROOT/{task}_lora)", nargs="+")
    lora_root: str = opt("checkpoints/LoRAs", "where the default LoRAs live")
    # ---- data
    data_root: str = opt("data", "folder with train/ dev/ and system_prompts.json")
    train_file: str | None = opt(None, "a JSONL file to train on instead of DATA_ROOT/train/{language}_{task}_train."
                                       "jsonl (generic files: one {\"prompt\": ..., \"response\": ...} per line)")
    dev_file: str | None = opt(None, "a JSONL dev file (default: DATA_ROOT/dev/{language}_{task}_dev.jsonl if it "
                                     "exists)")
    no_dev: bool = opt(False, "skip the dev loss even when a dev set exists", action="store_true")
    system_prompt: str | None = opt(None, "system prompt text (default: system_prompts.json's {language}_{task})")
    prompt_style: str = opt(FAITHFUL, "prompt format: faithful (the original's Llama-2 [INST] text; its old name "
                                        "llama2-chat is accepted) or chat-template (the tokenizer's own)",
                            choices=(*STYLES, *STYLE_ALIASES))
    cot_suffix: bool = opt(True, "append the original's Chinese 'think step by step' (让我们一步一步地思考。) after "
                                 "[/INST] of every training prompt, as the released gates were trained",
                           action=argparse.BooleanOptionalAction)
    max_len: int = opt(4096, "longest example in tokens; longer ones lose prompt tokens from the left (the "
                             "response is kept whole when it fits)", type=int)
    limit: int | None = opt(None, "train on the first N examples only (smoke tests)", type=int)
    dev_limit: int | None = opt(None, "use the first N dev examples only", type=int)
    select: str = opt("auto", "how the best epoch is chosen: dev-metric (the original: generate on the dev set after "
                              "each epoch and score it as the original did, math dev accuracy / code dev pass@1), "
                              "dev-metric-strict (the same, strict scoring), dev-loss (cheap: no generation), auto "
                              "(dev-metric when the pair has dev data, else dev-loss)", choices=SELECTIONS)
    dev_temperature: float | None = opt(None, "dev metric: gate temperature while generating (default: the "
                                              "original's evaluation one, 1.1 for zh/ru math, else 1.0)", type=float)
    dev_fp32: bool = opt(True, "dev metric: generate in fp32 as the original evaluated (the base is cast for the "
                               "dev pass and back); --no-dev-fp32 keeps the training dtype",
                         action=argparse.BooleanOptionalAction)
    dev_max_new_tokens: int = opt(512, "--dev-metric: new tokens per dev item at most", type=int)
    dev_batch_size: int = opt(8, "--dev-metric: prompts per generate call", type=int)
    allow_code_execution: bool = opt(False, "--dev-metric on code: run the programs the model writes (sandboxed, "
                                            "not a security boundary)", action=argparse.BooleanOptionalAction)
    # ---- optimisation (the original recipe, SPEC §2)
    preset: str | None = opt(None, f"published hyper-parameters of a pair ({', '.join(PRESETS)}); default: "
                                   "{language}_{task} when it is one", choices=list(PRESETS))
    lr: float | None = opt(None, "peak learning rate (default: the preset's)", type=float)
    total_batch: int | None = opt(None, "examples per optimizer step = batch_per_device × processes × grad_accum "
                                        "(default: the preset's, unless batch_per_device is given)", type=int)
    batch_per_device: int | None = opt(None, "examples per process per micro-batch (default: total_batch / "
                                             "(processes × grad_accum))", type=int)
    grad_accum: int = opt(1, "micro-batches per optimizer step (FREQ in scripts/train.sh)", type=int)
    epochs: int = opt(5, "passes over the training data", type=int)
    max_steps: int | None = opt(None, "stop after this many optimizer steps (the schedule is unchanged)", type=int)
    schedule: str = opt("loraflow", "loraflow: every epoch sees every example (ceil(N / total batch) steps each); "
                                    "original: int(epochs × N / (batch per device × processes)) + 1 steps, FREQ not "
                                    "counted, stopping there (the last batches of the last epoch may go unseen)",
                        choices=SCHEDULES)
    warmup_ratio: float | None = opt(None, "fraction of the steps spent warming up linearly (default: the preset's: "
                                           "0.4 for ru_code, 0.2 otherwise)", type=float)
    weight_decay: float = opt(0.1, "AdamW weight decay", type=float)
    beta1: float = opt(0.9, "AdamW beta1", type=float)
    beta2: float = opt(0.95, "AdamW beta2", type=float)
    eps: float = opt(1e-5, "AdamW epsilon", type=float)
    clip_grad: float = opt(1.0, "clip the gate gradients' global norm to this (0 = off)", type=float)
    seed: int = opt(0, "seed of the data order (with the epoch) and of LoRA dropout (with the rank)", type=int)
    lora_dropout: bool = opt(True, "keep the LoRAs' dropout active while training the gate, as the original did",
                             action=argparse.BooleanOptionalAction)
    # ---- hardware
    device: str = opt("auto", DEVICE_HELP + " (cuda: each process its local rank's GPU)")
    dtype: str = opt("auto", DTYPE_HELP + "; below float32 the forward runs under autocast",
                     choices=("auto", *DTYPES))
    grad_ckpt: bool = opt(False, "gradient (activation) checkpointing: less memory, ~30% more compute",
                          action=argparse.BooleanOptionalAction)
    fsdp: bool = opt(False, "shard the frozen base with FSDP2 (for bases that do not fit one GPU); needs torchrun",
                     action=argparse.BooleanOptionalAction)
    # ---- outputs
    out_dir: str = opt("checkpoints/gates", "gates go to OUT_DIR/RUN_NAME/epoch_{n}/; the best epoch's to "
                                            "OUT_DIR/RUN_NAME.safetensors")
    run_name: str | None = opt(None, "default: {language}_{task}, or the training file's stem")
    save_every: int = opt(0, "also save the training state every N optimizer steps (0 = at epoch ends only)",
                          type=int)
    resume: bool = opt(False, "continue the run in OUT_DIR/RUN_NAME from its last training state",
                       action=argparse.BooleanOptionalAction)
    overwrite: bool = opt(False, "delete an earlier run in OUT_DIR/RUN_NAME and start again",
                          action=argparse.BooleanOptionalAction)
    log_every: int = opt(1, "write a metrics line every N optimizer steps", type=int)
    # ---- filled in by resolve(); recorded in config.json
    world_size: int | None = field(default=None, metadata={"cli": False})

    def __post_init__(self):
        for name in ("language", "task"):
            value = getattr(self, name)
            if value is not None and not _NAME.match(value):
                raise LoraflowError(f"{name} {value!r}: use letters, digits, '.', '_' and '-'")
        if self.train_file is None and (self.language is None or self.task is None):
            raise LoraflowError("say what to train on: --language and --task (data from DATA_ROOT), or --train-file")
        if self.loras is None and (self.language is None or self.task is None):
            raise LoraflowError("give --loras (in fusion order), or --language and --task for the default "
                                "LORA_ROOT/{language}_lora LORA_ROOT/{task}_lora")
        if self.loras is not None and len(self.loras) == 0:
            raise LoraflowError("--loras needs at least one LoRA")
        if self.prompt_style not in (*STYLES, *STYLE_ALIASES):
            raise LoraflowError(f"prompt_style {self.prompt_style!r}: choose one of {STYLES}")
        self.prompt_style = canonical_style(self.prompt_style)
        self.dtype = canonical_dtype(self.dtype)
        check_device(self.device)
        if self.select not in SELECTIONS:
            raise LoraflowError(f"select {self.select!r}: choose one of {SELECTIONS}")
        if self.schedule not in SCHEDULES:
            raise LoraflowError(f"schedule {self.schedule!r}: choose one of {SCHEDULES}")
        _require(self, "dev_temperature", lambda v: v > 0, "> 0", optional=True)
        for name in ("epochs", "grad_accum", "log_every", "dev_max_new_tokens", "dev_batch_size"):
            _require(self, name, lambda v: v >= 1, "at least 1")
        for name in ("total_batch", "batch_per_device", "limit", "dev_limit", "max_steps"):
            _require(self, name, lambda v: v >= 1, "at least 1", optional=True)
        _require(self, "max_len", lambda v: v >= 2, "at least 2")
        _require(self, "save_every", lambda v: v >= 0, ">= 0 (0 = at epoch ends only)")
        _require(self, "lr", lambda v: v > 0, "> 0", optional=True)
        _require(self, "warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1)", optional=True)
        _require(self, "weight_decay", lambda v: v >= 0, ">= 0")
        for name in ("beta1", "beta2"):
            _require(self, name, lambda v: 0 <= v < 1, "in [0, 1)")
        _require(self, "eps", lambda v: v > 0, "> 0")
        _require(self, "clip_grad", lambda v: v >= 0, ">= 0 (0 = no clipping)")
        # Fill lr / total batch / warm-up from the preset: the one named, else the pair's own when it has one.
        if self.preset is not None and self.preset not in PRESETS:
            raise LoraflowError(f"unknown preset {self.preset!r}; presets: {', '.join(PRESETS)}")
        pair = f"{self.language}_{self.task}"
        preset = PRESETS.get(self.preset or pair)
        if preset is not None:
            self.preset = self.preset or pair
            if self.lr is None:
                self.lr = preset.lr
            if self.total_batch is None and self.batch_per_device is None:
                self.total_batch = preset.total_batch
            if self.warmup_ratio is None:
                self.warmup_ratio = preset.warmup_ratio
        if self.lr is None or (self.total_batch is None and self.batch_per_device is None):
            raise LoraflowError(f"no preset for {pair!r} (presets: {', '.join(PRESETS)}): give --lr and "
                                "--total-batch (or --batch-per-device), or --preset")
        if self.warmup_ratio is None:
            self.warmup_ratio = 0.2
        if self.run_name is None:
            self.run_name = pair if self.language and self.task else Path(self.train_file).stem
        if not _NAME.match(self.run_name):
            raise LoraflowError(f"run_name {self.run_name!r}: use letters, digits, '.', '_' and '-'")
        if self.select == "auto":
            self.select = "dev-metric" if self._has_dev_benchmark() else "dev-loss"
        from loraflow.train.dev_metric import check_dev_metric_config

        check_dev_metric_config(self)

    def _has_dev_benchmark(self) -> bool:
        """A dev set that the evaluation harness can score: math or code, dev data there, not --no-dev/--fsdp."""
        if self.pair is None or self.task not in ("math", "code") or self.no_dev or self.fsdp:
            return False
        return bool(self.dev_file) or (Path(self.data_root) / "dev" / f"{self.pair}_dev.jsonl").is_file()

    @property
    def dev_metric(self) -> bool:
        """Whether the best epoch is chosen by a dev metric (generation on the dev set after each epoch)."""
        return self.select in ("dev-metric", "dev-metric-strict")

    # ------------------------------------------------------------------------------------------------ derived
    def resolve(self, world_size: int, device_type: str) -> TrainConfig:
        """A copy with `batch_per_device`, `total_batch`, `world_size`, `device` and `dtype` all set (what
        config.json records); raises when the batch sizes cannot agree."""
        per_step = world_size * self.grad_accum  # micro-batches per optimizer step, over all processes
        bpd, total = self.batch_per_device, self.total_batch
        if bpd is None:
            if total % per_step:
                raise LoraflowError(
                    f"total batch {total} cannot be split over {world_size} process(es) × grad_accum "
                    f"{self.grad_accum}: it must be a multiple of {per_step}. Change the number of processes, "
                    "--grad-accum (FREQ), or give --batch-per-device / --total-batch")
            bpd = total // per_step
        elif total is not None and bpd * per_step != total:
            raise LoraflowError(
                f"batch_per_device {bpd} × {world_size} process(es) × grad_accum {self.grad_accum} = "
                f"{bpd * per_step}, not the total batch {total} asked for")
        if self.world_size is not None and self.world_size != world_size:
            raise LoraflowError(f"this config was resolved for {self.world_size} processes, not {world_size}")
        if self.resume and self.overwrite:
            raise LoraflowError("--resume and --overwrite contradict each other")
        dtype = resolve_dtype(self.dtype, device_type)
        return dataclasses.replace(self, batch_per_device=bpd, total_batch=bpd * per_step, world_size=world_size,
                                   device=device_type, dtype=dtype)

    @property
    def pair(self) -> str | None:
        return f"{self.language}_{self.task}" if self.language and self.task else None

    def lora_sources(self) -> list[str]:
        if self.loras is not None:
            return list(self.loras)
        return [str(Path(self.lora_root) / f"{self.language}_lora"), str(Path(self.lora_root) / f"{self.task}_lora")]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _require(cfg: TrainConfig, name: str, ok, what: str, optional: bool = False) -> None:
    value = getattr(cfg, name)
    if value is None and optional:
        return
    if value is None or isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
        raise LoraflowError(f"{name} must be {what}, got {value!r}")


def schedule_steps(num_examples: int, total_batch: int, epochs: int) -> tuple[int, int]:
    """(optimizer steps per epoch, length of the lr schedule).

    Every epoch uses every example, so a last partial batch is kept: ceil(N / total_batch) steps per epoch. The
    schedule is `steps + 1` long, SPEC §2's `epochs × N / total_batch + 1` when total_batch divides N (the +1
    keeps the last step's learning rate above 0).
    """
    per_epoch = math.ceil(num_examples / total_batch)
    return per_epoch, epochs * per_epoch + 1


def original_steps(num_examples: int, batch_per_device: int, world_size: int, epochs: int) -> int:
    """The original's step count: int(epochs × N / (batch per device × processes)) + 1; gradient accumulation
    is not counted in it (SPEC §2)."""
    return int(epochs * num_examples / (batch_per_device * world_size)) + 1


def lr_at(step: int, peak: float, schedule: int, warmup_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up over warmup_ratio × schedule steps, then
    cosine decay to 0 at `schedule`."""
    warmup = int(warmup_ratio * schedule)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, schedule - warmup))
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------ command line
def cli_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; defaults are SUPPRESSed so that only flags actually given override a --config file."""
    parser.add_argument("--config", help="YAML or JSON file of field: value (flags given here win over it)")
    for f in cli_fields():
        kwargs = {k: v for k, v in f.metadata.items() if k != "help"}
        default = f"(default: {f.default})" if f.default is not None else ""
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS,
                            help=f"{f.metadata['help']} {default}".strip().replace("%", "%%"), **kwargs)
    for old, new in RENAMED_FIELDS.items():  # hidden: the old spellings, for one release
        parser.add_argument("--" + old.replace("_", "-"), dest=new, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def upgrade_fields(values: dict[str, Any]) -> dict[str, Any]:
    """Field values under their current names and values (`precision: bf16` -> `dtype: bfloat16`, `llama2-chat` ->
    `faithful`): what an older --config file or config.json said, read by this release."""
    out = {RENAMED_FIELDS.get(k, k): v for k, v in values.items()}
    if isinstance(out.get("dtype"), str):
        out["dtype"] = canonical_dtype(out["dtype"])
    if out.get("prompt_style") in STYLE_ALIASES:
        out["prompt_style"] = STYLE_ALIASES[out["prompt_style"]]
    return out


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    values.update({f.name: getattr(args, f.name) for f in cli_fields() if hasattr(args, f.name)})
    return TrainConfig(**upgrade_fields(values))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Field values from a `.yaml`/`.yml` (needs PyYAML) or `.json` file; unknown keys are errors."""
    path = Path(path)
    if not path.is_file():
        raise LoraflowError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise LoraflowError(f"{path}: reading YAML needs PyYAML (`pip install pyyaml`), or write the config as "
                                "JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise LoraflowError(f"{path}: invalid YAML: {e}") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LoraflowError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    else:
        raise LoraflowError(f"{path}: a config file is .yaml, .yml or .json")
    if not isinstance(data, dict):
        raise LoraflowError(f"{path}: expected a mapping of field: value")
    fields = {f.name: f for f in cli_fields()}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        name = RENAMED_FIELDS.get(name, name)
        if name not in fields:
            raise LoraflowError(f"{path}: unknown field {key!r}; fields: {', '.join(fields)}")
        kind = fields[name].metadata.get("type")
        if kind in (int, float) and isinstance(value, str):  # YAML reads `1e-3` as a string
            try:
                value = kind(value)
            except ValueError:
                raise LoraflowError(f"{path}: {key} must be a number, got {value!r}") from None
        out[name] = value
    return out
