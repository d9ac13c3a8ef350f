"""Worker process internals: claim loop, executor, settings; and the worker API 0.1.x exported here."""

from ..types import StartWorkerOptions
from .worker import Worker, start_worker

WorkerHandle = Worker

__all__ = ["StartWorkerOptions", "WorkerHandle", "start_worker"]
