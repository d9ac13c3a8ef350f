"""The bench workflows in the default registry, for ``python -m redflow.supervisor --import bench.supervisor_app``."""

from __future__ import annotations

from redflow import get_default_registry

from .workflows import registry

for _definition in registry.definitions():
    get_default_registry().register(_definition)
