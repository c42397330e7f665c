"""Compile one Triton kernel for an NVIDIA GPU without one, and report what the compiler made of it.

    python3 benchmarks/sass_report.py seqlab.ops.triton.ssd:_ssd_bwd_dx_kernel \
        --const T=64,BLOCK_P=64,BLOCK_N=32,HAS_Z=1,SHARED_CB=1 --ptr-dtype bf16 \
        --ptr states_ptr=fp32,cum_ptr=fp32 --int L=2048,H=80,P=64 --warps 8 [--maxnreg 128] [--arch 90] \
        [--sass FILE] [--json]

Prints registers per thread, spilled bytes (local-memory loads and stores), shared memory, the occupancy the
register and shared-memory use allow (CTAs and warps per SM), and the SASS instruction mix (total, MUFU, tensor-core
HGMMA/HMMA, global/shared/local memory). Registers bound the warps an SM can keep in flight, which is what a
latency-bound kernel lives on; this lets a kernel's variants be compared on a machine with no GPU before one is
timed. Constexprs not given are False (flags); integer arguments are int32; pointers take ``--ptr-dtype`` unless
named in ``--ptr``. Specialised as a launch would: pointers 16-byte aligned, integers given with ``--int`` equal to
1 become constants and multiples of 16 carry that divisibility (vectorised loads depend on it; strides and sizes
not given are assumed to be neither). The compiler is the installed Triton's (its bundled cuobjdump reads the
cubin).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REGISTERS_PER_SM = 65536
SHARED_PER_SM = 228 * 1024  # sm_90: 228 KB per SM, of which a CTA may use 227 KB
MAX_WARPS_PER_SM = 64


def _pairs(text: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (text or "").split(",")):
        if "=" not in item:
            raise SystemExit(f"sass_report: expected NAME=VALUE, got {item!r}")
        name, value = item.split("=", 1)
        out[name.strip()] = value.strip()
    return out


def _value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text  # a string constexpr


def compile_kernel(target: str, const: dict, ptr_dtype: str, ptrs: dict, warps: int, stages: int, arch: int,
                   ints: dict | None = None, maxnreg: int | None = None, floats: tuple[str, ...] = ()):
    """The compiled kernel (triton.compile's result) for ``module:function``; ``floats``: float32 arguments."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = target.split(":")
    fn = getattr(importlib.import_module(module), name)
    ints = ints or {}
    constexprs, signature, attrs = {}, {}, {}
    aligned = [["tt.divisibility", 16]]
    for index, arg in enumerate(fn.arg_names):
        param = fn.params[index]
        if param.is_constexpr:
            signature[arg] = "constexpr"
            constexprs[(index,)] = const.get(arg, False)
        elif arg.endswith("_ptr"):
            signature[arg] = "*" + ptrs.get(arg, ptr_dtype)
            attrs[(index,)] = aligned
        elif arg in floats:
            signature[arg] = "fp32"
        elif ints.get(arg) == 1:
            signature[arg] = "constexpr"
            constexprs[(index,)] = 1
        else:
            signature[arg] = "i32"
            if arg in ints and ints[arg] % 16 == 0:
                attrs[(index,)] = aligned
    unknown = set(const) - {a for a, p in zip(fn.arg_names, fn.params) if p.is_constexpr}
    if unknown:
        raise SystemExit(f"sass_report: --const names no constexpr of {name}: {sorted(unknown)}")
    source = ASTSource(fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": warps, "num_stages": stages}
    if maxnreg:
        options["maxnreg"] = maxnreg
    return triton.compile(source, target=GPUTarget("cuda", arch, 128), options=options)


def report(compiled, warps: int, sass_file: str | None = None) -> dict:
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", cubin], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([str(tools / "cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
    if sass_file:
        Path(sass_file).write_text(sass)
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    shared = int(getattr(compiled.metadata, "shared", 0))
    opcodes = Counter()
    for line in sass.splitlines():
        match = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if match:
            opcodes[match.group(1)] += 1
    threads = 32 * warps
    by_regs = REGISTERS_PER_SM // max(1, regs * threads)
    by_shared = SHARED_PER_SM // shared if shared else 32
    ctas = max(0, min(by_regs, by_shared, MAX_WARPS_PER_SM // warps))
    group = {
        "total": sum(opcodes.values()),
        "mufu": opcodes["MUFU"],
        "tensor": sum(v for k, v in opcodes.items() if k.startswith(("HGMMA", "HMMA", "WGMMA"))),
        "global_load": sum(v for k, v in opcodes.items() if k in ("LDG", "LDGSTS") or k.startswith("UTMALDG")),
        "global_store": sum(v for k, v in opcodes.items() if k in ("STG", "RED", "ATOMG")),
        "shared": sum(v for k, v in opcodes.items() if k in ("LDS", "STS", "LDSM", "STSM")),
        "local (spills)": opcodes["LDL"] + opcodes["STL"],
        "barriers": opcodes["BAR"],
    }
    return dict(registers=regs, stack_bytes=stack, shared_bytes=shared, ctas_per_sm=ctas, warps_per_sm=ctas * warps,
                instructions=group)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kernel", help="module:function of a @triton.jit kernel")
    parser.add_argument("--const", default="", help="constexpr values, NAME=VALUE,...")
    parser.add_argument("--ptr-dtype", default="bf16", help="pointer element type by default (bf16, fp16, fp32, i32)")
    parser.add_argument("--ptr", default="", help="pointer types by name, NAME=TYPE,...")
    parser.add_argument("--int", default="", help="integer arguments' values at the launch, NAME=VALUE,...")
    parser.add_argument("--float", default="", help="float32 arguments by name, NAME,...")
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--maxnreg", type=int, help="registers per thread the compiler may use (a launch's maxnreg)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--sass", help="write the SASS listing here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    const = {k: _value(v) for k, v in _pairs(args.const).items()}
    ints = {k: int(v) for k, v in _pairs(args.int).items()}
    compiled = compile_kernel(args.kernel, const, args.ptr_dtype, _pairs(args.ptr), args.warps, args.stages,
                              args.arch, ints, args.maxnreg, tuple(filter(None, args.float.split(","))))
    result = report(compiled, args.warps, args.sass)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.kernel}  warps {args.warps}  stages {args.stages}  sm_{args.arch}")
    print(f"registers {result['registers']}  stack {result['stack_bytes']} B  shared {result['shared_bytes']} B  "
          f"-> {result['ctas_per_sm']} CTAs / {result['warps_per_sm']} warps per SM")
    print("SASS: " + "  ".join(f"{k} {v}" for k, v in result["instructions"].items()))


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ.pop("TRITON_INTERPRET", None)  # compiled for the GPU, also where the tests interpret kernels
    main()
