"""Small models with bugs planted on purpose, built outside the demo: other modalities (8x8
images, short or long captions, a feature vector), other sizes, other bugs, two or four classes.

Every world draws its concepts independently, renders them into the modalities, and derives the
label from the *causal* concepts only; a bug is planted in the training data (a spurious concept
that agrees with the label, a modality decorrelated from the label) and the analysed split is
drawn without it, so the answer is known by construction. Tests prove each bug from the model's
own accuracies before asserting the diagnosis.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from mmdiag.pipeline import Counterfactual, FeatureGroups, PatchGrid, SampleSet, Tokens, TorchAdapter

from ranges import SEED

SIDE, PATCH = 8, 2  # 8x8 images, 4x4 grid of 2x2 patches
COLOURS = np.array([[0.85, 0.15, 0.15], [0.15, 0.25, 0.85], [0.15, 0.75, 0.2], [0.85, 0.8, 0.1]], np.float32)
VOCAB = ["[PAD]", "[CLS]", "zz", "not", "yes", *[f"w{i}" for i in range(20)]]
PAD, CLS, ZZ, NOT, YES = 0, 1, 2, 3, 4
CORNERS = [(0, 0), (0, 6), (6, 0), (6, 6)]  # top-left pixel of each corner patch


@dataclass
class World:
    """How the concepts of a sample are drawn and rendered. `label(c)` maps concept values to
    the label; `spurious` concepts copy the label with probability `p` (the bug; 0.5 = none)."""

    label: callable
    n_classes: int = 2
    caption: tuple[int, int] = (3, 6)  # words per caption (filler included)
    contrast: float = 0.35  # how far the object's colour stands out from the background
    modalities: tuple[str, ...] = ("image", "text")
    spurious: dict[str, float] = field(default_factory=dict)  # concept -> p(it equals the label)
    # share of samples whose object is not drawn: there a spurious concept is all that tells the
    # label, so a model fits them by it and the shortcut takes, on that part, by construction
    hidden: float = 0.0
    # p of the spurious concepts where the object is drawn, where it differs (0.5: only the causal
    # concepts tell the label there, so a model learns them there by construction too)
    visible_spurious: float | None = None


def _concepts(world: World, n: int, rng: np.random.Generator, p_spurious: dict[str, float], visible: float | None) -> dict[str, np.ndarray]:
    c = {
        "colour": rng.integers(0, world.n_classes if world.n_classes > 2 else 2, n),
        "cue": rng.integers(0, 2, n),  # the word "yes" in the caption
        "negation": rng.integers(0, 2, n),  # the word "not" in the caption
        "tone": rng.integers(0, 2, n),  # sign of the feature vector's first group
    }
    y = world.label(c)
    if world.hidden:
        c["hidden"] = (rng.random(n) < world.hidden).astype(np.int64)
    for name, p in p_spurious.items():
        agree = rng.random(n) < (np.where(c["hidden"] == 1, p, visible) if world.hidden and visible is not None else p)
        if world.n_classes == 2:
            c[name] = np.where(agree, y, 1 - y)
        else:  # points to the label, or to another class uniformly
            other = (y + rng.integers(1, world.n_classes, n)) % world.n_classes
            c[name] = np.where(agree, y, other)
    c["label"] = y
    return c


def render(world: World, c: dict[str, np.ndarray], rng: np.random.Generator) -> tuple[dict, dict, list, np.ndarray]:
    """Raw inputs, truth masks and display tokens of the concepts, and the images before any
    corner mark was painted on them."""
    n = len(c["label"])
    image = 0.5 + rng.normal(0, 0.08, (n, 3, SIDE, SIDE)).astype(np.float32)
    # the object: a 2x4 block (two patches) at a random place of the middle rows
    obj = np.zeros((n, SIDE, SIDE), bool)
    rows, cols = rng.integers(2, 5, n), rng.integers(1, 4, n) * 2 - 1
    drawn = c["hidden"] == 0 if "hidden" in c else np.ones(n, bool)
    for i in range(n):
        obj[i, rows[i] : rows[i] + 2, cols[i] : cols[i] + 4] = drawn[i]
    colour = 0.5 + world.contrast * (COLOURS[c["colour"]] - 0.5) + rng.normal(0, 0.05, (n, 3)).astype(np.float32)
    image = unmarked = np.where(obj[:, None], colour[:, :, None, None], image).astype(np.float32)
    mark = np.zeros((n, SIDE, SIDE), bool)
    if "mark" in c:  # a dark corner patch (two classes: present or not)
        mark[:, :PATCH, :PATCH] = c["mark"][:, None, None] == 1
    if "mark_pos" in c:  # a dark patch in the corner that names a class
        for k, (r, q) in enumerate(CORNERS):
            mark[c["mark_pos"] == k, r : r + PATCH, q : q + PATCH] = True
    image = np.where(mark[:, None], 0.05, image).astype(np.float32)
    spot = np.zeros((n, SIDE, SIDE), bool)
    if "spot" in c:  # a dark 2x2 spot anywhere, off the patch grid: an object, at no fixed place
        r, q = rng.integers(0, SIDE - 1, n), rng.integers(0, SIDE - 1, n)
        for i in np.flatnonzero(c["spot"] == 1):
            spot[i, r[i] : r[i] + 2, q[i] : q[i] + 2] = True
        image = np.where(spot[:, None], 0.05, image).astype(np.float32)
    if "cast" in c:  # a warm colour cast over the whole image: more red, less blue
        image = (image + np.array([0.08, 0.0, -0.08], np.float32)[:, None, None] * c["cast"][:, None, None, None]).astype(np.float32)
    length = world.caption
    ids = np.full((n, length[1] + 2), PAD, np.int64)
    word_at = {k: np.zeros(ids.shape, bool) for k in ("zz", "negation", "cue")}
    for i in range(n):
        words = list(rng.integers(5, len(VOCAB), rng.integers(length[0], length[1] + 1)))
        for name, token in (("negation", NOT), ("cue", YES), ("zz", ZZ)):
            if c.get(name) is not None and c[name][i] == 1:
                words.insert(int(rng.integers(0, len(words) + 1)), token)
        words = [CLS, *words][: ids.shape[1]]
        ids[i, : len(words)] = words
        for name, token in (("negation", NOT), ("cue", YES), ("zz", ZZ)):
            word_at[name][i] = ids[i] == token
    features = rng.normal(0, 1, (n, 8)).astype(np.float32)
    features[:, :2] = np.where(c["tone"][:, None] == 1, 1.0, -1.0) + rng.normal(0, 0.3, (n, 2))
    inputs = {"image": torch.from_numpy(image), "text": torch.from_numpy(ids), "audio": torch.from_numpy(features)}
    tone = torch.zeros(n, 8, dtype=torch.bool)
    tone[:, :2] = True  # the tone lives in the first feature group
    truth = {
        "image": {"object": torch.from_numpy(obj), "mark": torch.from_numpy(mark), **({"spot": torch.from_numpy(spot)} if "spot" in c else {})},
        "text": {"zz": torch.from_numpy(word_at["zz"]), "negation": torch.from_numpy(word_at["negation"]), "cue": torch.from_numpy(word_at["cue"])},
        "audio": {"tone": tone},
    }
    tokens = [[VOCAB[t] for t in row if t != PAD] for row in ids.tolist()]
    return {m: inputs[m] for m in world.modalities}, {m: truth[m] for m in world.modalities if m in truth}, tokens, unmarked


def toggle_word(ids: np.ndarray, token: int, rng: np.random.Generator) -> np.ndarray:
    """The captions with `token` deleted where it is (the gap closed: what the model saw when the
    word was absent) and inserted at a random place where it is not (a full caption drops its
    last filler word)."""
    out = np.full_like(ids, PAD)
    for i, row in enumerate(ids):
        words = [t for t in row.tolist() if t != PAD]
        if token in words:
            words.remove(token)
        else:
            words.insert(int(rng.integers(1, len(words) + 1)), token)
            if len(words) > ids.shape[1]:
                words.pop(max(k for k, t in enumerate(words) if t >= 5))
        out[i, : len(words)] = words
    return out


def toggle_mark(image: np.ndarray, unmarked: np.ndarray) -> np.ndarray:
    """The images with the top-left corner mark painted where it is not and removed (the pixels
    beneath restored) where it is."""
    corner = np.zeros((SIDE, SIDE), bool)
    corner[:PATCH, :PATCH] = True
    marked = (image[:, :, :PATCH, :PATCH] <= 0.05 + 1e-6).all(axis=(1, 2, 3))
    painted = np.where(corner, np.float32(0.05), image)
    return np.where(marked[:, None, None, None], np.where(corner, unmarked, image), painted).astype(np.float32)


def samples(world: World, n: int, seed: int, p_spurious: dict[str, float] | None = None, shuffle: tuple[str, ...] = (), label_noise: float = 0.0) -> SampleSet:
    """n samples; `shuffle` names modalities whose inputs are permuted across samples (so that
    they say nothing about the label: a model trained on that ignores them); `label_noise` is the
    share of given labels replaced by another class at random (the concepts and the inputs stay
    those of the true label: `true_labels` gives it back)."""
    rng = np.random.default_rng(seed)
    # the world's own spurious p (and its visible_spurious), or the one given everywhere
    c = _concepts(world, n, rng, world.spurious if p_spurious is None else p_spurious, world.visible_spurious if p_spurious is None else None)
    inputs, truth, tokens, unmarked = render(world, c, rng)
    for m in shuffle:
        inputs[m] = inputs[m][torch.from_numpy(rng.permutation(n))]
    meta = {k: torch.as_tensor(v) for k, v in c.items() if k != "label"}
    links = {"image": {"object": "colour"}, "text": {"negation": "negation", "cue": "cue"}, "audio": {"tone": "tone"}}
    if "zz" in c:
        links["text"]["zz"] = "zz"
    if "mark" in c:
        links["image"]["mark"] = "mark"
    if "mark_pos" in c:
        links["image"]["mark"] = "mark_pos"
    if "spot" in c:
        links["image"]["spot"] = "spot"
    truth = {m: {r: t for r, t in regions.items() if r in links.get(m, {}) and bool(t.any())} for m, regions in truth.items()}
    links = {m: {r: k for r, k in regions.items() if r in truth.get(m, {})} for m, regions in links.items() if m in world.modalities}
    class_concepts = [k for k in ("colour", "mark_pos") if k in meta] if world.n_classes > 2 else None
    given = c["label"]
    if label_noise:
        wrong = np.random.default_rng(seed + 1).random(n) < label_noise
        given = np.where(wrong, (given + np.random.default_rng(seed + 2).integers(1, world.n_classes, n)) % world.n_classes, given)
    counterfactuals = {}  # a spurious concept toggled and nothing else; the label stays
    if "zz" in c:
        counterfactuals["zz"] = Counterfactual({"text": torch.from_numpy(toggle_word(inputs["text"].numpy(), ZZ, np.random.default_rng(seed + 3)))}, labels=torch.as_tensor(given))
    if "mark" in c and "image" in inputs:
        counterfactuals["mark"] = Counterfactual({"image": torch.from_numpy(toggle_mark(inputs["image"].numpy(), unmarked))}, labels=torch.as_tensor(given))
    return SampleSet(
        inputs,
        torch.as_tensor(given),
        meta=meta,
        truth=truth,
        display={"text": tokens} if "text" in inputs else {},
        class_names=[f"c{k}" for k in range(world.n_classes)],
        truth_concepts=links,
        class_concepts=class_concepts,
        counterfactuals=counterfactuals,
    )


def true_labels(world: World, data: SampleSet) -> np.ndarray:
    """The labels the concepts give (before any label noise)."""
    return np.asarray(world.label({k: v.numpy() for k, v in data.meta.items()}))


class Net(nn.Module):
    """One small encoder per modality; `fusion="mlp"` concatenates and mixes them (it can learn
    any interaction), `fusion="sum"` gives each modality its own hidden layer and concatenates
    those under one linear head (logits additive over the modalities)."""

    def __init__(self, modalities: tuple[str, ...], n_classes: int, fusion: str = "mlp", width: int = 24):
        super().__init__()
        self.modalities, self.fusion_kind = modalities, fusion
        self.embedding = nn.Embedding(len(VOCAB), width, padding_idx=PAD)
        encoders = {
            "image": nn.Sequential(nn.Conv2d(3, 8, PATCH, stride=PATCH), nn.ReLU(), nn.Flatten(), nn.Linear(8 * (SIDE // PATCH) ** 2, width), nn.ReLU()),
            "text": nn.Sequential(nn.Linear(width, width), nn.ReLU()),
            "audio": nn.Sequential(nn.Linear(8, width), nn.ReLU()),
        }
        self.encoders = nn.ModuleDict({m: encoders[m] for m in modalities})
        if fusion == "mlp":
            self.fused = nn.Sequential(nn.Linear(width * len(modalities), 2 * width), nn.ReLU())
        else:
            self.hidden = nn.ModuleDict({m: nn.Sequential(nn.Linear(width, width), nn.ReLU()) for m in modalities})
            self.fused = nn.Identity()
        self.head = nn.Linear(2 * width if fusion == "mlp" else width * len(modalities), n_classes)

    def encode(self, inputs: dict) -> dict:
        out = {}
        for m in self.modalities:
            x = inputs[m]
            if m == "text":
                x = (self.embedding(x) if not x.is_floating_point() else x).mean(1)
            out[m] = self.encoders[m](x)
        return out

    def forward(self, inputs: dict) -> torch.Tensor:
        z = self.encode(inputs)
        if self.fusion_kind == "mlp":
            return self.head(self.fused(torch.cat([z[m] for m in self.modalities], 1)))
        return self.head(self.fused(torch.cat([self.hidden[m](z[m]) for m in self.modalities], 1)))


def train(world: World, fusion: str = "mlp", n: int = 4000, steps: int = 500, seed: int = SEED, shuffle: tuple[str, ...] = ()) -> TorchAdapter:
    torch.manual_seed(seed)
    data = samples(world, n, seed=seed + 100, shuffle=shuffle)
    net = Net(world.modalities, world.n_classes, fusion)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, n, (128,), generator=g)
        batch = {m: x[idx] for m, x in data.inputs.items()}
        for m in shuffle:  # paired anew each step: there is no pairing to memorise, so it is ignored by construction
            batch[m] = batch[m][torch.randperm(len(idx), generator=g)]
        loss = nn.functional.cross_entropy(net(batch), data.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return adapter(net.eval(), world)


def adapter(net: Net, world: World) -> TorchAdapter:
    units = {
        "image": PatchGrid(patch=PATCH, baseline=0.5, modality="image"),
        "text": Tokens(pad_id=PAD, special_ids=(CLS,), vocab=VOCAB, modality="text"),
        "audio": FeatureGroups(groups=[0, 0, 1, 1, 2, 2, 3, 3], modality="audio"),
    }
    layers = {**{m: f"encoders.{m}" for m in world.modalities}, "decision": "fused"}
    return TorchAdapter(
        net,
        modalities=world.modalities,
        units={m: units[m] for m in world.modalities},
        embeddings={"text": "embedding"} if "text" in world.modalities else {},
        layers=layers,
        head="head",
        class_names=[f"c{k}" for k in range(world.n_classes)],
    )


def accuracy(adapter: TorchAdapter, data: SampleSet, where: np.ndarray | None = None) -> float:
    with torch.no_grad():
        pred = adapter(data.inputs).argmax(1).numpy()
    hit = pred == data.labels.numpy()
    return float(hit[where].mean() if where is not None else hit.mean())


def bare(data: SampleSet) -> SampleSet:
    """Inputs, labels and class names: what a user brings."""
    return SampleSet(data.inputs, data.labels, class_names=data.class_names, display=data.display)
