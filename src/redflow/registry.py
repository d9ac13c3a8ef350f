"""Workflow registries: which definitions a process knows by name."""

from __future__ import annotations

import builtins
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .workflow import WorkflowDefinition


class WorkflowRegistry:
    """Definitions by name. Defining a second workflow under a taken name is an error."""

    def __init__(self) -> None:
        self._definitions: dict[str, WorkflowDefinition[Any]] = {}

    def register(self, definition: WorkflowDefinition[Any]) -> None:
        existing = self._definitions.get(definition.name)
        if existing is not None and _origin(existing) != _origin(definition):
            raise ConfigurationError(
                f"workflow {definition.name!r} is already defined (by {existing.handler.__qualname__}); "
                "workflow names must be unique within a registry"
            )
        self._definitions[definition.name] = definition

    def get(self, name: str) -> WorkflowDefinition[Any] | None:
        return self._definitions.get(name)

    def names(self) -> list[str]:
        return sorted(self._definitions)

    def definitions(self) -> list[WorkflowDefinition[Any]]:
        return [self._definitions[name] for name in sorted(self._definitions)]

    def list(self) -> builtins.list[WorkflowDefinition[Any]]:
        """Every definition, by name (as ``definitions()``)."""
        return self.definitions()

    def clear(self) -> None:
        """Forget every definition (tests that reuse one registry)."""
        self._definitions.clear()

    def queues(self) -> builtins.list[str]:
        return sorted({d.options.queue for d in self._definitions.values()})

    def __contains__(self, name: object) -> bool:
        return name in self._definitions

    def __len__(self) -> int:
        return len(self._definitions)


def _origin(definition: WorkflowDefinition[Any]) -> tuple[str, str]:
    # The same function defined again (a module imported twice) replaces the old definition.
    handler = definition.handler
    return getattr(handler, "__module__", ""), getattr(handler, "__qualname__", repr(handler))


_default_registry = WorkflowRegistry()


def get_default_registry() -> WorkflowRegistry:
    return _default_registry


def reset_default_registry_for_tests() -> None:
    global _default_registry
    _default_registry = WorkflowRegistry()
