"""Hugging Face ViLT for visual question answering (`ViltForQuestionAnswering`).

Inputs are what the ViLT processor gives, resized to one size: `image` = pixel_values (B, 3, H,
W), normalised, H and W multiples of the patch size; `text` = input_ids (B, L) of the question
with [CLS] and [SEP]. `encode` gives the pixel values and the word embeddings (position and
token-type embeddings are added inside the model). The output is the answer logits.

`forward` finds the question's padding from the embeddings (padding is never removed, so its row
is exact) and embeds the image patches itself in a fixed order: ViLT's own `visual_embed` draws
the patch order at random on every call, which costs the same numbers up to rounding but moves
the global random state. Units: the patch grid at the model's patch size (a removed patch is 0 in
normalised pixel space, the processor's mean colour); one unit per question token, [CLS], [SEP]
and padding kept, a removed token takes the [MASK] embedding (ViLT was pre-trained to read it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from mmdiag.pipeline.adapter import ModelAdapter
from mmdiag.pipeline.errors import MmdiagError
from mmdiag.pipeline.hf.common import check_ids, check_text_units, check_vocab, matches, pretrained, processor_or_none, text_units, vocabulary
from mmdiag.pipeline.units import PatchGrid

# BERT's ids, which ViLT's tokenizer uses, for a model loaded without its processor
BERT_IDS = {"pad": 0, "cls": 101, "sep": 102, "mask": 103}


class ViltAdapter(ModelAdapter):
    modalities = ("image", "text")
    joint_fusion = True  # one transformer over the patches and the words

    def __init__(self, model, processor=None, *, class_names: Sequence[str] | None = None, text_units: str = "tokens"):
        self.module = model.eval()
        self.processor = processor
        config = model.config
        tokenizer = getattr(processor, "tokenizer", None)
        self.vocab_size = config.vocab_size
        self.patch = config.patch_size
        self.max_length = config.max_position_embeddings
        check_vocab(tokenizer, self.vocab_size, "ViLT")
        self._check_image_processor(processor)
        ids = {k: getattr(tokenizer, f"{k}_token_id", None) if tokenizer is not None else None for k in BERT_IDS}
        ids = {k: v if v is not None else BERT_IDS[k] for k, v in ids.items()}
        bad = [k for k, v in ids.items() if v >= self.vocab_size]
        if bad:
            raise MmdiagError(f"model: the [{bad[0].upper()}] token id {ids[bad[0]]} is outside ViLT's vocabulary of {self.vocab_size}; load the model with its processor")
        self.pad_id, self.special_ids, self.removed_id = ids["pad"], (ids["cls"], ids["sep"]), ids["mask"]
        self.vocab = vocabulary(tokenizer)
        self.text_units = check_text_units(text_units, self.vocab)
        if tokenizer is not None:
            self.max_length = min(self.max_length, tokenizer.model_max_length)
        labels = config.id2label or {}
        self.class_names = list(class_names) if class_names is not None else [str(labels.get(i, i)) for i in range(config.num_labels)]

    def _check_image_processor(self, processor) -> None:
        divisor = getattr(getattr(processor, "image_processor", None), "size_divisor", None)
        if divisor and divisor % self.patch:
            raise MmdiagError(f"model: the processor pads images to multiples of {divisor} px, the model's patches are {self.patch} px; load the processor that belongs to this model")

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.module.vilt.embeddings.text_embeddings.word_embeddings

    def encode(self, inputs):
        self.check_inputs(inputs)
        pixels = inputs["image"].float()
        if pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[2] % self.patch or pixels.shape[3] % self.patch:
            raise MmdiagError(f"inputs.image: pixel values shaped {tuple(pixels.shape)}; ViLT takes (B, 3, H, W) with H and W multiples of {self.patch}")
        check_ids(inputs["text"], self.vocab_size, self.max_length, "ViLT")
        return {"image": pixels, "text": self.word_embeddings(inputs["text"])}

    def patches(self, pixels: Tensor) -> Tensor:
        """(B, 1 + N, D): [CLS] and the patch embeddings, row-major, with position embeddings
        interpolated to the image's grid, as ViLT's `visual_embed` does for an unpadded image."""
        embeddings = self.module.vilt.embeddings
        x = embeddings.patch_embeddings(pixels)
        b, d, h, w = x.shape
        side = self.module.config.image_size // self.patch
        grid = embeddings.position_embeddings[:, 1:, :].transpose(1, 2).reshape(1, d, side, side)
        position = nn.functional.interpolate(grid, size=(h, w), mode="bilinear", align_corners=True)
        x = (x + position).flatten(2).transpose(1, 2)
        cls = embeddings.cls_token.expand(b, -1, -1) + embeddings.position_embeddings[:, :1]
        return torch.cat([cls, x], dim=1)

    def forward(self, encoded):
        text = encoded["text"]
        attention = (~matches(text, self.word_embeddings.weight[self.pad_id])).long()
        image = self.patches(encoded["image"])
        out = self.module(
            inputs_embeds=text,
            attention_mask=attention,
            image_embeds=image,
            pixel_mask=torch.ones(image.shape[:2], dtype=torch.long, device=image.device),
        )
        return out.logits

    def units(self, inputs, encoded):
        return {
            "image": PatchGrid(patch=self.patch, baseline=0.0).build(inputs["image"], encoded["image"]),
            "text": text_units(
                inputs["text"],
                encoded["text"],
                self.word_embeddings,
                pad_id=self.pad_id,
                special_ids=self.special_ids,
                removed_id=self.removed_id,
                vocab=self.vocab,
                words=self.text_units == "words",
            ),
        }

    def layers(self):
        vilt = self.module.vilt
        named: dict[str, nn.Module] = {"text": vilt.embeddings.text_embeddings, "image": vilt.embeddings.patch_embeddings}
        named |= {f"layer{i}": layer for i, layer in enumerate(vilt.encoder.layer)}
        # the classifier is Linear, LayerNorm, GELU, Linear: the GELU's output feeds the head
        return named | {"pooled": vilt.pooler, "decision": self.module.classifier[2]}

    def head(self):
        return self.module.classifier[3]


def load_vilt(path_or_id: str | Path, *, processor=None, class_names: Sequence[str] | None = None, text_units: str = "tokens", local_files_only: bool = False) -> ViltAdapter:
    """A ViLT VQA adapter from a local folder or a Hugging Face id; the processor is loaded from
    the same place unless given. Class names: the config's id2label (the answers).
    `text_units="words"`: the WordPiece pieces of a word are one unit."""
    from transformers import ViltForQuestionAnswering

    model = pretrained(ViltForQuestionAnswering, path_or_id, "a ViLT question-answering model", local_files_only)
    processor = processor if processor is not None else processor_or_none(path_or_id, local_files_only)
    return ViltAdapter(model, processor, class_names=class_names, text_units=text_units)
