"""Engine and model configuration: plain dataclasses, no tensors."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from engine.generation_defaults import SETTINGS as GENERATION_SETTINGS, check_override
from engine.lora.names import MAX_LORA_SCALE, listed

KV_CACHE_DTYPES = ("auto", "float32", "float16", "int8")  # EngineConfig.kv_cache_dtype
SCHEDULING_POLICIES = ("fcfs", "priority")  # EngineConfig.scheduling_policy (engine/scheduler.py)
MAX_BLOCK_SIZE = 1024  # tokens a KV block at most (each sequence takes whole blocks)


@dataclass
class ModelConfig:
    """Architecture of a Llama-family decoder, read from a HF `config.json`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_ids: list[int]
    # Gemma 3: per-layer attention kind, local window, query scale and the local layers' rope base
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    query_pre_attn_scalar: float | None = None
    rope_local_theta: float | None = None
    # Gemma 2: attention scores and logits soft-capped, s -> cap * tanh(s / cap) (None: not)
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    partial_rotary_factor: float = 1.0  # the share of each head's dimensions rotated (Phi-4-mini's 0.75)
    # mixture of experts (Qwen3-MoE, gpt-oss): experts per layer, experts per token, an expert's FFN
    # width, whether the chosen experts' weights are renormalized to sum to 1
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_dense_layers: bool = False  # some layers of a mixture of experts are dense (not supported)
    # gpt-oss's clamped SwiGLU: gate <= limit, up within +-limit, gate * sigmoid(alpha * gate) * (up + 1)
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    quantization: str | None = None  # a HF checkpoint's quantization_config method (gpt-oss's mxfp4, AWQ, GPTQ, ...)

    def __post_init__(self):
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"the model's {self.num_heads} attention heads are not a multiple of its "
                             f"{self.num_kv_heads} key/value heads")
        if not 0 < self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise ValueError(f"partial_rotary_factor {self.partial_rotary_factor} of {self.head_dim}-wide heads "
                             "does not rotate an even number of dimensions")

    def is_sliding(self, layer: int) -> bool:
        """Whether a layer attends over the sliding window (its `layer_types` entry says so)."""
        return self.layer_types is not None and self.layer_types[layer] == "sliding_attention"

    @property
    def rotary_dim(self) -> int:
        """The leading dimensions of each q and k head that the rotary embedding turns (all of them
        but for Phi-4-mini's 0.75); the rest pass through."""
        return int(self.head_dim * self.partial_rotary_factor + 1e-6)  # transformers' int(), less float error

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "ModelConfig":
        from engine.models import SUPPORTED  # (it imports this module)

        file = Path(path) / "config.json"
        try:
            raw = json.loads(file.read_text())
        except ValueError as exc:
            raise ValueError(f"{file} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict) or raw.get("model_type") not in SUPPORTED:  # before its keys are read: theirs
            kind = raw.get("model_type") if isinstance(raw, dict) else None  # differ (GPT-2's n_embd)
            raise ValueError(f"unsupported architecture {kind!r} (supported: {sorted(SUPPORTED)})")
        try:
            config = cls._from_raw(path, raw)
        except (KeyError, ZeroDivisionError, TypeError) as exc:
            raise ValueError(f"{file}: " + (f"no {exc.args[0]!r}" if isinstance(exc, KeyError)
                                            else f"a value it cannot have ({exc})")) from None
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            value = getattr(config, name)
            if not positive_int(value):
                raise ValueError(f"{file}: {name} is {value!r}, not a positive integer")
        return config

    @classmethod
    def _from_raw(cls, path: str | Path, raw: dict) -> "ModelConfig":
        quantized = raw.get("quantization_config")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        local_theta = raw.get("rope_local_base_freq")
        if "full_attention" in rope:  # per layer type (Gemma 3 in transformers 5)
            local_theta = rope.get("sliding_attention", {}).get("rope_theta", local_theta)
            rope = rope["full_attention"]
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "su":  # longrope's first name (Phi-3's early configs)
            rope_type = "longrope"
        if rope_type == "longrope":  # Phi-3: the pretrained length decides the factors and the attention scale
            rope = dict(rope, max_position_embeddings=raw.get("max_position_embeddings"),
                        original_max_position_embeddings=rope.get("original_max_position_embeddings")
                        or raw.get("original_max_position_embeddings") or raw.get("max_position_embeddings"))
        eos = raw.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        gen_cfg = Path(path) / "generation_config.json"
        if gen_cfg.exists():
            geos = json.loads(gen_cfg.read_text()).get("eos_token_id")
            for t in [geos] if isinstance(geos, int) else (geos or []):
                if t not in eos_ids:
                    eos_ids.append(t)
        return cls(
            model_type=raw["model_type"],
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=raw["num_attention_heads"],
            num_kv_heads=raw.get("num_key_value_heads", raw["num_attention_heads"]),
            head_dim=raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"],
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", raw.get("rope_theta", 10000.0)),
            rope_scaling=None if rope_type == "default" else dict(rope, rope_type=rope_type),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            eos_token_ids=eos_ids,
            layer_types=raw.get("layer_types") or _pattern_layer_types(raw),
            sliding_window=raw.get("sliding_window"),
            query_pre_attn_scalar=raw.get("query_pre_attn_scalar"),
            rope_local_theta=local_theta,
            attn_logit_softcapping=raw.get("attn_logit_softcapping"),
            final_logit_softcapping=raw.get("final_logit_softcapping"),
            partial_rotary_factor=rope.get("partial_rotary_factor", raw.get("partial_rotary_factor")) or 1.0,
            num_experts=raw.get("num_experts") or raw.get("num_local_experts") or 0,
            num_experts_per_tok=raw.get("num_experts_per_tok") or 0,
            # Mixtral's experts are its FFN's width, and it always renormalizes the chosen weights
            moe_intermediate_size=raw.get("moe_intermediate_size") or
            (raw["intermediate_size"] if raw["model_type"] == "mixtral" else 0),
            norm_topk_prob=bool(raw.get("norm_topk_prob", raw["model_type"] == "mixtral")),
            moe_dense_layers=bool(raw.get("mlp_only_layers")) or raw.get("decoder_sparse_step", 1) not in (None, 1),
            swiglu_limit=raw.get("swiglu_limit", 7.0),
            swiglu_alpha=raw.get("swiglu_alpha", 1.702),
            quantization=quantized.get("quant_method", "unnamed") if quantized else None,
        )


def _pattern_layer_types(raw: dict) -> list[str] | None:
    """Layer types from `sliding_window_pattern` (configs written before `layer_types`, as
    transformers reads them): every pattern-th layer full attention, the others sliding. Gemma 2's
    and gpt-oss's configs may name no pattern: transformers alternates them (every 2nd layer full)."""
    pattern = raw.get("sliding_window_pattern") or (2 if raw.get("model_type") in ("gemma2", "gpt_oss") else None)
    if not pattern or not raw.get("sliding_window"):
        return None
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(raw["num_hidden_layers"])]


