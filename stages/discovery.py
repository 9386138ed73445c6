"""Discovery: the words, image places and image-wide properties a model follows, found with no
annotations.

A user brings inputs, labels and class names. Candidates come from the data, through the
adapter's own units, per modality (one record per kind in `KINDS`):

- `word`: every word type (a unit's label: whole words where the adapter groups subword pieces)
  in at least `min_samples` samples. Removed by deleting it with the gap closed: where the
  adapter's own removal is a deletion (`Units.deletes`: the generative VLMs), through it;
  otherwise the words after it move up and the sequence ends in the removed-token baseline, e.g.
  padding (what the model saw when a caption was a word shorter). The null deletes as many other
  words of the same sample, drawn at random.
- `region`: every cell of an image's unit grid and every 2x2 block of cells (a shortcut at a
  place is found whatever the patch size). Its carriers are the samples whose pixels there
  stand out from the rest of their image (robust z > `content_z` in some channel, the scale
  that of every place of every image: a mark on half the images stands out all the same); removed
  as every perturbation method removes units (`Units.apply`); the null removes another place of
  the same shape in the same sample whose content deviates as much (one of the 3 nearest).
- `group`: each feature group of each vector modality (`FeatureGroups`: a table's columns, a
  signal's bands), on the half of the samples where its values are highest and, as another
  candidate, where they are lowest (a group pushes one way or the other with its value); removed
  as units are (`Units.apply`); the null removes another group of as many features in the same
  sample, drawn at random.
- `segment`: objects rather than places: each image cut into SLIC superpixels (scikit-image,
  `slic_zero`: its compactness adapts to each superpixel), the superpixels of all images grouped
  by their mean colour (k-means, `segment_groups`); a group's carriers are the images with one
  of its superpixels. Removed by giving those pixels the unit baseline; the null gives as many
  pixels of other superpixels of the same image (drawn at random, whole superpixels) the same.
- `transform`: a fixed battery over each image modality (`TRANSFORMS`: grayscale, hue rotation,
  each channel's shift, brightness, contrast, blur), each removing one property from the whole
  image, on the half of the samples where that property is strongest (or weakest); the null is
  a colour change in a random direction, as large (L2) as the transform's.

For each candidate, on its carriers: the prediction flips when it is removed and when its null
is; a one-sided sign test on the discordant pairs; Benjamini-Hochberg over all candidates. The
class it pushes towards is the class whose centred logit drops most when it is removed,
averaged over its carriers. The stage takes on the reliable features that no annotation already
names (`settle`), and `extend` turns each into a concept (its push class on its carriers,
unknown elsewhere) with a truth region (or, for a transform, a counterfactual with `null_draws`
draws of its null) linked to it: every later stage and rule treats it as an annotated concept.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from pydantic import Field
from scipy.stats import binomtest, false_discovery_control
from torch import Tensor

from mmdiag.pipeline.adapter import ModelAdapter
from mmdiag.pipeline.data import Counterfactual, Derived, SampleSet
from mmdiag.pipeline.errors import MmdiagError
from mmdiag.pipeline.units import Units, superpixels
from mmdiag.stages import priors, summaries
from mmdiag.stages.base import Context, Stage, StageConfig, StageResult
from mmdiag.stages.intervention import null_scores


class DiscoveryConfig(StageConfig):
    # of KINDS; `segment` on request: where objects matter more than places (it splits a
    # coloured object into several groups that compete with the places and transforms)
    kinds: list[str] = Field(default_factory=lambda: ["word", "region", "group", "transform"])
    segments: int = Field(default=16, gt=1)  # SLIC superpixels per image (about)
    segment_groups: int = Field(default=8, gt=1)  # appearance groups of the superpixels of all images
    min_samples: int = Field(default=20, gt=0)  # carriers a candidate needs to be tested
    max_words: int = Field(default=300, gt=0)  # the most frequent word types, per modality
    content_z: float = Field(default=3.0, gt=0)  # how far a place's pixels stand out on a carrier
    fdr: float = Field(default=0.05, gt=0, lt=1)  # Benjamini-Hochberg, over all candidates
    batch_size: int = Field(default=256, gt=0)  # samples read together
    eval_batch: int = Field(default=256, gt=0)  # model inputs per forward pass
    null_draws: int = Field(default=6, gt=0)  # random casts per carrier beside a found transform, for the per-error test
    swap_draws: int = Field(default=4, ge=0)  # other samples' inputs per sample and modality, for the priors (0: none)


@dataclass
class Feature:
    """A candidate: where it is, on which samples, and what removing it does."""

    id: str  # the concept name it takes: "word:photo", "region:0,0,4,4", "group:tone:high"
    modality: str
    kind: str
    carriers: np.ndarray  # (N,) bool
    word: str | None = None
    box: list[int] | None = None  # [x0, y0, x1, y1] in the input's pixels, x right, y down, end exclusive
    slots: tuple[int, ...] = ()  # a region's unit slots
    grid: Grid | None = None  # a region's places and their content, for its null
    mask: Tensor | None = None  # a word's token positions (N, L)
    transform: str | None = None  # a transform's name in TRANSFORMS
    group: str | None = None  # a feature group's name; `side`: the half of the samples it is on
    side: str | None = None
    layout: Tensor | None = None  # a group's features (F,) bool
    segmentation: Segmentation | None = None  # a segment group's superpixels, for every image
    cluster: int | None = None  # its appearance group
    colour: list[float] | None = None  # the group's mean colour (the input's channel values)
    scale: list[float] | None = None  # a transform's scale per channel
    stats: dict = field(default_factory=dict)

    def record(self) -> dict:
        """The schema a suggestion and a card carry (`feature`)."""
        out = {"id": self.id, "modality": self.modality, "kind": self.kind, "found": True}
        out.update({k: v for k, v in (("word", self.word), ("box", self.box), ("group", self.group), ("side", self.side), ("colour", self.colour), ("transform", self.transform)) if v is not None})
        return out


@dataclass
class Discovery:
    features: list[Feature]  # every candidate tested, in the order found
    n: int
    forward_passes: int
    swaps: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> each sample's dependence on it (stages/priors.py)
    slices: list[dict] = field(default_factory=list)  # every word slice tested for a prior

    @property
    def reliable(self) -> list[Feature]:
        """The candidates whose removal flips more predictions than their null, at the FDR."""
        return [f for f in self.features if f.stats.get("reliable")]

    def summary(self, fdr: float) -> dict:
        return {
            "n": self.n,
            "fdr": fdr,
            "candidates": len(self.features),
            "reliable": [{**f.record(), **f.stats} for f in sorted(self.reliable, key=lambda f: -f.stats["flip_effect"])],
            "priors": sorted((s for s in self.slices if s["prior"]), key=lambda s: (-s["errors_explained"], s["q_value"])),
            "slices_tested": len(self.slices),
            "forward_passes_per_sample": round(self.forward_passes / max(self.n, 1), 1),
        }


# ---------------------------------------------------------------- removal


def close_gaps(x: Tensor, slots: Tensor, removed: Tensor, baseline: Tensor) -> Tensor:
    """Token sequences (K, L, D) with the tokens whose slot (K, L) is `removed` (K, L) deleted:
    the rest move up in order and the freed positions at the end take `baseline` (K, L, D)."""
    gone = removed.gather(1, slots.clamp_min(0)) & (slots >= 0)
    order = torch.sort(gone.to(torch.int8), dim=1, stable=True).indices  # kept first, in order
    out = x.gather(1, order[..., None].expand_as(x))
    tail = torch.arange(x.shape[1], device=x.device) >= x.shape[1] - gone.sum(1, keepdim=True)
    return torch.where(tail[..., None], baseline, out)


def is_sequence(units: Units, encoded: Tensor) -> bool:
    return encoded.dim() == 3 and tuple(units.mask.shape[:2]) == tuple(encoded.shape[:2])


# ---------------------------------------------------------------- candidates


@dataclass
class Batch:
    rows: slice
    inputs: dict[str, Tensor]
    encoded: dict[str, Tensor]
    units: dict[str, Units]


def _words(units: Units) -> list[set[str]]:
    present = units.present.cpu()
    return [{labels[s] for s in range(units.n) if present[i, s]} for i, labels in enumerate(units.labels)]


def word_candidates(batches: Callable[[], Iterator[Batch]], n: int, config: DiscoveryConfig) -> list[Feature]:
    """Each word type of each token-sequence modality in enough samples (not in all: a word
    every sample has cannot tell one class from another), the most frequent first."""
    positions: dict[tuple[str, str], Tensor] = {}  # the word's token positions (N, L)
    for b in batches():
        for m, units in b.units.items():
            if not is_sequence(units, b.encoded[m]):
                continue
            slots = units.mask[..., 0].cpu()
            present = units.present.cpu()
            for i, words in enumerate(_words(units)):
                for w in words:
                    at = positions.setdefault((m, w), torch.zeros(n, slots.shape[1], dtype=torch.bool))
                    own = torch.tensor([lab == w for lab in units.labels[i]]) & present[i]
                    at[b.rows.start + i] = own[slots[i].clamp_min(0)] & (slots[i] >= 0)
    out = []
    for m in dict.fromkeys(m for m, _ in positions):
        counts = {w: int(at.any(1).sum()) for (mm, w), at in positions.items() if mm == m}
        ranked = sorted((w for w, k in counts.items() if config.min_samples <= k < n), key=lambda w: (-counts[w], w))
        out += [Feature(f"word:{w}", m, "word", positions[m, w].any(1).numpy(), word=w, mask=positions[m, w]) for w in ranked[: config.max_words]]
    return out


def _cells(units: Units) -> tuple[list[list[int]], list[tuple[int, ...]]] | None:
    """A grid modality's cells (one unit slot each) with their pixel boxes, and the candidate
    places: each cell and each 2x2 block of adjacent cells."""
    mask = units.mask[0, 0] if units.mask.dim() == 4 else None
    if mask is None or units.mask.shape[1] != 1:
        return None
    boxes = []
    for s in range(units.n):
        ys, xs = (mask == s).nonzero(as_tuple=True)
        if not len(ys):
            return None
        boxes.append([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1])
    at = {(b[1], b[0]): s for s, b in enumerate(boxes)}
    places = [(s,) for s in range(units.n)]
    for s, (x0, y0, x1, y1) in enumerate(boxes):
        right, below, diagonal = at.get((y0, x1)), at.get((y1, x0)), at.get((y1, x1))
        if None not in (right, below, diagonal):
            places.append((s, right, below, diagonal))
    return boxes, places


@dataclass
class Grid:
    places: list[tuple[int, ...]]  # each place's unit slots
    z: Tensor  # (N, P): how far each sample's pixels at each place stand out from the place's typical content


def _content(x: Tensor, units: Units, places: list[tuple[int, ...]]) -> Tensor:
    """Mean of each channel over each place's pixels: (B, P, C)."""
    onehot = torch.nn.functional.one_hot(units.mask[0, 0].clamp_min(0), units.n).permute(2, 0, 1).to(x.dtype)
    cells = torch.einsum("bchw,nhw->bnc", x, onehot) / onehot.sum((1, 2))[None, :, None]
    return torch.stack([cells[:, list(s)].mean(1) for s in places], 1)


