"""Words from subword tokens: the pieces of one word become one attribution unit.

A tokenizer's vocabulary says where its words begin or end: CLIP's BPE ends a word's last
piece with "</w>", WordPiece (BERT, ViLT) starts every later piece with "##", SentencePiece
(Llama, Gemma) and byte-level BPE (GPT-2, Qwen) start a word's first piece with "▁" or "Ġ".
Grouping from the ids and the vocabulary alone keeps the units a function of the inputs, so a
perturbed copy and a streamed row give the same units as the batch they came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from mmdiag.pipeline.units import Units

Style = Literal["end", "continue", "start"]
STARTS = ("▁", "Ġ")


def piece_style(vocab: Sequence[str]) -> Style:
    """How this vocabulary marks words: "end" (the last piece ends with </w>), "continue"
    (later pieces start with ##) or "start" (the first piece starts with ▁ or Ġ)."""
    # the marker most of the vocabulary carries (a stray entry with another one decides nothing)
    counts = {
        "end": sum(t.endswith("</w>") for t in vocab),
        "start": sum(t.startswith(STARTS) for t in vocab),
        "continue": sum(t.startswith("##") for t in vocab),
    }
    style = max(counts, key=counts.get)
    return style if counts[style] else "continue"  # a vocabulary of whole words: each token is a word


def word_slots(pieces: Sequence[str], fixed: Sequence[bool], style: Style) -> list[int]:
    """For each token: the position of the first piece of its word (the word's unit slot), or -1
    for a fixed token (special, template, padding), which also ends the word before it."""
    out, first, open_word = [], -1, False
    for i, (piece, keep) in enumerate(zip(pieces, fixed)):
        if keep:
            out.append(-1)
            open_word = False
            continue
        if style == "continue":
            begins = not piece.startswith("##")
        elif style == "start":
            begins = piece.startswith(STARTS)
        else:
            begins = False  # "end": a word begins only where the last one ended
        if begins or not open_word:
            first = i
        out.append(first)
        open_word = not (style == "end" and piece.endswith("</w>"))
    return out


def words(ids: Tensor, fixed: Tensor, vocab: Sequence[str], style: Style | None = None) -> tuple[Tensor, list[list[str]]]:
    """(slots (B, L), labels): each token's word slot (the position of the word's first piece;
    -1 for `fixed` tokens, which are never removed) and, per position, the whole word at its
    slot and the piece itself elsewhere."""
    style = style or piece_style(vocab)
    slots, labels = [], []
    for row, keep in zip(ids.tolist(), fixed.tolist()):
        pieces = [vocab[t] for t in row]
        slot = word_slots(pieces, keep, style)
        joined = [""] * len(row)
        for i, s in enumerate(slot):
            if s >= 0:
                joined[s] += _bare(pieces[i], style)
        slots.append(slot)
        labels.append([w if w else pieces[i] for i, w in enumerate(joined)])
    return torch.tensor(slots, dtype=torch.long, device=ids.device), labels


def word_units(ids: Tensor, embedded: Tensor, fixed: Tensor, vocab: Sequence[str], removed: Tensor, style: Style | None = None, deletes: bool = False) -> Units:
    """One unit per word over token ids (B, L), its slot the position of its first piece (so a
    batch has L slots whatever its words, and labels line up with the tokens); a removed word's
    pieces all take `removed` (`deletes`: which the adapter reads as the word deleted)."""
    slots, labels = words(ids, fixed, vocab, style)
    return Units(slots[..., None], ids.shape[1], removed.to(embedded.dtype).expand(embedded.shape), labels, deletes)


def _bare(piece: str, style: Style) -> str:
    if style == "continue":
        return piece.removeprefix("##")
    if style == "end":
        return piece.removesuffix("</w>")
    return piece.lstrip("".join(STARTS))
