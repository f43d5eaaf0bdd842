"""One engine, one thread: the step loop that serves every HTTP request.

The engine is not thread-safe, so only the loop thread touches it. Request handlers (on the asyncio event loop)
put commands on a thread-safe queue: "add" (a RequestHandle) and "abort". The thread drains the queue between
steps, runs `engine.step()` while anything is unfinished, and hands each StepOutput to its request's asyncio
queue with `loop.call_soon_threadsafe`. When idle it blocks on the command queue, so an idle server costs nothing.
A request is forgotten (`engine.pop`) as soon as it finishes or is aborted, so its pages are back at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..engine import Engine
from ..engine.engine import StepOutput
from ..sampling import SamplingParams
from .metrics import ServerMetrics

log = logging.getLogger("dsinfer.server")


class EngineStopped(RuntimeError):
    """The loop is shutting down and takes no new requests."""


@dataclass(eq=False)
class RequestHandle:
    """One engine request as its HTTP handler sees it. Await `accepted` (the engine's seq id, or the ValueError
    of add_request), then read StepOutputs from `outputs`, which the n handles of one HTTP request share."""

    prompt_ids: list[int]
    params: SamplingParams
    outputs: asyncio.Queue                   # StepOutputs (or an exception if the engine failed)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    accepted: asyncio.Future = None
    arrival: float = field(default_factory=time.perf_counter)
    seq_id: int | None = None                # written by the loop thread before `accepted` resolves
    finished: bool = False                   # set by the event loop once the last output was taken

    def __post_init__(self):
        self.accepted = self.loop.create_future()

    def _resolve(self, seq_id: int | None, error: BaseException | None) -> None:
        if not self.accepted.done():
            if error is None:
                self.accepted.set_result(seq_id)
            else:
                self.accepted.set_exception(error)


async def iterate(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, StepOutput]]:
    """(index into handles, output) as they come, until every handle has finished. The handles share a queue
    and have all been accepted."""
    index = {h.seq_id: i for i, h in enumerate(handles)}
    queue_ = handles[0].outputs
    left = sum(not h.finished for h in handles)
    while left:
        item = await queue_.get()
        if isinstance(item, BaseException):
            for h in handles:
                h.finished = True
            raise item
        i = index[item.seq_id]
        if item.finished:
            handles[i].finished = True
            left -= 1
        yield i, item


class EngineLoop:
    def __init__(self, engine: Engine, metrics: ServerMetrics | None = None):
        self.engine = engine
        self.metrics = metrics or ServerMetrics()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._handles: dict[int, RequestHandle] = {}        # engine seq id -> handle (loop thread only)
        self._last_token: dict[int, float] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- called from the event loop ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dsinfer-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort what is left, end the thread; requests still waiting get an `abort` finish."""
        if self._thread is None:
            return
        self._stopping = True
        self._commands.put(("stop", None))
        self._thread.join(timeout)
        self._thread = None

    def submit(self, prompt_ids: list[int], params: SamplingParams, outputs: asyncio.Queue) -> RequestHandle:
        """Queue a request for the engine; await `handle.accepted` to learn whether the engine took it."""
        handle = RequestHandle(prompt_ids, params, outputs)
        if self._stopping or self._thread is None:
            handle._resolve(None, EngineStopped("the server is shutting down"))
        else:
            self._commands.put(("add", handle))
        return handle

    def abort(self, handle: RequestHandle) -> None:
        if not handle.finished:
            self._commands.put(("abort", handle))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the loop thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while True:
            try:                            # block only while there is nothing to step
                command = self._commands.get_nowait() if engine.has_unfinished() else self._commands.get()
            except queue.Empty:
                command = None
            while command is not None:
                if command[0] == "stop":
                    self._abort_all()
                    return
                self._apply(*command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if engine.has_unfinished():
                self._step()
            self.metrics.update_engine(engine)

    def _apply(self, kind: str, handle: RequestHandle) -> None:
        if kind == "add":
            try:
                handle.seq_id = self.engine.add_request(handle.prompt_ids, handle.params)
            except (ValueError, TypeError) as e:
                _post(handle, handle._resolve, None, e)
                return
            self._handles[handle.seq_id] = handle
            self.metrics.prompt_tokens.inc(len(handle.prompt_ids))
            _post(handle, handle._resolve, handle.seq_id, None)
        elif kind == "abort" and handle.seq_id in self._handles:
            self._forget(handle.seq_id, abort=True)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:              # a bug or out-of-memory: fail the batch, keep serving
            log.exception("engine step failed; aborting %d requests", len(self._handles))
            for seq_id, handle in list(self._handles.items()):
                self._forget(seq_id, abort=True)
                _post(handle, handle.outputs.put_nowait, e)
            return
        now = time.perf_counter()
        for out in outputs:
            handle = self._handles.get(out.seq_id)
            if handle is None:
                continue
            last = self._last_token.get(out.seq_id)
            if last is None:
                self.metrics.ttft.observe(now - handle.arrival)
            else:
                self.metrics.itl.observe(now - last)
            self._last_token[out.seq_id] = now
            self.metrics.generation_tokens.inc(len(out.new_token_ids))
            _post(handle, handle.outputs.put_nowait, out)
            if out.finished:
                self._forget(out.seq_id, abort=False)

    def _forget(self, seq_id: int, abort: bool) -> None:
        if abort:
            self.engine.abort(seq_id)
        self.engine.pop(seq_id)
        self._handles.pop(seq_id, None)
        self._last_token.pop(seq_id, None)

    def _abort_all(self) -> None:
        """Shutdown: abort every request still known (waiting, running or not yet added) and tell its handler."""
        pending = []
        while True:
            try:
                kind, handle = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                pending.append(handle)
        for handle in pending:
            _post(handle, handle._resolve, None, EngineStopped("the server is shutting down"))
        for seq_id, handle in list(self._handles.items()):
            self._forget(seq_id, abort=True)
            done = StepOutput(seq_id, [], "", True, "abort")
            _post(handle, handle.outputs.put_nowait, done)
        self.metrics.update_engine(self.engine)


def _post(handle: RequestHandle, fn, *args) -> None:
    """Run fn(*args) on the handle's event loop (which may already be closed at shutdown)."""
    try:
        handle.loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass
