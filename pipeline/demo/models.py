"""The two demo fusion models and their adapters.

FiLM: the caption's mean word embedding scales and shifts the channels of the CNN's second and
third layers, so the text can select which image region matters: it *can* learn the rule.
Late fusion: the CNN's pooled vector and the mean word vector are concatenated before an MLP;
it cannot bind a word to a region, so it can only learn additive evidence such as the mark.
Both take {"image": (B, 3, 32, 32) in [0, 1], "text": ids (B, L) or embeddings (B, L, D)}.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmdiag.pipeline.adapter import TorchAdapter
from mmdiag.pipeline.demo.shapes import CLASS_NAMES
from mmdiag.pipeline.demo.vocab import CLS_ID, PAD_ID, WORDS
from mmdiag.pipeline.units import PatchGrid, Tokens

# channel means of the generated images: the value a removed image patch takes
IMAGE_MEAN = (0.75, 0.70, 0.75)
EMBED_DIM = 32


class MeanPool(nn.Module):
    """Mean over all positions; [PAD] embeds to zero, so this is the sum of the words / L."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


class Identity(nn.Module):
    """A named point to read a representation with a hook."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def conv(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1)


class _Fusion(nn.Module):
    def __init__(self, n_classes: int = 2):
        super().__init__()
        self.embedding = nn.Embedding(len(WORDS), EMBED_DIM, padding_idx=PAD_ID)
        self.text = MeanPool()
        self.conv1, self.conv2, self.conv3 = conv(3, 16), conv(16, 32), conv(32, 64)
        self.image = Identity()  # image-only features (before any fusion)
        self.fused = Identity()
        self.hidden = nn.Sequential(nn.Linear(64 + EMBED_DIM, 64), nn.ReLU())
        self.head = nn.Linear(64, n_classes)

    def words(self, text: Tensor) -> Tensor:
        return self.embedding(text) if not text.is_floating_point() else text

    def first(self, image: Tensor) -> Tensor:
        # channels-last makes oneDNN's 3-channel convolution and the max pooling 2-3x faster on
        # a CPU (values within 1e-6), in training too (a step ~1.5x faster)
        image = image.contiguous(memory_format=torch.channels_last)
        # relu after the pooling: max and relu commute exactly, and relu then runs on a quarter
        # of the elements
        return self.image(torch.relu(nn.functional.max_pool2d(self.conv1((image - 0.5) / 0.25), 2)))  # 16 x 16

    def classify(self, fused: Tensor) -> Tensor:
        return self.head(self.hidden(self.fused(fused)))


class FiLMNet(_Fusion):
    def __init__(self, n_classes: int = 2):
        super().__init__(n_classes)
        self.film2 = nn.Linear(EMBED_DIM, 2 * 32)
        self.film3 = nn.Linear(EMBED_DIM, 2 * 64)

    @staticmethod
    def modulate(x: Tensor, film: Tensor) -> Tensor:
        gamma, beta = film[:, :, None, None].chunk(2, dim=1)
        return (1 + gamma) * x + beta

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        t = self.text(self.words(inputs["text"]))
        x = self.first(inputs["image"])
        x = torch.relu(nn.functional.max_pool2d(self.modulate(self.conv2(x), self.film2(t)), 2))  # 8 x 8
        x = torch.relu(self.modulate(self.conv3(x), self.film3(t)).amax(dim=(2, 3)))
        return self.classify(torch.cat([x, t], dim=1))


class LateFusionNet(_Fusion):
    def separate(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each modality's features, from that modality alone."""
        x = self.first(inputs["image"])
        x = torch.relu(nn.functional.max_pool2d(self.conv2(x), 2))
        return {"image": torch.relu(self.conv3(x).amax(dim=(2, 3))), "text": self.text(self.words(inputs["text"]))}

    def fuse(self, features: dict[str, Tensor]) -> Tensor:
        return self.classify(torch.cat([features["image"], features["text"]], dim=1))

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        return self.fuse(self.separate(inputs))


class JointTransformer(nn.Module):
    """Early fusion: 16 image patches of 8 px and the caption's words in one sequence, two
    layers of joint self-attention (`nn.TransformerEncoderLayer`, PyTorch's fused attention),
    mean-pooled into an MLP. Any patch can attend to any word, so it can bind the caption to a
    region."""

    def __init__(self, n_classes: int = 2, width: int = EMBED_DIM, patch: int = 8):
        super().__init__()
        n_patches = (32 // patch) ** 2
        self.embedding = nn.Embedding(len(WORDS), width, padding_idx=PAD_ID)
        self.patches = nn.Conv2d(3, width, patch, stride=patch)
        self.position = nn.Parameter(torch.randn(1, n_patches + 16, width) * 0.02)  # up to 16 words
        self.kind = nn.Parameter(torch.randn(2, width) * 0.02)  # image or word
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.image, self.text, self.fused = Identity(), MeanPool(), Identity()
        self.hidden = nn.Sequential(nn.Linear(width, 64), nn.ReLU())
        self.head = nn.Linear(64, n_classes)

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        image = self.patches((inputs["image"] - 0.5) / 0.25).flatten(2).transpose(1, 2)  # (B, P, D)
        words = self.embedding(inputs["text"]) if not inputs["text"].is_floating_point() else inputs["text"]
        # what each modality is before fusion, read by stage 3 through hooks on these points
        self.image(image.mean(1))
        self.text(words)
        tokens = torch.cat([image + self.kind[0], words + self.kind[1]], 1)
        tokens = tokens + self.position[:, : tokens.shape[1]]
        return self.head(self.hidden(self.fused(self.encoder(tokens).mean(1))))


ARCHS = {"film": FiLMNet, "late": LateFusionNet, "transformer": JointTransformer}


def demo_adapter(module: nn.Module, patch: int = 4) -> TorchAdapter:
    """The adapter for every demo model: 8x8 image patches of 4 px (the mark is exactly one),
    one unit per word ([CLS] and [PAD] are kept)."""
    return TorchAdapter(
        module,
        modalities=("image", "text"),
        units={
            "image": PatchGrid(patch=patch, baseline=IMAGE_MEAN),
            "text": Tokens(pad_id=PAD_ID, special_ids=(CLS_ID,), vocab=WORDS),
        },
        embeddings={"text": "embedding"},
        layers={"image": "image", "text": "text", "fused": "fused", "decision": "hidden"},
        head="head",
        class_names=CLASS_NAMES,
        fusion=("separate", "fuse") if isinstance(module, LateFusionNet) else None,
        joint_fusion=not isinstance(module, LateFusionNet),  # FiLM and joint self-attention
    )
