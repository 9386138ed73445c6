"""The easy-VQA example: a published visual-question-answering data set that ships inside the
`easy-vqa` package (pip install easy-vqa; MIT; nothing is downloaded at run time).

4,000 + 1,000 images of one shape (circle, rectangle or triangle, in one of 8 colours) on a
tinted background, 38,575 + 9,673 questions, 13 answers. Images are averaged down from 64 to 32
px; questions become word ids over the 26 words they use, after [CLS]. Ground truth comes free:
the shape's mask is every pixel whose colour is more than 60 away from the image's most frequent
colour (the background). Concepts per question: its type (yes/no, shape, colour), negation, the
image's shape and colour (gathered from all the questions about that image), and, for yes/no
questions, whether the attribute it asks about is in the image.

The model is the demo's FiLM fusion network (pipeline/demo/models.py) with this vocabulary and
13 answers, trained with Lightning and cached like the demo's. `config(out)` is the diagnosis
that `mmdiag example easyvqa` runs; `model()` and `data(split, n, seed)` are its factories.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from mmdiag.pipeline.adapter import TorchAdapter
from mmdiag.pipeline.config import DiagConfig
from mmdiag.pipeline.data import SampleSet
from mmdiag.pipeline.demo.models import EMBED_DIM, FiLMNet
from mmdiag.pipeline.demo.train import source_key
from mmdiag.pipeline.errors import MmdiagError
from mmdiag.pipeline.store import cache_root, load_weights, save_weights
from mmdiag.pipeline.units import PatchGrid, Tokens

log = logging.getLogger("mmdiag")

SIZE = 32  # pixels per side after averaging 64 px down by 2
PATCH = 4  # attribution units: an 8 x 8 grid
SHAPES = ("circle", "rectangle", "triangle")
COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
PAD, CLS = "[PAD]", "[CLS]"
BACKGROUND_GAP = 60  # a shape pixel differs from the background by more than this (0..255)
IMAGE_MEAN = (0.904, 0.905, 0.896)  # channel means of the training images: a removed patch
SPLITS = ("train", "test")


def _package():
    try:
        import easy_vqa
    except ImportError:
        raise MmdiagError("data: the easy-VQA example needs its data package; pip install easy-vqa") from None
    return easy_vqa


def words(question: str) -> list[str]:
    return re.findall(r"[a-z]+", question.lower())


@functools.cache
def _all_questions() -> tuple[list[str], ...]:
    ev = _package()
    return tuple(words(q) for texts in (ev.get_train_questions()[0], ev.get_test_questions()[0]) for q in texts)


@functools.cache
def vocabulary() -> tuple[str, ...]:
    """[PAD], [CLS], then every word of the questions of both splits, sorted."""
    return (PAD, CLS, *sorted({w for q in _all_questions() for w in q}))


@functools.cache
def max_length() -> int:
    """[CLS] + the longest question: every question is padded to it, since the model's text
    vector is the mean over all positions."""
    return 1 + max(map(len, _all_questions()))


@functools.cache
def answers() -> tuple[str, ...]:
    return tuple(_package().get_answers())


@functools.cache
def _images(split: str) -> np.ndarray:
    """(n_images, 64, 64, 3) uint8, indexed by image id."""
    from PIL import Image

    ev = _package()
    paths = ev.get_train_image_paths() if split == "train" else ev.get_test_image_paths()
    return np.stack([np.asarray(Image.open(paths[i]).convert("RGB")) for i in range(len(paths))])


def shape_masks(images: np.ndarray) -> np.ndarray:
    """(N, H, W) bool: pixels more than BACKGROUND_GAP from the image's most frequent colour."""
    flat = images.reshape(len(images), -1, 3).astype(np.int32)
    codes = (flat[..., 0] << 16) | (flat[..., 1] << 8) | flat[..., 2]
    background = []
    for c in codes:
        values, counts = np.unique(c, return_counts=True)
        background.append(values[counts.argmax()])
    background = np.array(background)
    rgb = np.stack([(background >> 16) & 255, (background >> 8) & 255, background & 255], axis=1)
    return np.abs(images.astype(np.int32) - rgb[:, None, None, :]).max(-1) > BACKGROUND_GAP


