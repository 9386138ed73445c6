"""Samples, stored column-wise so that a batch is a slice and not a Python loop.

Sample `i` is the dict
    {"id", "inputs": {modality: raw tensor}, "label",
     "meta": {concept: value}, "truth": {modality: {region: mask}}, "display": {...}}
where `meta` holds named concepts (for probing and slicing; -1 = unknown), `truth` holds
ground-truth relevance masks over each modality's own grid (pixels, token positions), and
`display` what the report shows (token strings; images are shown from the inputs).

Links the diagnosis needs are declared, never guessed: `truth_concepts` says which concept a
truth region shows ({modality: {region: concept}}; a region named like a concept is linked to
it), `class_concepts` which concepts take class values (value k points to class k), and
`counterfactuals` holds, per concept, the inputs with that concept flipped (and, where known,
the label the flipped sample has).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mmdiag.pipeline.errors import MmdiagError
from mmdiag.pipeline.store import ContentHash


@dataclass
class Counterfactual:
    """The samples with one concept flipped: the raw inputs of the modalities that change
    (all rows), the labels the flipped samples have (None: unknown) and which rows have a
    counterfactual at all (None: every row). `null`: the same rows changed as much at random,
    one set of inputs per draw (a flip that no more than a typical change of its size does is
    no evidence; None: no null)."""

    inputs: dict[str, Tensor]
    labels: Tensor | None = None
    valid: Tensor | None = None
    null: list[dict[str, Tensor]] | None = None

    def subset(self, index: Tensor) -> Counterfactual:
        return Counterfactual(
            {m: x[index] for m, x in self.inputs.items()},
            None if self.labels is None else self.labels[index],
            None if self.valid is None else self.valid[index],
            None if self.null is None else [{m: x[index] for m, x in draw.items()} for draw in self.null],
        )


class Derived:
    """A column computed on read from the set's own rows (what mmdiag found: a place as a mask, a
    transform of the images), so that nothing it adds is held in memory beside the data and a
    streamed set stays streamed. Indexed like a tensor: `compute(rows)` gets positions in the set
    it was made for."""

    def __init__(self, rows: Tensor, row_shape: tuple[int, ...], dtype: torch.dtype, compute):
        self.rows, self.row_shape, self.dtype, self.compute = rows, tuple(row_shape), dtype, compute

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.row_shape))

    def dim(self) -> int:
        return 1 + len(self.row_shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def view(self, index: Tensor) -> Derived:
        return Derived(self.rows[torch.as_tensor(index)], self.row_shape, self.dtype, self.compute)

    def __getitem__(self, index) -> Tensor:
        if isinstance(index, int) or (torch.is_tensor(index) and index.dim() == 0):
            return self[torch.as_tensor([int(index)])][0]
        rows = self.rows[index] if isinstance(index, slice) else self.rows[torch.as_tensor(index)]
        return self.compute(rows)


_INTEGER = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _describe(x) -> str:
    if torch.is_tensor(x):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__}" + (f" of length {len(x)}" if hasattr(x, "__len__") else "")


@dataclass
class SampleSet(torch.utils.data.Dataset):
    inputs: dict[str, Tensor]
    labels: Tensor
    meta: dict[str, Tensor] = field(default_factory=dict)
    truth: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    display: dict[str, list] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    ids: Tensor | None = None
    name: str = "data"
    truth_concepts: dict[str, dict[str, str]] = field(default_factory=dict)
    class_concepts: list[str] | None = None  # None: not declared
    counterfactuals: dict[str, Counterfactual] = field(default_factory=dict)
    # concepts that mmdiag found rather than the user annotated (pipeline.discovery): {concept: feature record}
    found: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self):
        if self.ids is None:
            self.ids = torch.arange(len(self.labels))
        self.validate()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        """Sample `i` as a dict: what a streamed source's items look like (pipeline.sources)."""
        flipped = {
            c: {"inputs": {m: x[i] for m, x in cf.inputs.items()}, **({} if cf.labels is None else {"label": int(cf.labels[i])})}
            for c, cf in self.counterfactuals.items()
            if cf.valid is None or bool(cf.valid[i])
        }
        return {
            "id": int(self.ids[i]),
            "inputs": {m: x[i] for m, x in self.inputs.items()},
            "label": int(self.labels[i]),
            "meta": {k: int(v[i]) for k, v in self.meta.items()},
            "truth": {m: {r: t[i] for r, t in regions.items()} for m, regions in self.truth.items()},
            "display": {k: v[i] for k, v in self.display.items()},
            **({"counterfactuals": flipped} if flipped else {}),
        }

    def validate(self) -> None:
        if not torch.is_tensor(self.labels) or self.labels.dim() != 1:
            raise MmdiagError(f"data ({self.name}): labels must be a 1-D tensor of class indices; got {_describe(self.labels)}")
        if self.labels.dtype not in _INTEGER:
            raise MmdiagError(f"data ({self.name}): labels must be integer class indices, got {self.labels.dtype}; use labels.long()")
        n = len(self.labels)
        if n == 0:
            raise MmdiagError(f"data ({self.name}): the data set is empty")
        if not self.inputs:
            raise MmdiagError(f"data ({self.name}): samples have no inputs")
        self._validate_columns(n)
        for k, v in self.meta.items():
            if not torch.is_tensor(v) or v.dim() != 1 or v.dtype not in _INTEGER:
                raise MmdiagError(f"data ({self.name}): meta.{k} must be a 1-D integer tensor (a concept's value per sample, -1 unknown); got {_describe(v)}; use .long()")
            if len(v) != n:
                raise MmdiagError(f"data ({self.name}): meta.{k} has {len(v)} values for {n} samples")
        for k, v in self.display.items():
            if not isinstance(v, (list, tuple)) or len(v) != n:
                raise MmdiagError(f"data ({self.name}): display.{k} must be a list with one entry per sample ({n}); got {_describe(v)}")
        if not isinstance(self.class_names, list) or not all(isinstance(c, str) for c in self.class_names):
            raise MmdiagError(f"data ({self.name}): class_names must be a list of strings")
        n_classes = len(self.class_names)
        if n_classes and (self.labels.min() < 0 or self.labels.max() >= n_classes):
            raise MmdiagError(f"data ({self.name}): labels must lie in 0..{n_classes - 1} (class_names)")
        self._validate_links(n)

    def _validate_columns(self, n: int) -> None:
        """The large tensors: inputs and truth masks (a streamed set checks them as it reads)."""
        for m, x in self.inputs.items():
            if not torch.is_tensor(x) or x.dim() < 2:
                raise MmdiagError(f"data ({self.name}): inputs.{m} must be a tensor with a batch axis and at least one more (N, ...); got {_describe(x)}")
        for m, x in self.inputs.items():
            if len(x) != n:
                raise MmdiagError(f"data ({self.name}): inputs.{m} has {len(x)} rows for {n} labels")
            if x.is_floating_point() and not torch.isfinite(x).all():
                bad = int((~torch.isfinite(x)).reshape(n, -1).any(1).nonzero()[0])
                raise MmdiagError(f"data ({self.name}): inputs.{m} of sample {bad} holds NaN or inf; clean the data")
        for m, regions in self.truth.items():
            for r, t in regions.items():
                if not (torch.is_tensor(t) or isinstance(t, Derived)) or t.dim() < 2:
                    raise MmdiagError(f"data ({self.name}): truth.{m}.{r} must be a tensor of masks (N, ...) over the input's grid; got {_describe(t)}")
                if len(t) != n:
                    raise MmdiagError(f"data ({self.name}): truth.{m}.{r} has {len(t)} masks for {n} samples")

    def _validate_links(self, n: int) -> None:
        where = f"data ({self.name})"
        for m, regions in self.truth_concepts.items():
            for r, c in regions.items():
                if r not in self.truth.get(m, {}):
                    raise MmdiagError(f"{where}: truth_concepts.{m}.{r} names no truth region; add truth[{m!r}][{r!r}] or drop the link")
                if c not in self.meta:
                    raise MmdiagError(f"{where}: truth_concepts.{m}.{r} links to {c!r}, which is not a meta concept; add meta[{c!r}] or fix the name")
        n_classes = len(self.class_names) or int(self.labels.max()) + 1
        for c in self.class_concepts or ():
            if c not in self.meta:
                raise MmdiagError(f"{where}: class_concepts names {c!r}, which is not a meta concept; add it to meta or drop it")
            if int(self.meta[c].max()) >= n_classes or int(self.meta[c].min()) < -1:
                raise MmdiagError(f"{where}: class_concepts: {c!r} takes values outside -1..{n_classes - 1}; a class concept's value is a class index (-1 unknown)")
        for c, cf in self.counterfactuals.items():
            if c not in self.meta:
                raise MmdiagError(f"{where}: counterfactuals.{c} is not a meta concept; name the concept the counterfactual flips")
            for part, given in (("inputs", cf.inputs), *((f"null[{k}]", draw) for k, draw in enumerate(cf.null or ()))):
                for m, x in given.items():
                    if m not in self.inputs:
                        raise MmdiagError(f"{where}: counterfactuals.{c}.{part}.{m} is not an input modality ({', '.join(self.inputs)})")
                    if len(x) != n or x.shape[1:] != self.inputs[m].shape[1:] or x.dtype != self.inputs[m].dtype:
                        raise MmdiagError(f"{where}: counterfactuals.{c}.{part}.{m} must match inputs.{m} in rows, shape and dtype; got {tuple(x.shape)} {x.dtype}")
            for part in ("labels", "valid"):
                v = getattr(cf, part)
                if v is not None and len(v) != n:
                    raise MmdiagError(f"{where}: counterfactuals.{c}.{part} has {len(v)} values for {n} samples")

    def class_valued(self) -> list[str] | None:
        """The concepts whose values point to classes: as declared, or, undeclared in a
        two-class task, its binary concepts; None in a larger task that declares none. A
        discovered concept (`found`) points to the class it pushes towards, always."""
        found = [c for c in self.found if c in self.meta]
        if self.class_concepts is not None:
            return list(dict.fromkeys([*self.class_concepts, *found]))
        if max(len(self.class_names), int(self.labels.max()) + 1) != 2:
            return found or None
        return [c for c, v in self.meta.items() if c in found or set(v[v >= 0].unique().tolist()) == {0, 1}]

    def concept_of(self, modality: str, region: str) -> str | None:
        """The concept a truth region shows: declared in `truth_concepts`, or the concept of the
        same name."""
        declared = self.truth_concepts.get(modality, {}).get(region)
        return declared or (region if region in self.meta else None)

    def subset(self, index: Tensor) -> SampleSet:
        index = torch.as_tensor(index, dtype=torch.long)
        rows = index.tolist()
        return SampleSet(
            inputs={m: x[index] for m, x in self.inputs.items()},
            labels=self.labels[index],
            meta={k: v[index] for k, v in self.meta.items()},
            truth={m: {r: t[index] for r, t in regions.items()} for m, regions in self.truth.items()},
            display={k: [v[i] for i in rows] for k, v in self.display.items()},
            class_names=self.class_names,
            ids=self.ids[index],
            name=self.name,
            truth_concepts=self.truth_concepts,
            class_concepts=self.class_concepts,
            counterfactuals={c: cf.subset(index) for c, cf in self.counterfactuals.items()},
            found=self.found,
        )

    def view(self, index: Tensor) -> SampleSet:
        """The samples at `index`, without reading them yet where the data is streamed (a
        shard of a stage); in memory the same as `subset`."""
        return self.subset(index)

    def batches(self, batch_size: int, device: torch.device | str = "cpu") -> Iterator[tuple[slice, dict[str, Tensor]]]:
        for start in range(0, len(self), batch_size):
            rows = slice(start, min(start + batch_size, len(self)))
            yield rows, {m: x[rows].to(device) for m, x in self.inputs.items()}

    def large(self) -> dict[str, Tensor]:
        """The columns that grow with the data (a streamed set hashes them as it reads); a
        Derived column is a function of these and of what `found` records, and is left out."""
        named = {f"inputs.{m}": x for m, x in self.inputs.items()}
        named.update({f"truth.{m}.{r}": t for m, regions in self.truth.items() for r, t in regions.items()})
        named.update({f"counterfactuals.{c}.{m}": x for c, cf in self.counterfactuals.items() for m, x in cf.inputs.items()})
        return {k: v for k, v in named.items() if not isinstance(v, Derived)}

    def fingerprint(self) -> str:
        """Content hash of everything a stage may read: inputs, labels, ids, concepts, truth
        masks, counterfactuals, and the names, links and display strings: a fixed concept label
        or mask recomputes what reads it. Computed once per set (a set is never changed in place)."""
        if "_content" not in self.__dict__:
            h = ContentHash()
            for name, t in self.large().items():
                h.update(name, t)
            self.__dict__["_content"] = self._fingerprint(h)
        return self.__dict__["_content"]

    def _fingerprint(self, h: ContentHash) -> str:
        """The fingerprint from a hash already fed with the large columns."""
        import hashlib
        import json

        small = {f"meta.{k}": v for k, v in self.meta.items()}
        for c, cf in self.counterfactuals.items():
            small.update({f"counterfactuals.{c}.{p}": getattr(cf, p) for p in ("labels", "valid") if getattr(cf, p) is not None})
        for name, t in {**small, "labels": self.labels, "ids": self.ids}.items():
            h.update(name, t)
        described = json.dumps([self.class_names, self.display, self.truth_concepts, self.class_concepts, *([self.found] if self.found else [])], sort_keys=True, default=str)
        return hashlib.sha256((h.hexdigest() + described).encode("utf-8", "surrogatepass")).hexdigest()[:16]
