"""Fetch, check and convert the released LoRA-Flow checkpoints (`scripts/model_preparation.sh` runs this).

The release (hub repo `Bowen232/LoRA-Flow`, or a local folder laid out like it) holds
`LoRAs/{zh,ru,es,math,code}_lora/` (PEFT adapters) and `Gates/{zh,ru,es}_{math,code}.pt` (original gates). Into
CHECKPOINT_DIR this puts:

  LoRAs/{name}_lora/adapter_config.json + adapter_model.bin    as released (downloads resume)
  Gates/{lang}_{task}.pt                                        as released
  Gates/{lang}_{task}/gate.safetensors + gate.json              the loraflow gate converted from it
  BM_LoRAs/{name}/lora.pt + lora_config.json                    with --convert-bmtrain (the original's layout)
  .loraflow-manifest.json                                       size + sha256 of what was checked, for reruns

Every LoRA is checked against the base model's config.json (hidden and intermediate sizes, layer count) and its
adapter_config.json (rank, targets); every gate against the base config and its LoRAs (k = 2, hidden, layers).
A rerun recomputes the sha256 of what is there, skips what matches the manifest, and says so.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from loraflow.errors import LoraflowError
from loraflow.eval.registry import RELEASE_LORAS, RELEASE_PAIRS, release_gate_metadata
from loraflow.files import atomic_path, atomic_write_text, sha256_file

# The tensor code (torch) is imported only where something must be checked or converted: a rerun that finds
# everything verified, and an offline run that must stop, answer in about a second.

RELEASE_REPO = "Bowen232/LoRA-Flow"
DEFAULT_BASE = "meta-llama/Llama-2-7b-hf"
LORAS = RELEASE_LORAS  # zh_lora ru_lora es_lora math_lora code_lora
GATES = RELEASE_PAIRS  # zh_math zh_code ru_math ...
LORA_WEIGHTS = ("adapter_model.bin", "adapter_model.safetensors")  # the release has .bin; either is accepted
MANIFEST = ".loraflow-manifest.json"


def _files(name: str) -> list[tuple[str, ...]]:
    """The files of one release item; a tuple lists alternatives (the first one present is used)."""
    if name in LORAS:
        return [(f"LoRAs/{name}/adapter_config.json",), tuple(f"LoRAs/{name}/{w}" for w in LORA_WEIGHTS)]
    return [(f"Gates/{name}.pt",)]


def _read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LoraflowError(f"{path}: cannot read JSON ({e})") from None


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


def _copy(src: Path, dst: Path) -> None:
    """Copy to a temporary name beside `dst`, then rename: an interrupted copy never looks complete."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


@dataclass
class PrepareConfig:
    """What `prepare_models` fetches and where it puts it."""

    repo: str = RELEASE_REPO  # hub repo id, or a local folder laid out like the release
    revision: str | None = None  # hub branch, tag or commit (None: main)
    checkpoint_dir: Path = Path("checkpoints")
    base_model: str | None = DEFAULT_BASE  # hub id or local folder/config.json; only config.json is read; None: skip
    only: list[str] = field(default_factory=list)  # a subset of LORAS + GATES; empty: everything
    convert_bmtrain: bool = False  # also write BMTrain/ModelCenter LoRAs to BM_LoRAs/

    def __post_init__(self):
        self.checkpoint_dir = Path(self.checkpoint_dir)
        self.only = [n for part in self.only for n in re.split(r"[\s,]+", part) if n]
        unknown = sorted(set(self.only) - set(LORAS + GATES))
        if unknown:
            raise LoraflowError(f"ONLY / --only: unknown names {unknown}; choose from {list(LORAS + GATES)}")
        self.base_model = self.base_model or None

    @property
    def items(self) -> list[str]:
        return [n for n in LORAS + GATES if not self.only or n in self.only]

    @property
    def local_repo(self) -> Path | None:
        path = Path(self.repo).expanduser()
        return path if path.is_dir() else None




def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _how_to_supply(cfg: PrepareConfig, missing: list[str], reason: str) -> LoraflowError:
    listing = "\n".join(f"  {cfg.checkpoint_dir / m}" for m in missing)
    return LoraflowError(
        f"{len(missing)} file(s) of {cfg.repo} are missing and cannot be fetched ({reason}):\n{listing}\n"
        f"To supply them by hand: on a machine with network run `hf download {RELEASE_REPO} --local-dir "
        f"/path/to/LoRA-Flow`, bring that folder here and rerun with REPO=/path/to/LoRA-Flow; or put the files at "
        f"the paths above yourself. To download instead, unset HF_HUB_OFFLINE and make sure the hub is reachable.")


