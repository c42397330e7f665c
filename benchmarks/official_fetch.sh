#!/usr/bin/env bash
# Fetch the official Mamba package's sources (mamba-ssm and causal-conv1d sdists from PyPI, pinned, checksums
# checked) into .official/src, for benchmarks/official_build.py and benchmarks/official_mamba.py.
# Run it on a machine with network access; the build and the benchmark need none.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.official/src
mkdir -p "$dest"
fetch() {  # name version sha256 url
    local file="$dest/$1-$2.tar.gz"
    [ -f "$file" ] || curl -fsSL -o "$file" "$4"
    echo "$3  $file" | sha256sum -c --quiet
    tar xzf "$file" -C "$dest"
}
fetch mamba_ssm 2.3.2.post1 104cc47e9101e5401a675fa2b784f2952b9b037f3b1dd83b5ac544394e95d028 \
    https://files.pythonhosted.org/packages/af/48/aa7bec0efc7453fa0512276c0069c854bf684219050294266534bfef34bb/mamba_ssm-2.3.2.post1.tar.gz
fetch causal_conv1d 1.7.0 3202758494eaa7b597ce1c282dfa188889506bfcb92cad3c407d26736bfcd32b \
    https://files.pythonhosted.org/packages/f4/d1/eba27735f31bd5527d39a3c7f693e6ded7b844cab275db719a15ad37b6cd/causal_conv1d-1.7.0.tar.gz
ls -d "$dest"/*/