def _disjoint(places: list[tuple[int, ...]], slots: tuple[int, ...]) -> list[int]:
    """The places of the same size as `slots` that share no unit with it: its null's choices."""
    return [p for p, s in enumerate(places) if len(s) == len(slots) and not set(s) & set(slots)]


def region_candidates(batches: Callable[[], Iterator[Batch]], n: int, config: DiscoveryConfig) -> list[Feature]:
    grids: dict[str, tuple] = {}
    deviation: dict[str, list[Tensor]] = {}
    for b in batches():
        for m, units in b.units.items():
            if m not in grids:
                if b.encoded[m].dim() != 4 or (found := _cells(units)) is None:
                    continue
                grids[m] = found
            x = b.encoded[m].float()
            # a place's content against its own image's (a mark on half the images still stands out)
            background = x.flatten(2).median(2).values
            deviation.setdefault(m, []).append((_content(x, units, grids[m][1]) - background[:, None]).cpu())
    out = []
    for m, (boxes, places) in grids.items():
        d = torch.cat(deviation[m])  # (N, P, C)
        spread = 1.4826 * d.abs().flatten(0, 1).median(0).values  # per channel, over every place of every image
        grid = Grid(places, (d / spread.clamp_min(1e-6)).abs().amax(-1))  # (N, P)
        for p, slots in enumerate(places):
            carriers = (grid.z[:, p] > config.content_z).numpy()
            if not config.min_samples <= carriers.sum() < n or not _disjoint(places, slots):  # no null place: untestable
                continue
            box = [min(boxes[s][0] for s in slots), min(boxes[s][1] for s in slots), max(boxes[s][2] for s in slots), max(boxes[s][3] for s in slots)]
            out.append(Feature(f"region:{','.join(map(str, box))}", m, "region", carriers, box=box, slots=slots, grid=grid))
    return out


