"""The durable step API handed to handlers as ``ctx.step``.

A step's output is recorded once, through the recorder, and returned decoded from its JSON so the
first run and every replay see the same value. A recorded step is never run again.
"""

from __future__ import annotations

import asyncio
import builtins
import inspect
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any, Protocol

import msgspec

from .encoding import decode, encode_output
from .errors import RedflowError, TimeoutError
from .storage.records import StepRecord
from .types import RunContext


class StepRecorder(Protocol):
    async def record(self, record: StepRecord) -> None:
        """Persist a step record; raises LeaseLostError when the run is no longer ours."""


class LeaseLostError(BaseException):
    """The run's fencing token is no longer current: another worker owns it. Not user-catchable."""


@lru_cache(maxsize=2048)
def _accepts_signal(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "signal" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def accepts_signal(fn: Callable[..., Any]) -> bool:
    try:
        return _accepts_signal(fn)
    except TypeError:  # unhashable callable
        return _accepts_signal.__wrapped__(fn)


class StepApi:
    def __init__(
        self,
        run: RunContext,
        run_signal: asyncio.Event,
        cached: dict[str, StepRecord],
        recorder: StepRecorder,
        max_payload_bytes: int,
    ) -> None:
        self._run = run
        self._run_signal = run_signal
        self._cached = cached
        self._recorder = recorder
        self._max_payload = max_payload_bytes
        self._seen: set[str] = set()
        self._next_seq = max((r.q for r in cached.values()), default=0) + 1
        self._active_signals: set[asyncio.Event] = set()

    def cancel_active(self) -> None:
        """Set the ``signal`` of every step in flight (the run is being canceled)."""
        for signal in self._active_signals:
            signal.set()

    def was_called(self, name: str) -> bool:
        return name in self._seen

    def _claim_name(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise RedflowError(f"run {self._run.id}: step name must be a non-empty string, got {name!r}")
        if name in self._seen:
            raise RedflowError(
                f"run {self._run.id} of workflow {self._run.workflow!r}: duplicate step name {name!r}; "
                "step names must be unique within a run"
            )
        self._seen.add(name)

    async def run(
        self,
        name: str,
        fn: Callable[..., Any],
        *args: Any,
        timeout_ms: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` once for this run and return its recorded output."""
        self._claim_name(name)
        cached = self._cached.get(name)
        if cached is not None:
            return decode(cached.o)
        signal = asyncio.Event()
        if self._run_signal.is_set():
            signal.set()
        if accepts_signal(fn):
            kwargs["signal"] = signal
        started = int(time.time() * 1000)
        self._active_signals.add(signal)
        try:
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                if timeout_ms is None:
                    result = await result
                else:
                    try:
                        async with asyncio.timeout(timeout_ms / 1000):
                            result = await result
                    except builtins.TimeoutError:
                        signal.set()
                        raise TimeoutError(
                            f"step {name!r} of run {self._run.id} timed out after {timeout_ms} ms"
                        ) from None
        finally:
            self._active_signals.discard(signal)
        data = encode_output(
            result, f"output of step {name!r} in run {self._run.id} of workflow {self._run.workflow!r}",
            self._max_payload,
        )
        record = StepRecord(
            n=name, q=self._next_seq, a=self._run.attempt, o=msgspec.Raw(data), t0=started,
            t1=int(time.time() * 1000),
        )
        self._next_seq += 1
        await self._recorder.record(record)
        self._cached[name] = record
        return decode(data)
