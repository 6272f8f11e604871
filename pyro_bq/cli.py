"""The ``pyro-bq`` console script.

Usage::

    pyro-bq study --data-dir data --out-dir runs/study
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from pyro_bq.study.cli import main as study_main

__all__ = ["main"]

_COMMANDS = {"study": "run the Dirty-MNIST study (train, quantize, evaluate; resumable)"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in _COMMANDS:
        parser = argparse.ArgumentParser(prog="pyro-bq", description="pyro_bq command line")
        sub = parser.add_subparsers(dest="command", metavar="COMMAND")
        for name, text in _COMMANDS.items():
            sub.add_parser(name, help=text, add_help=False)
        if not argv:
            parser.print_help()
            return 2
        parser.parse_args(argv[:1])  # prints help, or an error naming the allowed commands
        return 2
    return study_main(argv[1:], prog="pyro-bq study")


if __name__ == "__main__":
    sys.exit(main())