def _hub_unreachable() -> str | None:
    """Why the hub endpoint cannot be reached, from one quick connection attempt (None: reachable, or behind a
    proxy, which huggingface_hub will use). Without it a dead network costs ~25 s of retries per file."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as e:
        return f"cannot reach {constants.ENDPOINT}: {e}"
    return None


def _fetch(cfg: PrepareConfig, wanted: list[tuple[str, ...]], say) -> None:
    """Bring every wanted file (first alternative found) into checkpoint_dir: copy from a local release folder,
    from the Hugging Face cache, or download (resumable). Fails before fetching anything when offline."""
    local = cfg.local_repo
    if local is not None:
        for alts in wanted:
            rel = next((a for a in alts if (local / a).is_file()), None)
            if rel is None:
                raise LoraflowError(f"REPO={local}: none of {list(alts)} there; is it laid out like the release "
                                    "(LoRAs/{name}_lora/, Gates/{lang}_{task}.pt)?")
            if (local / rel).resolve() != (cfg.checkpoint_dir / rel).resolve():
                _copy(local / rel, cfg.checkpoint_dir / rel)
                say(f"copied {rel} from {local}")
        return
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RemoteEntryNotFoundError

    pending = []
    for alts in wanted:
        cached = next(((a, p) for a in alts if isinstance(p := try_to_load_from_cache(
            cfg.repo, a, revision=cfg.revision), str)), None)
        if cached:
            _copy(Path(cached[1]), cfg.checkpoint_dir / cached[0])
            say(f"copied {cached[0]} from the Hugging Face cache")
        else:
            pending.append(alts)
    if pending and _hub_offline():
        raise _how_to_supply(cfg, [a[0] for a in pending], "HF_HUB_OFFLINE is set")
    if pending and (why := _hub_unreachable()):
        raise _how_to_supply(cfg, [a[0] for a in pending], why)
    for i, alts in enumerate(pending):
        for rel in alts:
            try:
                say(f"downloading {rel} from {cfg.repo}" + (f"@{cfg.revision}" if cfg.revision else ""))
                hf_hub_download(cfg.repo, rel, revision=cfg.revision, local_dir=cfg.checkpoint_dir)
                break
            except LocalEntryNotFoundError as e:  # (a subclass of EntryNotFoundError: catch it first)
                raise _how_to_supply(cfg, [a[0] for a in pending[i:]], f"the hub is not reachable: {e}") from None
            except RemoteEntryNotFoundError:
                if rel == alts[-1]:
                    raise LoraflowError(f"{cfg.repo}: has none of {list(alts)}") from None
            except HfHubHTTPError as e:
                raise LoraflowError(f"{cfg.repo}: {str(e).splitlines()[0]} (for a gated or private repo, set HF_TOKEN "
                                    "or run `hf auth login`)") from None


def _base_config(cfg: PrepareConfig, say) -> dict | None:
    """The base model's config.json (a local folder or file, the HF cache, or a download of that one file)."""
    if cfg.base_model is None:
        say("BASE_MODEL is empty: LoRAs and gates are only checked against each other")
        return None
    path = Path(cfg.base_model).expanduser()
    if path.exists():
        return _read_json(path / "config.json" if path.is_dir() else path)
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cached = try_to_load_from_cache(cfg.base_model, "config.json")
    if isinstance(cached, str):
        return _read_json(cached)
    how = "set BASE_MODEL to a local folder holding its config.json (or BASE_MODEL= to skip the base checks)"
    if _hub_offline() or (why := _hub_unreachable()):
        reason = "HF_HUB_OFFLINE is set" if _hub_offline() else why
        raise LoraflowError(f"BASE_MODEL={cfg.base_model}: config.json is not cached and {reason}; {how}")
    try:
        return _read_json(hf_hub_download(cfg.base_model, "config.json"))
    except LocalEntryNotFoundError:
        raise LoraflowError(f"BASE_MODEL={cfg.base_model}: the hub is not reachable; {how}") from None
    except HfHubHTTPError as e:
        raise LoraflowError(f"BASE_MODEL={cfg.base_model}: {str(e).splitlines()[0]}. Llama-2 is gated: accept its "
                            f"licence on the hub and set HF_TOKEN (or `hf auth login`); or {how}") from None


def _check_lora(folder: Path, base_config: dict | None) -> dict:
    from loraflow.convert import tables as C
    from loraflow.convert.formats import PEFT_WEIGHTS
    from loraflow.convert.shards import TensorSource

    adapter_config = _read_json(folder / "adapter_config.json")
    state = TensorSource(folder, PEFT_WEIGHTS).load_all()
    summary = C.check_peft_lora(state, adapter_config, base_config)
    summary["hidden_size"] = next(t.shape[1] for k, t in state.items() if k.endswith("q_proj.lora_A.weight")) \
        if "q_proj" in summary["ranks"] else None
    return summary


def _check_gate(path: Path, base_config: dict | None, loras: dict[str, dict]) -> dict:
    from loraflow.convert import tables as C
    from loraflow.files import load_tensors

    num_layers, k, hidden = C.gate_shape(C.gate_original_to_loraflow(load_tensors(path)))
    names = release_gate_metadata(path.stem)["lora_names"]
    problems = [f"k = {k}, but it fuses {len(names)} LoRAs {names}"] if k != len(names) else []
    refs = {"base model": C.hf_dims(base_config)} if base_config else {}
    refs.update({n: {"layers": s["num_layers"], "h": s.get("hidden_size")} for n, s in loras.items() if n in names})
    for what, ref in refs.items():
        if ref["layers"] != num_layers or ref["h"] not in (None, hidden):
            problems.append(f"{num_layers} layers x hidden {hidden}, {what} has {ref['layers']} x {ref['h']}")
    if problems:
        raise LoraflowError(f"{path}: gate does not fit: {'; '.join(problems)}")
    return {"num_layers": num_layers, "k": k, "hidden_size": hidden}


