"""The one place that touches tensors, and the only way into a forward pass.

`run(batch)`: a scheduled step runs its prefill chunks in one dense forward (attention per
sequence), except short ones, which go as dense decode rows of their sequence where the decode
step lets rows of one sequence see each other (`short_chunk_rows`); then one decode token for
every decoding row (through the skip policy's gate), a sequence's draft tokens as more rows of
it at the next positions (speculative decoding), all rows in one decode call, then
one lm_head + sampler call for all of those rows; a sequence keeps its drafted tokens the
model produced too, up to the first it did not, and that row's token. An embeddings input's
chunks are pooled from the prefill's hidden states and reach no lm_head. `prefill`, `decode`
and `logits` are the same forwards for callers that hold KV blocks of their own (calibration, the
quality harness, tests; see `LLMEngine.kv_blocks`).

At start the runner picks the device backend (engine/backends), sizes the paged KV cache from
memory (engine/kv/capacity.py) and logs its capacity.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from engine import native
from engine.backends import select_backend
from engine.backends.cpu.threads import configure_threads
from engine.config import KV_CACHE_DTYPES, EngineConfig, ModelConfig
from engine.gguf_weights import load_weights, quantized_gguf
from engine.heap import drop_unwritten_file_pages, freeze_loaded_objects, release_free_memory
from engine.host_resources import available_memory
from engine.kv import int8_rows
from engine.kv.cache import KVCache, element_bytes
from engine.kv.capacity import DeviceMemory, plan_capacity
from engine.kv.metadata import AttentionMetadata
from engine.loader import ensure_hf_dir, load_state_dict
from engine.lora.registry import LoRARegistry
from engine.models import build_model, check_architecture
from engine.quant.int8 import quantize_state
from engine.sampler import SampleRow, Sampled, listed_tokens, sample, token_logprobs
from engine.scheduler import ScheduledBatch
from engine.seeded_uniform import seeded_uniform
from engine.skip import DenseGate, RowSkip, build_policy
from engine.skip.base import RuleGate
from engine.weight_check import check_weights

log = logging.getLogger("skipserve.runner")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _accepted_length(draft: list[int], made: list) -> int:
    """How many of the draft's tokens the model produced itself (`made`: its rows' tokens, or an
    error where a row's could not be drawn), up to the first it did not: the row after them gives
    the sequence's sample. A row failing past that point would not have run without drafts, so it
    fails nothing."""
    taken = 0
    while taken < len(draft) and not isinstance(made[taken], Exception) and made[taken].token_id == draft[taken]:
        taken += 1
    return taken


def _to_host(pooled: dict) -> dict[str, tuple[range, list[float]]]:
    """The step's pooled sums as lists, read once the step's work is queued (no sync between launches)."""
    return {seq_id: (positions, [] if summed is None else summed.tolist()) for seq_id, (positions, summed) in pooled.items()}


def resolve_device(device: str) -> torch.device:
    """Raises ValueError, first thing in the load, for a CUDA device this host has not (it failed
    deep in the model's build, after the dense weights were written)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "no CUDA device is visible" if torch.backends.cuda.is_built() else \
                f"this torch ({torch.__version__}) is built without CUDA"
            raise ValueError(f"--device {device}: {why}; --device cpu (or auto) serves on the CPU")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"--device {device}: this host has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def resolve_kv_dtype(kv_cache_dtype: str, act_dtype: torch.dtype, device: torch.device, quantized: bool) -> torch.dtype:
    """The KV cache's element type. auto: on the CPU, fp16 for quantized weights (as llama.cpp keeps
    a GGUF's cache: half the memory and half the bytes decode attention reads; the native decode
    attention widens as it loads, prefill attention reads fp32 copies) and the activations' fp32
    for dense weights (the reference precision); on CUDA the activations' dtype (the only choice
    there: `check_kv_dtype`). int8: rows of int8 values with a scale per 32 (engine/kv/int8_rows.py),
    as llama.cpp's q8_0 cache: 0.56x fp16's bytes."""
    if kv_cache_dtype == "auto":
        return torch.float16 if device.type == "cpu" and quantized else act_dtype
    return torch.int8 if kv_cache_dtype == "int8" else DTYPES[kv_cache_dtype]


def check_kv_dtype(kv_cache_dtype: str, device: torch.device) -> None:
    if kv_cache_dtype not in KV_CACHE_DTYPES:  # a config file's value (the CLI offers only these)
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r}: one of {', '.join(KV_CACHE_DTYPES)}")
    if kv_cache_dtype != "auto" and device.type != "cpu":
        raise ValueError(f"--kv-cache-dtype {kv_cache_dtype} is a CPU option; on {device.type} the cache holds "
                         "the activations' dtype (auto)")


