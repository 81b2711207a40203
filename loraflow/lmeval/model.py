"""`LoraflowLM`: lm-evaluation-harness's model (`--model loraflow`) for a LoRA-Flow model folder.

  loraflow lm-eval --model loraflow --model_args folder=OUT,engine=hf --batch_size 8 --tasks ... --include_path TASKS

`--model_args` (lm-eval's `key=value,...`):
- `folder` (or lm-eval's usual `pretrained`): a model folder written by `loraflow export` (its mode, LoRAs, gate and
  temperature are the folder's), or a plain Hugging Face base folder (the `base` method);
- `engine`: `hf` (`FlowModel` / transformers), `vllm` (a vLLM engine on the folder, `loraflow.vllm`), or `auto`
  (the default: vLLM when it is importable, else HF);
- `dtype` (float32), `max_length` (the model's context; under vLLM two less), `max_gen_toks` (256, when a task
  gives none), `tensor_parallel_size` (1; vLLM).
lm-eval's own `--batch_size N` (a number; not `auto`) and `--device` (HF; lm-eval's default `cuda:0` means CUDA
when there is a GPU, else the CPU) reach the model too, and `--apply_chat_template` renders a task's messages with
the tokenizer's own chat template.

Requests, per engine:
- `generate_until`: greedy only (a task asking to sample is refused), `until` and `max_gen_toks` honoured. It runs
  `loraflow.eval.generate.generate`, the code of `loraflow eval`, with either engine (vLLM through
  `VLLMGenerator.loraflow_generate_batch`): the same prompt ids (BOS added unless the text has it; prompts cut from
  the left to `max_length - max_gen_toks` tokens), EOS ids and stop-string cut, and it returns the `generation` field
  of `loraflow eval`'s predictions.jsonl (the new tokens decoded alone).
- `loglikelihood`: lm-eval's own tokenisation (`TemplateLM`: context and continuation encoded together and split
  where the context's own encoding ends, trailing spaces of the context moved to the continuation; an empty
  context is the BOS token, else EOS). HF: one forward per batch, the log-softmax in fp32. vLLM: its prompt logprobs
  (`VLLMGenerator.loraflow_score_tokens`), whose prompt is the whole sequence (so the engine gets
  `max_model_len = max_length + 2`: a prompt must leave room for one generated token).
- `loglikelihood_rolling`: the string without special tokens, cut into lm-eval's disjoint rolling windows of
  `max_length` tokens (the first one conditioned on the BOS/EOS prefix token), scored as loglikelihood requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from loraflow.errors import LoraflowError
from loraflow.eval.generate import DecodeConfig, generate

ENGINES = ("auto", "hf", "vllm")
KEYS = ("folder", "pretrained", "engine", "dtype", "max_length", "max_gen_toks", "tensor_parallel_size")
# generation kwargs that greedy decoding ignores (lm-eval tasks often set them next to do_sample: false)
IGNORED_WHEN_GREEDY = ("top_p", "top_k", "min_p")
LM_EVAL_DEFAULT_DEVICE = "cuda:0"  # lm_eval.config.evaluate_config.EvaluatorConfig.device


def resolve_engine(engine: str) -> str:
    from loraflow.vllm import vllm_available

    if engine not in ENGINES:
        raise LoraflowError(f"--model_args engine={engine}: choose one of {', '.join(ENGINES)}")
    if engine == "auto":
        return "vllm" if vllm_available() else "hf"
    if engine == "vllm" and not vllm_available():
        raise LoraflowError("--model_args engine=vllm, but vLLM is not installed: bash scripts/setup_env.sh vllm")
    return engine


def _positive_int(key: str, value) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise LoraflowError(f"{key}={value}: a whole number of at least 1")
    return number


def _lm_eval_device(device: str | None) -> str:
    """lm-eval passes `cuda:0` whenever --device is not given (its config's default): that one means `auto`, as
    lm-eval's own HF model takes it; any other device is taken as asked (a missing GPU is an error)."""
    return "auto" if device in (None, LM_EVAL_DEFAULT_DEVICE) else str(device)


def load_hf_model(folder: Path, dtype: str, device: str):
    """A model folder as a FlowModel; a plain base folder as its transformers model. In eval mode, on `device`."""
    from loraflow.devices import torch_dtype
    from loraflow.fusion.folder import is_model_folder

    if is_model_folder(folder):
        from loraflow.fusion.model import FlowModel

        return FlowModel.from_pretrained(folder, torch_dtype=torch_dtype(dtype), device=device)
    from loraflow.bases import load_base_model

    return load_base_model(str(folder), dtype=torch_dtype(dtype)).to(device).eval()


@register_model("loraflow")
class LoraflowLM(TemplateLM):
    """lm-eval's LM for a LoRA-Flow model folder (module docstring: the arguments and what each request does)."""

    def __init__(self, folder: str | None = None, pretrained: str | None = None, engine: str = "auto",
                 dtype: str = "float32", device: str | None = None, batch_size: int | str = 1,
                 max_length: int | None = None, max_gen_toks: int = 256, tensor_parallel_size: int = 1,
                 max_batch_size: int | None = None, **unknown):
        super().__init__()
        if unknown:
            raise LoraflowError(f"--model_args: unknown key {', '.join(sorted(unknown))}; loraflow's model takes "
                                f"{', '.join(KEYS)}")
        if (folder is None) == (pretrained is None):
            raise LoraflowError("--model_args: give folder=OUT (a `loraflow export` model folder or a base folder); "
                                "pretrained=OUT is the same key")
        path = Path(str(folder if folder is not None else pretrained))
        if not (path / "config.json").is_file():
            raise LoraflowError(f"--model_args folder={path}: no model folder there (no config.json); write one "
                                "with `loraflow export`")
        from loraflow.bases import load_base_tokenizer
        from loraflow.devices import canonical_dtype, resolve_device
        from loraflow.files import read_json

        self.engine = resolve_engine(str(engine))
        self.dtype = canonical_dtype(str(dtype))
        self.batch_size = _positive_int("batch_size", batch_size)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        positions = read_json(path / "config.json").get("max_position_embeddings") or 2048
        room = 2 if self.engine == "vllm" else 0  # vLLM: the scored sequence is a prompt with one token to go
        self.max_length = _positive_int("max_length", max_length) if max_length is not None else positions - room
        if self.max_length + room > positions:
            raise LoraflowError(f"--model_args max_length={self.max_length}: the model has {positions} positions"
                                f"{' and vLLM needs 2 of them spare' if room else ''}")
        self.folder = path
        self.tokenizer = load_base_tokenizer(str(path))
        if self.engine == "vllm":
            from loraflow.vllm.engine import VLLMGenerator

            self.model = VLLMGenerator(path, dtype=self.dtype,
                                       tensor_parallel_size=_positive_int("tensor_parallel_size", tensor_parallel_size),
                                       max_model_len=self.max_length + room)
        else:
            self.model = load_hf_model(path, self.dtype, resolve_device(_lm_eval_device(device)))

    # ------------------------------------------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and the first rolling window) is conditioned on: BOS, else EOS."""
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids; `None`: the tokenizer's special tokens (BOS) unless the text starts with BOS already (a chat
        template wrote it), as `loraflow eval` encodes prompts."""
        from loraflow.eval.registry import prompt_has_bos

        if add_special_tokens is None:
            add_special_tokens = not prompt_has_bos(self.tokenizer, string)
        return list(self.tokenizer(string, add_special_tokens=add_special_tokens)["input_ids"])

    # ---------------------------------------------------------------------------------- lm-eval's chat flags

    @property
    def tokenizer_name(self) -> str:
        """What lm-eval's request cache is keyed by (with --apply_chat_template)."""
        return str(self.folder.resolve()).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """lm-eval's --apply_chat_template: the messages through the tokenizer's own chat template (the text; BOS,
        when the template writes it, is then not added again)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise LoraflowError(f"--apply_chat_template: the tokenizer of {self.folder} has no chat template")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # -------------------------------------------------------------------------------------------- generation

    def _decode_config(self, gen_kwargs: dict, context: str) -> DecodeConfig:
        """The greedy DecodeConfig of one request's generation kwargs; sampling is refused."""
        from loraflow.eval.registry import prompt_has_bos

        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_new = _positive_int("max_gen_toks", kwargs.pop("max_gen_toks", self.max_gen_toks))
        sampling = kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0
        if sampling:
            raise LoraflowError(f"generation kwargs {gen_kwargs}: the loraflow model decodes greedily only (set "
                                "do_sample: false and temperature: 0)")
        if int(kwargs.pop("num_beams", 1)) != 1:
            raise LoraflowError(f"generation kwargs {gen_kwargs}: no beam search, greedy decoding only")
        other = sorted(k for k in kwargs if k not in IGNORED_WHEN_GREEDY)
        if other:
            raise LoraflowError(f"generation kwargs: unknown {', '.join(other)} (the loraflow model takes until, "
                                f"max_gen_toks, do_sample, temperature, num_beams)")
        return DecodeConfig(max_new_tokens=max_new, max_prompt_tokens=max(1, self.max_length - max_new),
                            batch_size=self.batch_size, stop=tuple(s for s in until if s),
                            add_special_tokens=not prompt_has_bos(self.tokenizer, context))

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generations, batched per decoding setting (most tasks have one)."""
        groups: dict[DecodeConfig, list[int]] = {}
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            groups.setdefault(self._decode_config(gen_kwargs, context), []).append(i)
        texts: list[str | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm) as bar:
            for config, members in groups.items():
                contexts = [requests[i].args[0] for i in members]
                for batch in generate(self.model, self.tokenizer, contexts, config):
                    for j, text in batch:
                        texts[members[j]] = text
                        self.cache_hook.add_partial("generate_until", requests[members[j]].args, text)
                    bar.update(len(batch))
        return texts

    # ------------------------------------------------------------------------------------------ likelihoods

    def _loglikelihood_tokens(self, requests: Sequence[tuple], disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's token log-probs, whether greedy decoding gives it) per (key, context ids,
        continuation ids); a sequence longer than max_length + 1 keeps its last tokens (the context is cut)."""
        sequences, scored = [], []
        for _, context, continuation in requests:
            if not continuation:
                raise LoraflowError("loglikelihood: an empty continuation (nothing to score)")
            if len(continuation) > self.max_length:
                raise LoraflowError(f"loglikelihood: a continuation of {len(continuation)} tokens is longer than "
                                    f"max_length={self.max_length}")
            sequences.append((list(context) + list(continuation))[-(self.max_length + 1):])
            scored.append(len(continuation))
        if self.engine == "vllm":
            results = self.model.loraflow_score_tokens(sequences, scored, progress=not disable_tqdm)
        else:
            results = self._hf_scores(sequences, scored, disable_tqdm)
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:  # rolling windows have none: their sum is cached instead
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def _hf_scores(self, sequences: list[list[int]], scored: list[int], disable_tqdm: bool) -> list[tuple[float, bool]]:
        import torch

        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        order = sorted(range(len(sequences)), key=lambda i: (-len(sequences[i]), i))  # similar lengths together
        results: list[tuple[float, bool] | None] = [None] * len(sequences)
        with torch.no_grad(), tqdm(total=len(order), desc="loglikelihood", disable=disable_tqdm) as bar:
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                inputs = [sequences[i][:-1] for i in batch]  # position t predicts token t + 1
                width = max(len(x) for x in inputs)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, x in enumerate(inputs):  # right padding: real tokens keep positions 0..n-1
                    ids[row, :len(x)] = torch.as_tensor(x)
                    mask[row, :len(x)] = 1
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (b, w, vocab)
                for row, i in enumerate(batch):
                    n, end = scored[i], len(inputs[row])
                    logprobs = logits[row, end - n:end].float().log_softmax(-1)  # (n, vocab), fp32
                    target = torch.as_tensor(sequences[i][-n:], device=logprobs.device)
                    total = logprobs.gather(-1, target[:, None]).sum().item()
                    results[i] = (total, bool((logprobs.argmax(-1) == target).all()))
                bar.update(len(batch))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole string, summed over its rolling windows."""
        windows, owner = [], []
        for i, request in enumerate(requests):
            (string,) = request.args
            tokens = self.tok_encode(string, add_special_tokens=False)
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[i] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals
