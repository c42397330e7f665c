"""seqlab against the official Mamba package (mamba-ssm's CUDA selective scan and its CUDA-graph decoding), same run.

    bash benchmarks/official_fetch.sh                      # once, with network: the pinned sdists
    python3 benchmarks/official_build.py                   # on the GPU: .official/site
    PYTHONPATH=.official/site python3 benchmarks/official_mamba.py --sections scan,generate --json official.json

scan: the Mamba-1.4B layer (d_inner 4096, N 16, bf16, softplus(delta + bias), D skip, silu(z) gate), forward and
forward+backward, batch x seqlen from 8 x 2048 to 1 x 65536: seqlab's Triton kernels against mamba-ssm's
`selective_scan_fn` (each in its own layout, (B, L, D) and (B, D, L), converted outside the timing), the exp floor of
benchmarks/kernels.py, and how far the two disagree (relative error of y and every gradient at the first shape).
generate: Mamba-1.4B (random bf16 weights, bf16 recurrent state on both sides, as mamba-ssm keeps it), prompt
2048, 128 new tokens: seqlab's `bench generate` path against mamba-ssm's MambaLMHeadModel decoded greedily through
its own CUDA-graph cache (mamba_ssm.utils.generation.update_graph_cache), timed the same way (one prefill call, then
gen_len - 1 steps). Median CUDA-event / wall-clock times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gpu_check import rel  # noqa: E402  (||out - ref|| / ||ref||, inf where out is not finite)
from kernels import cuda_time, fwd_bwd, log, measure_ceilings, scan_floor, scan_inputs  # noqa: E402

SHAPES = [(8, 2048), (4, 4096), (2, 8192), (1, 16384), (1, 65536)]
ROWS: list[dict] = []


def official_layout(u, delta, A, B, C, D, z, bias):
    """seqlab's (B, L, D) / (B, L, 1, N) scan inputs as mamba-ssm takes them: (B, D, L) and (B, N, L), contiguous."""
    t = lambda x: x.detach().transpose(1, 2).contiguous()  # noqa: E731
    bc = lambda x: x.detach()[:, :, 0, :].transpose(1, 2).contiguous()  # noqa: E731
    return [t(u), t(delta), A.detach().clone(), bc(B), bc(C), D.detach().clone(), t(z), bias.detach().clone()]


def agreement(batch: int, seqlen: int, dim: int, N: int, selective_scan_fn, ours) -> dict:
    """Relative differences between the two implementations' y and gradients on one set of inputs."""
    ins = scan_inputs(batch, seqlen, dim, N, grad=True)
    off = [x.requires_grad_(True) for x in official_layout(*ins)]
    y = ours(*ins)[0]  # (y, final state)
    y_off = selective_scan_fn(*off[:7], delta_bias=off[7], delta_softplus=True)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_off.backward(dy.transpose(1, 2).contiguous())
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    to_ours = {0: lambda g: g.transpose(1, 2), 1: lambda g: g.transpose(1, 2), 6: lambda g: g.transpose(1, 2),
               3: lambda g: g.transpose(1, 2)[:, :, None, :], 4: lambda g: g.transpose(1, 2)[:, :, None, :]}
    out = {"y": rel(y_off.transpose(1, 2), y)}
    for i, name in enumerate(names):
        g_off = off[i].grad
        out["d" + name] = rel(to_ours.get(i, lambda g: g)(g_off), ins[i].grad)
    return out


def bench_scan(c: dict, shapes, check: bool) -> None:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    from seqlab.ops.triton import selective_scan as tss

    dim, N = 4096, 16
    ours = lambda *a: tss.selective_scan_triton(*a, True, None, None)  # noqa: E731
    official = lambda u, d, A, B, C, D, z, b: selective_scan_fn(u, d, A, B, C, D, z, delta_bias=b,  # noqa: E731
                                                                 delta_softplus=True)
    if check:
        diff = agreement(2, 1024, dim, N, selective_scan_fn, ours)
        log("agreement at 2 x 1024 (relative, official vs seqlab): "
            + ", ".join(f"{k} {v:.2e}" for k, v in diff.items()))
        ROWS.append(dict(section="scan", shape="2x1024", name="agreement", **diff))
    log(f"\n{'shape':>9} {'impl':<9} {'fwd ms':>8} {'x floor':>8} {'fwd+bwd ms':>11} {'x fwd':>6}")
    for batch, seqlen in shapes:
        shape = f"{batch}x{seqlen}"
        floor = scan_floor(c, batch, seqlen, dim, N, False)[0]
        for impl in ("seqlab", "official"):
            fn = ours if impl == "seqlab" else official
            ins = scan_inputs(batch, seqlen, dim, N)
            if impl == "official":
                ins = official_layout(*ins)
            with torch.no_grad():
                ms = cuda_time(lambda f=fn, i=ins: f(*i))
            ins = scan_inputs(batch, seqlen, dim, N, grad=True)
            if impl == "official":
                ins = [x.requires_grad_(True) for x in official_layout(*ins)]
            msb = cuda_time(fwd_bwd(lambda f=fn, i=ins: f(*i), ins))
            ins = None
            torch.cuda.empty_cache()
            log(f"{shape:>9} {impl:<9} {ms:8.3f} {ms / floor:7.2f}x {msb:11.3f} {msb / ms:5.2f}x")
            ROWS.append(dict(section="scan", shape=shape, name=impl, fwd_ms=ms, fwd_bwd_ms=msb, floor_ms=floor,
                             x_floor=ms / floor, fwd_bwd_over_fwd=msb / ms))


