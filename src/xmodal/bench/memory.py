"""Child process of the CPU memory measurement: ``python -m xmodal.bench.memory < spec.json``.

Reads ``{"cell": ..., "impls": [...], "threads": n}`` on standard input and prints one JSON line
mapping each implementation to its peak extra resident bytes (or to why there is none). See
:mod:`xmodal.bench.measure` for the method. Not meant to be run by hand.
"""

from __future__ import annotations

import json
import sys

from xmodal.bench.measure import memory_child


def main() -> int:
    spec = json.loads(sys.stdin.read())
    sys.stdout.write(json.dumps(memory_child(spec)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