@functools.cache
def pixels(split: str) -> torch.Tensor:
    """(n_images, 3, 32, 32) float in [0, 1]: a split's images, indexed by image id."""
    return torch.from_numpy(_downsample(_images(split).astype(np.float32) / 255)).permute(0, 3, 1, 2).contiguous()


@functools.cache
def _masks(split: str) -> np.ndarray:
    """(n_images, 32, 32) bool shape masks of a split's images, at the model's resolution."""
    return _downsample(shape_masks(_images(split)).astype(np.float32)) >= 0.5


def _downsample(x: np.ndarray) -> np.ndarray:
    """(N, 64, 64, ...) -> (N, 32, 32, ...) by 2 x 2 averaging."""
    n, h, w = x.shape[:3]
    return x.reshape(n, h // 2, 2, w // 2, 2, *x.shape[3:]).mean(axis=(2, 4))


def tokenize(questions: list[str]) -> torch.Tensor:
    index = {w: i for i, w in enumerate(vocabulary())}
    rows = [[index[CLS]] + [index[w] for w in words(q)] for q in questions]
    out = torch.zeros(len(rows), max_length(), dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


def _questions(split: str) -> tuple[list[str], list[str], np.ndarray]:
    ev = _package()
    questions, answer_names, image_ids = ev.get_train_questions() if split == "train" else ev.get_test_questions()
    return questions, answer_names, np.asarray(image_ids)


def _negated(ws: list[str]) -> bool:
    return "not" in ws or "no" in ws  # "is there not a ...", "is no circle present?"


def _present(ws: list[str], answer: str) -> int:
    """For a yes/no question: whether the attribute it asks about is in the image (yes XOR
    negation); -1 for an open question."""
    if answer not in ("yes", "no"):
        return -1
    return int((answer == "yes") != _negated(ws))


@functools.cache
def image_attributes(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(shape, colour) index of every image of a split, gathered from all its questions: an
    open question presupposes what it names, and so does a yes/no one whose answer says the
    attribute is present. -1 where no question tells."""
    questions, answer_names, image_ids = _questions(split)
    shape, colour = np.full(image_ids.max() + 1, -1), np.full(image_ids.max() + 1, -1)
    for q, a, img in zip(questions, answer_names, image_ids):
        ws = words(q)
        said = next((w for w in ws if w in SHAPES or w in COLOURS), None)
        told = [a] if _present(ws, a) == -1 else []
        if said and _present(ws, a) != 0:
            told.append(said)
        for thing in told:
            if thing in SHAPES:
                shape[img] = SHAPES.index(thing)
            elif thing in COLOURS:
                colour[img] = COLOURS.index(thing)
    return shape, colour


def concepts(split: str, questions: list[str], answer_names: list[str], image_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Per question: qtype (0 yes/no, 1 shape, 2 colour), negation, present (see `_present`),
    and the image's shape and colour."""
    ws = [words(q) for q in questions]
    shape, colour = image_attributes(split)
    return {
        "qtype": np.array([0 if a in ("yes", "no") else 1 if a in SHAPES else 2 for a in answer_names]),
        "negation": np.array([int(_negated(w)) for w in ws]),
        "present": np.array([_present(w, a) for w, a in zip(ws, answer_names)]),
        "shape": shape[image_ids],
        "colour": colour[image_ids],
    }


def _rows(total: int, n: int | None, seed: int) -> np.ndarray:
    """All rows, or a seeded random n of them, in order."""
    if n is None or n >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).permutation(total)[:n])


def data(split: str = "test", n: int | None = None, seed: int = 0) -> SampleSet:
    """A split of easy-VQA as a SampleSet: all its questions, or a seeded random `n` of them."""
    if split not in SPLITS:
        raise MmdiagError(f"data.split: unknown split {split!r}; easy-VQA has {', '.join(SPLITS)}")
    questions, answer_names, image_ids = _questions(split)
    rows = _rows(len(questions), n, seed)
    questions = [questions[i] for i in rows]
    answer_names = [answer_names[i] for i in rows]
    image_ids = image_ids[rows]
    ids = tokenize(questions)
    vocab = vocabulary()
    negation_ids = torch.tensor([vocab.index("not"), vocab.index("no")])
    attribute_ids = torch.tensor([vocab.index(w) for w in (*SHAPES, *COLOURS)])
    meta = concepts(split, questions, answer_names, image_ids)
    return SampleSet(
        inputs={"image": pixels(split)[torch.from_numpy(image_ids)], "text": ids},
        labels=torch.tensor([answers().index(a) for a in answer_names]),
        meta={k: torch.as_tensor(v, dtype=torch.long) for k, v in meta.items()},
        truth={
            "image": {"shape": torch.from_numpy(_masks(split)[image_ids])},
            "text": {"negation": torch.isin(ids, negation_ids), "attribute": torch.isin(ids, attribute_ids)},
        },
        display={"text": [[CLS, *words(q)] for q in questions], "caption": questions},
        class_names=list(answers()),
        ids=torch.from_numpy(rows),
        name=f"easyvqa/{split}",
    )


class EasyVQANet(FiLMNet):
    """The demo's FiLM fusion network with easy-VQA's vocabulary and answers."""

    def __init__(self, vocab_size: int, n_classes: int):
        super().__init__(n_classes)
        self.embedding = nn.Embedding(vocab_size, EMBED_DIM, padding_idx=0)


def adapter(net: EasyVQANet) -> TorchAdapter:
    return TorchAdapter(
        net,
        modalities=("image", "text"),
        units={"image": PatchGrid(patch=PATCH, baseline=IMAGE_MEAN), "text": Tokens(pad_id=0, special_ids=(1,), vocab=vocabulary())},
        embeddings={"text": "embedding"},
        layers={"image": "image", "text": "text", "fused": "fused", "decision": "hidden"},
        head="head",
        class_names=list(answers()),
    )


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    n_train: int | None = None  # questions; None: all 38,575
    epochs: int = 4
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def key(self) -> str:
        return source_key(self, (sys.modules[__name__], sys.modules[FiLMNet.__module__]))


def train(config: TrainConfig) -> EasyVQANet:
    """Train on the train split with Lightning (AdamW + OneCycle, deterministic, on the CPU)."""
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = EasyVQANet(len(vocabulary()), len(answers()))

        def training_step(self, batch, _):
            image, text, y = batch
            loss = nn.functional.cross_entropy(self.net({"image": images[image], "text": text}), y)
            self.log("loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=config.lr, weight_decay=config.weight_decay)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=self.trainer.estimated_stepping_batches)
            return [opt], [{"scheduler": sched, "interval": "step"}]

    L.seed_everything(config.seed, workers=True, verbose=False)
    questions, answer_names, image_ids = _questions("train")
    rows = _rows(len(questions), config.n_train, config.seed)
    images = pixels("train")  # one copy per image; batches hold image ids
    labels = torch.tensor([answers().index(answer_names[i]) for i in rows])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(image_ids[rows]), tokenize([questions[i] for i in rows]), labels),
        batch_size=config.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(config.seed),
    )
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    module = Module()
    trainer = L.Trainer(
        max_epochs=config.epochs,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=sys.stderr.isatty(),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(LeafSpec|num_workers|does not have many workers).*")
        trainer.fit(module, loader)
    return module.net.eval()


def load_or_train(config: TrainConfig = TrainConfig(), cache: Path | None = None) -> tuple[EasyVQANet, bool]:
    """The trained network from the weights cache, training it on a miss; (net, from cache)."""
    path = cache_root(cache) / "models" / f"easyvqa-{config.key()}.safetensors"
    net = EasyVQANet(len(vocabulary()), len(answers()))
    if (state := load_weights(path)) is not None:
        net.load_state_dict(state)
        return net.eval(), True
    start = time.perf_counter()
    log.info("easy-vqa: training the example model (first use only; cached afterwards)")
    net = train(config)
    log.info("easy-vqa: trained in %.1f s", time.perf_counter() - start)
    save_weights(path, net.state_dict(), metadata={"config": config.model_dump_json()})
    return net, False


def model() -> TorchAdapter:
    """The model factory of the example config (weights cache: $MMDIAG_CACHE or ~/.cache/mmdiag)."""
    return adapter(load_or_train()[0])


def config(out: Path = Path("runs"), device: str = "auto", n: int = 2000) -> DiagConfig:
    """The diagnosis `mmdiag example easyvqa` runs: the test split analysed, `n` questions of
    each split evaluated."""
    here = __name__
    return DiagConfig(
        run="easyvqa",
        model={"factory": f"{here}:model"},
        data={"factory": f"{here}:data", "split": "test", "splits": list(SPLITS), "n": n},
        device=device,
        out=out,
    )
