"""A stand-in for the CUDA-graph timing of the ops that pick their kernel by timing candidates on first use."""

from __future__ import annotations


def stand_in_clock(monkeypatch, module, times) -> list:
    """Replace ``module.graph_time_ms`` by ``times`` in call order; an exception instance is raised instead of
    returned, as the compiler does for a tile that does not fit. Returns the times not yet taken."""
    pending = list(times)

    def graph_time_ms(fn, *args, **kwargs):
        t = pending.pop(0)
        if isinstance(t, Exception):
            raise t
        return t

    monkeypatch.setattr(module, "graph_time_ms", graph_time_ms)
    return pending
