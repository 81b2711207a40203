"""LoRA-Hub (Huang et al., 2023) as a baseline: one static weight per LoRA, found without gradients.

    weights = lorahub_search(flow_model, examples).weights   # flow_model.set_mode("static", weights=weights)

The search (SPEC §4): nevergrad's `NGOpt` over w ∈ [-1.5, 1.5]^k, minimising

    objective(w) = mean loss on the few-shot examples under static fusion w  +  0.05 · Σ_i |w_i|

for a budget of 40 evaluations. The loss of one example is the mean cross-entropy over its response tokens (the
prompt is masked), and examples count equally. Each evaluation is a forward pass of the `FlowModel` in `static`
mode, under `torch.no_grad()`. The search is seeded and deterministic, starts from the average fusion (1/k each,
evaluated first) and returns the best weights it evaluated, so its result is never worse than the average on its
own objective. (The reference code starts from zeros, the base model; `init="zeros"` does that.)

**What is fused.** loraflow's static fusion adds the weighted deltas, ΔW = Σ_i w_i B_i A_i, in every targeted
projection. The reference LoRA-Hub merges the factors first, ΔW = (Σ_i w_i B_i)(Σ_i w_i A_i), which also creates
cross terms w_i w_j B_i A_j between LoRAs that were never trained together (and, for LoRAs of different ranks,
is not even defined). The cross terms are an artefact of merging into one LoRA-shaped module, not part of the
idea of a static weighted combination; the exact weighted sum is what "static fusion" means, is what LoRA-Flow's
gate generalises (its gate scales each LoRA's output), and is exactly loraflow's `static` mode, so the
average, LoRA-Hub and LoRA-Flow baselines differ only in how the weights are chosen.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loraflow import __version__
from loraflow.errors import LoraflowError
from loraflow.files import atomic_write_json, read_json

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LoraHubConfig:
    """The search's knobs (defaults: LoRA-Hub's)."""

    budget: int = 40  # loss evaluations (each one pass over the examples)
    bound: float = 1.5  # every weight stays in [-bound, bound]
    l1: float = 0.05  # weight of the L1 penalty Σ|w| in the objective
    seed: int = 0  # seeds nevergrad's random state
    init: str = "average"  # first candidate: "average" (1/k each) or "zeros" (the reference code's start)
    batch_size: int = 4  # examples per forward pass; does not change the loss

    def __post_init__(self):
        if self.budget < 1:
            raise LoraflowError(f"LoRA-Hub budget must be at least 1, got {self.budget}")
        if not self.bound > 0:
            raise LoraflowError(f"LoRA-Hub bound must be > 0, got {self.bound}")
        if self.l1 < 0:
            raise LoraflowError(f"LoRA-Hub L1 penalty must be >= 0, got {self.l1}")
        if self.init not in ("average", "zeros"):
            raise LoraflowError(f"LoRA-Hub init must be 'average' or 'zeros', got {self.init!r}")
        if self.batch_size < 1:
            raise LoraflowError(f"batch_size must be at least 1, got {self.batch_size}")


@dataclass
class LoraHubResult:
    weights: list[float]  # one per LoRA, in the model's LoRA order
    loss: float  # mean example loss at `weights`
    objective: float  # loss + l1 · Σ|w|
    history: list[dict] = field(default_factory=list)  # every evaluation: weights, loss, objective


def mean_example_loss(model, examples: Sequence[dict], batch_size: int = 4) -> float:
    """Mean over examples of each one's mean cross-entropy on its labelled (response) tokens.

    examples: dicts with `input_ids` and `labels` (lists of ints; `-100` = no loss), as `data.encode_example`
    makes them. Batches are right-padded, so positions are those of the unpadded sequence.
    """
    import torch
    import torch.nn.functional as F

    if not examples:
        raise LoraflowError("LoRA-Hub needs at least one example")
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    total = 0.0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for start in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[start:start + batch_size]]
            width = max(len(ex["input_ids"]) for ex in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ex in enumerate(batch):
                n = len(ex["input_ids"])
                ids[row, :n] = torch.as_tensor(ex["input_ids"])
                labels[row, :n] = torch.as_tensor(ex["labels"])
                mask[row, :n] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            targets = labels[:, 1:].to(device)  # token t predicts t + 1
            token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                         reduction="none")  # (batch, seq - 1)
            counts = (targets != IGNORE_INDEX).sum(dim=1)
            if (counts == 0).any():
                raise LoraflowError("an example has no labelled tokens (its response was cut away?)")
            total += (token_loss.sum(dim=1) / counts).sum().item()
    return total / len(examples)


def lorahub_search(model, examples: Sequence[dict], config: LoraHubConfig | None = None,
                   progress: bool = False) -> LoraHubResult:
    """Search static fusion weights for `model` (a `FlowModel`) on `examples`; leaves it in static mode at them."""
    import numpy as np

    try:
        import nevergrad as ng
    except ImportError:
        raise LoraflowError("LoRA-Hub needs nevergrad: pip install 'loraflow[eval]' (or pip install nevergrad)") \
            from None
    from tqdm.auto import tqdm

    config = config or LoraHubConfig()
    k = model.k
    start = np.full(k, 1.0 / k) if config.init == "average" else np.zeros(k)
    param = ng.p.Array(init=start, lower=-config.bound, upper=config.bound)
    param.random_state = np.random.RandomState(config.seed)
    optimizer = ng.optimizers.NGOpt(parametrization=param, budget=config.budget, num_workers=1)
    history = []
    was_training = model.training
    model.eval()
    with warnings.catch_warnings():
        # NGOpt's inner solvers complain about their own defaults; nothing a user can act on
        warnings.filterwarnings("ignore", message=".*RHOEND.*")
        for _ in tqdm(range(config.budget), desc="LoRA-Hub search", unit="eval", disable=not progress):
            candidate = optimizer.ask()
            weights = [float(w) for w in candidate.value]
            model.set_mode("static", weights=weights)
            loss = mean_example_loss(model, examples, config.batch_size)
            objective = loss + config.l1 * sum(abs(w) for w in weights)
            optimizer.tell(candidate, objective)
            history.append({"weights": weights, "loss": loss, "objective": objective})
    model.train(was_training)
    best = min(history, key=lambda h: h["objective"])  # the first of equals: deterministic
    model.set_mode("static", weights=best["weights"])
    return LoraHubResult(best["weights"], best["loss"], best["objective"], history)


# -------------------------------------------------------------------------------------------------- weights file

def save_weights(path: str | os.PathLike, result: LoraHubResult, config: LoraHubConfig, **metadata) -> None:
    """Write the found weights with what they were found for (atomically)."""
    atomic_write_json(path, {"format": "loraflow-lorahub", "weights": result.weights, "loss": result.loss,
                             "objective": result.objective, "config": asdict(config), **metadata,
                             "loraflow_version": __version__, "history": result.history})


def load_weights(path: str | os.PathLike, lora_names: Sequence[str] | None = None) -> list[float]:
    """The weights in a LoRA-Hub file; with `lora_names`, refuses a file made for other LoRAs or another order."""
    data = read_json(path)
    weights = data.get("weights") if isinstance(data, dict) else None
    if not isinstance(weights, list) or not all(isinstance(w, (int, float)) for w in weights):
        raise LoraflowError(f"{path}: not a LoRA-Hub weights file (no list of numbers under 'weights')")
    if lora_names is not None:
        names = data.get("lora_names")
        if len(weights) != len(lora_names) or (names is not None and list(names) != list(lora_names)):
            raise LoraflowError(f"{path}: weights for LoRAs {names or len(weights)}, but the model has "
                                f"{list(lora_names)}; delete the file to search again")
    return [float(w) for w in weights]


def lorahub_weights(model, examples, path: str | os.PathLike, config: LoraHubConfig | None = None,
                    progress: bool = False, **metadata) -> tuple[list[float], bool]:
    """(weights, reused): the weights saved at `path` if it exists, else a new search saved there.

    `examples` may be a callable returning them, so nothing is tokenised when the file is reused.
    """
    path = Path(path)
    if path.is_file():
        return load_weights(path, model.lora_names), True
    config = config or LoraHubConfig()
    result = lorahub_search(model, examples() if callable(examples) else examples, config, progress=progress)
    save_weights(path, result, config, lora_names=list(model.lora_names), lora_ids=[str(i) for i in model.lora_ids],
                 base_model=model.base_name_or_path, **metadata)
    return result.weights, False
