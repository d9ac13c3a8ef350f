"""What redflow tells operators: Prometheus metrics (``metrics``), run and outage logs (``logs``)."""

from .metrics import count_run, enabled, metrics, observe, observe_step, set_gauge

__all__ = ["count_run", "enabled", "metrics", "observe", "observe_step", "set_gauge"]
