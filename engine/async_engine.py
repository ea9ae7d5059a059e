"""The engine as the HTTP server sees it: `stream = engine.add_request(...)`, `async for out in stream`,
`abort(id)`.

The model loads and steps in one dedicated thread, so the event loop never waits on tensor work.
The loop thread validates and hands requests over through a command queue; the engine thread
pushes each step's output deltas back into per-request asyncio queues.

All tensor work, loading included, happens on that one thread. GNU OpenMP keeps a worker team per
thread that enters a parallel region; once a second team exists the process has more OpenMP
threads than cores and libgomp stops spinning between regions, so every GEMM pays a futex
wake-up. Loading in a helper thread and stepping in another made decode 35-40% slower; `bench/gemm.py`
shows the effect on the GEMMs alone (bf16, 1 row: 21.9 ms a step from a second thread, 13.9 ms
from the thread that owns the only team).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from typing import Callable

from engine.config import EngineConfig
from engine.lora.names import scaled_name
from engine.lora.scaled_set import ScaledSet
from engine.outputs import SequenceOutput, StepStats
from engine.sampling_params import SamplingParams, SkipParams

log = logging.getLogger("skipserve.async_engine")


class EngineNotReadyError(RuntimeError):
    def __init__(self, message: str, code: str = "not_ready"):
        """`code`: why, as the API's 503 names it (loading, shutting_down, engine_dead, not_ready)."""
        super().__init__(message)
        self.code = code


class QueueFullError(RuntimeError):
    pass


class EngineShutdownError(RuntimeError):
    """In-flight requests still running when the shutdown grace period ends."""


class EngineDeadError(EngineShutdownError):
    """The engine thread stopped on an error outside any one request: every open request ends with
    it, and the server exits (non-zero) so that whatever supervises it starts a new one."""


class GenerationError(RuntimeError):
    """Generation failed for this request alone (the others in the batch go on); `invalid_request`:
    its own settings failed it (contradicting constraints), not the server."""

    def __init__(self, message: str, invalid_request: bool = False):
        super().__init__(message)
        self.invalid_request = invalid_request

    @property
    def status(self) -> int:
        return 400 if self.invalid_request else 500


