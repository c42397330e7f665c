"""Build the official Mamba package's CUDA extensions for this GPU, to benchmark against (no network needed).

    bash benchmarks/official_fetch.sh            # once, where there is network: sources into .official/src
    python3 benchmarks/official_build.py         # on the GPU machine: .official/site, importable
    PYTHONPATH=.official/site python3 benchmarks/official_mamba.py ...

Builds `selective_scan_cuda` (mamba-ssm) and `causal_conv1d_cuda` (causal-conv1d) with torch's extension loader
(ninja, all cores) for the local GPU's architecture only, and lays the two Python packages out in .official/site
with a minimal dist-info each (so transformers' availability checks see them). To keep the build within minutes
the selective scan's backward is compiled for real weights in bf16 and float32 only; the other backward variants
(complex A, fp16 inputs) raise if called. Nothing here is imported by seqlab.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCAN_FILES = ["selective_scan.cpp", "selective_scan_fwd_fp32.cu", "selective_scan_fwd_fp16.cu",
              "selective_scan_fwd_bf16.cu", "selective_scan_bwd_fp32_real.cu", "selective_scan_bwd_bf16_real.cu"]
SKIPPED_BWD = [("float", "complex_t"), ("c10::Half", "float"), ("c10::Half", "complex_t"),
               ("c10::BFloat16", "complex_t")]
CONV_FILES = ["causal_conv1d.cpp", "causal_conv1d_fwd.cu", "causal_conv1d_bwd.cu", "causal_conv1d_update.cu"]
NVCC_FLAGS = ["-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
              "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math"]


def skipped_variants_source() -> str:
    """A translation unit defining the backward variants not compiled, each raising when called."""
    lines = ["#include <c10/util/BFloat16.h>", "#include <c10/util/Exception.h>", "#include <c10/util/Half.h>",
             '#include "selective_scan.h"', '#include "selective_scan_common.h"',
             "template <typename input_t, typename weight_t>",
             "void selective_scan_bwd_cuda(SSMParamsBwd &params, cudaStream_t stream);"]
    for itype, wtype in SKIPPED_BWD:
        lines.append(f"template <> void selective_scan_bwd_cuda<{itype}, {wtype}>(SSMParamsBwd &, cudaStream_t) "
                     f'{{ TORCH_CHECK(false, "selective_scan_bwd<{itype}, {wtype}> is not built here"); }}')
    return "\n".join(lines) + "\n"


def build(name: str, csrc: Path, files: list[str], build_dir: Path, extra: list[Path] = ()):
    from torch.utils.cpp_extension import load

    build_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sources = [str(csrc / f) for f in files] + [str(p) for p in extra]
    load(name=name, sources=sources, extra_cflags=["-O3", "-std=c++17"], extra_cuda_cflags=NVCC_FLAGS,
         extra_include_paths=[str(csrc)], build_directory=str(build_dir), verbose=True)
    print(f"built {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return next(build_dir.glob(f"{name}*.so"))


def dist_info(site: Path, name: str, version: str) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "INSTALLER").write_text("seqlab-benchmarks\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default=str(ROOT / ".official" / "src"), help="where official_fetch.sh unpacked")
    p.add_argument("--out", default=str(ROOT / ".official"), help="build/ and site/ go here")
    p.add_argument("--scan-only", action="store_true",
                   help="build selective_scan_cuda alone (~1.5 min; causal-conv1d's kernels take ~5 more): enough for "
                        "official_mamba.py --sections scan, and mamba-ssm then runs its convolutions through torch")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("official_build.py: needs a CUDA GPU and nvcc", file=sys.stderr)
        return 2
    major, minor = torch.cuda.get_device_capability()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    src, out = Path(args.src), Path(args.out)
    mamba = next(src.glob("mamba_ssm-*/"), None)
    conv = next(src.glob("causal_conv1d-*/"), None)
    if mamba is None or conv is None:
        print(f"official_build.py: --src {src} holds no mamba_ssm-*/ and causal_conv1d-*/ "
              "(run benchmarks/official_fetch.sh first)", file=sys.stderr)
        return 2
    site = out / "site"
    site.mkdir(parents=True, exist_ok=True)
    stub = out / "build" / "selective_scan_skipped_bwd.cu"
    stub.parent.mkdir(parents=True, exist_ok=True)
    stub.write_text(skipped_variants_source())
    libs = [build("selective_scan_cuda", mamba / "csrc" / "selective_scan", SCAN_FILES,
                  out / "build" / "selective_scan", extra=[stub])]
    packages = [("mamba_ssm", mamba)]
    if not args.scan_only:
        libs.append(build("causal_conv1d_cuda", conv / "csrc", CONV_FILES, out / "build" / "causal_conv1d"))
        packages.append(("causal_conv1d", conv))
    for lib in libs:
        shutil.copy2(lib, site / lib.name)
    for package, tree in packages:
        shutil.rmtree(site / package, ignore_errors=True)
        shutil.copytree(tree / package, site / package)
        dist_info(site, package, tree.name.split("-", 1)[1])
    print(f"official packages ready in {site}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