@dataclass
class StepResult:
    samples: dict[str, Sampled]  # seq_id -> token produced this step (after its accepted drafts)
    ffn_skipped: dict[str, int]  # seq_id -> FFN blocks skipped producing it
    layer_ffn_skipped: list[int]  # per layer, over this step's decode rows
    failed: dict[str, Exception] = field(default_factory=dict)  # seq_id -> why its token could not be made
    # seq_id -> (token id, logprob, [(alternative id, logprob)]) of the prompt tokens scored this step
    prompt_scores: dict[str, list] = field(default_factory=dict)
    # seq_id -> its draft tokens the model produced too, in order: they come before its sample
    accepted: dict[str, list[Sampled]] = field(default_factory=dict)
    # seq_id -> (positions, the sum of their hidden states) of an embeddings input pooled this step
    pooled: dict[str, tuple[range, list[float]]] = field(default_factory=dict)

    def merge(self, other: "StepResult") -> None:
        self.samples.update(other.samples)
        self.accepted.update(other.accepted)
        self.ffn_skipped.update(other.ffn_skipped)
        self.layer_ffn_skipped = [a + b for a, b in zip(self.layer_ffn_skipped, other.layer_ffn_skipped)]
        self.failed.update(other.failed)
        self.prompt_scores.update(other.prompt_scores)
        self.pooled.update(other.pooled)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig):
        threads, source = configure_threads(config.threads)
        log.info("%d CPU threads (%s)", threads, source)
        self.device = resolve_device(config.device)
        if self.device.type == "cuda" and self.device.index is not None:
            # Triton launches and graph captures go to the thread's current device: this thread's,
            # which builds the model and runs every step
            torch.cuda.set_device(self.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.device.type == "cpu":
            native.load(config.cache_dir)  # C++ CPU kernels (engine/native); torch paths without them
        self.model_config = model_config
        t0 = time.perf_counter()
        check_kv_dtype(config.kv_cache_dtype, self.device)
        if config.quantize and self.device.type != "cpu":
            raise ValueError(f"--quantize {config.quantize} runs on the CPU's quantized kernels, not on {self.device}")
        # --quantize int8 rounds dense weights (a GGUF's dequantized ones too); else a GGUF may be served as it is
        check_architecture(model_config)
        gguf = None if config.quantize else quantized_gguf(config.model, config.cache_dir, config.dtype, self.device)
        source = gguf or ensure_hf_dir(config.model, config.cache_dir)
        state = load_weights(gguf) if gguf else load_state_dict(source)
        check_weights(model_config, state, config.model or source)  # before a kernel trusts a shape
        if config.quantize == "int8":
            state = quantize_state(state)
        self.backend = select_backend(self.device)
        self.model = build_model(model_config, state, self.device, self.dtype, config.max_model_len, self.backend)
        del state
        self.backend.prepare(self.model)
        release_free_memory()  # the load's temporaries (repacking, tiling) back to the OS
        freeze_loaded_objects()
        self.quantized = gguf is not None or config.quantize == "int8"  # else dense `self.dtype` weights
        self.act_dtype = self.model.act_dtype  # activations (fp32 on CPU)
        log.info("model on %s (%s backend), %s weights, %s activations, in %.1f s", self.device, self.backend.name,
                 "GGUF-quantized" if gguf else "int8" if config.quantize else str(self.dtype).removeprefix("torch."),
                 str(self.act_dtype).removeprefix("torch."), time.perf_counter() - t0)
        # LoRA adapters named at start: read before the KV cache takes the memory left
        self.lora = None
        adapters, default = [], None
        if config.enable_lora or config.lora_modules or config.default_loras:
            self.lora = LoRARegistry(self.model, model_config, self.device, self.act_dtype, self.backend)
            adapters = [(name, self.lora.reserve(name), *self.lora.read(name, path, config.max_lora_rank))
                        for name, path in config.lora_modules.items()]
            if config.default_loras:
                default = self.lora.read_default(config.default_loras, config.max_lora_rank)
        self.kv_dtype = resolve_kv_dtype(config.kv_cache_dtype, self.act_dtype, self.device, self.quantized)
        if self.kv_dtype == torch.int8 and not int8_rows.supported(model_config.head_dim):
            raise ValueError(f"--kv-cache-dtype int8 takes heads of a multiple of {int8_rows.GROUP} values; this "
                             f"model's have {model_config.head_dim}")
        element_size = element_bytes(self.kv_dtype, model_config.head_dim)
        self.capacity = plan_capacity(config, model_config, element_size, self._device_memory(),
                                      self.backend.decode_reads_kv_in_place,
                                      available_memory() if self.device.type == "cpu" else None)
        log.info("%s (%s)", self.capacity.describe(config.max_model_len), str(self.kv_dtype).removeprefix("torch."))
        self.block_size = config.block_size
        self.kv = KVCache(model_config.num_layers, self.capacity.num_blocks, model_config.num_kv_heads,
                          self.block_size, model_config.head_dim, self.device, self.kv_dtype)
        self.model.fused_decode = self.backend.fused_decode(self.model, self.kv)
        self.policy = build_policy(config.skip, model_config.num_layers)
        self.decode_step = self.backend.decode_step(self.model, self.kv, config, self.policy)  # CUDA: Triton + graphs
        # drafts are checked as decode rows of their sequence, which must see the K/V of the rows
        # before them in the same step: the native CPU step writes every row's K/V before attending
        self.checks_drafts = self.model.fused_decode is not None
        # for the same reason, short prefill chunks may go as decode rows of their sequence
        self.short_chunk_rows = self.backend.short_chunk_rows() if self.checks_drafts else 0
        self.num_layers = model_config.num_layers
        # LoRA adapters: installed once the fused paths took the base projections (rows of no adapter keep them)
        if self.lora is not None:
            self.lora.wrap(self.model)
            if self.model.fused_decode is not None:
                self.model.fused_decode.serve_adapters(self.lora)
            for name, slot, adapter, pairs in adapters:
                self.lora.install(slot, name, adapter, pairs)
            if default is not None:  # llama-server's --lora files, combined at their scales
                scales = [scale for _, scale in config.default_loras]
                self.lora.set_default(self.lora.install_scaled(scales, *default) if default[1] else None, scales)
        per_token = self.model.weight_bytes()
        log.info("weights read per decoded token: %.1f MB (FFN %.1f, attention %.1f, lm_head %.1f); kernels: %s",
                 sum(per_token.values()) / 1e6, per_token["ffn"] / 1e6, per_token["attention"] / 1e6,
                 per_token["lm_head"] / 1e6,
                 ", ".join(f"{fmt} -> {path}" for fmt, path in self.model.weight_formats().items()))
        dropped = drop_unwritten_file_pages()
        log.info("start-up code out of the resident set: %.0f MiB of read-only library pages (reloaded when touched)",
                 dropped / 2**20)

    def _device_memory(self) -> DeviceMemory | None:
        if self.device.type != "cuda":
            return None
        free, total = torch.cuda.mem_get_info(self.device)
        return DeviceMemory(total=total, in_use=total - free)

    # ---- forwards -------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, chunks: list[tuple[list[int], list[int], int]], gate=None,
                adapters: list[int] | None = None) -> torch.Tensor:
        """Chunks (token ids, block table, start position) of several sequences in one forward, dense
        unless `gate` says otherwise, each through its LoRA adapter slot in `adapters` where given ->
        hidden states [tokens, hidden] (normed)."""
        meta = AttentionMetadata.for_prefill([(table, start, len(ids)) for ids, table, start in chunks],
                                             self.block_size, self.device)
        ids = torch.tensor([t for ids, _, _ in chunks for t in ids], device=self.device)
        rows = None if adapters is None else [a for (ids, _, _), a in zip(chunks, adapters) for _ in ids]
        return self._forward(ids, meta, gate or DenseGate(self.num_layers), rows)

    @torch.inference_mode()
    def decode(self, token_ids: list[int], positions: list[int], block_tables: list[list[int]], gate=None,
               adapters: list[int] | None = None):
        """One token per row at `positions` (through its LoRA adapter slot in `adapters` where given) ->
        hidden states [rows, hidden] (normed), through the backend's decode step where it takes this
        one (valid until the next step), else the model."""
        gate = gate or DenseGate(self.num_layers)
        if self.decode_step is not None and not any(adapters or ()) and \
                self.decode_step.takes(len(token_ids), block_tables, gate):
            return self.decode_step(token_ids, positions, block_tables, gate)
        meta = AttentionMetadata.for_decode(block_tables, positions, self.block_size, self.device, self.act_dtype)
        ids = torch.tensor(token_ids, device=self.device)
        return self._forward(ids, meta, gate, adapters)

    def _forward(self, ids: torch.Tensor, meta: AttentionMetadata, gate, adapters: list[int] | None):
        """The model's forward; with a row of a LoRA adapter, each row's adapter applied: a decode step
        in the backend's fused step where it takes the adapters with this gate, else on the model's
        per-op path (the backend's fused calls hold the base projections)."""
        if not any(adapters or ()):
            return self.model.forward(ids, meta, self.kv, gate)
        if self.lora is None:
            raise ValueError("no LoRA adapter is served (--lora-modules)")
        fused = self.model.fused_decode
        if not meta.is_prefill and fused is not None and fused.takes_adapters(gate):
            return self.model.forward(ids, meta, self.kv, gate, adapters=adapters)
        if isinstance(gate, RuleGate):  # its FFNs on the running rows only: the row map follows them
            gate.row_state = self.lora.rows
        with self.lora.applied(adapters):
            return self.model.forward(ids, meta, self.kv, gate, per_op=True)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepResult:
        hiddens, producers, prompt_scores, pooled = [], [], {}, {}
        # short prefill chunks go as decode rows (below); the others in one forward, always dense
        as_rows = [c for c in batch.prefills if self._computes_as_rows(c)]
        chunks = [c for c in batch.prefills if not self._computes_as_rows(c)]
        chunk_hidden = {}  # id(chunk) -> its rows' hidden states
        if chunks:
            hidden = self.prefill([(c.seq.token_ids()[c.start:c.end], c.seq.block_table, c.start) for c in chunks],
                                  adapters=[c.seq.lora_slot for c in chunks])
            chunk_hidden.update(zip(map(id, chunks), hidden.split([c.end - c.start for c in chunks])))
        # a sequence's row, then one row per draft token: the draft's token at its position
        decoding = [(s, batch.drafts.get(s.seq_id, [])[:j]) for s in batch.decodes
                    for j in range(len(batch.drafts.get(s.seq_id, ())) + 1)]
        gate = rows_hidden = None
        if decoding or as_rows:
            gate, per_chunk, rows_hidden = self._decode_rows(as_rows, decoding)
            chunk_hidden.update(zip(map(id, as_rows), per_chunk))
        for chunk in batch.prefills:
            hidden = chunk_hidden[id(chunk)]
            if chunk.seq.wants_prompt_logprobs:
                prompt_scores[chunk.seq.seq_id] = self._score_prompt(chunk.seq, hidden, chunk.start)
            if chunk.seq.pooling is not None:
                pooled[chunk.seq.seq_id] = self._pool(chunk, hidden)
            if chunk.produces_token:
                hiddens.append(hidden[-1:])
                producers.append(chunk.seq)
        producers = [(seq, []) for seq in producers]  # each row's sequence and the draft tokens before it
        skipped = {}
        layer_skipped = [0] * self.num_layers
        if decoding:
            hiddens.append(rows_hidden)
            producers.extend(decoding)
        if not producers:
            return StepResult({}, {}, layer_skipped, prompt_scores=prompt_scores, pooled=_to_host(pooled))
        logits = self.logits(torch.cat(hiddens))
        failed, live, rows = {}, [], []
        for i, (seq, before) in enumerate(producers):  # a row's own settings may fail it alone (its seed, its schema)
            try:
                output = seq.output_ids + before
                uniform = None if seq.params.greedy else seeded_uniform(seq.seed, len(output))
                allowed = None if seq.constraint is None else seq.constraint.mask()  # (such rows have no drafts)
                rows.append(SampleRow(seq.params, seq.prompt_ids, output, uniform, allowed,
                                      seq.refused_tokens(output), listed_tokens(seq.params, logits.shape[-1])))
                live.append(i)
            except Exception as exc:
                failed[seq.seq_id] = exc
        tokens: dict[str, list[Sampled | Exception]] = {}  # per sequence, its rows' tokens in order
        for i, token in zip(live, sample(logits[live] if len(live) < len(producers) else logits, rows) if rows else []):
            tokens.setdefault(producers[i][0].seq_id, []).append(token)
        samples, accepted = {}, {}
        for seq_id, made in tokens.items():
            if seq_id not in failed:
                taken = _accepted_length(batch.drafts.get(seq_id, []), made)
                if isinstance(made[taken], Exception):
                    failed[seq_id] = made[taken]
                    continue
                samples[seq_id] = made[taken]
                if taken:
                    accepted[seq_id] = made[:taken]
        if gate is not None:  # after sampling, which waits for the device anyway: no sync between step and lm_head
            chunk_rows = sum(c.end - c.start for c in as_rows)
            per_row, layer_skipped = gate.skip_counts(chunk_rows + len(decoding))
            skipped = {s.seq_id: n for (s, before), n in zip(decoding, per_row[chunk_rows:]) if not before}
        return StepResult(samples, skipped, layer_skipped, failed, prompt_scores, accepted, _to_host(pooled))

    @staticmethod
    def _pool(chunk, hidden: torch.Tensor) -> tuple[range, torch.Tensor | None]:
        """An embeddings input's share of a prefill chunk: the positions it pools from the chunk's
        `hidden` rows and their sum, in float64 (a mean over thousands of positions), on the device
        (`_to_host` reads it after the step's last launch)."""
        seq = chunk.seq
        positions = seq.pooling.positions(chunk.start, chunk.end, len(seq.prompt_ids))
        if not positions:
            return positions, None
        rows = hidden[positions.start - chunk.start:positions.stop - chunk.start]
        return positions, rows.sum(dim=0, dtype=torch.float64)

    PREFILL_ROW = RowSkip(max_skips=0, threshold=1.0)  # prefill never skips

    def _computes_as_rows(self, chunk) -> bool:
        """Whether a prefill chunk goes as decode rows (the backend's `short_chunk_rows`)."""
        return chunk.end - chunk.start <= self.short_chunk_rows

    def _decode_rows(self, as_rows: list, decoding: list):
        """Short prefill chunks' tokens (dense rows at their positions), then the decoding rows with
        their drafts, in one decode call -> (its gate, each chunk's hidden rows, the decoding rows')."""
        tokens = [t for c in as_rows for t in c.seq.token_ids()[c.start:c.end]]
        gate = self.policy.make_gate([self.PREFILL_ROW] * len(tokens) +
                                     [self.policy.row_skip(s.skip_plan, len(s.output_ids) + len(before))
                                      for s, before in decoding], self.device)
        hidden = self.decode(tokens + [before[-1] if before else s.last_token for s, before in decoding],
                             [p for c in as_rows for p in range(c.start, c.end)] +
                             [s.num_tokens - 1 + len(before) for s, before in decoding],
                             [c.seq.block_table for c in as_rows for _ in range(c.start, c.end)] +
                             [s.block_table for s, _ in decoding], gate,
                             [c.seq.lora_slot for c in as_rows for _ in range(c.start, c.end)] +
                             [s.lora_slot for s, _ in decoding])
        return gate, hidden[:len(tokens)].split([c.end - c.start for c in as_rows]), hidden[len(tokens):]

    SCORE_ROWS = 64  # prompt positions scored per lm_head call: [64, vocab] fp32 logits at a time (67 MB for Gemma 3)

    def _score_prompt(self, seq, hidden: torch.Tensor, start: int) -> list:
        """The logprob of each prompt token after position `start`.. of this chunk's `hidden` rows
        (the ones not scored before: a preempted sequence computes its prompt again), with its
        rank and `prompt_logprobs` most likely alternatives: [(token id, logprob, rank, [(id, logprob)])]."""
        prompt = seq.prompt_ids
        first = max(start, len(seq.prompt_logprobs))  # position p scores token p + 1
        last = min(start + hidden.shape[0], len(prompt) - 1)
        scores = []
        for p in range(first, last, self.SCORE_ROWS):
            q = min(p + self.SCORE_ROWS, last)
            targets = torch.tensor(prompt[p + 1:q + 1], device=hidden.device)
            chosen, ranks, top_ids, top_values = token_logprobs(self.logits(hidden[p - start:q - start]), targets,
                                                                seq.params.prompt_logprobs, ranked=True)
            scores += [(t, lp, rank, list(zip(ids, values)))
                       for t, lp, rank, ids, values in zip(prompt[p + 1:q + 1], chosen, ranks, top_ids, top_values)]
        return scores