def _groups(units: Units, x: Tensor) -> bool:
    """A vector modality split into the same groups in every sample (FeatureGroups)."""
    return x.dim() == 2 and x.is_floating_point() and tuple(units.mask.shape) == tuple(x.shape) and bool((units.mask == units.mask[:1]).all())


def group_candidates(batches: Callable[[], Iterator[Batch]], n: int, config: DiscoveryConfig) -> list[Feature]:
    """Each feature group on the half of the samples where its mean value (less its removed
    value) is highest, and on the half where it is lowest; a group with no other of its size
    has no null and is not tested."""
    values: dict[str, list[Tensor]] = {}
    layouts: dict[str, tuple[Tensor, list[str]]] = {}
    for b in batches():
        for m, units in b.units.items():
            x = b.encoded[m]
            if not _groups(units, x):
                continue
            onehot = torch.nn.functional.one_hot(units.mask[0].clamp_min(0), units.n).T.to(x.dtype) * (units.mask[0] >= 0)
            values.setdefault(m, []).append((((x - units.baseline) @ onehot.T) / onehot.sum(1).clamp_min(1)).cpu())
            layouts[m] = (onehot.bool().cpu(), units.labels[0])
    out = []
    for m, (onehot, names) in layouts.items():
        v = torch.cat(values[m])  # (N, G)
        sizes = onehot.sum(1)
        for g in range(onehot.shape[0]):
            if int((sizes == sizes[g]).sum()) < 2:
                continue
            middle = v[:, g].median()
            for side, carriers in (("high", v[:, g] > middle), ("low", v[:, g] < middle)):
                carriers = carriers.numpy()
                if config.min_samples <= carriers.sum() < n:
                    out.append(Feature(f"group:{names[g]}:{side}", m, "group", carriers, group=names[g], side=side, slots=(g,), layout=onehot[g]))
    return out


@dataclass
class Segmentation:
    """Every image's SLIC superpixels (N, H, W) and each superpixel's appearance group (N, S);
    -1 where an image has fewer superpixels. Recomputed on read where it is not kept (`extend`)."""

    labels: Tensor
    groups: Tensor
    centres: np.ndarray  # (K, C) mean colour of each group

    def mask(self, rows: Tensor, cluster: int) -> Tensor:
        """(len(rows), H, W) bool: the pixels of the group's superpixels."""
        labels, groups = self.labels[rows].long(), self.groups[rows].long()
        return groups.gather(1, labels.flatten(1)).view(labels.shape) == cluster


