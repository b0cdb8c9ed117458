"""The bridge between the engine's scheduler thread and the server's event loop: the admission queue,
one HTTP request's generation as an async event stream, and the SSE response that cancels it when the
client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque

import anyio
from fastapi.responses import StreamingResponse


class QueueFull(Exception):
    pass


class Admission:
    """At most max_running requests generate; up to max_queue more wait in FIFO order; the rest are
    refused. Runs on the event loop only, so it needs no lock."""

    def __init__(self, max_running: int, max_queue: int):
        self.max_running, self.max_queue = max_running, max_queue
        self.running = 0
        self.waiters: deque[asyncio.Future] = deque()

    async def acquire(self) -> None:
        if self.running < self.max_running and not self.waiters:
            self.running += 1
            return
        if len(self.waiters) >= self.max_queue:
            raise QueueFull
        slot = asyncio.get_running_loop().create_future()
        self.waiters.append(slot)
        try:
            await slot
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():
                self.release()  # the slot was handed over just as the waiter left: pass it on
            else:
                self.waiters.remove(slot)
            raise

    def release(self) -> None:
        while self.waiters:  # hand the slot straight to the next waiter, so running stays the same
            slot = self.waiters.popleft()
            if not slot.done():
                slot.set_result(None)
                return
        self.running -= 1


class Generation:
    """One HTTP request's engine requests (several for a multi-prompt completion), seen from asyncio.
    Engine events arrive on the scheduler thread and are handed to the loop with call_soon_threadsafe.
    close() is idempotent: it cancels unfinished engine requests and gives the admission slot back."""

    def __init__(self, app_state, submissions: list[dict], n: int):
        self.state = app_state
        self.queue: asyncio.Queue = asyncio.Queue()
        self.remaining = len(submissions) * n
        self.requests = []
        self.tokens = 0
        self.t_start = time.perf_counter()
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.closed = False
        loop = asyncio.get_running_loop()
        try:
            for i, kwargs in enumerate(submissions):
                offset = i * n
                def on_event(event, offset=offset):  # on the scheduler thread
                    loop.call_soon_threadsafe(self.queue.put_nowait, (offset, event))

                self.requests.append(app_state.engine.submit(**kwargs, on_event=on_event))
        except BaseException:  # a later prompt was refused: drop the earlier ones; the caller frees the slot
            for r in self.requests:
                r.cancel()
            self.closed = True
            raise

    async def events(self):
        """(choice index, StreamEvent) until every choice has finished."""
        while self.remaining:
            offset, event = await self.queue.get()
            if event.token_ids:
                now = time.perf_counter()
                self.t_first = self.t_first or now
                self.t_last = now
                self.tokens += len(event.token_ids)
            if event.finish_reason is not None:
                self.remaining -= 1
            yield offset + event.index, event

    async def results(self) -> list:
        """The engine's RequestOutputs; every choice has finished, so this waits only for bookkeeping."""
        return [await asyncio.to_thread(r.result) for r in self.requests]

    def error_message(self) -> str:
        return next((r.error for r in self.requests if r.error), None) or "generation failed"

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        metrics = self.state.metrics
        unfinished = [r for r in self.requests if not r.done] if self.remaining else []
        for r in unfinished:
            r.cancel()
        if unfinished:
            metrics.cancelled.inc()
        if self.t_first is not None:
            metrics.ttft.observe(self.t_first - self.t_start)
            if self.tokens > 1 and self.t_last > self.t_first:
                metrics.per_token.observe((self.t_last - self.t_first) / (self.tokens - 1))
        self.state.admission.release()
        metrics.running.set(self.state.admission.running)


class EventStreamResponse(StreamingResponse):
    """Server-sent events that notice a client leaving even while no token is ready (uvicorn's HTTP
    protocols speak ASGI 2.3, so a send after a disconnect does not fail), and always run on_close."""

    media_type = "text/event-stream"

    def __init__(self, content, on_close):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()
            self.on_close()


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"
