"""The demo pipeline: world -> base model -> two LoRAs -> gate / LoRA-Hub -> every method evaluated -> table, plots.

Every stage uses loraflow's own code paths: the gate is trained by `loraflow.train.recipe.train` (the `loraflow train`
recipe), LoRA-Hub's weights come from `loraflow.train.lorahub`, every method runs as a `FlowModel` (mode base / single /
static / flow), generation is `loraflow.eval.generate` and scoring is what `loraflow score --task mgsm` runs
(`loraflow.eval.score.score_predictions`, the MGSM scorer) on data files in the MGSM test layout.

Every stage writes into a temporary folder that is renamed into place once complete, with a `done.json` marker
holding the hash of everything the stage depends on (its config fields, its inputs' hashes, `STAGE_VERSIONS`).
A rerun skips a stage whose marker matches and redoes it (and everything downstream) when its inputs changed.

    outputs/demo/
      data/          world.json, tokenizer/, pretrain.jsonl, lang_train.jsonl, task_train.jsonl,
                     composite_{train,dev}.jsonl (gate training), test/{xx,en}_math_test.jsonl (MGSM layout)
      base/          the pretrained LlamaForCausalLM (HF format) + its tokenizer
      lang_lora/     the language LoRA (PEFT format)        task_lora/  the task LoRA (PEFT format)
      gate/          the `loraflow train` run: gate/epoch_N/, gate.safetensors + gate.json (best dev-loss epoch)
      lorahub/       weights.json (the searched static weights and every evaluation)
      eval_<method>/ {xx,en}/predictions.jsonl, .scored.jsonl, results.json (loraflow score) per method
      report/        table.md, results.json, gate_heatmap.png, gate_layers.png
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loraflow.data.records import split_path
from loraflow.demo.methods import load_flow, load_tokenizer
from loraflow.demo.training import LoopConfig, base_config, encode, pretrain_base, train_lora, world_tokenizer
from loraflow.demo.world import World, dataset
from loraflow.errors import LoraflowError
from loraflow.eval.registry import LORA_ROLES, METHODS, apply_method
from loraflow.files import atomic_write_json, atomic_write_text, read_json, read_jsonl

# Bump a stage's version when its code changes what it produces: that stage and everything after it is redone.
STAGE_VERSIONS = {"data": 8, "base": 4, "lang_lora": 3, "task_lora": 3, "gate": 3, "lorahub": 3, "eval": 5}
METHOD_LABELS = {name: method.title for name, method in METHODS.items()}
LORA_NAMES = tuple(f"{role}_lora" for role in LORA_ROLES)  # fusion order as in the paper: language LoRA first
LANGUAGES = ("xx", "en")  # the composite task (the other language) and the English sanity check


@dataclass
class DemoConfig:
    """Every knob of the demo; `DemoConfig.of_size("small")` is the CI-sized variant."""

    size: str = "full"
    seed: int = 0
    # base model (LlamaForCausalLM)
    hidden: int = 96
    layers: int = 4
    heads: int = 4
    pretrain_steps: int = 800  # 400 left the task LoRA at 43-58% in English (seeds 0, 1) and LoRA-Flow at 3-7%
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    # the base reads L word by word as English: each L word's input embedding is its English word's (see
    # `training.pretrain_base`); without it no method read the L questions (README, "The demo")
    shared_inputs: bool = True
    # LoRAs (PEFT, all seven projections)
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_steps: int = 200
    lora_batch: int = 32
    lora_lr: float = 3e-3
    # gate training (`loraflow train`; the paper's zh_math recipe is 200 examples, 5 epochs, batch 4, lr 1e-3. Here
    # lr 1e-2 for 15 epochs: the recipe's gate answered in English, its dev loss still falling (2.41); chosen on
    # seed 0's composite dev set (never the test set): lr 1e-2 x 5 epochs gave dev loss 1.97 and 4% dev accuracy,
    # 3e-2 x 5 1.73 and 6%, 1e-2 x 15 1.70 and 8%)
    gate_examples: int = 200
    gate_epochs: int = 15
    gate_batch: int = 4
    gate_lr: float = 1e-2
    dev_examples: int = 50  # composite dev set: `loraflow train` keeps the epoch with the lowest dev loss
    # LoRA-Hub (loraflow.train.lorahub defaults: NGOpt, 40 evaluations, on the gate's training examples)
    lorahub_budget: int = 40
    # evaluation
    test_examples: int = 250  # held-out composite problems (MGSM's 250 per language)
    english_examples: int = 100  # plain English problems: the task skill's sanity check
    eval_batch: int = 64

    def __post_init__(self):
        if self.size not in SIZES:
            raise LoraflowError(f"demo size {self.size!r}: choose one of {sorted(SIZES)}")
        for name in ("hidden", "layers", "heads", "pretrain_steps", "lora_steps", "gate_examples", "gate_epochs",
                     "test_examples", "dev_examples", "english_examples", "lorahub_budget", "eval_batch"):
            if getattr(self, name) < 1:
                raise LoraflowError(f"demo config: {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise LoraflowError(f"demo config: hidden ({self.hidden}) must be divisible by heads ({self.heads})")

    @classmethod
    def of_size(cls, size: str, **overrides) -> DemoConfig:
        if size not in SIZES:
            raise LoraflowError(f"demo size {size!r}: choose one of {sorted(SIZES)}")
        return cls(size=size, **{**SIZES[size], **overrides})


SIZES: dict[str, dict] = {
    "full": {},
    # CI: every stage and every file, on a model too small to learn much (well under 2 CPU-minutes)
    "small": dict(hidden=32, layers=2, heads=2, pretrain_steps=30, pretrain_batch=16, lora_steps=15, lora_batch=16,
                  gate_examples=16, gate_epochs=2, dev_examples=8, lorahub_budget=4, test_examples=16,
                  english_examples=8),
}


# ---------------------------------------------------------------------------------------------------- caching
def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stages:
    """Runs each stage at most once per config: `run(name, fields, deps, fn, title)` -> the stage's folder."""

    def __init__(self, out: Path, cfg: DemoConfig, total: int):
        self.out, self.cfg, self.hashes, self.total, self.count = out, cfg, {}, total, 0
        self.timings: dict[str, float] = {}

    def run(self, name: str, fields: tuple[str, ...], deps: tuple[str, ...], fn: Callable[[Path], dict | None],
            title: str) -> Path:
        self.count += 1
        title = f"[{self.count}/{self.total}] {title}"
        key = _hash({"stage": name, "version": STAGE_VERSIONS.get(name, STAGE_VERSIONS.get(name.split("_")[0], 1)),
                     "config": {f: getattr(self.cfg, f) for f in ("seed", *fields)},
                     "deps": {d: self.hashes[d] for d in deps}})
        self.hashes[name] = key
        final = self.out / name
        marker = final / "done.json"
        if marker.is_file() and read_json(marker).get("hash") == key:
            print(f"== {title}: done already ({final})", flush=True)
            self.timings[name] = read_json(marker).get("seconds", 0.0)  # when it ran
            return final
        print(f"== {title}", flush=True)
        start = time.time()
        tmp = self.out / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        info = fn(tmp) or {}
        seconds = round(time.time() - start, 1)
        atomic_write_json(tmp / "done.json", {"hash": key, "seconds": seconds, **info})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        self.timings[name] = seconds
        print(f"   done in {seconds:.0f} s -> {final}", flush=True)
        return final