def _segment_colours(x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Mean colour (B, S, C) and pixel count (B, S) of each superpixel."""
    n = int(labels.max()) + 1
    onehot = torch.nn.functional.one_hot(labels.long(), n).permute(0, 3, 1, 2).float()  # (B, S, H, W)
    size = onehot.sum((2, 3))
    return torch.einsum("bchw,bshw->bsc", x.float().cpu(), onehot) / size.clamp_min(1)[..., None], size


def _assign(colours: Tensor, sizes: Tensor, centres: np.ndarray) -> Tensor:
    """Each superpixel's nearest group centre (B, S); -1 for an absent superpixel."""
    d = torch.cdist(colours, torch.from_numpy(centres).float()[None].expand(len(colours), -1, -1))
    return torch.where(sizes > 0, d.argmin(-1), torch.full_like(sizes, -1, dtype=torch.long)).to(torch.int16)


def segment_candidates(batches: Callable[[], Iterator[Batch]], n: int, config: DiscoveryConfig) -> list[Feature]:
    """Each appearance group of the superpixels of each image modality, on the images that have
    one of its superpixels (not on all: a group every image has cannot tell one from another)."""
    from scipy.cluster.vq import kmeans2

    labels: dict[str, list[Tensor]] = {}
    colours: dict[str, list[tuple[Tensor, Tensor]]] = {}
    for b in batches():
        for m, x in b.encoded.items():
            if x.dim() != 4 or not x.is_floating_point():
                continue
            sp = superpixels(x, config.segments)
            labels.setdefault(m, []).append(sp)
            colours.setdefault(m, []).append(_segment_colours(x, sp))
    out = []
    for m in labels:
        width = max(c.shape[1] for c, _ in colours[m])
        pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[1]) if t.dim() == 3 else (0, width - t.shape[1]))  # noqa: E731
        colour, size = torch.cat([pad(c) for c, _ in colours[m]]), torch.cat([pad(s) for _, s in colours[m]])
        present = (size > 0).numpy()
        k = min(config.segment_groups, int(present.sum()))
        centres, _ = kmeans2(colour.numpy()[present].astype(np.float64), k, rng=0, minit="++")
        seg = Segmentation(torch.cat(labels[m]), _assign(colour, size, centres), centres)
        for c in range(k):
            carriers = (seg.groups == c).any(1).numpy()
            if config.min_samples <= carriers.sum() < n:
                out.append(Feature(f"segment:{c}", m, "segment", carriers, segmentation=seg, cluster=c, colour=[round(float(v), 3) for v in centres[c]]))
    return out


# Image-wide properties: a fixed battery of transforms, each removing one property from the
# whole image. `statistic` measures that property per image; its carriers are the half of the
# samples where it is strongest (`high`) or weakest. A shift moves a carrier's colour to the
# other half's: by the difference of the two halves' mean channel values (`scale`), so that a
# cast of any size is taken away whole and nothing is guessed about its strength.
LUMA = (0.299, 0.587, 0.114)


def _saturation(x: Tensor) -> Tensor:
    return x.std(1).flatten(1).mean(1)


def _cast(c: int) -> Callable[[Tensor], Tensor]:
    return lambda x: x[:, c].flatten(1).mean(1) - torch.cat([x[:, :c], x[:, c + 1 :]], 1).flatten(1).mean(1)


def _shift(sign: float) -> Callable[[Tensor, Tensor], Tensor]:
    def apply(x: Tensor, scale: Tensor) -> Tensor:
        return x + sign * scale[None, :, None, None]

    return apply


def _contrast(factor: float) -> Callable[[Tensor, Tensor], Tensor]:
    def apply(x: Tensor, scale: Tensor) -> Tensor:
        mean = x.mean((2, 3), keepdim=True)
        return mean + factor * (x - mean)

    return apply


def _blur(x: Tensor, scale: Tensor) -> Tensor:
    return torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _grayscale(x: Tensor, scale: Tensor) -> Tensor:
    luma = torch.einsum("bchw,c->bhw", x, torch.tensor(LUMA, dtype=x.dtype, device=x.device))
    return luma[:, None].expand_as(x).clone()


@dataclass(frozen=True)
class Transform:
    apply: Callable[[Tensor, Tensor], Tensor]  # (images, scale per channel) -> images
    statistic: Callable[[Tensor], Tensor]  # the property it removes, per image
    high: bool  # its carriers: where the property is above the median (else below)
    colour: bool = False  # needs three colour channels


CHANNELS = ("red", "green", "blue")
TRANSFORMS: dict[str, Transform] = {
    "grayscale": Transform(_grayscale, _saturation, True, colour=True),
    "hue_rotation": Transform(lambda x, s: x[:, [2, 0, 1]], _saturation, True, colour=True),  # 120 degrees: red to green to blue
    **{f"less_{name}": Transform(_shift(-1.0), _cast(c), True, colour=True) for c, name in enumerate(CHANNELS)},
    **{f"more_{name}": Transform(_shift(1.0), _cast(c), False, colour=True) for c, name in enumerate(CHANNELS)},
    "darker": Transform(_shift(-1.0), lambda x: x.flatten(1).mean(1), True),
    "brighter": Transform(_shift(1.0), lambda x: x.flatten(1).mean(1), False),
    "less_contrast": Transform(_contrast(0.5), lambda x: x.flatten(2).std(2).mean(1), True),
    "more_contrast": Transform(_contrast(1.5), lambda x: x.flatten(2).std(2).mean(1), False),
    "blur": Transform(_blur, lambda x: (x - _blur(x, None)).abs().flatten(1).mean(1), True),
}


