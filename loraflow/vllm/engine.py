"""vLLM as the generator of `loraflow eval --engine vllm`: the same prompts, token ids and text post-processing
as the Hugging Face path (`loraflow.eval.generate`), with vLLM doing the decoding.

`VLLMGenerator` stands in for the model in `generate_predictions` (through its `loraflow_generate_batch`): it
takes the already encoded (and cut) prompt ids of one batch and returns the generated token ids, which
`loraflow.eval.generate.decode_rows` decodes as it does HF's (EOS ids, stop strings, and `generation_original`,
the text as the original harness saw it). So `predictions.jsonl`, its
resume and its scoring do not change; only larger batches pay off more (vLLM schedules a whole batch at
once, so raise --batch-size).

Each method becomes a model folder (`loraflow export`) under the run's folder: base (vLLM's own architecture, the
base folder as it is), lang/task (single), average/lorahub (static, with the weights of the run), flow (the gate).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


class VLLMGenerator:
    """Greedy decoding with a vLLM engine on one model folder; `generate_batch` matches the HF path's contract."""

    training = False

    def __init__(self, folder: str | os.PathLike, dtype: str = "float32", tensor_parallel_size: int = 1,
                 max_model_len: int | None = None):
        from loraflow.vllm.check import engine

        kwargs = {} if max_model_len is None else {"max_model_len": max_model_len}
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.llm = engine(folder, dtype=dtype, tensor_parallel_size=tensor_parallel_size, **kwargs)
        self.folder = Path(folder)
        self.generation_config = None  # read by eos_ids, as the HF path reads the model's
        if (self.folder / "generation_config.json").is_file():
            from transformers import GenerationConfig

            self.generation_config = GenerationConfig.from_pretrained(self.folder)

    def eval(self):  # generate() switches models to eval mode and back
        return self

    def train(self, mode: bool = True):
        return self

    def loraflow_generate_batch(self, tokenizer, prompt_ids: Sequence[Sequence[int]], config) -> list[list[int]]:
        """Greedy new token ids of every prompt (`loraflow.eval.generate` decodes them, as it does HF's)."""
        from vllm import SamplingParams

        from loraflow.eval.generate import eos_ids

        eos = eos_ids(tokenizer, self)
        params = SamplingParams(temperature=0.0, max_tokens=config.max_new_tokens, stop_token_ids=eos,
                                stop=list(config.stop) or None, include_stop_str_in_output=True)
        outputs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_ids], params, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]

    def loraflow_score_tokens(self, sequences: Sequence[Sequence[int]], scored: Sequence[int],
                              progress: bool = False) -> list[tuple[float, bool]]:
        """(sum of the log-probs of the last `scored[i]` tokens of `sequences[i]` given the tokens before them,
        whether each of those tokens is the greedy one), from vLLM's prompt logprobs (one forward per sequence)."""
        from vllm import SamplingParams

        # prompt_logprobs=1: each prompt position gets its own token's logprob and rank (1 = the argmax)
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
        outputs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in sequences], params, use_tqdm=progress)
        results = []
        for out, ids, n in zip(outputs, sequences, scored, strict=True):
            entries = [out.prompt_logprobs[t][ids[t]] for t in range(len(ids) - n, len(ids))]
            results.append((float(sum(e.logprob for e in entries)), all(e.rank == 1 for e in entries)))
        return results

    def close(self) -> None:
        from loraflow.vllm.check import shutdown

        shutdown(self.llm)


def method_folder(out: Path, method: str, base: str, loras: Sequence[str], gate: str | None,
                  temperature: float | None, static_weights: Sequence[float] | None) -> Path:
    """The model folder a method runs from in vLLM (written once per run folder; the base method needs none)."""
    from loraflow.fusion.folder import export_model_folder

    if method == "base":
        return Path(base)
    folder = out / "vllm-model"
    mode = {"lang": "single", "task": "single", "average": "static", "lorahub": "static", "flow": "flow"}[method]
    return export_model_folder(folder, base, list(loras), gate=gate if mode == "flow" else None, mode=mode,
                               static_weights=static_weights if mode == "static" else None,
                               temperature=temperature if mode == "flow" else None, overwrite=True)
