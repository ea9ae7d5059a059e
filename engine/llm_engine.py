"""The synchronous engine: add requests, step, get per-sequence output deltas.

One `step()` = scheduler decides -> model runner computes and samples -> tokens appended,
stop conditions checked, finished sequences leave the batch and free their KV blocks.
An embeddings request's inputs are prefilled in the same steps, pooled as their chunks are
computed (engine/pooling.py), and end with their prefill: one output each, holding the vector.
"""
from __future__ import annotations

import contextlib
import logging
import random

from engine.bad_words import bad_word_ids
from engine.config import EngineConfig, ModelConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.generation_defaults import sampling_defaults
from engine.kv.block_manager import BlockManager, blocks_for
from engine.loader import ensure_hf_dir
from engine.lora.names import DEFAULT_ADAPTER, listed
from engine.model_runner import ModelRunner, StepResult
from engine.ngram_drafter import NgramDrafter
from engine.pooling import Pooling
from engine.outputs import SequenceOutput, StepStats, TokenLogprob
from engine.sampling_params import InvalidParamError, SamplingParams, SkipParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import Sequence
from engine.skip.base import TokenSkipPlan
from engine.skip.settings import resolve_skip
from engine.structured.constraint import Constraint, StructuredOutputs
from engine.structured.thinking import ThinkingConstraint, ThinkingMasks
from engine.tokenizer import Tokenizer