def random_cast(x: Tensor, changed: Tensor, ids: Tensor, seed: int) -> Tensor:
    """The null of a transform: each image shifted by one colour, constant over its pixels, in a
    random direction (drawn from the sample's id), as far in total (L2) as the transform moved it."""
    b, c = x.shape[:2]
    norm = (changed - x).flatten(1).norm(dim=1)
    direction = torch.stack([torch.randn(c, generator=torch.Generator().manual_seed((seed * 1_000_003 + int(i)) % 2**63)) for i in ids.tolist()]).to(x)
    direction = direction / direction.norm(dim=1, keepdim=True)
    per_pixel = norm / math.sqrt(x[0, 0].numel())
    return x + (direction * per_pixel[:, None])[..., None, None]


def transform_candidates(batches: Callable[[], Iterator[Batch]], n: int, config: DiscoveryConfig) -> list[Feature]:
    """Each transform of the battery on each image modality (raw float (B, C, H, W) inputs)."""
    means: dict[str, list[Tensor]] = {}
    values: dict[tuple[str, str], list[Tensor]] = {}
    for b in batches():
        for m, x in b.inputs.items():
            if not (x.is_floating_point() and x.dim() == 4):
                continue
            means.setdefault(m, []).append(x.float().mean((2, 3)).cpu())
            for name, t in TRANSFORMS.items():
                if t.colour and x.shape[1] != 3:
                    continue
                values.setdefault((m, name), []).append(t.statistic(x.float()).cpu())
    out = []
    for (m, name), v in values.items():
        s = torch.cat(v)
        t = TRANSFORMS[name]
        carriers = (s > s.median() if t.high else s < s.median()).numpy()
        if carriers.sum() < config.min_samples:
            continue
        colour = torch.cat(means[m])  # (N, C): each image's mean per channel
        high = torch.from_numpy(carriers if t.high else ~carriers)
        scale = colour[high].mean(0) - colour[~high].mean(0)  # from the low half's colour to the high half's
        out.append(Feature(f"transform:{name}", m, "transform", carriers, transform=name, scale=scale.tolist()))
    return out


# ---------------------------------------------------------------- interventions


