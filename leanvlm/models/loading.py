"""Resolve `--model` (alias, hub id, local dir, built-in name) and load it with transformers."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from leanvlm.errors import UserError

MODEL_ALIASES: dict[str, str] = {
    "llava-7b": "llava-hf/llava-1.5-7b-hf",
    "llava-13b": "llava-hf/llava-1.5-13b-hf",
}
# Built-in checkpoints (no download needed): tiny-llava is made on first use (random weights, for parity
# tests); shapes-llava (4 decoder layers) and shapes-llava-8l (8, deep enough for a per-layer schedule search) are
# trained on the shapes task by tools/train_shapes.py and ship inside the package.
BUILTIN_MODELS = ("tiny-llava", "shapes-llava", "shapes-llava-8l")
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "assets"
SUPPORTED_ARCHITECTURES = ("LlavaForConditionalGeneration",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class LoadedModel:
    """A loaded checkpoint: the HF model (eval, fp32 unless asked), its processor and where it came from."""

    model: "object"
    processor: "object"
    source: str  # what the user asked for (alias resolved)
    path: Path  # local directory the files were read from


def cache_dir() -> Path:
    """Where built-in checkpoints are made: $LEANVLM_CACHE, else $XDG_CACHE_HOME/leanvlm, else ~/.cache/leanvlm."""
    if os.environ.get("LEANVLM_CACHE"):
        return Path(os.environ["LEANVLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "leanvlm"


def resolve_model(name: str) -> Path:
    """Turn a `--model` value into a local checkpoint directory, or raise a `UserError` saying how to get it."""
    if not name or not name.strip():
        raise UserError(f"--model is empty: give an alias ({', '.join([*MODEL_ALIASES, *BUILTIN_MODELS])}), a hub id "
                        "or a local path")
    if name in BUILTIN_MODELS:
        return _builtin(name)
    repo = MODEL_ALIASES.get(name, name)
    local = Path(repo).expanduser()
    if local.exists() or name.startswith((".", "/", "~")) or os.sep in name and not _HUB_ID.match(name):
        if not local.is_dir():
            raise UserError(f"--model {name}: no such directory {local}")
        _check_architecture(local)
        return local
    if name not in MODEL_ALIASES and not _HUB_ID.match(repo):
        known = ", ".join([*MODEL_ALIASES, *BUILTIN_MODELS])
        raise UserError(f"--model {name}: not a known alias ({known}), a hub id (org/name) or an existing directory")
    return _from_hub(name, repo)


CONFIGS_DIR = Path(__file__).resolve().parent / "configs"  # the aliases' config.json (a few KB each)


def load_config(name: str):
    """The LlavaConfig of `--model` without its weights (`leanvlm plan`): the checkpoint's own when it is on
    disk or in the Hugging Face cache; for a known alias that is neither, the config leanvlm ships for it,
    so planning works offline. Anything else resolves (and fails) as `resolve_model` does."""
    from transformers import LlavaConfig

    repo = MODEL_ALIASES.get(name)
    if repo is not None:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo, "config.json")
        if not isinstance(cached, str):
            return LlavaConfig.from_json_file(CONFIGS_DIR / f"{repo.replace('/', '--')}.json")
    return LlavaConfig.from_pretrained(resolve_model(name))


def _builtin(name: str) -> Path:
    from leanvlm.models.tiny import make_tiny

    if name != "tiny-llava":
        path = SHIPPED_DIR / name
        if not (path / "config.json").is_file():
            layers = (f" --text-layers 8 --expand-from {SHIPPED_DIR / 'shapes-llava'} --steps 300 --lr 3e-4 --warmup 30"
                      if name == "shapes-llava-8l" else "")
            raise UserError(f"--model {name}: the shipped checkpoint is missing from {path}; reinstall leanvlm "
                            f"or retrain it with tools/train_shapes.py --out {path} --seed 0{layers}")
        return path
    path = cache_dir() / name
    if not (path / "config.json").is_file():
        make_tiny(path, seed=0)
    return path


def _from_hub(name: str, repo: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - transformers depends on huggingface_hub
        raise UserError(f"--model {name}: huggingface_hub is needed to fetch {repo}") from e
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    try:
        path = Path(
            snapshot_download(
                repo,
                local_files_only=offline,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
            )
        )
    except LocalEntryNotFoundError as e:
        raise UserError(
            f"--model {name}: {repo} is not in the local Hugging Face cache and the hub cannot be reached "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}); download it where there is network "
            f"(`huggingface-cli download {repo}`) or pass a local checkpoint directory"
        ) from e
    except Exception as e:  # network errors, 401/404 from the hub
        raise UserError(
            f"--model {name}: could not fetch {repo} from the Hugging Face hub ({type(e).__name__}); "
            f"download it where there is network or pass a local checkpoint directory"
        ) from e
    _check_architecture(path)
    return path


def _check_architecture(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"--model {path}: no config.json there; is this a Hugging Face checkpoint directory?")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--model {path}: config.json is not readable JSON ({e})") from e
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "llava" or not set(archs) & set(SUPPORTED_ARCHITECTURES):
        raise UserError(
            f"--model {path}: architecture {archs or cfg.get('model_type')} is not supported; "
            f"leanvlm exports {', '.join(SUPPORTED_ARCHITECTURES)} (LLaVA-1.5) checkpoints"
        )
    text = cfg.get("text_config", {})
    if text.get("model_type", "llama") != "llama":
        raise UserError(f"--model {path}: text model {text.get('model_type')} is not supported (Llama only)")
    return cfg


def load_model(name: str, dtype: "object | None" = None) -> LoadedModel:
    """Load a LLaVA checkpoint and its processor (no remote code), in eval mode."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = resolve_model(name)
    model = LlavaForConditionalGeneration.from_pretrained(
        path, dtype=dtype or torch.float32, attn_implementation="sdpa"
    )
    model.eval()
    processor = AutoProcessor.from_pretrained(path)
    return LoadedModel(model=model, processor=processor, source=MODEL_ALIASES.get(name, name), path=path)