def prepare_models(cfg: PrepareConfig, say=None) -> dict[str, str]:
    """Fetch, check and convert the selected release items; return {item: what was done}."""
    say = say or (lambda msg: print(f"[prepare] {msg}", file=sys.stderr))
    root = cfg.checkpoint_dir
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / MANIFEST
    manifest = _read_json(manifest_path) if manifest_path.is_file() else {}
    missing = [alts for n in cfg.items for alts in _files(n) if not any((root / a).is_file() for a in alts)]
    if missing:
        _fetch(cfg, missing, say)
    base: list[dict | None] = []  # read on first need: a rerun with everything verified never asks for it

    def base_config() -> dict | None:
        if not base:
            base.append(_base_config(cfg, say))
        return base[0]

    done, changed = {}, bool(missing)
    # Gates are checked against their LoRAs too: those checked now, or earlier (their manifest summary).
    lora_summaries = {n: e["summary"] for n, e in manifest.items() if n in LORAS and "summary" in e}
    for name in cfg.items:
        files = [next(a for a in alts if (root / a).is_file()) for alts in _files(name)]
        digests = {rel: {"size": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)} for rel in files}
        entry = dict(manifest.get(name, {}))
        if entry.get("files") == digests and entry.get("checked_against") == cfg.base_model:
            actions = ["present, sha256 verified"]
        else:
            summary = _check_lora(root / "LoRAs" / name, base_config()) if name in LORAS \
                else _check_gate(root / files[0], base_config(), lora_summaries)
            detail = f"ranks {sorted(set(summary['ranks'].values()))}" if name in LORAS \
                else f"k = {summary['k']}, hidden {summary['hidden_size']}"
            actions = [f"checked ({summary['num_layers']} layers, {detail})"]
            entry = {"files": digests, "checked_against": cfg.base_model, "summary": summary}
        if name in LORAS:
            lora_summaries[name] = entry["summary"]
        # What each conversion was made from, so a rerun can tell whether it is still current.
        source_sha = hashlib.sha256("".join(d["sha256"] for d in digests.values()).encode()).hexdigest()
        targets = [f"Gates/{name}"] if name in GATES else \
            [f"BM_LoRAs/{name.removesuffix('_lora')}"] if cfg.convert_bmtrain else []
        converted = dict(entry.get("converted", {}))
        for rel in targets:
            if (root / rel).exists() and converted.get(rel) == source_sha:
                actions.append(f"{rel} up to date")
                continue
            _convert(cfg, name, root / rel, base_config())
            converted[rel] = source_sha
            actions.append(f"converted -> {rel}")
        entry["converted"] = converted
        if manifest.get(name) != entry:
            manifest[name] = entry
            _write_json(manifest_path, manifest)
            changed = True
        done[name] = "; ".join(actions)
        say(f"{name}: {done[name]}")
    if not changed:
        say(f"nothing to do: all {len(done)} items already present, verified and converted in {root}")
    return done


def _convert(cfg: PrepareConfig, name: str, out: Path, base_config: dict | None) -> None:
    from loraflow.convert.formats import convert_gate, convert_lora

    root = cfg.checkpoint_dir
    if name in GATES:  # Gates/{lang}_{task}/gate.safetensors + gate.json, beside Gates/{lang}_{task}.pt
        names = release_gate_metadata(name)["lora_names"]
        convert_gate(root / "Gates" / f"{name}.pt", out, "loraflow", base_model=cfg.base_model,
                     lora_ids=[str(root / "LoRAs" / n) for n in names], base_config=base_config, force=True)
    else:
        convert_lora(root / "LoRAs" / name, out, "bmtrain", base_config=base_config, force=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", default=RELEASE_REPO, help=f"hub repo id or a local copy of it ({RELEASE_REPO})")
    parser.add_argument("--revision", help="hub branch, tag or commit (default: main)")
    parser.add_argument("--checkpoint-dir", default="checkpoints", help="where to put everything (checkpoints)")
    parser.add_argument("--base-model", default=DEFAULT_BASE,
                        help=f"hub id or local folder whose config.json the shapes are checked against; only "
                             f"config.json is fetched ({DEFAULT_BASE}); '' skips the base checks")
    parser.add_argument("--only", nargs="*", default=[], help=f"a subset of {' '.join(LORAS + GATES)}")
    parser.add_argument("--convert-bmtrain", action="store_true",
                        help="also write BMTrain/ModelCenter LoRAs to BM_LoRAs/{zh,ru,es,math,code}/")


def run(args: argparse.Namespace) -> int:
    prepare_models(PrepareConfig(repo=args.repo, revision=args.revision, checkpoint_dir=args.checkpoint_dir,
                                 base_model=args.base_model, only=args.only, convert_bmtrain=args.convert_bmtrain))
    return 0
