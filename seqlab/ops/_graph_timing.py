"""Timing a decode step's kernels as a decode step runs them: inside a CUDA graph, with their big operands
streamed from memory. Used by the ops that pick their kernel per shape on first use (seqlab.ops.decode_linear,
seqlab.ops.mamba_step) and by the decode benchmarks."""

from __future__ import annotations

import torch


def cold_copies(t: torch.Tensor, most: int = 64) -> list[torch.Tensor]:
    """``t`` and copies of it, together over twice the L2 cache (up to ``most``): calls that cycle through them
    stream it from memory as a decode step does, where the other layers' weights and states evict it (one tensor
    timed over and over stays in L2 and measures the cache instead)."""
    if not t.is_cuda:
        return [t]
    l2 = getattr(torch.cuda.get_device_properties(t.device), "L2_cache_size", 64 << 20)
    count = max(2, min(most, -(-2 * l2 // max(1, t.numel() * t.element_size()))))
    return [t] + [t.clone() for _ in range(count - 1)]


def graph_time_ms(fn, calls: int = 3, replays: int = 3, statistic=min) -> float:
    """GPU milliseconds of ``calls`` calls of ``fn`` replayed from a CUDA graph (as a graphed decode step runs them;
    eager timing would measure the Python launch cost instead): ``statistic`` (default the least) of ``replays``."""
    fn()  # compile / pick the algorithm outside the recording
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(replays):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return statistic(times)
