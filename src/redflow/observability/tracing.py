"""OpenTelemetry tracing, on whenever the ``otel`` extra is installed (``REDFLOW_TRACING=0`` turns it
off), through the global tracer provider the application configured.

A run carries the trace context of the code that started it (``tc`` in its header, W3C
``traceparent``/``tracestate``), so every execution of the run, hours later and in another process,
continues that trace:

    send <queue>      PRODUCER  around enqueue / emit_event; its context is stored with the run
    process <queue>   CONSUMER  one per execution (an attempt that sleeps has several), child of send
    step <name>                 one per step.run body executed, child of its execution

A wait ends an execution with a ``suspend`` event; children and event subscribers are started
inside their parent's spans, so their ``send`` span is a child of the parent's execution. When
tracing is off, or on but the application set no tracer provider, every function here returns at
once and no context is stored.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

_enabled: bool | None = None
_tracer: Any = None
_trace: Any = None  # the opentelemetry.trace module, once tracing is on
_propagate: Any = None
_provider_seen = False  # a tracer provider was configured (kept: a global provider is set once)
_next_check = 0.0  # monotonic time of the next provider lookup while none was seen

SYSTEM = "redflow"
PROVIDER_RECHECK_S = 1.0


def enabled() -> bool:
    """Tracing is installed and not turned off."""
    global _enabled, _tracer, _trace, _propagate
    if _enabled is None:
        if os.environ.get("REDFLOW_TRACING") == "0":
            _enabled = False
        else:
            try:
                from opentelemetry import propagate, trace
            except ImportError:
                _enabled = False
            else:
                _trace, _propagate = trace, propagate
                _tracer = trace.get_tracer("redflow")
                _enabled = True
    return _enabled


def recording() -> bool:
    """Tracing is on and the application configured a tracer provider (until it does, spans would
    record nothing: none are made and no context is stored). A global provider is set once and for
    good, so once one is seen the answer is kept; until then it is looked up again at most every
    PROVIDER_RECHECK_S (the lookup reads the environment, a few microseconds on every step)."""
    global _provider_seen, _next_check
    if not enabled():
        return False
    if _provider_seen:
        return True
    now = time.monotonic()
    if now < _next_check:
        return False
    _next_check = now + PROVIDER_RECHECK_S
    _provider_seen = not isinstance(
        _trace.get_tracer_provider(), (_trace.ProxyTracerProvider, _trace.NoOpTracerProvider)
    )
    return _provider_seen


def reset() -> None:
    """Decide again on next use (tests switching ``REDFLOW_TRACING``)."""
    global _enabled, _tracer, _trace, _propagate, _provider_seen, _next_check
    _enabled, _tracer, _trace, _propagate = None, None, None, None
    _provider_seen, _next_check = False, 0.0


def _attributes(operation: str, queue: str, workflow: str, **extra: Any) -> dict[str, Any]:
    attrs = {"messaging.system": SYSTEM, "messaging.destination.name": queue,
             "messaging.operation.type": operation}
    if workflow:
        attrs["redflow.workflow"] = workflow
    attrs.update({k: v for k, v in extra.items() if v is not None})
    return attrs


@contextlib.contextmanager
def producer(queue: str, workflow: str, run_id: str | None = None) -> Iterator[str]:
    """A ``send`` span around starting a run (or publishing an event, ``queue`` = the event name);
    yields the trace context to store with the run ('' when tracing is off)."""
    if not recording():
        yield ""
        return
    with _tracer.start_as_current_span(
        f"send {queue}", kind=_trace.SpanKind.PRODUCER,
        attributes=_attributes("send", queue, workflow, **{"redflow.run_id": run_id}),
    ):
        carrier: dict[str, str] = {}
        _propagate.inject(carrier)
        yield "\n".join(carrier.get(k, "") for k in ("traceparent", "tracestate")).rstrip("\n")


@contextlib.contextmanager
def execution(run_id: str, workflow: str, queue: str, attempt: int, trace_context: str | None) -> Iterator[None]:
    """The ``process`` span of one execution of a run, continuing the trace stored with it."""
    if not recording():
        yield
        return
    parent = None
    if trace_context:
        traceparent, _, tracestate = trace_context.partition("\n")
        carrier = {"traceparent": traceparent}
        if tracestate:
            carrier["tracestate"] = tracestate
        parent = _propagate.extract(carrier)
    with _tracer.start_as_current_span(
        f"process {queue}", context=parent, kind=_trace.SpanKind.CONSUMER,
        attributes=_attributes("process", queue, workflow, **{"redflow.run_id": run_id, "redflow.attempt": attempt}),
    ):
        yield


@contextlib.contextmanager
def step(name: str, run_id: str, workflow: str, attempt: int) -> Iterator[None]:
    """A span around one step body that runs (replayed steps have none)."""
    if not recording():
        yield
        return
    with _tracer.start_as_current_span(
        f"step {name}",
        attributes={"redflow.step": name, "redflow.run_id": run_id, "redflow.workflow": workflow,
                    "redflow.attempt": attempt},
    ):
        yield


def event(name: str, **attributes: Any) -> None:
    """An event on the current span (a wait that ends the execution, its outcome)."""
    if not recording():
        return
    _trace.get_current_span().add_event(name, {k: v for k, v in attributes.items() if v is not None})


def outcome(name: str, error: dict[str, Any] | None) -> None:
    """Mark the current execution span with the run's outcome; failures set an error status."""
    if not recording():
        return
    span = _trace.get_current_span()
    span.set_attribute("redflow.outcome", name)
    if name in ("failed", "rate_limited", "retried") and error:
        span.set_status(_trace.Status(_trace.StatusCode.ERROR, f"{error.get('name')}: {error.get('message')}"))