SKIP_POLICIES = ("none", "ffn_skipllm", "batch_aligned")  # engine/skip's POLICIES
DTYPES = ("auto", "float32", "bfloat16", "float16")
POOLINGS = ("mean", "last")


def positive_int(value) -> bool:
    """An int above 0 (not a bool: JSON's true is no size)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class SkipConfig:
    """Server-side FFN-skip defaults for one model (see DESIGN.md section 4).

    `budget` is the fraction of a token's FFN blocks it may skip; `threshold` the cosine
    similarity of the previous layer's pre- vs post-FFN residual that triggers a skip run.
    """

    policy: str = "ffn_skipllm"
    cold_start: int = 4
    cold_end: int = 4
    threshold: float = 0.95
    warmup_tokens: int = 16
    interleave: int = 0  # every interleave-th generated token runs dense; 0 = never
    default_budget: float = 0.0
    max_budget: float = 0.5

    def check(self) -> None:
        """The settings a request's `ffn_skip` is checked against: checked at start, as a wrong one
        would fail every request that asks no budget (a server setting blamed on the client)."""
        _require(self.policy in SKIP_POLICIES, f"skip.policy must be one of {list(SKIP_POLICIES)}, got {self.policy!r}")
        _require(0.0 <= self.default_budget <= self.max_budget <= 1.0, "the skip budgets need 0 <= default_budget "
                 f"<= max_budget <= 1, got {self.default_budget} and {self.max_budget}")
        _require(-1.0 <= self.threshold <= 1.0, f"skip.threshold is a cosine, in [-1, 1], got {self.threshold}")
        for name in ("cold_start", "cold_end", "warmup_tokens", "interleave"):
            _require(getattr(self, name) >= 0, f"skip.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class EngineConfig:
    model: str = ""  # path to a GGUF file or a HF folder; "" = the embedded default
    served_model_name: str = "smollm2-135m-instruct"
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (CPU: a GGUF's own quantization, else fp32; CUDA: bf16) | float32 | bfloat16 | float16
    quantize: str | None = None  # CPU: "int8" rounds dense weights to int8 per group of 32 (weight-only)
    max_num_seqs: int = 16  # rows in a decode batch
    max_model_len: int = 2048  # tokens per sequence (prompt + completion)
    block_size: int = 16  # tokens per KV block
    kv_capacity_tokens: int | None = None  # KV cache size in tokens (overrides the two below)
    kv_cache_memory: float | None = None  # KV cache size in GiB
    kv_cache_dtype: str = "auto"  # KV_CACHE_DTYPES: auto (CPU: fp16 for quantized weights, else fp32; CUDA: bf16); int8: CPU
    gpu_memory_utilization: float = 0.9  # CUDA: share of the card for weights, workspace and KV cache
    max_prefill_tokens: int = 512  # prefill chunk per engine step
    prefix_caching: bool = True  # full blocks of dense K/V are kept, by hash, for prompts sharing them
    cache_dir: str | None = None  # where converted GGUF weights are cached
    threads: int | None = None
    chat_template: str | None = None  # a Jinja chat template, or a file holding one, instead of the model's
    speculative_tokens: int = 0  # draft tokens (n-gram lookup) checked per sequence and step; 0 = off
    scheduling_policy: str = "fcfs"  # fcfs | priority: the queue in requests' `priority` order (engine/scheduler.py)
    pooling: str = "mean"  # engine/pooling.py: how /v1/embeddings pools an input's hidden states (mean | last)
    enforce_eager: bool = False  # CUDA: decode steps without CUDA graphs (Triton kernels, run eagerly)
    # requests' sampling defaults (engine/generation_defaults.py): auto = the model's generation config,
    # vllm = none (OpenAI's), or a folder holding one; the override's values over it
    generation_config: str = "auto"
    override_generation_config: dict | None = None
    # LoRA adapters served beside the model (engine/lora): name -> a PEFT adapter folder; a request
    # names one as its model. max_lora_rank: adapters of a higher rank are refused (None: any)
    enable_lora: bool = False  # projections ready for adapters loaded at run time (implied by lora_modules)
    lora_modules: dict = field(default_factory=dict)  # (str -> str; a plain dict for config files' type check)
    # llama-server's --lora / --lora-scaled: [adapter, scale] pairs applied together to every request
    # that names the model itself
    default_loras: list = field(default_factory=list)
    max_lora_rank: int | None = None
    skip: SkipConfig = field(default_factory=SkipConfig)

    def check(self) -> None:
        """Ranges and names, at start: a wrong value fails here, named, before the model loads and
        the port is bound (config files included, which the CLI's choices do not see)."""
        _require(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
                 f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _require(self.dtype in DTYPES, f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        _require(self.quantize in (None, "int8"), f"quantize must be int8 or unset, got {self.quantize!r}")
        _require(self.kv_cache_dtype in KV_CACHE_DTYPES,
                 f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        _require(self.pooling in POOLINGS, f"pooling must be one of {list(POOLINGS)}, got {self.pooling!r}")
        _require(self.scheduling_policy in SCHEDULING_POLICIES,
                 f"scheduling_policy must be one of {list(SCHEDULING_POLICIES)}, got {self.scheduling_policy!r}")
        for name in ("max_num_seqs", "max_model_len", "block_size", "max_prefill_tokens"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        # every sequence holds whole blocks: 16 sequences of 100,000-token blocks asked for 34 GiB
        _require(self.block_size <= MAX_BLOCK_SIZE, f"block_size must be <= {MAX_BLOCK_SIZE}, got {self.block_size}")
        _require(self.speculative_tokens >= 0, f"speculative_tokens must be >= 0, got {self.speculative_tokens}")
        _require(self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}")
        _require(0.0 < self.gpu_memory_utilization <= 1.0,
                 f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("kv_capacity_tokens", "kv_cache_memory"):
            _require(getattr(self, name) is None or 0 < getattr(self, name) < math.inf, f"{name} must be > 0 "
                     f"and finite, got {getattr(self, name)}")
        _require(self.generation_config in GENERATION_SETTINGS or Path(self.generation_config).expanduser().is_dir(),
                 f"generation_config must be auto, vllm or a folder holding generation_config.json, got "
                 f"{self.generation_config!r}")
        # (kept as checked: keys vLLM reads past are warned of here, once, and dropped)
        self.override_generation_config = check_override(self.override_generation_config) or None
        _require(self.max_lora_rank is None or self.max_lora_rank >= 1,
                 f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        _require(isinstance(self.lora_modules, dict), f"lora_modules maps names to adapter folders (name: path), "
                 f"got {self.lora_modules!r}")
        _require(isinstance(self.default_loras, list) and all(
            isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str) and item[0]
            and isinstance(item[1], (int, float)) and not isinstance(item[1], bool) and math.isfinite(item[1])
            and abs(item[1]) <= MAX_LORA_SCALE for item in self.default_loras),
            f"default_loras is a list of [adapter, scale] pairs (a scale from -{MAX_LORA_SCALE:g} to "
            f"{MAX_LORA_SCALE:g}), got {self.default_loras!r}")
        for path in [*self.lora_modules.values(), *(item[0] for item in self.default_loras)]:
            _require(not isinstance(path, str) or Path(path).expanduser().exists(),
                     f"LoRA adapter {path}: no such file or folder")
        for name, path in self.lora_modules.items():
            _require(isinstance(name, str) and listed(name) and isinstance(path, str) and path,
                     f"lora_modules maps names to adapter folders, got {name!r}: {path!r}")
        self.skip.check()
