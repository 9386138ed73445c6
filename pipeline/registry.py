"""Named records that extend mmdiag: attribution methods, per-error rules, findings, report
sections. Each extension point is one `Registry`; a plugin adds a record with `register`.

The functions of a record registered from outside mmdiag are part of the cache keys of what reads
it (`Registry.fingerprint`): editing a registered method or rule reruns what it feeds, as editing
mmdiag's own modules does, and an unrelated registration changes no key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from mmdiag.pipeline.errors import MmdiagError

T = TypeVar("T")


class Registry(Generic[T]):
    """Records with a `name`, in the order registered; registering a name again replaces it."""

    def __init__(self, what: str, setting: str):
        self.what, self.setting = what, setting  # e.g. "attribution method", "stages.unimodal.methods"
        self._records: dict[str, T] = {}

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

    def fingerprint(self, names: list[str] | None = None) -> str:
        """A hash of the functions of the records (those named, or all) registered from outside
        mmdiag; "" when there are none, so mmdiag's own cache keys do not move."""
        h, found = hashlib.sha256(), False
        for record in self:
            if names is not None and record.name not in names:
                continue
            for f in dataclasses.fields(record):
                fn = getattr(record, f.name)
                if callable(fn) and not isinstance(fn, type) and not (getattr(fn, "__module__", "") or "").startswith("mmdiag."):
                    h.update(f"{record.name}.{f.name}".encode() + _source(fn))
                    found = True
        return h.hexdigest() if found else ""


def _source(fn: Callable) -> bytes:
    try:
        return inspect.getsource(fn).encode()
    except (OSError, TypeError):  # defined where no source is kept (a notebook's exec): its code
        code = getattr(fn, "__code__", None)
        return b"" if code is None else code.co_code + repr(code.co_consts).encode()
