"""Named records that extend mmdiag: attribution methods, per-error rules, findings, report
sections. Each extension point is one `Registry`; a plugin adds a record with `register`.

A record's functions are part of the cache keys (`extensions()`): editing a registered method or
rule outside mmdiag reruns what it feeds, as editing mmdiag's own modules does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from mmdiag.pipeline.errors import MmdiagError

T = TypeVar("T")

_ALL: list[Registry] = []


class Registry(Generic[T]):
    """Records with a `name`, in the order registered; registering a name again replaces it."""

    def __init__(self, what: str, setting: str):
        self.what, self.setting = what, setting  # e.g. "attribution method", "stages.unimodal.methods"
        self._records: dict[str, T] = {}
        _ALL.append(self)

    def register(self, record: T, before: str | None = None) -> T:
        """Add `record` last, or just ahead of the record named `before`."""
        self._records.pop(record.name, None)
        if before is None:
            self._records[record.name] = record
            return record
        self.get(before)
        items = list(self._records.items())
        at = next(i for i, (name, _) in enumerate(items) if name == before)
        self._records = dict([*items[:at], (record.name, record), *items[at:]])
        return record

    def get(self, name: str) -> T:
        if name not in self._records:
            raise MmdiagError(f"{self.setting}: unknown {self.what} {name!r}; the {self.what}s are: {', '.join(self._records) or 'none'}")
        return self._records[name]

    def names(self) -> list[str]:
        return list(self._records)

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._records.values()))

    def __contains__(self, name: str) -> bool:
        return name in self._records


def _source(fn: Callable) -> bytes:
    try:
        return inspect.getsource(fn).encode()
    except (OSError, TypeError):  # defined where no source is kept (a notebook's exec): its code
        code = getattr(fn, "__code__", None)
        return b"" if code is None else code.co_code + repr(code.co_consts).encode()


def extensions() -> str:
    """A hash of the functions of every record registered from outside mmdiag ("" when there
    are none, so mmdiag's own cache keys do not move)."""
    h, any_ = hashlib.sha256(), False
    for registry in _ALL:
        for record in registry:
            for f in dataclasses.fields(record):
                fn = getattr(record, f.name)
                if callable(fn) and not isinstance(fn, type) and not (getattr(fn, "__module__", "") or "").startswith("mmdiag."):
                    h.update(f"{registry.setting}:{record.name}.{f.name}".encode() + _source(fn))
                    any_ = True
    return h.hexdigest() if any_ else ""
