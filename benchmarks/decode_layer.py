"""Mamba's decode step per layer: the unfused kernels against the one-launch layer step (seqlab.ops.mamba_layer).

    python3 benchmarks/decode_layer.py --batch 1,64,128 --state-dtype bf16 [--layers 48] \
        [--configs '[{}, {"OUT_SPLIT": 4, "BLOCK_N_OUT": 64}]'] [--phases] [--json FILE]

Builds ``--layers`` Mamba layers of Mamba-1.4b's shape (d_model 2048, d_inner 4096, N 16, R 128, random bf16
weights, each with its block's RMSNorm), so that a step streams every layer's weights and states from memory as a
model's step does, and times one step through all of them as a CUDA-graph replay: the mixer's own decode path
(``unfused``: norm, in_proj, conv, x_proj, dt_proj + state update, out_proj, each the kernel the per-shape timing
picks) and the layer launch with each tile config given (``layer``). Before timing, each batch checks the layer
launch against the unfused step and against a float32 evaluation (relative errors printed), and the persistent
launch against the phase-by-phase launches (bit equality) and that no grid barrier gave up. ``--phases`` also
times the persistent launch cut after each phase (cumulative), which splits its time by phase.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seqlab.mixers import base as mixer_base  # noqa: E402
from seqlab.mixers.mamba import Mamba  # noqa: E402
from seqlab.mixers.norm import RMSNorm  # noqa: E402
from seqlab.ops import mamba_layer  # noqa: E402

D_MODEL, EXPAND, D_STATE = 2048, 2, 16
REPLAYS = 20
DEFAULT_CONFIG = dict(mamba_layer.CONFIG)


def build_layers(count: int) -> list[tuple[Mamba, RMSNorm]]:
    torch.manual_seed(0)
    layers = []
    for _ in range(count):
        mixer = Mamba(D_MODEL, d_state=D_STATE, expand=EXPAND)
        norm = RMSNorm(D_MODEL)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
        layers.append((mixer.to("cuda", torch.bfloat16).eval(), norm.to("cuda", torch.bfloat16)))
    return layers


def step(layers, states, h):
    """One decode step through every layer: h (B, 1, d_model) -> the last layer's output."""
    for (mixer, norm), state in zip(layers, states):
        h = mixer(h, state=state, residual=h, norm=norm)
    return h


def set_kind(kind: str, config: dict | None = None) -> None:
    mixer_base.FUSED_DECODE_KERNELS["layer"] = kind == "layer"
    mamba_layer.CONFIG.clear()
    mamba_layer.CONFIG.update({**DEFAULT_CONFIG, **(config or {})})


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(layers, batch: int, state_dtype: torch.dtype) -> dict:
    """The first layer's launch against the unfused step and a float32 evaluation; persistent vs phases."""
    mixer, norm = layers[0]
    h = torch.randn(batch, 1, D_MODEL, device="cuda", dtype=torch.bfloat16)
    base_state = mixer.allocate_state(batch, state_dtype=state_dtype)
    for t in base_state.tensors.values():
        t.normal_()

    def run(kind, config=None, dtype=torch.bfloat16):
        set_kind(kind, config)
        state = mixer.allocate_state(batch, state_dtype=state_dtype if dtype != torch.float32 else dtype)
        for k, t in base_state.tensors.items():
            state[k].copy_(t)
        m, n = (mixer, norm) if dtype == torch.bfloat16 else (_float_copy(mixer), _float_copy(norm))
        x = h.to(dtype)
        return m(x, state=state, residual=x, norm=n), state

    with torch.inference_mode():
        truth, truth_state = run("unfused", dtype=torch.float32)
        unfused, unfused_state = run("unfused")
        layer, layer_state = run("layer")
        phases, phases_state = run("layer", dict(persistent=False))
        torch.cuda.synchronize()
    set_kind("unfused")
    result = {"batch": batch, "barrier_failures": mamba_layer.barrier_failures("cuda"),
              "persistent_equals_phases": bool(torch.equal(layer, phases) and all(
                  torch.equal(layer_state[k], phases_state[k]) for k in ("conv", "ssm")))}
    for name, out, st in (("unfused", unfused, unfused_state), ("layer", layer, layer_state)):
        result[f"{name}_vs_fp32"] = {"h_out": rel_err(out, truth), "conv": rel_err(st["conv"], truth_state["conv"]),
                                     "ssm": rel_err(st["ssm"], truth_state["ssm"])}
    result["layer_vs_unfused"] = rel_err(layer, unfused)
    return result


def _float_copy(module):
    return copy.deepcopy(module).float()


def time_step(layers, states, h, kind: str, config: dict | None = None) -> float:
    """Milliseconds per step through all the layers, replayed from a CUDA graph."""
    set_kind(kind, config)
    with torch.inference_mode():
        step(layers, states, h)  # compile, pick the GEMM kernels
        step(layers, states, h)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(layers, states, h)
        graph.replay()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(REPLAYS):
            graph.replay()
        end.record()
        end.synchronize()
    set_kind("unfused")
    return begin.elapsed_time(end) / REPLAYS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="1,64,128")
    parser.add_argument("--state-dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--configs", default="[{}]", help="JSON list of tile configs (seqlab.ops.mamba_layer.CONFIG)")
    parser.add_argument("--phases", action="store_true", help="also time the launch cut after each phase")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("decode_layer: needs a CUDA GPU", file=sys.stderr)
        return 2
    state_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.state_dtype]
    configs = json.loads(args.configs)
    layers = build_layers(args.layers)
    results = []
    for batch in (int(b) for b in args.batch.split(",")):
        checked = check(layers, batch, state_dtype)
        print(json.dumps(checked), flush=True)
        results.append({"check": checked})
        states = [m.allocate_state(batch, state_dtype=state_dtype) for m, _ in layers]
        h = torch.randn(batch, 1, D_MODEL, device="cuda", dtype=torch.bfloat16)
        variants = [("unfused", None)] + [("layer", c) for c in configs]
        if args.phases:
            variants += [("layer", {**configs[0], "last_phase": p}) for p in range(6)]
        times: dict[int, list[float]] = {i: [] for i in range(len(variants))}
        for _ in range(args.rounds):  # interleaved: drift falls on every variant alike
            for i, (kind, config) in enumerate(variants):
                try:
                    times[i].append(time_step(layers, states, h, kind, config))
                except Exception as error:  # a config that does not compile or fit is a result, not a crash
                    print(f"batch {batch} {kind} {config}: {type(error).__name__}: {error}", flush=True)
                    break
        print(f"\n| batch | kernel | config | step ms ({args.layers} layers) | us per layer | rounds |\n"
              "|---|---|---|---|---|---|")
        for i, (kind, config) in enumerate(variants):
            if not times[i]:
                continue
            ms = min(times[i])
            row = {"batch": batch, "kind": kind, "config": config, "step_ms": ms,
                   "us_per_layer": 1000 * ms / args.layers, "rounds_ms": times[i]}
            results.append(row)
            print(f"| {batch} | {kind} | {json.dumps(config) if config is not None else '-'} | {ms:.3f} | "
                  f"{row['us_per_layer']:.2f} | {', '.join(f'{t:.3f}' for t in times[i])} |", flush=True)
        del states
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
