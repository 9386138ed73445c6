"""Log lines for people: rich on a terminal, plain lines otherwise."""

import logging
import sys


class _RunTag(logging.Filter):
    """While other runs report beside this process's (mmdiag.flows.hosting.side_by_side), its own lines carry
    its run's name too; lines relayed from those runs carry theirs already."""

    def filter(self, record: logging.LogRecord) -> bool:
        from mmdiag.flows import progress

        tag = progress.run_tag
        if tag and not getattr(record, "relayed", False) and not record.getMessage().startswith(f"{tag}: "):
            record.msg, record.args = f"{tag}: {record.getMessage()}", ()
        return True


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
    handler.addFilter(_RunTag())
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