def official_model(dtype: torch.dtype):
    """mamba-ssm's MambaLMHeadModel with Mamba-1.4B's shape (d_model 2048, 48 layers), random weights."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    torch.manual_seed(0)
    cfg = MambaConfig(d_model=2048, n_layer=48, vocab_size=50277, ssm_cfg={"layer": "Mamba1"}, rms_norm=True,
                      residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8)
    return MambaLMHeadModel(cfg, device="cuda", dtype=dtype).eval()


def time_official(model, batch: int, prompt_len: int, gen_len: int, repeats: int) -> tuple[float, float]:
    """Median (prefill s, decode s) of greedy generation through mamba-ssm's own CUDA-graph decoding cache."""
    from mamba_ssm.utils.generation import update_graph_cache

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt_len), device="cuda")
    max_len = prompt_len + gen_len
    with torch.inference_mode():
        cache = update_graph_cache(model, getattr(model, "_decoding_cache", None), batch, prompt_len, max_len)
        model._decoding_cache = cache
        params = cache.inference_params

        def once() -> tuple[float, float]:
            params.reset(max_len, batch)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits = model(ids, inference_params=params, num_last_tokens=1).logits[:, -1, :vocab]
            token = logits.argmax(-1)
            params.seqlen_offset += prompt_len
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            for _ in range(gen_len - 1):
                pos = torch.full((batch, 1), params.seqlen_offset, dtype=torch.long, device="cuda")
                token = cache.run(token[:, None], pos, params.seqlen_offset)[:, -1, :vocab].argmax(-1)
                params.seqlen_offset += 1
            torch.cuda.synchronize()
            return t1 - t0, time.perf_counter() - t1

        once()
        runs = [once() for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def bench_generate(c: dict, batches: list[int], prompt_len: int, gen_len: int, repeats: int) -> None:
    from seqlab.bench.generate import GenerateResult, _sweep, bench_seqlab, build_model, format_row

    dtype = torch.bfloat16
    ours = build_model("mamba", "1.4b", torch.device("cuda"), dtype)
    bw = c["hbm_bytes_per_s"]
    official = official_model(dtype)

    def measure(batch: int, result: GenerateResult) -> None:
        result.cuda_graph = True
        result.finish(*time_official(official, batch, prompt_len, gen_len, repeats))

    def show(r: GenerateResult) -> None:
        log(format_row(r))
        ROWS.append(dict(section="generate", **r.__dict__))

    log("")
    # mamba-ssm first: seqlab's first call at each batch size also times its decode GEMMs' kernel choices (minutes)
    _sweep(ours, "mamba:1.4b", "official", batches, prompt_len, gen_len, torch.device("cuda"), bw, 600.0, measure,
           show, notes=("mamba-ssm MambaLMHeadModel, update_graph_cache",), record_errors=True, recurrent_dtype=dtype)
    official = None
    bench_seqlab(ours, "mamba:1.4b", batches, prompt_len, gen_len, "cuda", repeats, bw, on_result=show,
                 state_dtype=dtype)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="scan,generate", help="comma list of scan, generate")
    p.add_argument("--shapes", default=",".join(f"{b}x{s}" for b, s in SHAPES), help="scan shapes BxL")
    p.add_argument("--batch", default="1,64,128", help="generate: batch sizes")
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-check", action="store_true", help="scan: skip the agreement check")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - {"scan", "generate"})
    if unknown:
        p.error(f"--sections: expected scan and/or generate, got {','.join(unknown)}")
    shapes = []
    for text in args.shapes.split(","):
        b, _, s = text.partition("x")
        if not (b.isdigit() and s.isdigit()):
            p.error(f"--shapes: expected BxL items like 8x2048, got {text!r}")
        shapes.append((int(b), int(s)))
    if not torch.cuda.is_available():
        print("official_mamba.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    try:
        import mamba_ssm
    except ImportError as err:
        print(f"official_mamba.py: mamba_ssm is not importable ({err}); build it with benchmarks/official_build.py "
              "and put .official/site on PYTHONPATH", file=sys.stderr)
        return 2
    log(f"mamba_ssm {mamba_ssm.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
    c = measure_ceilings()
    if "scan" in sections:
        bench_scan(c, shapes, not args.no_check)
    if "generate" in sections:
        bench_generate(c, [int(b) for b in args.batch.split(",")], args.prompt_len, args.gen_len, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(ceilings=c, rows=ROWS), f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
