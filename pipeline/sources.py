"""Streamed data: samples read from their source a batch at a time, never held whole.

A `StreamedSampleSet` is a `SampleSet` whose large columns (inputs, truth masks, counterfactual
inputs) are `Column`s: their rows are read from the source when a stage asks for them. Labels,
concepts, ids and display strings are small and held in memory. Building the set reads the
source once, checks every row (an error names the row) and computes the fingerprint the same
data has in memory, so both give the same cache keys and the same run.

Three ways in, each a data factory's return value:
- `streamed(dataset)`: any map-style `torch.utils.data.Dataset` whose items are sample dicts,
  as `SampleSet[i]` gives them;
- `image_table(table, images)`: a folder of images and a CSV or Parquet table of captions,
  labels and concepts;
- `hf_dataset(ds)`: a Hugging Face `datasets.Dataset` (read from its memory-mapped Arrow files).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmdiag.pipeline.data import Counterfactual, SampleSet, _describe
from mmdiag.pipeline.errors import MmdiagError
from mmdiag.pipeline.store import ContentHash

Path_ = tuple[str, ...]  # where a large tensor sits in a sample: ("inputs", "image"), ("truth", "image", "mark")...


def _large(item: dict) -> dict[Path_, Tensor]:
    out = {("inputs", m): x for m, x in item["inputs"].items()}
    out.update({("truth", m, r): t for m, regions in item.get("truth", {}).items() for r, t in regions.items()})
    for c, cf in item.get("counterfactuals", {}).items():
        out.update({("counterfactuals", c, m): x for m, x in cf["inputs"].items()})
    return out


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class _Guarded(torch.utils.data.Dataset):
    """The source's items, an exception turned into a value (so a loader worker reports the row
    instead of dying)."""

    def __init__(self, dataset, rows: Sequence[int]):
        self.dataset, self.rows = dataset, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        try:
            return row, self.dataset[row]
        except Exception as e:  # the user's reading code: reported with its row by the reader
            return row, _Failed(e)


def _fork_server():
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "mmdiag.pipeline.sources"])
    return context


class Reader:
    """Reads rows of a source as stacked tensors; the last rows read are kept, so the columns of
    one batch cost one read."""

    def __init__(self, dataset, name: str, workers: int = 0, cf_fill: dict[str, Sequence[str]] | None = None):
        self.dataset, self.name, self.workers = dataset, name, workers
        self.cf_fill = cf_fill or {}  # concept -> modalities its counterfactual replaces
        self._last: tuple[tuple[int, ...], dict[Path_, Tensor]] | None = None

    def items(self, rows: Sequence[int], batch_size: int = 64) -> Iterator[list[tuple[int, dict]]]:
        """The items at `rows`, in order, a batch at a time (with loader workers if asked)."""
        # workers come from a fork server: forking this process itself, once Prefect's threads
        # run, gives workers that die at exit
        workers = dict(num_workers=self.workers, multiprocessing_context=_fork_server()) if self.workers and len(rows) > batch_size else {}
        loader = torch.utils.data.DataLoader(_Guarded(self.dataset, rows), batch_size=batch_size, collate_fn=list, **workers)
        for batch in loader:
            for row, item in batch:
                if isinstance(item, _Failed):
                    raise self.failed(row, item.error)
            yield batch

    def failed(self, row: int, error: BaseException) -> MmdiagError:
        if isinstance(error, MmdiagError):
            return MmdiagError(f"data ({self.name}): row {row}: {error}")
        what = " ".join(str(error).split())[:200]
        return MmdiagError(f"data ({self.name}): row {row} could not be read ({type(error).__name__}: {what}); fix or remove that row")

    def stack(self, batch: list[tuple[int, dict]]) -> dict[Path_, Tensor]:
        parts = [self.filled(item) for _, item in batch]
        return {p: torch.stack([part[p] for part in parts]) for p in parts[0]}

    def filled(self, item: dict) -> dict[Path_, Tensor]:
        """The item's large tensors; a counterfactual it lacks is filled with its own inputs
        (and marked invalid in the set)."""
        out = _large(item)
        for c, modalities in self.cf_fill.items():
            for m in modalities:
                out.setdefault(("counterfactuals", c, m), item["inputs"][m])
        return out

    def remember(self, batch: list[tuple[int, dict]]) -> dict[Path_, Tensor]:
        self._last = None
        self._last = (tuple(row for row, _ in batch), self.stack(batch))
        return self._last[1]

    def read(self, rows: Sequence[int]) -> dict[Path_, Tensor]:
        key = tuple(int(r) for r in rows)
        if self._last is None or self._last[0] != key:
            self._last = None  # the old rows are freed before the new ones are read
            batches = [self.stack(b) for b in self.items(key, batch_size=max(len(key), 1))] if key else []
            self._last = (key, {p: torch.cat([b[p] for b in batches]) for p in batches[0]} if batches else {})
        return self._last[1]


class Column:
    """A large column of a streamed set: indexing reads those rows from the source."""

    def __init__(self, reader: Reader, path: Path_, rows: Tensor, shape: tuple[int, ...], dtype: torch.dtype):
        self.reader, self.path, self.rows = reader, path, rows
        self.row_shape, self.dtype = tuple(shape), dtype

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.row_shape))

    def dim(self) -> int:
        return 1 + len(self.row_shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def view(self, index: Tensor) -> Column:
        return Column(self.reader, self.path, self.rows[index], self.row_shape, self.dtype)

    def __getitem__(self, index) -> Tensor:
        if isinstance(index, int) or (torch.is_tensor(index) and index.dim() == 0):
            return self[torch.as_tensor([int(index)])][0]
        if isinstance(index, slice):
            rows = self.rows[index]
        else:
            index = torch.as_tensor(index)
            rows = self.rows[index if index.dtype == torch.bool else index.long()]
        if len(rows) == 0:
            return torch.empty((0, *self.row_shape), dtype=self.dtype)
        return self.reader.read(rows.tolist())[self.path]

    def __repr__(self) -> str:
        return f"Column({'.'.join(self.path)}, {tuple(self.shape)}, {self.dtype})"


@dataclass(eq=False)
class StreamedSampleSet(SampleSet):
    """A SampleSet whose inputs, truth masks and counterfactual inputs stay in their source."""

    reader: Reader | None = None
    content: str = ""  # the fingerprint, computed by the reading pass
    batch_size: int = 64  # rows read together by `batches` when a stage asks for fewer

    def _validate_columns(self, n: int) -> None:
        pass  # every row was checked as it was read

    def fingerprint(self) -> str:
        return self.content

    def view(self, index: Tensor) -> StreamedSampleSet:
        index = torch.as_tensor(index, dtype=torch.long)
        rows = index.tolist()
        return StreamedSampleSet(
            inputs={m: x.view(index) for m, x in self.inputs.items()},
            labels=self.labels[index],
            meta={k: v[index] for k, v in self.meta.items()},
            truth={m: {r: t.view(index) for r, t in regions.items()} for m, regions in self.truth.items()},
            display={k: [v[i] for i in rows] for k, v in self.display.items()},
            class_names=self.class_names,
            ids=self.ids[index],
            name=self.name,
            truth_concepts=self.truth_concepts,
            class_concepts=self.class_concepts,
            counterfactuals={
                c: Counterfactual(
                    {m: x.view(index) for m, x in cf.inputs.items()},
                    None if cf.labels is None else cf.labels[index],
                    None if cf.valid is None else cf.valid[index],
                    None if cf.null is None else [{m: x.view(index) for m, x in draw.items()} for draw in cf.null],
                )
                for c, cf in self.counterfactuals.items()
            },
            found=self.found,
            reader=self.reader,
            content=f"{self.content}:{hash(tuple(rows))}",
            batch_size=self.batch_size,
        )

    def batches(self, batch_size: int, device: torch.device | str = "cpu"):
        """One pass through the source (one loader, its workers kept for the whole pass); the
        batch is remembered, so the stage's reads of its truth masks cost nothing."""
        start = 0
        for batch in self.reader.items(next(iter(self.inputs.values())).rows.tolist(), batch_size):
            read = self.reader.remember(batch)
            yield slice(start, start + len(batch)), {m: read[("inputs", m)].to(device) for m in self.inputs}
            start += len(batch)


