"""Model implementations. Each takes a HF state dict and the device backend whose ops it calls,
and runs over the paged KV cache."""
from __future__ import annotations

from engine.config import ModelConfig

LLAMA_FAMILY = {"llama", "mistral", "qwen2", "smollm2"}
GEMMA3 = {"gemma3_text", "gemma3"}
GEMMA2 = {"gemma2"}
QWEN3 = {"qwen3"}
PHI3 = {"phi3"}
QWEN3_MOE = {"qwen3_moe"}
QWEN2_MOE = {"qwen2_moe"}
MIXTRAL = {"mixtral"}
GPT_OSS = {"gpt_oss"}
SUPPORTED = LLAMA_FAMILY | QWEN3 | GEMMA2 | GEMMA3 | PHI3 | QWEN3_MOE | QWEN2_MOE | MIXTRAL | GPT_OSS


def check_architecture(config: ModelConfig) -> None:
    """Raises for a model no implementation here runs: before its weights are read."""
    if config.model_type not in SUPPORTED:
        raise ValueError(f"unsupported architecture {config.model_type!r} (supported: {sorted(SUPPORTED)})")
    if config.quantization:
        raise ValueError(f"a checkpoint quantized by {config.quantization!r} (its config's quantization_config) is "
                         "not read here: serve a GGUF of the model (its quantized blocks run on the CPU's kernels), or "
                         "its unquantized weights")
    if config.moe_dense_layers:
        raise ValueError(f"{config.model_type!r} with dense layers among its experts' (mlp_only_layers, "
                         "decoder_sparse_step) is not supported")
    mixture = config.model_type in QWEN3_MOE | QWEN2_MOE | MIXTRAL | GPT_OSS
    if mixture and not 1 <= config.num_experts_per_tok <= config.num_experts:
        raise ValueError(f"{config.model_type!r} routes each token to {config.num_experts_per_tok} of "
                         f"{config.num_experts} experts: a file's expert counts must be 1 <= used <= experts")


def build_model(config: ModelConfig, state: dict, device, dtype, max_len: int, ops):
    if config.model_type in LLAMA_FAMILY:
        from engine.models.llama import LlamaModel

        return LlamaModel(config, state, device, dtype, max_len, ops)
    if config.model_type in QWEN3:
        from engine.models.qwen3 import Qwen3Model

        return Qwen3Model(config, state, device, dtype, max_len, ops)
    if config.model_type in QWEN3_MOE:
        from engine.models.qwen3_moe import Qwen3MoeModel

        return Qwen3MoeModel(config, state, device, dtype, max_len, ops)
    if config.model_type in QWEN2_MOE:
        from engine.models.qwen2_moe import Qwen2MoeModel

        return Qwen2MoeModel(config, state, device, dtype, max_len, ops)
    if config.model_type in MIXTRAL:
        from engine.models.mixtral import MixtralModel

        return MixtralModel(config, state, device, dtype, max_len, ops)
    if config.model_type in GPT_OSS:
        from engine.models.gpt_oss import GptOssModel

        return GptOssModel(config, state, device, dtype, max_len, ops)
    if config.model_type in PHI3:
        from engine.models.phi3 import Phi3Model

        return Phi3Model(config, state, device, dtype, max_len, ops)
    if config.model_type in GEMMA3:
        from engine.models.gemma3 import Gemma3Model

        return Gemma3Model(config, state, device, dtype, max_len, ops)
    if config.model_type in GEMMA2:
        from engine.models.gemma2 import Gemma2Model

        return Gemma2Model(config, state, device, dtype, max_len, ops)
    check_architecture(config)
