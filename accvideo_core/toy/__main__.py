"""``python -m accvideo_core.toy --out DIR [--size default|fast|paper]``: the paper's 1D toy experiment (Fig. 2).

Writes ``toy1d.json`` (config, timings, every figure, loss curves), ``toy1d.md`` (the table) and ``toy1d.png`` (the
figure) into ``DIR``; see docs/toy1d.md.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from ..utils.io import write_bytes, write_json
from .experiment import RUN_SIZES, run
from .report import figure, markdown_table, to_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m accvideo_core.toy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder for toy1d.json/.md/.png")
    parser.add_argument("--size", choices=sorted(RUN_SIZES), default="default",
                        help="default: ~1-2 min on 2 CPU cores; fast: seconds (CI); paper: the paper's 10k "
                             "teacher iterations")
    parser.add_argument("--seed", type=int, default=None, help="override the run size's seed")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1: fastest for this tiny net on a shared machine)")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    args = parser.parse_args(argv)
    cfg = RUN_SIZES[args.size]
    if args.seed is not None:
        cfg = replace(cfg, seed=args.seed)
    if args.threads is not None:
        cfg = replace(cfg, threads=args.threads)

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"\r\033[K{msg}", end="", file=sys.stderr, flush=True)

    try:
        result = run(cfg, progress)
    except KeyboardInterrupt:
        print("\ninterrupted; nothing written", file=sys.stderr)
        return 130
    if not args.quiet:
        print(file=sys.stderr)
    out: Path = args.out
    write_json(to_json(result), out / "toy1d.json")
    table = markdown_table(result)
    write_bytes(table.encode(), out / "toy1d.md")
    figure(result, out / "toy1d.png")
    print(table)
    print(f"teacher: final loss {result['teacher']['final_loss']:.4f}, velocity rel. error on its trajectories "
          f"{result['teacher']['velocity_rel_err_on_trajectories']:.4f}; timings {result['timings']}")
    print(f"wrote {out / 'toy1d.json'}, {out / 'toy1d.md'}, {out / 'toy1d.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
