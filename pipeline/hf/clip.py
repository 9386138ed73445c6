"""Hugging Face CLIP: image-text matching (two modalities) and zero-shot classification (the
image alone, over a set of prompts).

Inputs are what the CLIP processor gives: `image` = pixel_values (B, 3, S, S), normalised, S =
the vision config's image size; `text` = input_ids (B, L) with the start and end tokens. `encode`
gives the pixel values and the token embeddings (the lookup alone: position embeddings are added
inside `forward`). The text tower pools at the end-of-text token, which `forward` finds from the
embeddings (special tokens are never removed, so that row is exact): perturbed copies need no ids.

The model keeps its own attention implementation ("sdpa" by default): where PyTorch's fused
kernels lack the forward-mode AD that stage 2's mixed second derivatives use, stage 2 runs them
with the math attention backend (stages.interaction.mixed_block).

Units: the image's patch grid at the ViT's patch size (a removed patch is 0 in normalised pixel
space, i.e. the processor's mean colour); one unit per token, start/end tokens and padding kept,
a removed token takes the embedding of token 0 (as MM-SHAP's reference) or of a pad token that
differs from the end token.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from mmdiag.pipeline.adapter import ModelAdapter
from mmdiag.pipeline.errors import MmdiagError
from mmdiag.pipeline.hf.common import BottleneckSite, check_ids, check_text_units, check_vocab, matches, pretrained, processor_or_none, text_units, tokenize, vocabulary
from mmdiag.pipeline.units import PatchGrid


class Identity(nn.Module):
    """A named point to read with a hook."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def _hidden(output) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _field(size, key: str):
    """A field of an image processor's size (a dict, or transformers 5's SizeDict)."""
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _normalise(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def special_tokens(config, tokenizer=None) -> tuple[int, int, int]:
    """(start, end, pad) token ids. The text tower pools at the end token. Configs from before
    transformers PR #24773 say eos_token_id 2 and mean "the highest id in the sequence": the last
    id of CLIP's vocabulary, with the start token just before it."""
    text = config.text_config
    legacy = text.eos_token_id == 2
    eos = text.vocab_size - 1 if legacy else text.eos_token_id
    if eos is None or not 0 <= eos < text.vocab_size:
        raise MmdiagError(f"model: text_config.eos_token_id {eos} is outside the vocabulary (0..{text.vocab_size - 1}); CLIP would pool the text at position 0. Set it to the end-of-text token's id")
    if tokenizer is not None and tokenizer.eos_token_id != eos:
        what = f"eos_token_id 2 means 'pool at the highest id', {eos}" if legacy else f"eos_token_id is {eos}"
        raise MmdiagError(f"model: the tokenizer's end token is {tokenizer.eos_token_id}, the config's {what}; load the processor that belongs to this model")
    if tokenizer is not None:
        bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    else:
        bos, pad = (eos - 1, eos) if legacy else (text.bos_token_id, text.pad_token_id)
    return bos, eos, pad if pad is not None else eos


class _CLIP(ModelAdapter):
    """The towers of a CLIPModel, run from continuous inputs."""

    def __init__(self, model, processor=None, text_units: str = "tokens"):
        model.eval()
        self.processor = processor
        tokenizer = getattr(processor, "tokenizer", None)
        config = model.config
        self.image_size = config.vision_config.image_size
        self.patch = config.vision_config.patch_size
        self.vocab_size = config.text_config.vocab_size
        self.max_length = config.text_config.max_position_embeddings
        self.bos_id, self.eos_id, self.pad_id = special_tokens(config, tokenizer)
        check_vocab(tokenizer, self.vocab_size, "CLIP")
        self._check_image_processor(processor)
        self.removed_id = next(i for i in (self.pad_id, 0, 1, 2) if i not in (self.bos_id, self.eos_id))
        self.vocab = vocabulary(tokenizer)
        self.text_units = check_text_units(text_units, self.vocab)
        if tokenizer is not None:
            self.max_length = min(self.max_length, tokenizer.model_max_length)

    def _check_image_processor(self, processor) -> None:
        image = getattr(processor, "image_processor", None)
        if image is None:
            return
        if getattr(image, "do_center_crop", False):
            side = _field(getattr(image, "crop_size", None), "height")
        else:
            side = _field(getattr(image, "size", None), "shortest_edge") or _field(getattr(image, "size", None), "height")
        if side is not None and side != self.image_size:
            raise MmdiagError(f"model: the processor makes {side}x{side} images, the vision config takes {self.image_size}x{self.image_size}; load the processor that belongs to this model")

    @property
    def clip(self):
        return self.module.clip

    def encode(self, inputs):
        self.check_inputs(inputs)
        out = {}
        if "image" in self.modalities:
            pixels = inputs["image"].float()
            if pixels.dim() != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[2:]) != (self.image_size, self.image_size):
                raise MmdiagError(
                    f"inputs.image: pixel values shaped {tuple(pixels.shape)}, the model takes (B, 3, {self.image_size}, {self.image_size}); "
                    "process the images with the model's processor (pipeline.hf.hf_samples)"
                )
            out["image"] = pixels
        if "text" in self.modalities:
            check_ids(inputs["text"], self.vocab_size, self.max_length, "CLIP")
            out["text"] = self.token_embedding(inputs["text"])
        return out

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.clip.text_model.embeddings.token_embedding

    def units(self, inputs, encoded):
        out = {}
        if "image" in encoded:
            out["image"] = PatchGrid(patch=self.patch, baseline=0.0).build(inputs["image"], encoded["image"])
        if "text" in encoded:
            out["text"] = text_units(
                inputs["text"],
                encoded["text"],
                self.token_embedding,
                pad_id=self.pad_id,
                special_ids=(self.bos_id, self.eos_id),
                removed_id=self.removed_id,
                vocab=self.vocab,
                words=self.text_units == "words",
            )
        return out

    # the towers, split at any layer so that M2IB can start from a hidden state
    def _vision_input(self, pixels: Tensor) -> Tensor:
        vision = self.clip.vision_model
        return vision.pre_layrnorm(vision.embeddings(pixels))

    def _vision_from(self, h: Tensor, start: int) -> Tensor:
        vision = self.clip.vision_model
        for layer in vision.encoder.layers[start:]:
            h = _hidden(layer(h, None))
        return self.clip.visual_projection(vision.post_layernorm(h[:, 0]))

    def _text_input(self, embedded: Tensor) -> Tensor:
        positions = self.clip.text_model.embeddings
        return embedded + positions.position_embedding(positions.position_ids[:, : embedded.shape[1]])

    def _text_from(self, h: Tensor, start: int, eos: Tensor) -> Tensor:
        text = self.clip.text_model
        mask = self._causal(h)
        for layer in text.encoder.layers[start:]:
            h = _hidden(layer(h, mask, is_causal=True))
        h = text.final_layer_norm(h)
        return self.clip.text_projection(h[torch.arange(len(h), device=h.device), eos])

    def end_positions(self, embedded: Tensor) -> Tensor:
        """(B,) the first end-of-text position of each sequence, found from the embeddings."""
        hit = matches(embedded, self.token_embedding.weight[self.eos_id])
        if not hit.any(1).all():
            raise MmdiagError("inputs.text: a sequence has no end-of-text token; tokenise with the model's processor, which adds it")
        return hit.int().argmax(1)

    def shared_embeddings(self, encoded):
        """Each modality present in `encoded`, projected and normalised, from that modality alone."""
        out = {}
        if "image" in encoded:
            out["image"] = _normalise(self._vision_from(self._vision_input(encoded["image"]), 0))
        if "text" in encoded:
            e = encoded["text"]
            out["text"] = _normalise(self._text_from(self._text_input(e), 0, self.end_positions(e)))
        return out

    def layers(self):
        vision = self.clip.vision_model
        named: dict[str, nn.Module] = {f"vision.layer{i}": layer for i, layer in enumerate(vision.encoder.layers)}
        named |= {"vision.final": vision.post_layernorm, "image_embeds": self.clip.visual_projection}
        if "text" in self.modalities:
            text = self.clip.text_model
            named |= {f"text.layer{i}": layer for i, layer in enumerate(text.encoder.layers)}
            named |= {"text.final": text.final_layer_norm, "text_embeds": self.clip.text_projection}
        return named | {"decision": self.module.decision}

    @property
    def m2ib_layers(self) -> dict[str, str]:
        """The default bottleneck layer per tower: the paper's layer 9 of 12, scaled to the depth."""
        depth = {"image": ("vision", self.clip.config.vision_config.num_hidden_layers), "text": ("text", self.clip.config.text_config.num_hidden_layers)}
        return {m: f"{tower}.layer{min(n - 1, 3 * n // 4)}" for m, (tower, n) in depth.items() if m in self.modalities}

    def bottleneck_site(self, modality: str, layer: str, encoded) -> BottleneckSite:
        """The output of hidden layer `layer` ("vision.layer9", "text.layer9") of `modality`'s
        tower on the clean input, and the rest of that tower from there."""
        tower = {"image": "vision", "text": "text"}.get(modality)
        n = len(getattr(self.clip, f"{tower}_model").encoder.layers) if tower else 0
        index = layer.removeprefix(f"{tower}.layer")
        if tower is None or modality not in self.modalities or not index.isdigit() or int(index) >= n:
            names = f"{tower}.layer0 .. {tower}.layer{n - 1}" if tower else "image or text"
            raise MmdiagError(f"stages.unimodal.m2ib_layers.{modality}: {layer!r} is not a hidden layer of this tower; choose one of {names}")
        i = int(index)
        x = encoded[modality].detach()
        b = len(x)
        if modality == "image":
            h = self._vision_input(x)
            for block in self.clip.vision_model.encoder.layers[: i + 1]:
                h = _hidden(block(h, None))
            grid = torch.arange(-1, h.shape[1] - 1, device=x.device)  # position 0 is [CLS]
            return BottleneckSite(h, grid.expand(b, -1), torch.ones(h.shape[:2], dtype=torch.bool, device=x.device), lambda z: _normalise(self._vision_from(z, i + 1)))
        if self.text_units == "words":
            raise MmdiagError(
                "stages.unimodal.m2ib_layers.text: a hidden-layer bottleneck scores tokens, this model's text units are words; load it with text_units='tokens' or leave m2ib_layers unset"
            )
        eos = self.end_positions(x)
        h = self._text_input(x)
        mask = self._causal(h)
        for block in self.clip.text_model.encoder.layers[: i + 1]:
            h = _hidden(block(h, mask, is_causal=True))
        weight = self.token_embedding.weight
        fixed = matches(x, weight[self.pad_id]) | matches(x, weight[self.eos_id]) | matches(x, weight[self.bos_id])
        positions = torch.arange(x.shape[1], device=x.device).expand(b, -1)
        unit = torch.where(fixed, -1, positions)
        inside = positions <= eos[:, None]  # positions after the end token cannot reach it (causal attention)
        return BottleneckSite(h, unit, inside, lambda z: _normalise(self._text_from(z, i + 1, eos.repeat_interleave(len(z) // b))))

    def _causal(self, h: Tensor):
        import inspect

        from transformers.masking_utils import create_causal_mask

        # no cache: the argument is `past_key_values` in older transformers 5 releases, `cache` in newer ones
        name = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
        return create_causal_mask(config=self.clip.text_model.config, inputs_embeds=h, attention_mask=None, **{name: None})


class _Matching(nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.decision = Identity()  # u * v: the image and text embeddings multiplied element-wise


class CLIPAdapter(_CLIP):
    """Image-text matching. Output: two logits (mismatch, match) = (-d/2, d/2), d = the scaled
    cosine similarity s of the pair minus `threshold`, so that P(match) = sigmoid(s - threshold).
    Labels: 1 where the text is the image's own caption, 0 for a mismatched one. The decision
    features are u * v (normalised embeddings multiplied element-wise, s = scale * sum), and
    `head()` is the linear layer that turns them into the two logits exactly."""

    modalities = ("image", "text")

    def __init__(self, model, processor=None, *, threshold: float = 0.0, class_names: Sequence[str] = ("mismatch", "match"), text_units: str = "tokens"):
        self.module = _Matching(model)
        super().__init__(model, processor, text_units)
        self.threshold = float(threshold)
        self.class_names = list(class_names)

    def score(self, encoded) -> Tensor:
        """(B,) the pair's scaled cosine similarity: CLIP's logits_per_image of the pair."""
        return self._similarity(self.shared_embeddings(encoded))

    def _similarity(self, e: dict[str, Tensor]) -> Tensor:
        return self.clip.logit_scale.exp() * self.module.decision(e["image"] * e["text"]).sum(-1)

    def separate(self, encoded):
        """CLIP is late fusion: the modalities meet only in the cosine of their embeddings."""
        return self.shared_embeddings(encoded)

    def fuse(self, features):
        d = self._similarity(features) - self.threshold
        return torch.stack([-d / 2, d / 2], dim=1)

    def forward(self, encoded):
        return self.fuse(self.shared_embeddings(encoded))

    def head(self):
        scale = float(self.clip.logit_scale.detach().exp())
        dim = self.clip.config.projection_dim
        linear = nn.Linear(dim, 2).to(self.clip.logit_scale.device)
        with torch.no_grad():
            linear.weight.copy_(torch.tensor([[-scale / 2], [scale / 2]]).expand(2, dim))
            linear.bias.copy_(torch.tensor([self.threshold / 2, -self.threshold / 2]))
        return linear


class _ZeroShot(nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.decision = Identity()  # the normalised image embedding

    def set_prompts(self, prompts: Tensor) -> None:
        """The head: scaled cosine similarity with each prompt's normalised embedding."""
        self.head = nn.Linear(prompts.shape[1], prompts.shape[0], bias=False).to(prompts.device)
        with torch.no_grad():
            self.head.weight.copy_(self.clip.logit_scale.exp() * prompts)


class CLIPZeroShotAdapter(_CLIP):
    """Zero-shot classification: the image is the only modality, the logits are its scaled
    cosine similarities with the prompts' embeddings (CLIP's logits_per_image), computed once.
    Stage 2 needs two modalities and M2IB a second embedding to fit, so both need the matching
    adapter; stages 1, 3 and 4 work, and the head is exact (a linear layer over the normalised
    image embedding)."""

    modalities = ("image",)

    def __init__(self, model, processor=None, *, prompts: Sequence[str] | None = None, prompt_ids: Tensor | None = None, class_names: Sequence[str] | None = None):
        self.module = _ZeroShot(model)
        super().__init__(model, processor)
        if prompt_ids is None:
            if prompts is None or processor is None:
                raise MmdiagError("model: zero-shot CLIP needs prompts and a processor to tokenise them (or prompt_ids)")
            prompt_ids, _ = tokenize(processor.tokenizer, prompts, self.max_length)
        check_ids(prompt_ids, self.vocab_size, self.max_length, "CLIP")
        with torch.no_grad():
            e = self.token_embedding(prompt_ids)
            text = _normalise(self._text_from(self._text_input(e), 0, self.end_positions(e)))
        self.module.set_prompts(text)
        self.class_names = list(class_names if class_names is not None else prompts or [str(i) for i in range(len(prompt_ids))])

    def forward(self, encoded):
        image = _normalise(self._vision_from(self._vision_input(encoded["image"]), 0))
        return self.module.head(self.module.decision(image))

    def head(self):
        return self.module.head

    @property
    def has_shared_space(self) -> bool:
        return False


def load_clip(
    path_or_id: str | Path,
    *,
    prompts: Sequence[str] | None = None,
    threshold: float = 0.0,
    processor=None,
    text_units: str = "tokens",
    local_files_only: bool = False,
) -> _CLIP:
    """A CLIP adapter from a local folder or a Hugging Face id: matching (image, text) by
    default, zero-shot classification over `prompts` when given. The processor is loaded from
    the same place unless given. `text_units="words"`: the BPE pieces of a word are one unit."""
    from transformers import CLIPModel

    model = pretrained(CLIPModel, path_or_id, "a CLIP model", local_files_only)
    processor = processor if processor is not None else processor_or_none(path_or_id, local_files_only)
    if prompts is not None:
        return CLIPZeroShotAdapter(model, processor, prompts=prompts)
    return CLIPAdapter(model, processor, threshold=threshold, text_units=text_units)
