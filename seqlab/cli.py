"""The ``seqlab`` command: one verb per module under ``seqlab.commands``.

Each verb module defines ``HELP`` (one line), ``register(parser)`` to add its options and ``run(args) -> int``.
Verb modules import torch and the rest lazily inside ``run`` so that ``seqlab --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from seqlab.errors import SeqlabError

# verb -> module; a verb is offered only when its module is present.
VERBS = {
    "arena": "seqlab.commands.arena",
    "train": "seqlab.commands.train",
    "eval": "seqlab.commands.evaluate",
    "generate": "seqlab.commands.generate",
    "bench": "seqlab.commands.bench",
    "memory": "seqlab.commands.memory",
    "convert": "seqlab.commands.convert",
    "compare-lm": "seqlab.commands.compare_lm",
    "info": "seqlab.commands.info",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqlab",
        description="Build, train, measure and run Transformers, S4, Mamba, Mamba-2 and hybrids.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")
    for verb, module_name in VERBS.items():
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        verb_parser = sub.add_parser(verb, help=module.HELP, description=module.HELP)
        module.register(verb_parser)
        verb_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except SeqlabError as err:
        print(f"seqlab {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"seqlab {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