log = logging.getLogger("skipserve.engine")
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # OpenAI's error code for a prompt past the context


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        Pooling(config.pooling)  # a config file's unknown method stops the start before the load, as the CLI's would
        self.hf_dir = ensure_hf_dir(config.model, config.cache_dir, dense=False)  # the runner asks for dense weights
        self.tokenizer = Tokenizer(self.hf_dir, config.chat_template)
        self.model_config = ModelConfig.from_hf_dir(self.hf_dir)
        self.sampling_defaults = sampling_defaults(self.hf_dir, config.generation_config,
                                                   config.override_generation_config)
        if self.sampling_defaults:
            log.info("requests that leave them out sample with the model's generation config: %s "
                     "(--generation-config vllm: OpenAI's defaults)", self.sampling_defaults)
        self.max_model_len = min(config.max_model_len, self.model_config.max_position_embeddings)
        if self.max_model_len < config.max_model_len:
            log.warning("max_model_len %d is past the model's context of %d tokens: serving %d",
                        config.max_model_len, self.max_model_len, self.max_model_len)
        config.max_model_len = self.max_model_len
        self.runner = ModelRunner(config, self.model_config)
        self.blocks = BlockManager(self.runner.capacity.num_blocks, config.block_size, config.prefix_caching)
        # speculative decoding where the backend checks drafts (engine/ngram_drafter.py)
        if not 0 <= config.speculative_tokens < Scheduler.MAX_ROWS_WITH_DRAFTS:
            raise ValueError(f"speculative_tokens {config.speculative_tokens}: from 0 (off) to "
                             f"{Scheduler.MAX_ROWS_WITH_DRAFTS - 1}")
        self.speculative_tokens = config.speculative_tokens if self.runner.checks_drafts else 0
        if config.speculative_tokens and not self.speculative_tokens:
            log.warning("--speculative-tokens: this model and device have no decode step that checks drafts; off")
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_prefill_tokens, self.speculative_tokens,
                                   config.scheduling_policy)
        self.lora = self.runner.lora  # LoRA adapters (engine/lora), where enabled
        self._retiring: set[int] = set()  # withdrawn adapters' slots, removed once no sequence holds them
        self.eos_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.structured = StructuredOutputs(self.tokenizer.token_bytes, self.model_config.vocab_size, self.eos_ids)
        self.thinking_masks = ThinkingMasks(self.tokenizer.token_bytes, self.tokenizer.piece_bytes,
                                            self.model_config.vocab_size, self.eos_ids)
        self._sequences: dict[str, Sequence] = {}
        # engine-wide FFN accounting per layer, over generated tokens (read by /metrics)
        self.layer_ffn_total = [0] * self.model_config.num_layers
        self.layer_ffn_skipped = [0] * self.model_config.num_layers
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.draft_tokens_total = 0  # speculative draft tokens checked, and accepted (read by /metrics)
        self.accepted_draft_tokens_total = 0

    # ---- requests -------------------------------------------------------------------------
    def resolve_skip(self, skip: SkipParams | None) -> TokenSkipPlan:
        return resolve_skip(self.config.skip, skip)

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams, param: str) -> int:
        """Validate lengths; return the effective max_tokens: the request's (refused where it would
        not fit), else the room left, within the server's cap (which refuses nothing). A prompt-only
        request makes no token: its prompt may fill the context."""
        if params.prompt_only:
            self._check_length(prompt_ids, param, "prompt", reserve=0)
            return 1
        room = self.max_model_len - self._check_length(prompt_ids, param, "prompt", reserve=1)
        asked = self._asked_tokens(prompt_ids, params, room)
        most = asked if params.max_tokens_cap is None else min(asked, params.max_tokens_cap)
        if params.min_tokens > most:  # (one above a given max_tokens is refused by params.validate)
            where = (f"the room after the prompt's {len(prompt_ids)} tokens in this model's {self.max_model_len}-token "
                     "context" if most == room else "the server's cap on an answer (its generation config)")
            raise InvalidParamError(f"min_tokens ({params.min_tokens}) must be at most {most}, {where}", "min_tokens",
                                    CONTEXT_LENGTH_EXCEEDED if most == room else None)
        return most

    def _asked_tokens(self, prompt_ids: list[int], params: SamplingParams, room: int) -> int:
        if params.max_tokens is None:
            return room
        if params.max_tokens > room:
            raise InvalidParamError(  # OpenAI's words and code: clients key on them to trim a conversation
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(prompt_ids) + params.max_tokens} tokens ({len(prompt_ids)} in the prompt, {params.max_tokens} "
                f"in {params.max_tokens_param}). Please reduce the length of the prompt or {params.max_tokens_param}.",
                params.max_tokens_param, CONTEXT_LENGTH_EXCEEDED)
        return params.max_tokens

    def _check_length(self, ids: list[int], param: str, what: str, reserve: int) -> int:
        """A prompt or input of 1 to max_model_len - `reserve` tokens (room for as many more) -> its length."""
        if not ids:
            raise InvalidParamError(f"the {what} is empty", param)
        if min(ids) < 0 or max(ids) >= self.model_config.vocab_size:  # the embedding's rows (on a GPU an
            raise InvalidParamError(f"token ids must be in the model's vocabulary (0 to "  # index past
                                    f"{self.model_config.vocab_size - 1})", param)  # them breaks the device)
        if len(ids) > self.max_model_len - reserve:
            room = f", and {reserve} more must fit after it" if reserve else ""
            raise InvalidParamError(f"This model's maximum context length is {self.max_model_len} tokens. "
                                    f"However, the {what} has {len(ids)} tokens{room}.", param, CONTEXT_LENGTH_EXCEEDED)
        return len(ids)

    def prepare_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                        skip: SkipParams | None = None, prompt_param: str = "prompt") -> list[Sequence]:
        """Validate a request and build its sequences (one per choice); nothing is scheduled yet.

        Raises InvalidParamError. Reads only immutable state, so any thread may call it.
        """
        params.validate(self.model_config.vocab_size)
        slot = self._lora_slot(params.adapter)
        if params.priority and not self.scheduler.by_priority:  # as vLLM refuses it
            raise InvalidParamError(f"priority {params.priority} needs the server's --scheduling-policy priority "
                                    "(it runs fcfs: every request's priority is 0)", "priority")
        if params.bad_words:
            params.bad_words_ids = bad_word_ids(lambda text: self.tokenizer.encode(text, False), params.bad_words)
        if params.n > self.config.max_num_seqs:
            raise InvalidParamError(f"n must be at most {self.config.max_num_seqs} (the server's max batch)", "n")
        plan = self.resolve_skip(skip)
        max_tokens = self.check_prompt(prompt_ids, params, prompt_param)
        base_seed = params.seed if params.seed is not None else random.getrandbits(63)
        grammar = self.structured.for_params(params)
        ending = tuple(sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)))
        # choice i samples with seed + i, as an unsigned 64-bit value (what engine/seeded_uniform.py takes)
        return [
            Sequence(
                seq_id=f"{request_id}#{i}", request_id=request_id, index=i, prompt_ids=list(prompt_ids),
                params=params, skip_plan=plan, max_tokens=max_tokens,
                detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids, [*params.stop, *params.turn_stops],
                                                   params.include_stop_str_in_output,
                                                   special=not params.skip_special_tokens),
                seed=(base_seed + i) % 2**64,
                lora_slot=slot,
                constraint=self._constraint(grammar, params),
                prompt_logprobs=None if params.prompt_logprobs is None else [],
                ending_tokens=ending,
                # drafts for dense answers free of a schema (a skipping row's gate or a grammar's
                # mask would have to follow each draft token)
                drafter=NgramDrafter(self.speculative_tokens)
                if self.speculative_tokens and grammar is None and (plan.budget <= 0 or self.config.skip.policy == "none")
                else None,
            )
            for i in range(params.n)
        ]

    @property
    def adapters(self) -> dict[str, str]:
        """The LoRA adapters served by name: name -> folder (not llama-server's --lora ones: `default_adapter`)."""
        return {} if self.lora is None else {name: a.path for name, a in self.lora.adapters.items() if listed(name)}

    @property
    def default_adapter(self) -> str | None:
        """The adapter requests that name the model itself are computed through (llama-server's --lora
        files together), if any."""
        return DEFAULT_ADAPTER if self.lora is not None and DEFAULT_ADAPTER in self.lora.slots else None

    def adapters_in_flight(self) -> tuple[list[str], list[str]]:
        """The adapters of the running sequences and of the waiting ones, by name (one unloaded while its
        sequences run keeps its name here; llama-server's --lora ones are the model's). Any thread."""
        names = {} if self.lora is None else self.lora.names

        def of(sequences) -> list[str]:
            return sorted(n for n in {names.get(s.lora_slot, DEFAULT_ADAPTER) for s in sequences if s.lora_slot}
                          if listed(n))

        return of(list(self.scheduler.running)), of(list(self.scheduler.waiting))

    def held_slots(self) -> set[int]:
        """The adapter slots of the running and waiting sequences. Any thread."""
        return {s.lora_slot for s in [*list(self.scheduler.running), *list(self.scheduler.waiting)]}

    def _lora_slot(self, name: str | None) -> int:
        if name is None:
            return 0
        slot = None if self.lora is None else self.lora.slots.get(name)
        if slot is None:
            served = ", ".join(self.adapters) or "none: --lora-modules"
            raise InvalidParamError(f"no LoRA adapter named {name!r} is served ({served})", "model", "model_not_found")
        return slot

    def retire_adapter(self, slot: int) -> None:
        """A withdrawn adapter's slot (LoRARegistry.withdraw), its pairs removed once no sequence holds it."""
        self._retiring.add(slot)
        self._remove_retired()

    def _remove_retired(self) -> None:
        held = {seq.lora_slot for seq in self._sequences.values()}
        for slot in self._retiring - held:
            self.lora.remove(slot)
        self._retiring &= held

    def _constraint(self, grammar, params: SamplingParams) -> Constraint | ThinkingConstraint | None:
        if grammar is None:
            return None
        if params.thinking is None:
            return Constraint(self.structured, grammar)
        return ThinkingConstraint(self.structured, self.thinking_masks, grammar, opened=params.thinking == "open")

    def prepare_embeddings(self, request_id: str, inputs: list[list[int]], param: str = "input") -> list[Sequence]:
        """An embeddings request's sequences, one per input (input i is sequence i, named `param.i`
        in its errors where there are several); nothing is scheduled yet. Any thread may call it."""
        self.check_inputs(inputs, param)
        plan = self.resolve_skip(SkipParams(budget=0.0))  # computed as prefill: every FFN runs anyway
        return [Sequence(seq_id=f"{request_id}#{i}", request_id=request_id, index=i, prompt_ids=list(ids),
                         params=SamplingParams(), skip_plan=plan, max_tokens=0,
                         detokenizer=IncrementalDetokenizer(self.tokenizer, [], []), seed=0,
                         pooling=Pooling(self.config.pooling))
                for i, ids in enumerate(inputs)]

    def check_inputs(self, inputs: list[list[int]], param: str = "input") -> None:
        """Embeddings inputs of 1 to max_model_len tokens each (input i named `param.i` where there
        are several); raises InvalidParamError."""
        for i, ids in enumerate(inputs):
            self._check_length(ids, param if len(inputs) == 1 else f"{param}.{i}", "input", reserve=0)

    def add_sequences(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self._sequences[seq.seq_id] = seq
            self.scheduler.add(seq)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    skip: SkipParams | None = None, prompt_param: str = "prompt") -> list[Sequence]:
        seqs = self.prepare_request(request_id, prompt_ids, params, skip, prompt_param)
        self.add_sequences(seqs)
        return seqs

    def abort(self, request_id: str) -> None:
        for seq in self.scheduler.abort(request_id):
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self._sequences.pop(seq.seq_id, None)
        if seq.lora_slot in self._retiring:
            self._remove_retired()

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def prompt_tokens_cached_total(self) -> int:
        return self.scheduler.cached_tokens_total

    @property
    def num_preemptions_total(self) -> int:
        return self.scheduler.num_preemptions_total

    def kv_usage(self) -> float:
        """Share of KV blocks held by sequences (cached blocks nobody holds count as free)."""
        return self.blocks.usage()

    @contextlib.contextmanager
    def kv_blocks(self, lengths: list[int]):
        """Block tables for rows of up to `lengths[i]` tokens, outside the scheduler (calibration,
        the quality harness, tests drive `runner.prefill` / `runner.decode` with them); returned
        to the pool on exit. Call between steps, never inside one."""
        tables = []
        try:  # a table that cannot be had gives back those already taken
            for n in lengths:
                tables.append(self.blocks.allocate_blocks(blocks_for(n, self.config.block_size)))
            yield tables
        finally:
            for table in tables:
                self.blocks.free_blocks(table)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> tuple[list[SequenceOutput], StepStats]:
        batch = self.scheduler.schedule()
        stats = StepStats()
        if batch.empty:
            stuck = self.scheduler.unadmittable()
            if stuck is None:
                return [], stats
            return self._fail({stuck.seq_id: MemoryError("the sequence needs more KV cache than the server has")},
                              {stuck.seq_id: stuck}), stats
        result = self._run(batch)
        outputs = []  # what the step made: kept if a later part of the step fails
        try:
            self._collect(batch, result, outputs, stats)
        except Exception as exc:  # outside every sequence's own work: the step's unfinished sequences fail
            log.exception("collecting the step's results failed")
            seqs = {s.seq_id: s for s in [*(c.seq for c in batch.prefills), *batch.decodes] if not s.is_finished}
            outputs += self._fail({seq_id: exc for seq_id in seqs}, seqs)
        return outputs, stats

    def _collect(self, batch: ScheduledBatch, result: StepResult, outputs: list[SequenceOutput],
                 stats: StepStats) -> None:
        """The step's results into its sequences (tokens, stops, KV bookkeeping) and `outputs`."""
        failed = result.failed
        for chunk in batch.prefills:
            if chunk.seq.seq_id not in failed:
                self.prompt_tokens_total += self.scheduler.on_computed(chunk.seq, chunk.end)
                try:  # a prompt's logprobs and its vector are its own: a failure there is its alone
                    self._prompt_scores(chunk.seq, result.prompt_scores.get(chunk.seq.seq_id, ()))
                    if chunk.seq.pooling is not None:  # (a vector of non-finite states cannot be made)
                        chunk.seq.pooling.add(*result.pooled[chunk.seq.seq_id])
                        if chunk.ends_input:
                            outputs.append(self._embedding_output(chunk.seq))
                except Exception as exc:
                    failed[chunk.seq.seq_id] = exc
        for seq in batch.decodes:
            if seq.seq_id not in failed:
                self.scheduler.on_computed(seq, seq.num_tokens, dense=result.ffn_skipped.get(seq.seq_id, 0) == 0)
        stats.draft_tokens = sum(map(len, batch.drafts.values()))
        for seq_id, sampled in result.samples.items():
            if seq_id in failed:  # (its prompt's own work failed above: no token, its error only)
                continue
            seq = self._sequences[seq_id]
            accepted = result.accepted.get(seq_id, [])
            try:  # detokenizing and stop checks are the sequence's own: a failure there is its alone
                if seq_id in batch.drafts:
                    seq.drafter.taken(len(batch.drafts[seq_id]), len(accepted))
                seq.ffn_skipped += result.ffn_skipped.get(seq_id, 0)  # (a sequence with drafts runs every FFN)
                kept = []  # this step's tokens, up to the one that ends the sequence
                if seq.params.prompt_only:  # its prompt computed, it ends: the token sampled after it is dropped
                    self.scheduler.finish(seq, "length")
                    self._release(seq)
                for made in [] if seq.params.prompt_only else [*accepted, sampled]:
                    seq.ffn_total += self.model_config.num_layers
                    seq.output_ids.append(made.token_id)
                    kept.append(made)
                    stats.generated_tokens += 1
                    if made is not sampled:  # an accepted draft token: its K/V came with the step
                        stats.accepted_draft_tokens += 1
                        self.scheduler.on_computed(seq, seq.num_tokens)
                    reason = self._stop_reason(seq, made.token_id)
                    if reason:
                        self.scheduler.finish(seq, reason)
                        self._release(seq)
                        break
                if seq_id in batch.drafts:
                    self.scheduler.trim(seq)
                outputs.append(self._output(seq, kept))  # one output a step, whatever it made
            except Exception as exc:
                failed[seq_id] = exc
        outputs += self._fail(failed, {s.seq_id: s for s in [*(c.seq for c in batch.prefills), *batch.decodes]})
        for layer, n in enumerate(result.layer_ffn_skipped):
            self.layer_ffn_skipped[layer] += n
            self.layer_ffn_total[layer] += stats.generated_tokens
        self.generation_tokens_total += stats.generated_tokens
        self.draft_tokens_total += stats.draft_tokens
        self.accepted_draft_tokens_total += stats.accepted_draft_tokens

    def _prompt_scores(self, seq: Sequence, scores) -> None:
        """A prompt's logprobs (token, logprob, rank, top alternatives), for a sequence that asked for them."""
        text = self.tokenizer.token_text
        for t, lp, rank, top in scores:
            if lp != lp:  # NaN: log-softmax of logits that are not finite (no JSON number either)
                raise ValueError("the model's logits for this prompt are not finite (NaN or infinity)")
            seq.prompt_logprobs.append(TokenLogprob(text(t), t, lp, [(text(a), a, alp) for a, alp in top], rank))

    def _run(self, batch: ScheduledBatch) -> StepResult:
        """The runner's step. When a batched forward fails, each sequence is run alone in the same
        step (recomputing writes the same K/V), so a failure one sequence causes fails only it."""
        try:
            return self.runner.run(batch)
        except Exception as exc:
            parts = [ScheduledBatch(prefills=[c]) for c in batch.prefills] + \
                    [ScheduledBatch(decodes=[s], drafts={s.seq_id: batch.drafts[s.seq_id]} if s.seq_id in batch.drafts
                                    else {}) for s in batch.decodes]
            if len(parts) == 1:
                seq = (batch.prefills[0].seq if batch.prefills else batch.decodes[0])
                log.exception("step failed for sequence %s", seq.seq_id)
                return StepResult({}, {}, [0] * self.model_config.num_layers, {seq.seq_id: exc})
            log.warning("batched step failed (%s); running its %d sequences one at a time", exc, len(parts))
        result = StepResult({}, {}, [0] * self.model_config.num_layers)
        for part in parts:
            result.merge(self._run(part))
        return result

    def _fail(self, failed: dict[str, Exception], seqs: dict[str, Sequence]) -> list[SequenceOutput]:
        """End each failed sequence's request (all its choices): an error output, KV freed at once."""
        outputs = []
        for seq_id, exc in failed.items():
            seq = seqs[seq_id]
            log.error("request %s failed: %s: %s", seq.request_id, type(exc).__name__, exc)
            for victim in self.scheduler.abort(seq.request_id):
                self._release(victim)
            outputs.append(SequenceOutput(
                request_id=seq.request_id, index=seq.index, text="", token_ids=[], logprobs=None, finished=True,
                finish_reason="error", prompt_tokens=len(seq.prompt_ids), cached_tokens=seq.cached_tokens,
                completion_tokens=len(seq.output_ids), ffn_skipped=seq.ffn_skipped, ffn_total=seq.ffn_total,
                error=str(exc) if isinstance(exc, InvalidParamError) else f"{type(exc).__name__}: {exc}",
                invalid_request=isinstance(exc, InvalidParamError)))
        return outputs

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        params, constraint = seq.params, seq.constraint
        if constraint is not None:
            constraint.advance(token)  # raises for a token its mask refused: the sequence fails alone
        eos = token in self.eos_ids and (not params.ignore_eos or (constraint is not None and constraint.ended))
        if eos or token in params.stop_token_ids:
            # a stop token, or an end of text besides the tokenizer's own (a generation config's other
            # eos ids, as Gemma's <end_of_turn>: vLLM makes them stop tokens), is the stop reason
            if not eos or token != self.tokenizer.eos_token_id:
                seq.stop_reason = token
            if not eos and params.include_stop_str_in_output:  # a stop token's text stays, as vLLM keeps it
                seq.detokenizer.add_token(token, may_stop=False)
            return "stop"
        # as EOS (refused before it), a stop string ends the answer from the token after the min_tokens-th on
        seq.detokenizer.add_token(token, may_stop=len(seq.output_ids) > params.min_tokens)
        if seq.detokenizer.stopped:
            seq.stop_reason = seq.detokenizer.stops.matched
            return "stop"
        if constraint is not None and constraint.done:  # nothing may follow the JSON
            return "stop"
        if len(seq.output_ids) >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _output(self, seq: Sequence, made: list) -> SequenceOutput:
        """The sequence's output for this step's tokens `made` (Sampled, in order)."""
        logprobs = prompt_logprobs = None
        text = self.tokenizer.token_text
        if seq.params.logprobs is not None:
            logprobs = [TokenLogprob(text(s.token_id), s.token_id, s.logprob, [(text(t), t, lp) for t, lp in s.top_logprobs])
                        for s in made]
        if seq.prompt_logprobs is not None and len(seq.output_ids) == len(made):  # with the first output, once
            first = seq.prompt_ids[0]
            prompt_logprobs = [TokenLogprob(text(first), first, None, [])] + seq.prompt_logprobs
        return SequenceOutput(
            request_id=seq.request_id, index=seq.index, text=seq.detokenizer.take(final=seq.is_finished),
            token_ids=[s.token_id for s in made], logprobs=logprobs, prompt_logprobs=prompt_logprobs, finished=seq.is_finished,
            finish_reason=seq.finish_reason, prompt_tokens=len(seq.prompt_ids), cached_tokens=seq.cached_tokens,
            completion_tokens=len(seq.output_ids), ffn_skipped=seq.ffn_skipped, ffn_total=seq.ffn_total,
            stop_reason=seq.stop_reason if seq.is_finished else None,
        )

    def _embedding_output(self, seq: Sequence) -> SequenceOutput:
        """An embeddings input, computed: it leaves the batch (its K/V stay in the prefix cache for
        later prompts), and its one output holds the vector."""
        vector = seq.pooling.vector()
        self.scheduler.finish(seq, "stop")
        self._release(seq)
        return SequenceOutput(
            request_id=seq.request_id, index=seq.index, text="", token_ids=[], logprobs=None, finished=True,
            finish_reason="stop", prompt_tokens=len(seq.prompt_ids), cached_tokens=seq.cached_tokens,
            completion_tokens=0, ffn_skipped=0, ffn_total=0, embedding=vector)

    # ---- convenience for tests, benchmarks and offline use ----------------------------------
    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """Each input's embedding (all submitted as one request)."""
        self.add_sequences(self.prepare_embeddings("offline-embed", inputs))
        vectors = {}
        while self.has_work:
            for out in self.step()[0]:
                if out.error:
                    raise RuntimeError(out.error)
                vectors[out.index] = out.embedding
        return [vectors[i] for i in range(len(inputs))]

    def generate(self, prompts: list[list[int]], params: SamplingParams, skip: SkipParams | None = None):
        """Run prompts to completion (all submitted at once); -> list of (text, token_ids, output)."""
        ids = [f"offline-{i}" for i in range(len(prompts))]
        results = {rid: {"text": "", "ids": [], "last": None} for rid in ids}
        for rid, prompt in zip(ids, prompts):
            self.add_request(rid, prompt, params, skip)
        while self.has_work:
            for out in self.step()[0]:
                r = results[out.request_id]
                r["text"] += out.text
                r["ids"] += out.token_ids
                r["last"] = out
        return [(results[r]["text"], results[r]["ids"], results[r]["last"]) for r in ids]
