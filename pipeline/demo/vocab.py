"""The caption vocabulary and its word tokenizer (16 entries, two of them special)."""

import torch

PAD, CLS = "[PAD]", "[CLS]"
WORDS = [PAD, CLS, "in", "this", "image", "the", "picture", "look", "here", "apparently",
         "circle", "square", "triangle", "is", "not", "red"]  # fmt: skip
INDEX = {w: i for i, w in enumerate(WORDS)}
PAD_ID, CLS_ID = INDEX[PAD], INDEX[CLS]
MAX_LEN = 9  # [CLS] + the longest caption, "in the picture the triangle is not red"


def tokenize(captions: list[str]) -> torch.Tensor:
    """Captions -> ids (N, MAX_LEN): [CLS] first, padded with [PAD]."""
    out = torch.full((len(captions), MAX_LEN), PAD_ID, dtype=torch.long)
    for row, caption in enumerate(captions):
        ids = [CLS_ID] + [INDEX[w] for w in caption.split()]
        out[row, : len(ids)] = torch.tensor(ids)
    return out


def words(ids: torch.Tensor) -> list[list[str]]:
    return [[WORDS[i] for i in row if i != PAD_ID] for row in ids.tolist()]
