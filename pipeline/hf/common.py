"""What the Hugging Face adapters share: loading, tokenising with truncation, token units,
finding a token's positions from its embedding, and the bottleneck site of a hidden layer."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmdiag.pipeline.data import Counterfactual, SampleSet
from mmdiag.pipeline.errors import MmdiagError
from mmdiag.pipeline.units import Tokens, Units

log = logging.getLogger("mmdiag")


def pretrained(cls, path_or_id: str | Path, what: str, local_files_only: bool = False):
    """`cls.from_pretrained` on a local folder or a Hugging Face id (offline: an id already in
    the cache, with `local_files_only` or HF_HUB_OFFLINE=1), in float32 whatever the checkpoint
    holds (attribution in half precision is too coarse), failures as one line."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its "Loading weights" bar would be the run's stderr
    try:
        return cls.from_pretrained(str(path_or_id), local_files_only=local_files_only, dtype=torch.float32)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MmdiagError(f"model: cannot load {what} from {str(path_or_id)!r} ({reason}); give a folder written by save_pretrained, or a Hugging Face id that is already in the local cache") from None


def processor_or_none(path_or_id: str | Path, local_files_only: bool = False):
    """The folder's processor (tokenizer + image processor), or None when it has none."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(path_or_id), local_files_only=local_files_only)
    except (OSError, ValueError, TypeError) as e:
        log.info("no processor at %s (%s): build inputs yourself or pass a processor", path_or_id, type(e).__name__)
        return None


def check_vocab(tokenizer, vocab_size: int, model: str) -> None:
    if tokenizer is not None and len(tokenizer) > vocab_size:
        raise MmdiagError(f"model: the processor's tokenizer has {len(tokenizer)} tokens but the {model} config's vocabulary has {vocab_size}; load the processor that belongs to this model")


def check_ids(ids: Tensor, vocab_size: int, max_length: int, model: str) -> None:
    if ids.dim() != 2 or ids.is_floating_point():
        raise MmdiagError(f"inputs.text: expected token ids shaped (B, L), got {tuple(ids.shape)} {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise MmdiagError(f"inputs.text: token ids must lie in 0..{vocab_size - 1} (the {model} vocabulary); tokenise with the model's own processor")
    if ids.shape[1] > max_length:
        raise MmdiagError(f"inputs.text: sequences of {ids.shape[1]} tokens, the {model} model takes at most {max_length}; build the data with pipeline.hf.hf_samples, which truncates")


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
    """(ids (N, L), attention mask (N, L)) padded to the longest text; texts longer than the
    model's `max_length` tokens are truncated (the tokenizer keeps the end token) and a warning
    says how many."""
    texts = list(texts)
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    long = sum(n > max_length for n in lengths)
    if long:
        log.warning("text: %d of %d texts are longer than the model's %d tokens; truncated to fit", long, len(texts), max_length)
    out = tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return out["input_ids"], out["attention_mask"]


def token_units(ids: Tensor, embedded: Tensor, embedding: nn.Embedding, *, pad_id: int, special_ids: Sequence[int], removed_id: int, vocab: Sequence[str] | None) -> Units:
    """One unit per token; padding and special tokens are kept. A removed token takes the
    embedding of `removed_id` ([MASK] for BERT-like models), not the pad's: models that find
    padding or the end token from the embeddings must not mistake a removed token for one."""
    units = Tokens(pad_id=pad_id, special_ids=tuple(special_ids), vocab=vocab).build(ids, embedded, embedding)
    removed = embedding.weight[removed_id].detach().to(embedded.dtype)
    return dataclasses.replace(units, baseline=removed.expand(embedded.shape))


TEXT_UNITS = ("tokens", "words")


def check_text_units(text_units: str, vocab) -> str:
    if text_units not in TEXT_UNITS:
        raise MmdiagError(f"text_units: {text_units!r} is not one of {', '.join(TEXT_UNITS)}")
    if text_units == "words" and vocab is None:
        raise MmdiagError("text_units: 'words' needs the processor's tokenizer (its vocabulary marks where words begin); load the model with its processor")
    return text_units


def text_units(ids: Tensor, embedded: Tensor, embedding: nn.Embedding, *, pad_id: int, special_ids: Sequence[int], removed_id: int, vocab: Sequence[str] | None, words: bool) -> Units:
    """Token units, or word units (the BPE or WordPiece pieces of a word as one unit); padding
    and special tokens are kept either way, and a removed piece takes `removed_id`'s embedding."""
    if not words:
        return token_units(ids, embedded, embedding, pad_id=pad_id, special_ids=special_ids, removed_id=removed_id, vocab=vocab)
    from mmdiag.pipeline.hf.words import word_units

    fixed = (ids == pad_id) | torch.isin(ids, torch.tensor(list(special_ids), device=ids.device))
    return word_units(ids, embedded, fixed, vocab, embedding.weight[removed_id].detach())


