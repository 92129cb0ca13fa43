"""``python -m torchref.catalogue --out docs``: regenerate the detection table."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchref.catalogue",
                                     description="Run every catalogue bug through the verify "
                                                 "engine in float64 and float32 and write "
                                                 "catalogue.md and catalogue.json.")
    parser.add_argument("--out", default="docs", help="directory for the table (docs)")
    parser.add_argument("--only", nargs="*", help="bug names (a partial table, for a look)")
    args = parser.parse_args(argv)
    from torchref.catalogue.bugs import BY_NAME
    from torchref.catalogue.table import build, write

    unknown = [n for n in args.only or () if n not in BY_NAME]
    if unknown:
        print(f"unknown bug {', '.join(unknown)}: see torchref/catalogue/bugs.py",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    table = build(args.only)
    write(table, Path(args.out))
    print(f"wrote {args.out}/catalogue.md and catalogue.json in "
          f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