def streamed(
    dataset,
    *,
    class_names: Sequence[str] = (),
    name: str = "data",
    truth_concepts: dict[str, dict[str, str]] | None = None,
    class_concepts: Sequence[str] | None = None,
    batch_size: int = 64,
    workers: int = 0,
) -> StreamedSampleSet:
    """A streamed sample set over a map-style dataset whose item `i` is a sample dict:
    {"inputs": {modality: tensor}, "label": int, and optionally "id": int, "meta": {concept: int},
    "truth": {modality: {region: mask}}, "display": {key: value}, "counterfactuals": {concept:
    {"inputs": {modality: tensor}, "label": int}}}. Reads the whole source once, in batches of
    `batch_size` (with `workers` loader processes), to check it and fingerprint it."""
    n = len(dataset)
    if n == 0:
        raise MmdiagError(f"data ({name}): the data set is empty")
    reader = Reader(dataset, name, workers)
    scan = _Scan(name)
    for batch in reader.items(range(n), batch_size):
        for row, item in batch:
            scan.add(row, item)
        if scan.cf_fill != reader.cf_fill:
            reader.cf_fill = scan.cf_fill
        for p, t in reader.stack(batch).items():
            scan.hash.update(".".join(p), t)
    rows = torch.arange(n)
    column = lambda p: Column(reader, p, rows, *scan.layout[p])  # noqa: E731
    labels = torch.tensor(scan.labels, dtype=torch.long)
    data = StreamedSampleSet(
        inputs={p[1]: column(p) for p in scan.layout if p[0] == "inputs"},
        labels=labels,
        meta={k: torch.tensor(v, dtype=torch.long) for k, v in scan.meta.items()},
        truth=_nest({p[1:]: column(p) for p in scan.layout if p[0] == "truth"}),
        display=scan.display,
        class_names=list(class_names),
        ids=torch.tensor(scan.ids, dtype=torch.long),
        name=name,
        truth_concepts=truth_concepts or {},
        class_concepts=None if class_concepts is None else list(class_concepts),
        counterfactuals=scan.counterfactuals(column),
        reader=reader,
        batch_size=batch_size,
    )
    data.content = data._fingerprint(scan.hash)
    return data