class AsyncEngine:
    def __init__(self, config: EngineConfig, max_waiting: int = 64,
                 on_step: Callable[[StepStats, list[SequenceOutput]], None] | None = None):
        self.config = config
        self.max_waiting = max_waiting
        self.on_step = on_step
        self.engine = None  # LLMEngine once loaded
        self.load_error: BaseException | None = None
        self.dead: BaseException | None = None  # what stopped the engine thread after loading
        self.on_dead: Callable[[BaseException], None] | None = None  # called on the event loop then
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._queues: dict[str, asyncio.Queue] = {}
        self._places: dict[str, int] = {}  # request id -> its sequences (each choice, each input): queue places
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        # response schemas compile here, one at a time, apart from the default executor that
        # tokenizes every request: costly schemas queue behind each other, not the plain requests
        self._grammars = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="skipserve-grammar")
        self._scaling = asyncio.Lock()  # llama-server's adapters change scales one request at a time
        self._scaled = ScaledSet()  # their combinations at requests' own scales (`pin_scaled_adapter`)
        self._calls: set[concurrent.futures.Future] = set()  # work waiting for the engine thread (`_on_engine_thread`)
        self._calls_lock = threading.Lock()
        self._calls_closed = False  # the engine thread has left its loop: no more work for it

    # ---- lifecycle ---------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.engine is not None

    async def start(self) -> None:
        """Start the engine thread: it loads the model, then runs the step loop."""
        self._loop = asyncio.get_running_loop()
        loaded = self._loop.create_future()
        self._thread = threading.Thread(target=self._main, args=(loaded,), name="skipserve-engine", daemon=True)
        self._thread.start()
        await loaded

    def _main(self, loaded: asyncio.Future) -> None:
        from engine.llm_engine import LLMEngine

        def settle(exc: BaseException | None) -> None:
            if not loaded.done():
                loaded.set_result(None) if exc is None else loaded.set_exception(exc)

        try:
            engine = LLMEngine(self.config)
        except BaseException as exc:  # surfaced by /health and the CLI
            self.load_error = exc
            self._loop.call_soon_threadsafe(settle, exc)
            return
        self.engine = engine
        self._loop.call_soon_threadsafe(settle, None)
        # structured outputs' token index (0.14-0.2 s for SmolLM2, 1.1-1.2 s for Gemma 3), built beside the step
        # loop while the first requests come, not in it at the first constrained one (a pause for all)
        threading.Thread(target=lambda: engine.structured.vocabulary, name="skipserve-vocabulary",
                         daemon=True).start()
        try:
            self._run()
        except BaseException as exc:  # a bug outside any one request's work: nothing would step again
            log.exception("the engine thread stopped")
            self.dead = exc
            self._loop.call_soon_threadsafe(self._fail_dead, exc)
        finally:  # work handed to the engine thread that it will not do now
            with self._calls_lock:
                self._calls_closed = True
                for done in list(self._calls):
                    if not done.done() and done.set_running_or_notify_cancel():
                        done.set_exception(EngineNotReadyError("the engine stopped"))

    def _fail_dead(self, exc: BaseException) -> None:
        self._dispatch_error(list(self._queues), EngineDeadError(f"the engine stopped: {type(exc).__name__}: {exc}"))
        if self.on_dead is not None:
            self.on_dead(exc)

    def stop(self) -> None:
        self._stopping = True
        self._grammars.shutdown(wait=False, cancel_futures=True)
        self._commands.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ---- LoRA adapters --------------------------------------------------------------------------
    @property
    def adapters(self) -> dict[str, str]:
        """The LoRA adapters served: name -> folder (until the model is loaded, the config's)."""
        return dict(self.config.lora_modules) if self.engine is None else self.engine.adapters

    @property
    def default_adapter(self) -> str | None:
        """The adapter requests naming the model itself go through (llama-server's --lora), if any."""
        return None if self.engine is None else self.engine.default_adapter

    async def load_adapter(self, name: str, path: str) -> None:
        """Serves a PEFT adapter folder under `name` from now on: read off the event loop and the
        engine thread, its pairs made on the engine thread between steps. Raises AdapterError (the
        name taken, the folder not an adapter this model takes) or EngineNotReadyError; ValueError
        where LoRA is not enabled."""
        self._check_ready()
        lora = self.engine.lora
        if lora is None:
            raise ValueError("LoRA adapters are not enabled: start the server with --enable-lora")
        slot = lora.reserve(name)
        try:  # the file read on a worker thread, fused on the engine thread (its OpenMP team: `_on_engine_thread`)
            adapter = await asyncio.to_thread(lora.read_file, name, path, self.config.max_lora_rank)
            adapter, pairs = await self._on_engine_thread(lora.pairs_of, adapter)
        except BaseException:
            lora.release(name)
            raise
        lora.install(slot, name, adapter, pairs)

    @property
    def default_adapter_files(self) -> list[tuple[str, float]]:
        """llama-server's --lora adapters: (file, the scale requests naming the model take it at)."""
        if self.engine is None or self.engine.lora is None:
            return [(path, scale) for path, scale in self.config.default_loras]
        lora = self.engine.lora
        return [(adapter.path, scale) for adapter, scale in zip(lora.default_files, lora.default_scales)]

    async def scale_default_adapters(self, scales: list[float]) -> None:
        """llama-server's POST /lora-adapters: requests naming the model take its --lora adapters at
        `scales` (one a file, 0: left out) from now on, those running keep the scales they began with.
        The combination of the scales before stays ready for requests asking for them (`pin_scaled_adapter`)."""
        self._check_ready()
        lora = self.engine.lora
        async with self._scaling:
            name = await self._scaled_adapter(scales)
            before = lora.set_default(name, scales)
            if before is not None:
                self._scaled.kept(before)
            self._evict_scaled()

    async def pin_scaled_adapter(self, scales: list[float]) -> str | None:
        """The adapter a request with llama-server's per-request `lora` scales (one a --lora file) goes
        through: None where every scale is 0 (the model alone), else the files combined at `scales`
        (the server's own scales' combination among them), made on first use and kept while
        `ScaledSet.KEPT` others are less recently asked for. Pinned (never removed) until the caller's
        `unpin_scaled_adapter`, which must follow once the request is added (or was not).
        AdapterError where the combination does not fit in the memory left."""
        if not any(scales):
            return None
        self._check_ready()
        async with self._scaling:
            name = await self._scaled_adapter(scales)
            self._scaled.pin(name)
            self._evict_scaled()
        return name

    async def _scaled_adapter(self, scales: list[float]) -> str | None:
        """The name llama-server's adapters at `scales` are served under (None: all at 0), combined on
        the engine thread on first use; marked as the most recently asked for (under `_scaling`)."""
        if not any(scales):
            return None
        lora = self.engine.lora
        name = scaled_name(scales)
        if name not in lora.slots:
            self._evict_scaled()
            if self._scaled.full:
                raise QueueFullError(f"{len(self._scaled)} sets of the --lora adapters' scales are in use, the most "
                                     "served at once; retry later")
            read = await self._on_engine_thread(lora.read_scaled, scales)
            name = lora.install_scaled(scales, *read)
        self._scaled.asked(name)
        return name

    def unpin_scaled_adapter(self, name: str | None) -> None:
        if self._scaled.unpin(name):
            self._evict_scaled()

    def _evict_scaled(self) -> None:
        """Withdraws the combinations `ScaledSet.idle` lets go: not pinned, not held by a running or
        waiting sequence, not the server's (their slots are removed once their last sequences end)."""
        lora = self.engine.lora
        default = scaled_name(lora.default_scales)
        held = self.engine.held_slots()
        for name in self._scaled.idle(lambda name: name == default or lora.slots.get(name) in held):
            self._commands.put(("retire", lora.withdraw(name)))

    async def _on_engine_thread(self, fn, *args):
        """fn(*args) run on the engine thread between steps -> its result: torch work there runs on the
        one OpenMP team (a worker thread's would start a second, which slows every step after)."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        with self._calls_lock:  # (against the engine thread's exit, which fails what it holds then)
            self._check_ready()
            if self._calls_closed:
                raise EngineNotReadyError("the engine stopped")
            self._calls.add(done)
            self._commands.put(("call", (done, fn, args)))
        try:
            return await asyncio.wrap_future(done)
        finally:
            self._calls.discard(done)

    def unload_adapter(self, name: str) -> None:
        """`name` is served no more: new requests naming it are refused at once, those running finish
        with it (its weights go once the last one ends). KeyError where no adapter is so named."""
        self._check_ready()
        if self.engine.lora is None or name not in self.engine.adapters:  # (not llama-server's --lora ones)
            raise KeyError(name)
        self._commands.put(("retire", self.engine.lora.withdraw(name)))

    # ---- requests ----------------------------------------------------------------------------
    def tokenizer(self):
        self._check_ready()
        return self.engine.tokenizer

    def sampling_defaults(self) -> dict:
        """What requests that leave a sampling setting out take for it (engine/generation_defaults.py)."""
        self._check_ready()
        return self.engine.sampling_defaults

    def _check_ready(self):
        if self.dead is not None:
            raise EngineNotReadyError(f"the engine stopped: {type(self.dead).__name__}: {self.dead}", "engine_dead")
        if self.engine is None:
            raise EngineNotReadyError("the model is loading", "loading")  # (as /health names it)
        if self._stopping:
            raise EngineNotReadyError("the server is shutting down", "shutting_down")

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    skip: SkipParams | None = None, prompt_param: str = "prompt") -> "RequestStream":
        """Validate and enqueue a request; iterate the returned stream for its output deltas.

        Raises InvalidParamError (bad input, checked first), QueueFullError or EngineNotReadyError
        before anything is enqueued. The caller must `close()` the stream when it stops early: that aborts it.
        """
        self._check_ready()
        seqs = self.engine.prepare_request(request_id, prompt_ids, params, skip, prompt_param)
        self._check_room(request_id, len(seqs))
        return self._enqueue(request_id, seqs)

    async def compile_grammar(self, params: SamplingParams) -> None:
        """A response schema's grammar, compiled in a worker thread into the cache that `add_request`
        reads, so that a large schema does not hold up the event loop (every stream) while it
        compiles. Raises InvalidParamError for a schema it cannot compile."""
        if params.constrained:
            self._check_ready()
            await asyncio.get_running_loop().run_in_executor(self._grammars, self.engine.structured.for_params, params)

    def check_inputs(self, inputs: list[list[int]], param: str = "input") -> None:
        """Every input of a batch checked at once, before any is added (a batch goes in a window at a
        time, and a bad input late in it must not fail the batch after the rest were computed)."""
        self._check_ready()
        self.engine.check_inputs(inputs, param)

    def add_embeddings(self, request_id: str, inputs: list[list[int]], param: str = "input") -> "RequestStream":
        """As `add_request`, for an embeddings request: one output per input (its index), holding its
        vector."""
        self._check_ready()
        seqs = self.engine.prepare_embeddings(request_id, inputs, param)
        self._check_room(request_id, len(seqs))
        return self._enqueue(request_id, seqs)

    @property
    def capacity(self) -> int:
        """Sequences (a request's choices, an embeddings request's inputs) running and waiting, at most."""
        return self.config.max_num_seqs + self.max_waiting

    def check_room(self, places: int) -> None:
        """QueueFullError where `places` more sequences would not fit now (a request checks before
        work it would do for nothing, such as compiling its schema; `add_request` checks again)."""
        held = sum(self._places.values())
        if held + places > self.capacity:
            needs = f"; this request needs {places}" if places > 1 else ""
            raise QueueFullError(f"the server is at capacity ({held} of {self.capacity} sequences running or "
                                 f"waiting{needs}); retry later")

    def _check_room(self, request_id: str, places: int) -> None:
        self.check_room(places)
        if request_id in self._queues:
            raise ValueError(f"duplicate request id {request_id}")

    def _enqueue(self, request_id: str, seqs: list) -> "RequestStream":
        out_queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = out_queue
        self._places[request_id] = len(seqs)
        self._commands.put(("add", seqs))
        return RequestStream(self, request_id, out_queue, len(seqs))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def fail_in_flight(self, message: str) -> None:
        """End every open request with EngineShutdownError and abort it (call on the event loop); from
        then on no request is taken (one still being tokenized would otherwise start after this)."""
        self._stopping = True
        request_ids = list(self._queues)
        self._dispatch_error(request_ids, EngineShutdownError(message))
        for request_id in request_ids:
            self.abort(request_id)

    # ---- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while True:
            try:  # idle: sleep until a command comes; busy: only drain what is there
                cmd = self._commands.get(block=not engine.has_work)
            except queue.Empty:
                cmd = None
            while cmd is not None:
                kind, arg = cmd
                if kind == "stop":
                    return
                if kind == "add":
                    engine.add_sequences(arg)
                elif kind == "abort":
                    engine.abort(arg)
                elif kind == "retire":
                    engine.retire_adapter(arg)
                elif kind == "call":
                    done, fn, args = arg
                    if done.set_running_or_notify_cancel():
                        try:
                            done.set_result(fn(*args))
                        except BaseException as exc:  # (the caller's to raise)
                            done.set_exception(exc)
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if not engine.has_work:
                continue
            try:
                outputs, stats = engine.step()
            except Exception as exc:  # outside any one sequence's work (the scheduler's): fail them all
                log.exception("engine step failed")
                self._fail_all(exc)
                continue
            self._loop.call_soon_threadsafe(self._dispatch, outputs, stats)

    def _fail_all(self, exc: Exception) -> None:
        engine = self.engine
        ids = {s.request_id for s in [*engine.scheduler.running, *engine.scheduler.waiting]}
        for rid in ids:
            engine.abort(rid)
        self._loop.call_soon_threadsafe(self._dispatch_error, ids, exc)

    def _dispatch(self, outputs: list[SequenceOutput], stats: StepStats) -> None:
        for out in outputs:
            q = self._queues.get(out.request_id)
            if q is not None:
                q.put_nowait(GenerationError(f"generation failed: {out.error}", out.invalid_request)
                             if out.error else out)
        if self.on_step is not None:
            self.on_step(stats, outputs)

    def _dispatch_error(self, request_ids, exc) -> None:
        for rid in request_ids:
            q = self._queues.get(rid)
            if q is not None:
                q.put_nowait(exc)

    # ---- introspection (for /metrics and tests) --------------------------------------------------
    def snapshot(self) -> dict:
        engine = self.engine
        if engine is None:
            return {"running": 0, "waiting": 0, "kv_usage": 0.0, "kv_cache_bytes": 0, "time": time.time()}
        snap = {"running": engine.num_running, "waiting": engine.num_waiting, "kv_usage": engine.kv_usage(),
                "kv_cache_bytes": engine.runner.kv.nbytes, "time": time.time()}
        if engine.lora is not None:  # the adapters in flight, and how many are served (all may share a batch)
            snap["lora"] = (*engine.adapters_in_flight(), len(engine.adapters))
        return snap


class RequestStream:
    """Output deltas of one request, all choices interleaved, until every choice has finished."""

    def __init__(self, engine: AsyncEngine, request_id: str, out_queue: asyncio.Queue, num_choices: int):
        self.engine, self.request_id, self._queue = engine, request_id, out_queue
        self.pending = num_choices
        self.closed = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> SequenceOutput:
        if self.pending == 0:
            self.close()
            raise StopAsyncIteration
        out = await self._queue.get()
        if isinstance(out, BaseException):
            self.pending = 0
            self.close()
            raise out
        if out.finished:
            self.pending -= 1
        return out

    def close(self) -> None:
        """Stop listening; a request with unfinished choices is aborted and its KV freed."""
        if self.closed:
            return
        self.closed = True
        self.engine._queues.pop(self.request_id, None)
        self.engine._places.pop(self.request_id, None)
        if self.pending:
            self.engine.abort(self.request_id)
