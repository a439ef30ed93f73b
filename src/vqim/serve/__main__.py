"""`python -m vqim.serve --tokenizer T [--prior P] ...`: the same as `vqim serve`."""

from __future__ import annotations

import argparse
import logging
import sys

from vqim.options import add_options, build
from vqim.serve import ServeConfig, serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vqim.serve", description=ServeConfig.__doc__.splitlines()[0]
    )
    add_options(parser, ServeConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(build(ServeConfig, args))
    except (FileNotFoundError, NotADirectoryError, PermissionError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
