"""The production entry point: ``python -m redflow.supervisor --procs N --import myapp.workflows``."""

from __future__ import annotations

import importlib
import sys

from ..errors import ConfigurationError
from ..observability.logs import configure
from .config import SupervisorConfig, parse_config


def configure_logging(config: SupervisorConfig) -> None:
    configure(config.log_level, config.log_format)


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