def matches(embedded: Tensor, row: Tensor) -> Tensor:
    """(B, L) bool: positions whose embedding is `row`. Special tokens are never perturbed, so
    theirs is exact up to the rounding of a soft mask (base + 1 * (x - base))."""
    tol = 1e-4 * embedded.detach().abs().amax().clamp_min(1e-12)
    return (embedded.detach() - row.to(embedded.dtype)).abs().amax(-1) <= tol


def vocabulary(tokenizer) -> list[str] | None:
    return tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))) if tokenizer is not None else None


@dataclass
class BottleneckSite:
    """A hidden layer of one modality's tower, where M2IB puts its bottleneck."""

    hidden: Tensor  # (B, T, D) the layer's output on the clean input
    unit: Tensor  # (B, T) long: the attribution unit of each position, -1 for none ([CLS], special tokens, padding)
    inside: Tensor  # (B, T) bool: the positions the bottleneck acts on (all but padding)
    rest: Callable[[Tensor], Tensor]  # layer output (B * K, T, D), K copies per sample -> that modality's shared embedding


def counterfactual_lists(given: dict, n: int, keys: tuple[str, ...], inputs: tuple[str, ...]) -> dict[str, dict[str, list]]:
    """A sample builder's counterfactuals, checked: {concept: {key: one entry per sample}} with
    only `keys`, and at least one of `inputs` (what is flipped) given."""
    out = {}
    for concept, spec in given.items():
        where = f"data.counterfactuals.{concept}"
        if not isinstance(spec, dict) or set(spec) - set(keys):
            raise MmdiagError(f"{where}: give a mapping with some of {', '.join(keys)}")
        if all(spec.get(k) is None for k in inputs):
            raise MmdiagError(f"{where}: give the flipped samples' {' or '.join(inputs)}")
        for key, values in spec.items():
            if values is not None and len(values) != n:
                raise MmdiagError(f"{where}.{key}: {len(values)} entries for {n} samples; give one per sample")
        out[concept] = {k: list(v) for k, v in spec.items() if v is not None}
    return out


def _pixels(processor, images: list, field: str) -> Tensor:
    processed = processor.image_processor(images=images, return_tensors="pt")
    if "pixel_mask" in processed and not bool(processed["pixel_mask"].all()):
        raise MmdiagError(f"{field}: the images differ in size after processing (padding was added); resize them to one size first")
    return processed["pixel_values"].float()


