"""The production entry point: ``python -m redflow.supervisor --procs N --import myapp.workflows``."""

from __future__ import annotations

import importlib
import json
import logging
import sys
import time

from ..errors import ConfigurationError
from .config import SupervisorConfig, parse_config


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(config: SupervisorConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level)


def import_workflows(modules: list[str]) -> None:
    """Import the user's workflow modules; a failure is a clear error before anything is forked."""
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise ConfigurationError(f"cannot import workflow module {module!r}: {type(exc).__name__}: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_config(argv)
        configure_logging(config)
        import_workflows(config.imports)
    except ConfigurationError as exc:
        print(f"redflow supervisor: {exc}", file=sys.stderr)
        return 2
    from ..registry import get_default_registry
    from .tree import Supervisor

    if not len(get_default_registry()):
        print(f"redflow supervisor: the modules {config.imports} define no workflows", file=sys.stderr)
        return 2
    return Supervisor(config).run()
