"""The ``redflow`` command: ``redflow supervisor ...`` runs the supervisor."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: redflow supervisor [options]   (see: redflow supervisor --help)")
        return 0 if args else 2
    if args[0] == "supervisor":
        from ..supervisor import main as supervisor_main

        return supervisor_main(args[1:])
    print(f"redflow: unknown command {args[0]!r}", file=sys.stderr)
    return 2