def hf_samples(
    adapter: Any,
    images: Sequence,
    texts: Sequence[str] | None,
    labels: Sequence[int] | Tensor,
    *,
    class_names: Sequence[str] | None = None,
    meta: dict[str, Tensor] | None = None,
    truth: dict[str, dict[str, Tensor]] | None = None,
    truth_concepts: dict[str, dict[str, str]] | None = None,
    class_concepts: list[str] | None = None,
    counterfactuals: dict[str, dict[str, Sequence]] | None = None,
    name: str = "data",
) -> SampleSet:
    """A SampleSet for a Hugging Face adapter, made with its own processor: inputs hold the
    processed `pixel_values` (normalised) and the token ids (truncated to the model's maximum
    length, with a warning). `images`: PIL images or (H, W, 3) uint8 arrays; `texts`: one per
    image (None for zero-shot CLIP, whose only modality is the image). Truth masks go over the
    processed pixel grid; `truth_concepts` ({modality: {region: concept of meta}}) and
    `class_concepts` link them to the concepts, as in any SampleSet. `counterfactuals`:
    {concept: {"images": [...], "texts": [...], "labels": [...], "valid": [...]}}, each sample
    with the concept flipped (one entry per sample; the flipped samples' labels if known; which
    samples have one), made the way the samples are (texts padded to one length with theirs)."""
    processor = getattr(adapter, "processor", None)
    if processor is None:
        raise MmdiagError("data: the model was loaded without a processor; load it from a folder that has one, or pass processor=")
    pixels = _pixels(processor, list(images), "data")
    flips = counterfactual_lists(counterfactuals or {}, len(pixels), ("images", "texts", "labels", "valid"), ("images", "texts"))
    inputs, display, flipped = {"image": pixels}, {}, {c: {} for c in flips}
    for c, f in flips.items():
        if "images" in f:
            flipped[c]["image"] = _pixels(processor, f["images"], f"data.counterfactuals.{c}.images")
    if "text" in adapter.modalities:
        if texts is None or len(texts) != len(pixels):
            raise MmdiagError(f"data: give one text per image ({len(pixels)} images)")
        extra = [(c, f["texts"]) for c, f in flips.items() if "texts" in f]
        ids, mask = tokenize(processor.tokenizer, [*texts, *(t for _, ts in extra for t in ts)], adapter.max_length)  # one width for all
        for k, (c, _) in enumerate(extra, 1):
            flipped[c]["text"] = ids[k * len(pixels) : (k + 1) * len(pixels)]
        ids, mask = ids[: len(pixels)], mask[: len(pixels)]
        inputs["text"] = ids
        display = {"text": [processor.tokenizer.convert_ids_to_tokens(row[: int(n)]) for row, n in zip(ids.tolist(), mask.sum(1))], "caption": list(texts)}
    elif any("texts" in f for f in flips.values()):
        raise MmdiagError("data.counterfactuals: this model takes no text; flip images only")
    made = {
        c: Counterfactual(
            flipped[c],
            torch.as_tensor(f["labels"], dtype=torch.long) if "labels" in f else None,
            torch.tensor([bool(v) for v in f["valid"]]) if "valid" in f else None,
        )
        for c, f in flips.items()
    }
    return SampleSet(
        inputs=inputs,
        labels=torch.as_tensor(labels, dtype=torch.long),
        meta=dict(meta or {}),
        truth=dict(truth or {}),
        truth_concepts=dict(truth_concepts or {}),
        class_concepts=class_concepts,
        counterfactuals=made,
        display=display,
        class_names=list(class_names if class_names is not None else adapter.class_names),
        name=name,
    )


@dataclass(frozen=True)
class ProcessedImage:
    """A PIL image -> the processor's pixel values (3, H, W): what hf_samples gives, a row at a time."""

    image_processor: Any

    def __call__(self, picture) -> Tensor:
        return self.image_processor(images=[picture], return_tensors="pt")["pixel_values"][0].float()


@dataclass(frozen=True)
class PaddedTokens:
    """Texts -> ids (N, length), padded to one length whatever the text (streamed rows must
    stack), truncated to it."""

    tokenizer: Any
    length: int

    def __call__(self, texts: Sequence[str]) -> Tensor:
        return self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.length, return_tensors="pt")["input_ids"]


def hf_readers(adapter: Any, length: int | None = None) -> dict[str, Any]:
    """The `transform` and `tokenize` of a Hugging Face adapter's processor, for the streamed
    sources (pipeline.sources.image_table, hf_dataset): image_table(table, **hf_readers(clip))."""
    processor = getattr(adapter, "processor", None)
    if processor is None:
        raise MmdiagError("data: the model was loaded without a processor; load it from a folder that has one, or pass processor=")
    return {"transform": ProcessedImage(processor.image_processor), "tokenize": PaddedTokens(processor.tokenizer, length or adapter.max_length)}
