"""The one place that touches tensors: runs a scheduled batch through the model and samples.

A step runs all prefill chunks in one dense forward (attention per sequence), then one decode
token for every decoding row (through the skip policy's gate), then one lm_head + sampler call
for all sequences that produce a token this step.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from engine import native
from engine.attention import AttentionMetadata
from engine.config import EngineConfig, ModelConfig
from engine.gguf_weights import load_weights, quantized_gguf
from engine.kv_cache import KVCache
from engine.loader import load_state_dict
from engine.models import build_model
from engine.sampler import SampleRow, Sampled, sample
from engine.scheduler import ScheduledBatch
from engine.skip import DenseGate, build_policy

log = logging.getLogger("skipserve.runner")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


@dataclass
class StepResult:
    samples: dict[str, Sampled]  # seq_id -> token produced this step
    ffn_skipped: dict[str, int]  # seq_id -> FFN blocks skipped producing it
    layer_ffn_skipped: list[int]  # per layer, over this step's decode rows
    failed: dict[str, Exception] = field(default_factory=dict)  # seq_id -> why its token could not be made

    def merge(self, other: "StepResult") -> None:
        self.samples.update(other.samples)
        self.ffn_skipped.update(other.ffn_skipped)
        self.layer_ffn_skipped = [a + b for a, b in zip(self.layer_ffn_skipped, other.layer_ffn_skipped)]
        self.failed.update(other.failed)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, hf_dir):
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.device.type == "cpu":
            native.load(config.cache_dir)  # C++ CPU kernels (engine/native); torch paths without them
        self.model_config = model_config
        t0 = time.perf_counter()
        gguf = quantized_gguf(config.model, config.cache_dir, config.dtype, self.device)
        state = load_weights(gguf, hf_dir) if gguf else load_state_dict(hf_dir)
        self.model = build_model(model_config, state, self.device, self.dtype, config.max_model_len)
        del state
        self.quantized = gguf is not None  # the GGUF's own quantization (else dense `self.dtype`)
        self.act_dtype = self.model.act_dtype  # activations and KV cache (fp32 on CPU)
        self.kv = KVCache(model_config.num_layers, config.num_slots, model_config.num_kv_heads,
                          config.max_model_len, model_config.head_dim, self.device, self.act_dtype)
        self.policy = build_policy(config.skip, model_config.num_layers)
        self.num_layers = model_config.num_layers
        self._generators: dict[str, torch.Generator] = {}
        per_token = self.model.weight_bytes()
        log.info("model on %s, %s weights, %s activations, in %.1f s; KV cache %d slots x %d tokens (%.0f MiB)",
                 self.device, "GGUF-quantized" if gguf else str(self.dtype).removeprefix("torch."),
                 str(self.act_dtype).removeprefix("torch."), time.perf_counter() - t0, config.num_slots,
                 config.max_model_len, self.kv.nbytes / 2**20)
        log.info("weights read per decoded token: %.1f MB (FFN %.1f, attention %.1f, lm_head %.1f); kernels: %s",
                 sum(per_token.values()) / 1e6, per_token["ffn"] / 1e6, per_token["attention"] / 1e6,
                 per_token["lm_head"] / 1e6,
                 ", ".join(f"{fmt} -> {path}" for fmt, path in self.model.weight_formats().items()))

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepResult:
        hiddens, producers = [], []
        if batch.prefills:  # every prefill chunk of this step in one forward, always dense
            chunks = batch.prefills
            meta = AttentionMetadata.for_prefills([(c.seq.slot, c.start, c.end - c.start) for c in chunks],
                                                  self.device)
            ids = torch.tensor([t for c in chunks for t in c.seq.prompt_ids[c.start:c.end]], device=self.device)
            hidden = self.model.forward(ids, meta, self.kv, DenseGate(self.num_layers))
            end = 0
            for chunk in chunks:
                end += chunk.end - chunk.start
                if chunk.is_last:
                    hiddens.append(hidden[end - 1:end])
                    producers.append(chunk.seq)
        skipped = {}
        layer_skipped = [0] * self.num_layers
        if batch.decodes:
            seqs = batch.decodes
            meta = AttentionMetadata.for_decode([s.slot for s in seqs], [s.num_tokens - 1 for s in seqs],
                                                self.device, self.act_dtype)
            ids = torch.tensor([s.last_token for s in seqs], device=self.device)
            gate = self.policy.make_gate([self.policy.row_skip(s.skip_plan, len(s.output_ids)) for s in seqs],
                                         self.device)
            hiddens.append(self.model.forward(ids, meta, self.kv, gate))
            producers.extend(seqs)
            per_row, layer_skipped = gate.skip_counts(len(seqs))
            skipped = {s.seq_id: n for s, n in zip(seqs, per_row)}
        if not producers:
            return StepResult({}, {}, layer_skipped)
        logits = self.model.logits(torch.cat(hiddens))
        failed, live, rows = {}, [], []
        for i, seq in enumerate(producers):  # a row's own settings may fail it alone (e.g. its seed)
            try:
                rows.append(SampleRow(seq.params, seq.prompt_ids, seq.output_ids, self._generator(seq)))
                live.append(i)
            except Exception as exc:
                failed[seq.seq_id] = exc
        if len(live) < len(producers):
            logits = logits[live]
        samples = {}
        for i, token in zip(live, sample(logits, rows)):
            if isinstance(token, Exception):
                failed[producers[i].seq_id] = token
            else:
                samples[producers[i].seq_id] = token
        return StepResult(samples, skipped, layer_skipped, failed)

    def _generator(self, seq) -> torch.Generator | None:
        if seq.params.greedy:
            return None
        gen = self._generators.get(seq.seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seq.seed)
            self._generators[seq.seq_id] = gen
        return gen

    def release(self, seq_id: str) -> None:
        self._generators.pop(seq_id, None)