def _write_jsonl(path: Path, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ------------------------------------------------------------------------------------------------------ stages
def make_data(cfg: DemoConfig, out: Path) -> dict:
    """Every data set of the demo, from the world's generator (nothing downloaded). The test sets are held out:
    no prompt of a test set appears in any training or dev set."""
    world = World(cfg.seed)
    n_text = cfg.pretrain_steps * cfg.pretrain_batch
    n_skill = cfg.lora_steps * cfg.lora_batch
    test = dataset(world, "math-xx", cfg.test_examples, seed=3)
    english_test = dataset(world, "math-en", cfg.english_examples, seed=3)
    held_out = {ex["prompt"] for ex in test} | {ex["prompt"] for ex in english_test}
    dev = dataset(world, "math-xx", cfg.dev_examples, seed=2, exclude=held_out)
    train = dataset(world, "math-xx", cfg.gate_examples, seed=1, exclude=held_out | {ex["prompt"] for ex in dev})
    sets = {
        # the base model's text: mostly English, some L, some parallel English <=> L (50/20/30)
        "pretrain": (dataset(world, "plain-en", n_text * 50 // 100, seed=1)
                     + dataset(world, "plain-xx", n_text * 20 // 100, seed=1)
                     + dataset(world, "parallel", n_text * 30 // 100, seed=1)),
        "lang_train": dataset(world, "chat-xx", n_skill, seed=1),
        "task_train": dataset(world, "math-en", n_skill, seed=1, exclude=held_out),
        "composite_train": train, "composite_dev": dev,
    }
    for name, rows in sets.items():
        _write_jsonl(out / f"{name}.jsonl", rows)
    # the test sets in the MGSM layout `loraflow score --task mgsm` reads: question + answer string, ids = line index
    for lang, rows in (("xx", test), ("en", english_test)):
        _write_jsonl(split_path(out, lang, "math", "test"),
                     [{"question": r["prompt"], "answer": str(r["answer"]), "response": r["response"]} for r in rows])
    # for `loraflow eval` / scripts/eval.sh on these files (DATA_ROOT=outputs/demo/data); the demo's chat template
    # has no system turn, so the prompt is the same as the demo's own
    atomic_write_json(out / "system_prompts.json", {f"{lang}_math": "Solve the word problem." for lang in LANGUAGES})
    atomic_write_json(out / "world.json", {"seed": cfg.seed, "lexicon": world.lexicon,
                                           "answer_phrase": world.answer_phrase})
    world_tokenizer(world.vocabulary()).save_pretrained(str(out / "tokenizer"))
    return {"sizes": {**{k: len(v) for k, v in sets.items()}, "xx_test": len(test), "en_test": len(english_test)}}


def make_base(cfg: DemoConfig, data: Path, out: Path) -> dict:
    tok = load_tokenizer(data / "tokenizer")
    config = base_config(len(tok), cfg.hidden, cfg.layers, cfg.heads)
    loop = LoopConfig(cfg.pretrain_steps, cfg.pretrain_batch, cfg.pretrain_lr, weight_decay=0.01, seed=cfg.seed)
    vocab = tok.get_vocab()
    shared = [(vocab[en], vocab[xx]) for en, xx in World(cfg.seed).translation_pairs()] if cfg.shared_inputs else []
    model, losses = pretrain_base(config, read_jsonl(data / "pretrain.jsonl"), tok, loop, shared_inputs=shared)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    atomic_write_json(out / "losses.json", losses)
    return {"params": sum(p.numel() for p in model.parameters()), "final_loss": _tail_mean(losses)}


def make_lora(cfg: DemoConfig, base: Path, data_file: Path, out: Path, desc: str) -> dict:
    from transformers import LlamaForCausalLM

    tok = load_tokenizer(base)
    loop = LoopConfig(cfg.lora_steps, cfg.lora_batch, cfg.lora_lr, seed=cfg.seed)
    losses = train_lora(lambda: LlamaForCausalLM.from_pretrained(str(base)), read_jsonl(data_file), tok, loop,
                        cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, out, desc)
    atomic_write_json(out / "losses.json", losses)
    return {"final_loss": _tail_mean(losses)}


def _tail_mean(xs: list[float], n: int = 20) -> float:
    return round(sum(xs[-n:]) / max(1, len(xs[-n:])), 4)


def make_gate(cfg: DemoConfig, base: Path, loras: list[Path], data: Path, out: Path) -> dict:
    """`loraflow train` on the composite training examples; it keeps the epoch with the lowest dev loss."""
    from loraflow.train.config import TrainConfig
    from loraflow.train.recipe import train

    tc = TrainConfig(base_model=str(base), loras=[str(p) for p in loras],
                     train_file=str(data / "composite_train.jsonl"), dev_file=str(data / "composite_dev.jsonl"),
                     system_prompt="", prompt_style="chat-template", cot_suffix=False,  # not the paper's data
                     lr=cfg.gate_lr, total_batch=cfg.gate_batch, epochs=cfg.gate_epochs, seed=cfg.seed,
                     out_dir=str(out), run_name="gate", log_every=10)
    summary = train(tc)
    if not (out / "gate.safetensors").is_file():  # no dev set: the final gate
        shutil.copytree(out / "gate" / "final", out / "final")
    return {"best_epoch": summary["best_epoch"], "history": summary["history"]}


def gate_path(gate_dir: Path) -> Path:
    best = gate_dir / "gate.safetensors"
    return best if best.is_file() else gate_dir / "final"


def make_lorahub(cfg: DemoConfig, base: Path, loras: list[Path], data: Path, out: Path) -> dict:
    from loraflow.train.lorahub import LoraHubConfig, lorahub_search, save_weights

    flow = load_flow(base, loras)
    tok = load_tokenizer(base)
    examples = [encode(tok, ex, 4096) for ex in read_jsonl(data / "composite_train.jsonl")]
    config = LoraHubConfig(budget=cfg.lorahub_budget, seed=cfg.seed, batch_size=32)
    result = lorahub_search(flow, examples, config, progress=True)
    save_weights(out / "weights.json", result, config, lora_names=list(flow.lora_names))
    return {"weights": result.weights, "loss": result.loss}


# -------------------------------------------------------------------------------------------------- evaluation
def max_new_tokens(data: Path) -> int:
    """Room for the longest reference solution of the test sets, plus a margin."""
    tok = load_tokenizer(data / "tokenizer")
    longest = max(len(tok(r["response"], add_special_tokens=False)["input_ids"])
                  for lang in LANGUAGES for r in read_jsonl(split_path(data, lang, "math", "test")))
    return longest + 8


def make_eval(cfg: DemoConfig, method: str, base: Path, loras: list[Path], gate: Path, lorahub: Path, data: Path,
              out: Path) -> dict:
    """Greedy generation (`loraflow.eval.generate`) on both test sets, scored by `loraflow score --task mgsm`."""
    from loraflow.data.prompts import chat_prompt
    from loraflow.eval.generate import DecodeConfig, generate_predictions
    from loraflow.eval.registry import resolve_task
    from loraflow.eval.score import score_predictions
    from loraflow.train.lorahub import load_weights

    flow = load_flow(base, loras, gate_path(gate) if method == "flow" else None)
    apply_method(flow, method, weights=load_weights(lorahub / "weights.json", flow.lora_names)
                 if method == "lorahub" else None)
    tok = load_tokenizer(base)
    decode = DecodeConfig(max_new_tokens=max_new_tokens(data), batch_size=cfg.eval_batch, add_special_tokens=False)
    results = {}
    for lang in LANGUAGES:
        test_file = split_path(data, lang, "math", "test")
        items = [{"id": str(i), "task": "mgsm", "language": lang, "split": "test", "method": method,
                  "prompt": chat_prompt(tok, None, r["question"])} for i, r in enumerate(read_jsonl(test_file))]
        predictions = out / lang / "predictions.jsonl"
        predictions.parent.mkdir(parents=True, exist_ok=True)
        print(f"   {METHOD_LABELS[method]}, {lang}: generating {len(items)} answers", flush=True)
        generate_predictions(flow, tok, items, predictions, decode, progress=True)
        results[lang] = score_predictions(resolve_task("mgsm"), predictions, test_file, data_root=data,
                                          language=lang)["metrics"]
    world = World(cfg.seed)
    rows = read_jsonl(out / "xx" / "predictions.scored.jsonl")
    refs = read_jsonl(data / "test" / "xx_math_test.jsonl")
    composite = [world.l_answer(r["generation"]) == int(ref["answer"]) for r, ref in zip(rows, refs)]
    for r, ok in zip(rows, composite):
        r["correct_digits"], r["correct"] = r["correct"], ok
    _write_jsonl(out / "xx" / "predictions.scored.jsonl", rows)
    shares = [l_word_share(world, r["generation"]) for r in rows]
    words = [w for r in rows for w in r["generation"].split() if world.language_of(w)]
    summary = {"method": method, "composite_accuracy": _mean(composite),
               "composite_digit_accuracy": results["xx"]["accuracy"],
               "english_accuracy": results["en"]["accuracy"],
               "composite_l_word_share": _mean(world.language_of(w) == "xx" for w in words),
               "composite_correct_in_l": _mean(r["correct"] and s is not None and s >= IN_L
                                               for r, s in zip(rows, shares))}
    atomic_write_json(out / "results.json", summary)
    return summary


IN_L = 0.9  # an answer "is in L" when at least this share of its translatable words are L words


def l_word_share(world: World, text: str) -> float | None:
    """Share of L words among the words of `text` that belong to a language (None when there are none)."""
    langs = [world.language_of(w) for w in text.split()]
    langs = [x for x in langs if x]
    return sum(x == "xx" for x in langs) / len(langs) if langs else None


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def format_table(results: dict[str, dict]) -> str:
    lines = ["| Method | Composite: L math, answer in L (acc.) | English math (acc.) | L words in L answers "
             "| correct and in L |",
             "|---|---|---|---|---|"]
    for m, r in results.items():
        lines.append(f"| {METHOD_LABELS[m]} | {100 * r['composite_accuracy']:.1f} | "
                     f"{100 * r['english_accuracy']:.1f} | {100 * r['composite_l_word_share']:.0f}% | "
                     f"{100 * r['composite_correct_in_l']:.1f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- pipeline
def run_pipeline(cfg: DemoConfig, out: str | os.PathLike = "outputs/demo", assets: Path | None = None,
                 plots: bool = True) -> dict:
    """Run (or resume) every stage; returns {"table": markdown, "results": {...}, "files": {...}}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", dataclasses.asdict(cfg))
    st = Stages(out, cfg, total=6 + len(METHODS) + int(plots))
    t0 = time.time()
    data = st.run("data", ("size", "pretrain_steps", "pretrain_batch", "lora_steps", "lora_batch", "gate_examples",
                           "dev_examples", "test_examples", "english_examples"), (),
                  lambda o: make_data(cfg, o), "world: generate every data set from the seed")
    base = st.run("base", ("hidden", "layers", "heads", "pretrain_steps", "pretrain_batch", "pretrain_lr",
                           "shared_inputs"), ("data",),
                  lambda o: make_base(cfg, data, o), "pretrain the tiny base model on plain text")
    lora_fields = ("lora_r", "lora_alpha", "lora_dropout", "lora_steps", "lora_batch", "lora_lr")
    lang = st.run("lang_lora", lora_fields, ("data", "base"),
                  lambda o: make_lora(cfg, base, data / "lang_train.jsonl", o, "language LoRA"),
                  "train the language LoRA (chat in L, no arithmetic)")
    task = st.run("task_lora", lora_fields, ("data", "base"),
                  lambda o: make_lora(cfg, base, data / "task_train.jsonl", o, "task LoRA"),
                  "train the task LoRA (word problems in English)")
    loras = [lang, task]
    gate = st.run("gate", ("gate_epochs", "gate_batch", "gate_lr"), ("data", "lang_lora", "task_lora"),
                  lambda o: make_gate(cfg, base, loras, data, o),
                  f"loraflow train: the LoRA-Flow gate on {cfg.gate_examples} composite examples")
    lorahub = st.run("lorahub", ("lorahub_budget",), ("data", "lang_lora", "task_lora"),
                     lambda o: make_lorahub(cfg, base, loras, data, o), "LoRA-Hub: search two static weights")
    results = {}
    for method in METHODS:
        deps = ("data", "lang_lora", "task_lora", *(("gate",) if method == "flow" else ()),
                *(("lorahub",) if method == "lorahub" else ()))
        d = st.run(f"eval_{method}", (), deps,
                   lambda o, m=method: make_eval(cfg, m, base, loras, gate, lorahub, data, o),
                   f"evaluate {METHOD_LABELS[method]} on {cfg.test_examples} L + {cfg.english_examples} English "
                   "problems")
        results[method] = read_json(d / "results.json")
    table = format_table(results)
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report / "table.md", table)
    files = {"table": report / "table.md", "results": report / "results.json", "gate": gate_path(gate),
             "flow_predictions": out / "eval_flow" / "xx" / "predictions.jsonl"}
    extra = {}
    if plots:
        from loraflow.demo.report import write_plots

        print(f"== [{st.total}/{st.total}] plot the gate weights", flush=True)
        plot_files, extra = write_plots(cfg, out, base, loras, gate_path(gate), assets)
        files.update(plot_files)
    from loraflow.demo.report import dev_token_losses

    extra["dev_token_loss"] = dev_token_losses(cfg, out, base, loras, gate_path(gate))
    seconds = round(time.time() - t0, 1)
    atomic_write_json(report / "results.json", {"config": dataclasses.asdict(cfg), "results": results,
                                                "stage_seconds": st.timings, "seconds": seconds, **extra})
    print(f"\nLoRA-Flow demo ({cfg.size}), {seconds:.0f} s:\n\n{table}", flush=True)
    for name, path in files.items():
        print(f"  {name:<17} {path}")
    return {"table": table, "results": results, "files": files, "seconds": seconds}