def _nest(flat: dict[tuple[str, str], Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for (a, b), v in flat.items():
        out.setdefault(a, {})[b] = v
    return out


@dataclass
class _Scan:
    """What one pass over the source collects and checks, row by row."""

    name: str
    hash: ContentHash = field(default_factory=ContentHash)
    layout: dict[Path_, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)
    labels: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    meta: dict[str, list[int]] = field(default_factory=dict)
    display: dict[str, list] = field(default_factory=dict)
    cf_labels: dict[str, list] = field(default_factory=dict)
    cf_valid: dict[str, list[bool]] = field(default_factory=dict)
    cf_fill: dict[str, list[str]] = field(default_factory=dict)

    def fail(self, row: int, what: str) -> MmdiagError:
        return MmdiagError(f"data ({self.name}): row {row}: {what}")

    def add(self, row: int, item: Any) -> None:
        first = not self.labels
        if not isinstance(item, dict) or not isinstance(item.get("inputs"), dict) or not item["inputs"]:
            raise self.fail(row, f"an item must be a dict with 'inputs' ({{modality: tensor}}) and 'label'; got {_describe(item)}")
        if "label" not in item:
            raise self.fail(row, "has no 'label'; give each item its class index")
        self.labels.append(self._integer(row, "label", item["label"]))
        self.ids.append(self._integer(row, "id", item.get("id", row)))
        self._large(row, item, first)
        self._small(row, "meta", item.get("meta", {}), self.meta, first, self._integer)
        self._small(row, "display", item.get("display", {}), self.display, first, self._present)
        self._counterfactuals(row, item, first)

    def _integer(self, row: int, where: str, value) -> int:
        if torch.is_tensor(value) and value.numel() == 1 and not value.is_floating_point():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(row, f"{where} must be an integer, got {value!r}")
        return value

    def _present(self, row: int, where: str, value):
        if value is None or (isinstance(value, float) and value != value):
            raise self.fail(row, f"{where} is missing; give every row a value")
        return value

    def _large(self, row: int, item: dict, first: bool) -> None:
        for p, t in _large(item).items():
            where = ".".join(p)
            if not torch.is_tensor(t):
                raise self.fail(row, f"{where} must be a tensor, got {_describe(t)}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise self.fail(row, f"{where} holds NaN or inf; clean that row")
            if first and p[0] != "counterfactuals":
                self.layout[p] = (tuple(t.shape), t.dtype)
            elif p not in self.layout and p[0] != "counterfactuals":
                raise self.fail(row, f"has {where}, which row 0 does not have; give every row the same inputs and truth masks")
            if p in self.layout and (tuple(t.shape), t.dtype) != self.layout[p]:
                shape, dtype = self.layout[p]
                raise self.fail(row, f"{where} is {t.dtype} {tuple(t.shape)}, row 0 had {dtype} {shape}; give every row one shape (pad text, resize images)")
        missing = [p for p in self.layout if p[0] != "counterfactuals" and p not in _large(item)]
        if missing:
            raise self.fail(row, f"has no {'.'.join(missing[0])}; give every row the same inputs and truth masks")

    def _small(self, row: int, part: str, given, into: dict, first: bool, check) -> None:
        if not isinstance(given, dict):
            raise self.fail(row, f"{part} must be a dict, got {_describe(given)}")
        if first:
            into.update({k: [] for k in given})
        if set(given) != set(into):
            missing = sorted(set(into) - set(given)) or sorted(set(given) - set(into))
            raise self.fail(row, f"{part}.{missing[0]} is missing (or new); give every row the same {part} keys")
        for k, v in given.items():
            into[k].append(check(row, f"{part}.{k}", v))

    def _counterfactuals(self, row: int, item: dict, first: bool) -> None:
        given = item.get("counterfactuals", {})
        for c, cf in given.items():
            if not isinstance(cf, dict) or not isinstance(cf.get("inputs"), dict):
                raise self.fail(row, f"counterfactuals.{c} must be a dict with 'inputs' ({{modality: tensor}})")
            for m, x in cf["inputs"].items():
                if ("inputs", m) not in self.layout:
                    raise self.fail(row, f"counterfactuals.{c}.inputs.{m} is not an input modality")
                if (tuple(x.shape), x.dtype) != self.layout[("inputs", m)]:
                    raise self.fail(row, f"counterfactuals.{c}.inputs.{m} must match inputs.{m} in shape and dtype; got {x.dtype} {tuple(x.shape)}")
                self.layout.setdefault(("counterfactuals", c, m), self.layout[("inputs", m)])
            if c not in self.cf_fill:
                if not first:
                    raise self.fail(row, f"counterfactuals.{c} first appears here; row 0 must carry every counterfactual the data has")
                self.cf_fill[c], self.cf_labels[c], self.cf_valid[c] = sorted(cf["inputs"]), [], []
        for c in self.cf_fill:
            cf = given.get(c)
            self.cf_valid[c].append(cf is not None)
            self.cf_labels[c].append(None if cf is None or cf.get("label") is None else self._integer(row, f"counterfactuals.{c}.label", cf["label"]))

    def counterfactuals(self, column) -> dict[str, Counterfactual]:
        out = {}
        for c, modalities in self.cf_fill.items():
            labels, valid = self.cf_labels[c], self.cf_valid[c]
            out[c] = Counterfactual(
                {m: column(("counterfactuals", c, m)) for m in modalities},
                None if all(v is None for v in labels) else torch.tensor([-1 if v is None else v for v in labels], dtype=torch.long),
                None if all(valid) else torch.tensor(valid),
            )
        return out


# --- tables of images and captions ------------------------------------------------------------


class _Rows(torch.utils.data.Dataset):
    """Rows of a table (a dict per row) turned into sample dicts: the image loaded and resized,
    the text tokenized, the label and concepts as integers."""

    def __init__(self, get: Callable[[int], dict], n: int, *, image: str, text: str | None, label: str, concepts: Sequence[str], tokenize, transform, load_image: Callable[[Any], Any], classes: dict):
        self.get, self.n, self.image, self.text, self.label = get, n, image, text, label
        self.concepts, self.tokenize, self.transform, self.load_image, self.classes = list(concepts), tokenize, transform, load_image, classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        row = self.get(i)
        for key in [self.image, self.label, *([self.text] if self.text else []), *self.concepts]:
            value = row.get(key)
            if value is None or (isinstance(value, float) and value != value) or value == "":
                raise MmdiagError(f"column {key!r} is empty; fill it or remove the row")
        inputs = {"image": self.transform(self.load_image(row[self.image]).convert("RGB"))}
        display = {}
        if self.text:
            caption = str(row[self.text])
            inputs["text"] = torch.as_tensor(self.tokenize([caption]))[0]
            display["caption"] = caption
        label = row[self.label]
        if label not in self.classes:
            raise MmdiagError(f"column {self.label!r}: {label!r} is not a known class ({', '.join(map(str, list(self.classes)[:8]))})")
        meta = {}
        for c in self.concepts:
            try:
                meta[c] = int(row[c])
            except (TypeError, ValueError):
                raise MmdiagError(f"column {c!r}: {row[c]!r} is not an integer concept value (-1 unknown)") from None
        return {"inputs": inputs, "label": self.classes[label], "meta": meta, "display": display}


@dataclass(frozen=True)
class Resized:
    """The default image transform: RGB resized to size x size, floats in [0, 1], (3, H, W)."""

    size: int = 224

    def __call__(self, picture) -> Tensor:
        import numpy as np

        picture = picture.resize((self.size, self.size))
        return torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class _ImageFile:
    folder: Path

    def __call__(self, file):
        from PIL import Image

        return Image.open(self.folder / str(file))


def _hf_image(value):
    """An image cell of a Hugging Face dataset: a PIL image (the Image feature) or a path."""
    from PIL import Image

    return value if hasattr(value, "convert") else Image.open(value)


def _classes(values: Sequence, class_names: Sequence[str] | None) -> tuple[dict, list[str]]:
    """Label values -> class indices: integers as they are, names by `class_names` (or sorted)."""
    if class_names:
        names = [str(c) for c in class_names]
        return {**{name: k for k, name in enumerate(names)}, **{k: k for k in range(len(names))}}, names
    distinct = sorted({v for v in values if v is not None and v == v}, key=str)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in distinct):
        top = max(distinct, default=0)
        return {k: k for k in range(top + 1)}, [str(k) for k in range(top + 1)]
    return {v: k for k, v in enumerate(distinct)}, [str(v) for v in distinct]


def _read_table(table: Path) -> list[dict]:
    if not table.is_file():
        raise MmdiagError(f"data: no table at {table}; give a .csv or .parquet file")
    if table.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise MmdiagError("data: reading a Parquet table needs pyarrow; pip install 'mmdiag[data]'") from None
        return pq.read_table(table).to_pylist()
    if table.suffix.lower() != ".csv":
        raise MmdiagError(f"data: {table.name} is neither .csv nor .parquet; convert the table")
    import csv

    with open(table, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:  # integers stay integers (labels, concepts)
        for k, v in row.items():
            if isinstance(v, str) and v.lstrip("-").isdigit():
                row[k] = int(v)
    return rows


def image_table(
    table: str | Path,
    images: str | Path | None = None,
    *,
    tokenize: Callable[[list[str]], Tensor] | None = None,
    image: str = "image",
    text: str | None = "caption",
    label: str = "label",
    concepts: Sequence[str] = (),
    class_names: Sequence[str] | None = None,
    transform: Callable[[Any], Tensor] | None = None,
    image_size: int = 224,
    name: str | None = None,
    batch_size: int = 64,
    workers: int = 0,
) -> StreamedSampleSet:
    """A folder of images and a CSV or Parquet table, one row per sample: the image's file (in
    column `image`, relative to `images`, default the table's folder), the caption (`text`,
    turned into ids by `tokenize`: captions -> (B, L) ids of one length), the label (a class
    index or name) and integer concept columns. Images are read as RGB and turned into tensors by
    `transform` (default: resized to `image_size`, values in [0, 1]); for a Hugging Face model,
    `mmdiag.pipeline.hf.hf_readers(adapter)` gives its processor's transform and tokenizer.
    With `workers`, loader processes read the rows (the tokenize function must then pickle: a
    module-level function, not a lambda)."""
    table = Path(table)
    rows = _read_table(table)
    folder = Path(images) if images is not None else table.parent
    columns = list(rows[0]) if rows else [image, label, *([text] if text else []), *concepts]
    labels = lambda: [r.get(label) for r in rows]  # noqa: E731
    source, names = _rows_source(
        rows.__getitem__,
        len(rows),
        columns,
        table.name,
        labels,
        _ImageFile(folder),
        tokenize=tokenize,
        image=image,
        text=text,
        label=label,
        concepts=concepts,
        class_names=class_names,
        transform=transform,
        image_size=image_size,
    )
    return streamed(source, class_names=names, name=name or table.stem, batch_size=batch_size, workers=workers)


def _rows_source(get, n, columns, where, labels, load_image, *, tokenize, image, text, label, concepts, class_names, transform, image_size):
    """What image_table and hf_dataset share: the column checks, the classes, the row reader."""
    if text and tokenize is None:
        raise MmdiagError(f"data: the text column {text!r} needs a tokenize function (captions -> ids); pass tokenize= or text=None")
    missing = [c for c in [image, label, *([text] if text else []), *concepts] if c not in columns]
    if missing:
        raise MmdiagError(f"data: {where} has no column {missing[0]!r}; its columns are {', '.join(columns)}")
    classes, names = _classes(labels(), class_names)
    source = _Rows(get, n, image=image, text=text, label=label, concepts=concepts, tokenize=tokenize, transform=transform or Resized(image_size), load_image=load_image, classes=classes)
    return source, names


def hf_dataset(
    ds,
    *,
    tokenize: Callable[[list[str]], Tensor] | None = None,
    image: str = "image",
    text: str | None = "caption",
    label: str = "label",
    concepts: Sequence[str] = (),
    class_names: Sequence[str] | None = None,
    transform: Callable[[Any], Tensor] | None = None,
    image_size: int = 224,
    name: str | None = None,
    batch_size: int = 64,
    workers: int = 0,
) -> StreamedSampleSet:
    """A Hugging Face `datasets.Dataset` (e.g. `load_from_disk(path)` or `load_dataset(...)` from
    a local cache): rows are read from its Arrow files as the stages ask for them. The columns
    are named as for `image_table`; an image column holds PIL images (the `Image` feature) or
    file paths; a `ClassLabel` label gives the class names."""
    columns = list(getattr(ds, "column_names", []))
    if not columns or not hasattr(ds, "__getitem__"):
        raise MmdiagError(f"data: expected a datasets.Dataset, got {type(ds).__name__}")
    feature = ds.features.get(label) if label in columns else None
    if class_names is None and hasattr(feature, "names"):
        class_names = feature.names
    # the labels: one Arrow column, no image decoded
    source, names = _rows_source(
        ds.__getitem__,
        len(ds),
        columns,
        "the dataset",
        lambda: ds[label],
        _hf_image,
        tokenize=tokenize,
        image=image,
        text=text,
        label=label,
        concepts=concepts,
        class_names=class_names,
        transform=transform,
        image_size=image_size,
    )
    return streamed(source, class_names=names, name=name or "hf-dataset", batch_size=batch_size, workers=workers)


# --- mmdiag's own shards: a SampleSet saved to disk in blocks of rows ------------------------


def save_shards(data: SampleSet, folder: str | Path, rows_per_shard: int = 1000, start: int = 0, index: bool = True) -> Path:
    """Write `data` as shard files (safetensors of its large columns + JSON of the rest, a block
    of rows each), numbered from shard `start`; `index` writes the index that `shards` reads
    (write a large set a part at a time with index=False, the last part with index=True)."""
    import json

    from safetensors.torch import save_file

    from mmdiag.pipeline.store import atomic_write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for k, lo in enumerate(range(0, len(data), rows_per_shard)):
        part = data.subset(torch.arange(lo, min(lo + rows_per_shard, len(data))))
        name = folder / f"shard-{start + k:05d}"
        tensors = {key: t.contiguous() for key, t in part.large().items()}
        atomic_write(name.with_suffix(".safetensors"), lambda tmp: save_file(tensors, str(tmp)))
        small = {
            "ids": part.ids.tolist(),
            "labels": part.labels.tolist(),
            "meta": {k: v.tolist() for k, v in part.meta.items()},
            "display": part.display,
            "counterfactuals": {c: {"labels": None if cf.labels is None else cf.labels.tolist(), "valid": None if cf.valid is None else cf.valid.tolist()} for c, cf in part.counterfactuals.items()},
        }
        atomic_write(name.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(small)))
    if index:
        described = {"name": data.name, "class_names": data.class_names, "truth_concepts": data.truth_concepts, "class_concepts": data.class_concepts}
        atomic_write(folder / "index.json", lambda tmp: tmp.write_text(json.dumps(described)))
    return folder


class ShardFolder(torch.utils.data.Dataset):
    """The samples of a shard folder, one at a time, each read from its memory-mapped file."""

    def __init__(self, folder: str | Path):
        import json

        self.folder = Path(folder)
        if not (self.folder / "index.json").is_file():
            raise MmdiagError(f"data: {self.folder} holds no index.json; write the folder with pipeline.sources.save_shards")
        self.described = json.loads((self.folder / "index.json").read_text())
        self.names = sorted(p.with_suffix("") for p in self.folder.glob("shard-*.json"))
        self.small = [json.loads(p.with_suffix(".json").read_text()) for p in self.names]
        self.starts = [0]
        for s in self.small:
            self.starts.append(self.starts[-1] + len(s["labels"]))
        self._open: dict[int, Any] = {}

    def __getstate__(self):
        return {**self.__dict__, "_open": {}}  # file handles stay in the process that opened them

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> dict:
        import bisect

        from safetensors import safe_open

        k = bisect.bisect_right(self.starts, i) - 1
        at, small = i - self.starts[k], self.small[k]
        if k not in self._open:  # one shard mapped at a time: the pages of those read before are let go
            self._open = {k: safe_open(str(self.names[k].with_suffix(".safetensors")), framework="pt")}
        f = self._open[k]
        item: dict = {
            "id": small["ids"][at],
            "label": small["labels"][at],
            "meta": {c: v[at] for c, v in small["meta"].items()},
            "display": {d: v[at] for d, v in small["display"].items()},
            "inputs": {},
            "truth": {},
        }
        flipped: dict = {}
        for key in f.keys():
            part, *path = key.split(".")
            row = f.get_slice(key)[at : at + 1][0]
            if part == "inputs":
                item["inputs"][path[0]] = row
            elif part == "truth":
                item["truth"].setdefault(path[0], {})[path[1]] = row
            else:
                flipped.setdefault(path[0], {})[path[1]] = row
        for c, cf in small["counterfactuals"].items():
            if cf["valid"] is None or cf["valid"][at]:
                item.setdefault("counterfactuals", {})[c] = {"inputs": flipped[c], **({} if cf["labels"] is None else {"label": cf["labels"][at]})}
        return item


def shards(folder: str | Path, batch_size: int = 64, workers: int = 0) -> StreamedSampleSet:
    """A shard folder (save_shards) as a streamed sample set."""
    source = ShardFolder(folder)
    d = source.described
    return streamed(source, class_names=d["class_names"], name=d["name"], truth_concepts=d["truth_concepts"], class_concepts=d["class_concepts"], batch_size=batch_size, workers=workers)