def transformed(feature: Feature, x: Tensor, ids: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """Images with the transform applied, and with its null (a random colour cast as far)."""
    changed = TRANSFORMS[feature.transform].apply(x.float(), torch.tensor(feature.scale, device=x.device)).to(x.dtype)
    return changed, random_cast(x.float(), changed.float(), ids, seed).to(x.dtype)


def _removed(feature: Feature, b: Batch, at: Tensor, ids: Tensor, seed: int, salt: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The encoded inputs of the batch rows `at` with the feature removed, and with its null
    (drawn from each sample's id, so that a sample's null does not depend on its batch)."""
    m, units = feature.modality, b.units[feature.modality].take(at)
    enc = {k: v[at] for k, v in b.encoded.items()}
    if feature.kind == "transform":
        changed, null = transformed(feature, enc[m], ids, seed)
        return {**enc, m: changed}, {**enc, m: null}
    draws = null_scores(ids, seed, salt, 1, units.n)[:, 0]  # (B, n) uniform
    if feature.kind == "word":
        present = units.present
        own = torch.tensor([[lab == feature.word for lab in labels] for labels in units.labels], device=present.device) & present
        others = present & ~own
        scores = draws.to(present.device)
        scores = torch.where(others, scores, torch.full_like(scores, 2.0))
        rank = scores.argsort(1).argsort(1)
        null = (rank < own.sum(1, keepdim=True)) & others
        if units.deletes:  # the adapter's own removal is a deletion
            return {**enc, m: units.apply(enc[m], ~own)}, {**enc, m: units.apply(enc[m], ~null)}
        slots = units.mask[..., 0]
        return {**enc, m: close_gaps(enc[m], slots, own, units.baseline)}, {**enc, m: close_gaps(enc[m], slots, null, units.baseline)}
    if feature.kind == "segment":
        rows = torch.as_tensor(b.rows.start + at.cpu())
        own = feature.segmentation.mask(rows, feature.cluster)
        labels = feature.segmentation.labels[rows].long()
        size = torch.nn.functional.one_hot(labels.flatten(1), int(labels.max()) + 1).sum(1)  # (B, S)
        others = (feature.segmentation.groups[rows, : size.shape[1]] != feature.cluster) & (size > 0)
        # other superpixels in a random order, up to as many pixels as the feature's
        scores = null_scores(ids, seed, salt, 1, size.shape[1])[:, 0].cpu()
        order = torch.where(others, scores, torch.full(size.shape, 2.0)).argsort(1)
        before = (size.gather(1, order).cumsum(1) - size.gather(1, order)) < own.flatten(1).sum(1, keepdim=True)
        chosen = torch.zeros_like(others).scatter(1, order, before & others.gather(1, order))
        null = chosen.gather(1, labels.flatten(1)).view(labels.shape)
        base = units.baseline.to(enc[m].dtype)
        removed = torch.where(own[:, None].to(enc[m].device), base, enc[m])
        nulled = torch.where(null[:, None].to(enc[m].device), base, enc[m])
        return {**enc, m: removed}, {**enc, m: nulled}
    keep = torch.ones(len(at), units.n, dtype=torch.bool, device=enc[m].device)
    keep[:, list(feature.slots)] = False
    null_keep = torch.ones_like(keep)
    if feature.kind == "group":  # another group of as many features, at random
        sizes = (units.mask[0][None] == torch.arange(units.n, device=units.mask.device)[:, None]).sum(1)
        same = [g for g in range(units.n) if g != feature.slots[0] and sizes[g] == sizes[feature.slots[0]]]
        pick = (draws[:, 0] * len(same)).long().clamp_max(len(same) - 1)
        null_keep[torch.arange(len(at)), torch.tensor(same, device=pick.device)[pick].to(keep.device)] = False
        return {**enc, m: units.apply(enc[m], keep)}, {**enc, m: units.apply(enc[m], null_keep)}
    places = feature.grid.places
    z, own = feature.grid.z[b.rows][at.cpu()], places.index(feature.slots)
    same = _disjoint(places, feature.slots)
    distance = (z[:, same] - z[:, own : own + 1]).abs()
    nearest = distance.argsort(1)[:, :3]
    pick = nearest.gather(1, (draws[:, :1] * nearest.shape[1]).long().clamp_max(nearest.shape[1] - 1)).squeeze(1)
    for i, p in enumerate(pick.tolist()):
        null_keep[i, list(places[same[p]])] = False
    return {**enc, m: units.apply(enc[m], keep)}, {**enc, m: units.apply(enc[m], null_keep)}


def _logits(adapter: ModelAdapter, encoded: dict[str, Tensor], size: int) -> Tensor:
    n = len(next(iter(encoded.values())))
    with torch.no_grad():
        return torch.cat([adapter.forward({k: v[s : s + size] for k, v in encoded.items()}).float() for s in range(0, n, size)])


KINDS: dict[str, Callable] = {"word": word_candidates, "region": region_candidates, "segment": segment_candidates, "group": group_candidates, "transform": transform_candidates}


def discover(
    adapter: ModelAdapter,
    data: SampleSet,
    logits: Tensor,
    config: DiscoveryConfig | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Callable[[str, float], None] = lambda what, fraction: None,
) -> Discovery:
    """Every candidate feature of every kind, tested by removal against its null."""
    config = config or DiscoveryConfig()
    adapter = adapter.eval()
    n = len(data)

    def batches() -> Iterator[Batch]:
        for rows, inputs in data.batches(config.batch_size, device):
            with torch.no_grad():
                encoded = {m: t.detach() for m, t in adapter.encode(inputs).items()}
            yield Batch(rows, inputs, encoded, adapter.units(inputs, encoded))

    unknown = [k for k in config.kinds if k not in KINDS]
    if unknown:
        raise MmdiagError(f"stages.discovery.kinds: unknown kind {unknown[0]!r}; choose from {', '.join(KINDS)}")
    features = [f for kind in config.kinds for f in KINDS[kind](batches, n, config)]
    base = logits.float()
    pred = base.argmax(1)
    classes = base.shape[1]
    flips = {id(f): np.zeros(n, bool) for f in features}
    null_flips = {id(f): np.zeros(n, bool) for f in features}
    drops = {id(f): np.zeros((n, classes)) for f in features}
    fixes = {id(f): np.zeros(n, bool) for f in features}
    passes = 0
    labels = data.labels.numpy()
    n_batches = -(-n // config.batch_size)
    for j, b in enumerate(batches()):
        progress(f"batch {j + 1}/{n_batches}: {len(features)} candidates", j / n_batches)
        for k, f in enumerate(features):
            at = torch.from_numpy(np.flatnonzero(f.carriers[b.rows])).to(device)
            if not len(at):
                continue
            removed, nulled = _removed(f, b, at, data.ids[b.rows][at.cpu()], seed, salt=k)
            both = _logits(adapter, {m: torch.cat([removed[m], nulled[m]]) for m in removed}, config.eval_batch).cpu()
            passes += len(both)
            rows = b.rows.start + at.cpu().numpy()
            after, null_after = both[: len(at)], both[len(at) :]
            p = pred[rows]
            flips[id(f)][rows] = (after.argmax(1) != p).numpy()
            null_flips[id(f)][rows] = (null_after.argmax(1) != p).numpy()
            fixes[id(f)][rows] = after.argmax(1).numpy() == labels[rows]
            d = base[rows] - after
            drops[id(f)][rows] = (d - d.mean(1, keepdim=True)).numpy()
    pvalues = []
    errors = pred.numpy() != labels
    for f in features:
        c = f.carriers
        a, b_ = flips[id(f)][c], null_flips[id(f)][c]
        n10, n01 = int((a & ~b_).sum()), int((~a & b_).sum())
        pvalues.append(binomtest(n10, n10 + n01, 0.5, alternative="greater").pvalue if n10 + n01 else 1.0)
        push = int(drops[id(f)][c].mean(0).argmax())
        agree, disagree = c & (labels == push), c & (labels != push)
        f.stats = {
            "n": int(c.sum()),
            "push": push,
            "flip_rate": round(float(a.mean()), 4),
            "null_flip_rate": round(float(b_.mean()), 4),
            "flip_effect": round(float(a.mean() - b_.mean()), 4),
            # accuracy on its carriers with it removed, minus as they are
            "accuracy_change": round(float(fixes[id(f)][c].mean() - (~errors[c]).mean()), 4),
            "error_rate_agree": round(float(errors[agree].mean()), 4) if agree.any() else None,
            "error_rate_disagree": round(float(errors[disagree].mean()), 4) if disagree.any() else None,
            "fixes_error_rate": round(float(fixes[id(f)][c & errors].mean()), 4) if (c & errors).any() else None,
            "errors_explained": round(float((fixes[id(f)] & c & errors).sum() / max(errors.sum(), 1)), 4),
        }
    q = false_discovery_control(pvalues, method="bh") if pvalues else []
    for f, p, qq in zip(features, pvalues, q):
        f.stats.update(p_value=float(p), q_value=float(qq), reliable=bool(qq < config.fdr and f.stats["flip_effect"] > 0))
    words = [f for f in features if f.kind == "word"]
    swaps = {}
    if words and config.swap_draws:  # the priors: each other modality replaced by other samples'
        texts = {f.modality for f in words}
        for salt, m in enumerate(m for m in adapter.modalities if m not in texts):
            progress(f"priors: {m} of other samples", 1.0)
            swaps[m] = priors.dependence(adapter, data, pred, m, config.swap_draws, seed, 7919 + salt, config.batch_size, device)
            passes += config.swap_draws * n
    tested = priors.slices(((f.modality, f.word, f.carriers) for f in words), swaps, errors, config.fdr)
    return Discovery(features, n, passes, swaps, tested)


# ---------------------------------------------------------------- what the rest of the diagnosis sees


class LazySegmentation(Segmentation):
    """A Segmentation computed for the rows read: SLIC is deterministic, so nothing is kept."""

    def __init__(self, x: Tensor, centres: np.ndarray, n_segments: int):
        self.x, self.centres, self.n_segments = x, centres, n_segments

    def mask(self, rows: Tensor, cluster: int) -> Tensor:
        images = self.x[rows]
        labels = superpixels(images, self.n_segments)
        groups = _assign(*_segment_colours(images, labels), self.centres)
        return groups.long().gather(1, labels.long().flatten(1)).view(labels.shape) == cluster


def box_mask(carriers: np.ndarray, box: list[int], grid: tuple[int, int]) -> Callable[[Tensor], Tensor]:
    """A place's masks over the image grid, for rows of the set: the box on its carriers."""

    def compute(rows: Tensor) -> Tensor:
        x0, y0, x1, y1 = box
        out = torch.zeros(len(rows), *grid, dtype=torch.bool)
        out[:, y0:y1, x0:x1] = True
        return out & torch.from_numpy(carriers[rows.numpy()])[:, None, None]

    return compute


def place(feature: Feature, shape: tuple[int, ...]) -> Tensor | Derived:
    """The feature's place over its modality's input grid, on its carriers: (N, *grid) bool, a
    word's positions or a group's features in memory, a box computed on read."""
    if feature.kind == "word":
        return feature.mask & torch.from_numpy(feature.carriers)[:, None]
    if feature.kind == "group":
        return feature.layout[None] & torch.from_numpy(feature.carriers)[:, None]
    grid = tuple(shape[-2:])
    if feature.kind == "segment":
        return Derived(torch.arange(len(feature.carriers)), grid, torch.bool, lambda rows: feature.segmentation.mask(rows, feature.cluster))
    return Derived(torch.arange(len(feature.carriers)), grid, torch.bool, box_mask(feature.carriers, feature.box, grid))


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def _iou(a, b, rows: int = 1024) -> float:
    """Intersection over union of two mask columns (tensors, streamed or derived), a block at a time."""
    inter = union = 0.0
    for start in range(0, len(a), rows):
        x, y = a[start : start + rows].bool(), b[start : start + rows].bool().reshape(-1, *a.shape[1:])
        inter += float((x & y).sum())
        union += float((x | y).sum())
    return inter / max(union, 1.0)


def settle(features: list[Feature], data: SampleSet) -> list[Feature]:
    """The reliable features the diagnosis takes on, strongest first, each other one marked with
    what it agrees with: an annotated region of its modality at the same place (IoU >= 0.25 over
    all samples: the annotation's name is used), a stronger feature of the same modality it
    overlaps (a cell inside a block that both carry the mark: the one whose removal flips more
    predictions beyond its null),
    or a transform that marks the same samples (Jaccard >= 0.8) and pushes the same way."""
    placed: list[tuple[Feature, Tensor]] = []
    taken = []
    # transforms that mark the same samples (a colour cast raises the saturation too): the one
    # whose removal repairs most predictions comes first and names them
    # places: the one whose removal flips most predictions beyond its null, in samples, comes first
    order = sorted(features, key=lambda f: (f.kind == "transform", -(f.stats["accuracy_change"] if f.kind == "transform" else f.stats["flip_effect"] * f.stats["n"])))
    for f in order:
        if f.kind == "transform":  # a property of the whole image: no place, but maybe the samples of another
            twin = next((g for g in taken if g.kind == "transform" and g.modality == f.modality and g.stats["push"] == f.stats["push"] and _jaccard(f.carriers, g.carriers) >= 0.8), None)
            if twin is None:
                taken.append(f)
            else:
                f.stats["within"] = twin.id
            continue
        at = place(f, tuple(data.inputs[f.modality].shape))
        annotated = [(r, _iou(at, t)) for r, t in data.truth.get(f.modality, {}).items() if math.prod(t.shape[1:]) == math.prod(at.shape[1:])]
        region, iou = max(annotated, key=lambda ri: ri[1], default=(None, 0.0))
        inside = next((g for g, g_at in placed if g.modality == f.modality and _iou(at, g_at) > 0), None)
        if iou >= 0.25:
            f.stats["annotated_as"] = data.concept_of(f.modality, region) or region
        elif inside is not None:
            f.stats["within"] = inside.stats.get("annotated_as") or inside.id
        else:
            taken.append(f)
        placed.append((f, at))
    return taken


def run(ctx: Context, config: DiscoveryConfig, upstream: dict) -> StageResult:
    if ctx.logits is None:
        raise MmdiagError("stages.discovery: needs the model's logits on the data (run it through the flow or pass Context.logits)")
    found = discover(ctx.adapter, ctx.data, ctx.logits, config, ctx.seed, ctx.device, ctx.progress)
    taken = settle(found.reliable, ctx.data)
    arrays = {f"carriers.{f.id}": f.carriers for f in taken}
    arrays.update({f"words.{f.id}": f.mask.numpy() for f in taken if f.kind == "word"})
    arrays.update({f"group.{f.id}": f.layout.numpy() for f in taken if f.kind == "group"})
    arrays.update({f"centres.{f.id}": f.segmentation.centres for f in taken if f.kind == "segment"})
    arrays.update({f"swap.{m}": dep for m, dep in found.swaps.items()})
    words = {f.word: f.carriers for f in found.features if f.kind == "word"}
    arrays.update({f"prior.{s['modality']}.{s['word']}": words[s["word"]] for s in found.slices if s["prior"]})
    details = {
        "taken": [{**f.record(), "push": f.stats["push"], **({"scale": f.scale} if f.scale else {}), **({"cluster": f.cluster} if f.cluster is not None else {})} for f in taken],
        "segments": config.segments,
        "seed": ctx.seed,
        "null_draws": config.null_draws,
        "forward_passes": found.forward_passes,
    }
    summary = {**found.summary(config.fdr), "taken": [f.id for f in taken]}
    return StageResult(summary, arrays, details)


def extend(data: SampleSet, result: StageResult) -> SampleSet:
    """The data with each feature the stage took on as a concept (the class it pushes towards,
    on its carriers; -1 elsewhere) linked to what measures the model's reliance on it: a truth
    region (a word's positions, a place's box), or for a transform a counterfactual (the images
    transformed, with the random cast of its null beside them; the label taken as unknown),
    computed on read. Every later stage and rule treats it as an annotated concept;
    `SampleSet.found` marks it found."""
    meta, truth = dict(data.meta), {m: dict(r) for m, r in data.truth.items()}
    links = {m: dict(r) for m, r in data.truth_concepts.items()}
    found, counterfactuals = dict(data.found), dict(data.counterfactuals)
    rows = torch.arange(len(data))
    for record in result.details["taken"]:
        name, m = record["id"], record["modality"]
        if name in meta:
            raise MmdiagError(f"data.meta: a concept is named {name!r}, the name of a feature mmdiag found; rename it")
        f = Feature(
            name,
            m,
            record["kind"],
            result.arrays[f"carriers.{name}"].astype(bool),
            word=record.get("word"),
            box=record.get("box"),
            transform=record.get("transform"),
            scale=record.get("scale"),
            group=record.get("group"),
            side=record.get("side"),
            cluster=record.get("cluster"),
            colour=record.get("colour"),
        )
        meta[name] = torch.where(torch.from_numpy(f.carriers), record["push"], -1).long()
        x = data.inputs[m]
        if f.kind == "transform":
            seed = result.details["seed"]
            changed = Derived(rows, x.shape[1:], x.dtype, lambda r, f=f, x=x: transformed(f, x[r], data.ids[r], seed)[0])
            nulls = [{m: Derived(rows, x.shape[1:], x.dtype, lambda r, f=f, x=x, k=k: transformed(f, x[r], data.ids[r], seed + k)[1])} for k in range(result.details["null_draws"])]
            counterfactuals[name] = Counterfactual({m: changed}, valid=torch.from_numpy(f.carriers), null=nulls)
        else:
            if f.kind == "word":
                f.mask = torch.from_numpy(result.arrays[f"words.{name}"].astype(bool))
            if f.kind == "group":
                f.layout = torch.from_numpy(result.arrays[f"group.{name}"].astype(bool))
            if f.kind == "segment":  # the superpixels recomputed on read, each given its group by the centres
                f.segmentation = LazySegmentation(x, result.arrays[f"centres.{name}"], result.details["segments"])
            truth.setdefault(m, {})[name] = place(f, tuple(x.shape))
            links.setdefault(m, {})[name] = name
        found[name] = f.record()
    return dataclasses.replace(data, meta=meta, truth=truth, truth_concepts=links, found=found, counterfactuals=counterfactuals)


STAGE = Stage(
    "discovery",
    run,
    DiscoveryConfig,
    writes=("discovery.reliable", "discovery.priors", "discovery.taken"),
    modules=("mmdiag.stages.discovery", "mmdiag.stages.priors"),
    extends=extend,
    summary=summaries.DiscoverySummary,
)
