"""seqlab convert: Hugging Face checkpoint directories <-> seqlab checkpoints (local files only).

    seqlab convert --from-hf hf/mamba-130m --out ckpt/mamba-130m       # config.json + safetensors -> seqlab
    seqlab convert --to-hf ckpt/mamba-130m --out hf/mamba-130m-again   # seqlab -> transformers
    seqlab convert --to-hf runs/jamba --out hf/jamba --arch JambaForCausalLM

Tokenizer files found next to the source (tokenizer.json, tokenizer_config.json, ...) are copied along, so
``seqlab generate --checkpoint OUT --tokenizer OUT`` works on the result.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

HELP = (
    "convert Hugging Face checkpoints (Mamba, Mamba-2, Falcon Mamba, Llama, Jamba, Bamba, RecurrentGemma) "
    "to and from seqlab"
)


def register(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="DIR", help="a transformers checkpoint directory (config.json + weights)")
    source.add_argument(
        "--to-hf", metavar="DIR", help="a seqlab checkpoint (model.save / `seqlab train --out` directory)"
    )
    parser.add_argument("--out", metavar="DIR", required=True, help="directory to write (replaced atomically)")
    parser.add_argument(
        "--arch", default=None, metavar="NAME",
        help="with --to-hf: the transformers architecture to write (default: the one the model's config implies)",
    )


def _copy_tokenizer(source: Path, out: Path) -> list[str]:
    from seqlab.interop.hf import TOKENIZER_FILES

    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
            copied.append(name)
    return copied


def check_out(out: Path, source: Path) -> None:
    """--out is replaced wholesale: refuse a file, a folder holding anything but a previous checkpoint (its files
    would be deleted), and a folder that contains the source."""
    from seqlab.errors import ConfigError

    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out: expected a directory to write (it is replaced), got the file {str(out)!r}")
    src, dst = source.resolve(), out.resolve()
    if dst == src or dst in src.parents:
        raise ConfigError(f"--out: {str(out)!r} holds the source {str(source)!r}, which would be deleted; "
                          "pass a new directory")
    if any(out.iterdir()) and not (out / "config.json").is_file():
        raise ConfigError(f"--out: {str(out)!r} is a non-empty directory that is not a checkpoint; everything in it "
                          "would be replaced: pass a new or empty directory")


def run(args: argparse.Namespace) -> int:
    from seqlab.errors import ConfigError

    out = Path(args.out)
    if args.from_hf is not None:
        from seqlab.interop.hf import from_hf

        if args.arch is not None:
            raise ConfigError("--arch: only used with --to-hf (the architecture of --from-hf is read from config.json)")
        source = Path(args.from_hf)
        if out.resolve() == source.resolve():
            raise ConfigError("--out: must differ from --from-hf (the source would be replaced)")
        check_out(out, source)
        model = from_hf(source)
        arch = _architecture(source)
        model.save(out, metadata={"converted_from": arch})
    else:
        from seqlab.interop.hf import config_to_hf, to_hf
        from seqlab.models.language_model import LanguageModel

        source = Path(args.to_hf)
        if not (source / "config.json").exists() and (source / "checkpoint" / "config.json").exists():
            source = source / "checkpoint"  # a `seqlab train --out DIR` run directory
        if out.resolve() == source.resolve():
            raise ConfigError("--out: must differ from --to-hf (the source would be replaced)")
        check_out(out, Path(args.to_hf))
        model = LanguageModel.load(source)
        arch = config_to_hf(model.config, args.arch)["architectures"][0]
        to_hf(model, out, arch=arch)
    copied = _copy_tokenizer(source, out)
    direction = "seqlab checkpoint" if args.from_hf is not None else f"transformers {arch} checkpoint"
    print(
        f"[seqlab convert] {source} ({arch if args.from_hf is not None else 'seqlab'}, "
        f"{model.num_params():,} parameters) -> {out} ({direction})"
        + (f"; copied {', '.join(copied)}" if copied else ""),
        file=sys.stderr,
    )
    return 0


def _architecture(directory: Path) -> str:
    from seqlab.interop.hf import read_hf_config

    return read_hf_config(directory).architecture
