"""Log lines for people: rich on a terminal, plain lines otherwise."""

import logging
import sys


def setup(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    log = logging.getLogger("mmdiag")
    log.handlers.clear()
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, show_time=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("mmdiag: %(message)s"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
