"""seqlab info: versions, devices, and which backend of each op can run here."""

from __future__ import annotations

import argparse
import json
import platform

HELP = "print versions, devices and the usable backends of each op"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def collect() -> dict:
    import numpy
    import torch

    import seqlab
    from seqlab.ops import backends_table
    from seqlab.ops._common import triton_installed, triton_interpreting

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    triton_version = None
    if triton_installed():
        import triton

        triton_version = triton.__version__
    return {
        "seqlab": seqlab.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "triton": triton_version,
        "triton_interpret": triton_interpreting(),
        "cuda": torch.version.cuda,
        "devices": devices,
        "cpu_threads": torch.get_num_threads(),
        "backends": backends_table(),
    }


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("seqlab", "python", "torch", "numpy", "triton", "cuda", "cpu_threads"):
        print(f"{key:<14}{info[key]}")
    print(f"{'devices':<14}{', '.join(info['devices'])}")
    print("\nop backends (yes = usable on this machine; auto picks the fastest usable one)")
    names = ("ref", "torch", "triton")
    print(f"  {'op':<26}" + "".join(f"{n:<9}" for n in names))
    for op, usable in info["backends"].items():
        print(f"  {op:<26}" + "".join(f"{('yes' if usable.get(n) else '-'):<9}" for n in names))
    return 0
