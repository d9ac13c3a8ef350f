"""The chaos workload for ``python -m redflow.supervisor --import tests.chaos.supervised``.

The supervisor's worker processes use the default registry; this module puts the workload's
definitions there. The step bodies log to ``$CHAOS_LOG_DIR`` as in workload.py (the supervisor's
children inherit its environment).
"""

from __future__ import annotations

from redflow.registry import get_default_registry

from .workload import registry

for _definition in registry.definitions():
    get_default_registry().register(_definition)
