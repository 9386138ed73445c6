"""Generative vision-language models (LLaVA, PaliGemma, Qwen2-VL, Qwen2.5-VL) as classifiers
over a closed set of candidate answers.

The logit of candidate k is the log-likelihood of its tokens after the image and the prompt,
by teacher forcing: log p(a_k,1 | x) + log p(a_k,2 | x, a_k,1) + ... . When every candidate is
one token this is one forward pass (the log-softmax at the answer position, read at the
candidates' tokens); otherwise the prompt runs once with a KV cache that the K continuations
share (`prefix_reuse=False` runs K full sequences instead, for comparison).

Inputs: `image` = the processor's pixel values (B, 3, H, W) (Qwen2-VL: unpatched from its flat
patches, every image resized to the adapter's `image_size`); `text` = the prompt's token ids
(B, L), left-padded, made by `vlm_samples`: [pad...] prefix, question, suffix, where the prefix
holds the template's opening, the image placeholders and the start token as the family places
them. `encode` gives the pixels and, per token, its embedding with one more channel: its
presence (1 for a token, 0 for padding). The model's own forward puts the image features at the
placeholders, found from the embeddings (placeholders are never removed, so their rows are exact).

Units: the patch grid of the vision tower's pixel grid (a removed patch is 0 in normalised
pixel space, the processor's mean colour), and the words of the question (the pieces of one
word are one unit; pipeline.hf.words). Template tokens, placeholders, the start token and
padding are never removed. A removed word is deleted, as if the question had been written
without it: its presence is 0, so no token attends to it, and the positions after it close the
gap (position = the number of present tokens before it). That is what the model saw in training
when a word was absent; a token it never saw in a question (the unknown token, a [MASK]) moves a
language model's answer by itself. The presence is continuous for soft masks (integrated
gradients, IBA): a key weighs in at presence w (log w added to its attention scores) and the
positions after it move by w, so the path from the question to the question without the word is
smooth and the methods' completeness holds.

Layers: `vision` (the vision tower's last hidden states), `projector` (the image features in the
language model's space), `lm.layer{d}` (the language model's hidden state at the answer
position after layer d) and `decision` (the final-normed state there, the LM head's input).
`head()` is the LM head's rows of the candidates' tokens: exact (up to the log-softmax's
normaliser, which is the same for every candidate) when every candidate is one token.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from mmdiag.pipeline.adapter import ModelAdapter
from mmdiag.pipeline.data import Counterfactual, SampleSet
from mmdiag.pipeline.errors import MmdiagError
from mmdiag.pipeline.hf.common import check_vocab, counterfactual_lists, matches, pretrained, processor_or_none, vocabulary
from mmdiag.pipeline.hf.words import word_units, words
from mmdiag.pipeline.units import PatchGrid

IMAGE, QUESTION = "<image>", "{question}"
OPEN_CLASSES = ("target", "model's answer")  # open mode: class 0 is the sample's own answer
# stage 2 runs the model under vmap, where the placeholder merge (masked_scatter) has no batching
# rule yet: torch warns once per call that it loops instead; the numbers are the same
warnings.filterwarnings("ignore", message=".*batching rule for aten::masked_scatter.*")


@dataclass(frozen=True)
class Grid:
    """The image as a family's model takes it: its pixel size, the side of one unit (the pixels
    behind one image token of the language model) and the number of image tokens."""

    height: int
    width: int
    unit: int
    tokens: int
    patch: int  # the vision tower's patch (a unit is merge x merge of them)

    @property
    def merge(self) -> int:
        return self.unit // self.patch


@dataclass(frozen=True)
class Family:
    """What differs between the supported architectures (one record each in FAMILIES)."""

    name: str
    prompt: str  # the default template
    start_after_image: bool = False  # PaliGemma: image tokens, then <bos>, then the prompt
    first_position: int = 0  # the position id of the first real token
    bidirectional_prefix: bool = False  # PaliGemma: the image and prompt attend both ways

    def grid(self, config, image_size) -> Grid:
        vision = config.vision_config
        if image_size is not None and _pair(image_size) != (vision.image_size, vision.image_size):
            raise MmdiagError(f"image_size: a {self.name} model takes images of {vision.image_size} px only; leave image_size out")
        full = getattr(config, "vision_feature_select_strategy", "default") == "full"
        return Grid(vision.image_size, vision.image_size, vision.patch_size, (vision.image_size // vision.patch_size) ** 2 + int(full), vision.patch_size)

    def vision_inputs(self, pixels: Tensor, grid: Grid) -> dict:
        return {"pixel_values": pixels}

    def resized(self, picture, grid: Grid):
        return picture  # the processor makes the one size the vision tower takes

    def pixels(self, processed, grid: Grid) -> Tensor:
        """One image's pixel values (3, H, W) from its processor's output."""
        return processed["pixel_values"][0].float()

    def positions(self, present: Tensor, image: Tensor, grid: Grid) -> Tensor:
        """Position ids (B, L): the number of present tokens before each (a deleted word closes
        its gap), from the family's first position."""
        return (present.cumsum(1) - 1 + self.first_position).clamp_min(0)

    def towers(self, model, points: dict) -> dict[str, nn.Module]:
        return {"vision": model.model.vision_tower, "projector": model.model.multi_modal_projector}

    def feeds(self, model, points: dict) -> dict[str, nn.Module]:
        """Modules whose outputs feed the points of `towers` (none where they are modules)."""
        return {}


@dataclass(frozen=True)
class Qwen2VL(Family):
    """Qwen2-VL and Qwen2.5-VL: any image size (a multiple of the merged patch), the vision
    tower's patches flattened and merged 2 x 2 into one image token, multimodal rotary positions
    (temporal, height, width)."""

    default_size: int = 448

    def grid(self, config, image_size) -> Grid:
        vision = config.vision_config
        unit = vision.patch_size * vision.spatial_merge_size
        height, width = _pair(image_size if image_size is not None else self.default_size)
        if height % unit or width % unit or min(height, width) < unit:
            raise MmdiagError(f"image_size: {height} x {width} px is not a grid of the model's {unit} px image tokens; give multiples of {unit}")
        return Grid(height, width, unit, (height // unit) * (width // unit), vision.patch_size)

    def vision_inputs(self, pixels: Tensor, grid: Grid) -> dict:
        thw = torch.tensor([[1, grid.height // grid.patch, grid.width // grid.patch]], device=pixels.device).expand(len(pixels), 3)
        return {"pixel_values": _patches(pixels, grid.patch, grid.merge), "image_grid_thw": thw}

    def resized(self, picture, grid: Grid):
        """The image at the grid's size (the processor would pick a size of its own per image)."""
        import PIL.Image

        image = picture if isinstance(picture, PIL.Image.Image) else PIL.Image.fromarray(np.asarray(picture))
        return image.convert("RGB").resize((grid.width, grid.height), PIL.Image.BICUBIC)

    def pixels(self, processed, grid: Grid) -> Tensor:
        _, rows, cols = processed["image_grid_thw"][0].tolist()
        return _unpatched(processed["pixel_values"].float(), rows, cols, grid.patch, grid.merge)

    def positions(self, present: Tensor, image: Tensor, grid: Grid) -> Tensor:
        """(3, B, L): a text token's three positions are the number of positions before it (a
        deleted word closes its gap); the image tokens sit at the image's first position plus
        their row and column, and the image takes as many positions as its longer side has
        tokens, as the model's own get_rope_index places them."""
        across = grid.width // grid.unit
        nth = image.long().cumsum(1) - 1
        last = image & (nth == grid.tokens - 1)
        step = torch.where(image, last.to(present.dtype) * (max(grid.height, grid.width) // grid.unit), present)
        before = step.cumsum(1) - step
        row, col = (torch.where(image, x, 0).to(before.dtype) for x in (nth // across, nth % across))
        return torch.stack([before, before + row, before + col])

    def towers(self, model, points: dict) -> dict[str, nn.Module]:
        return {"vision": points["vision"], "projector": points["projector"]}

    def feeds(self, model, points: dict) -> dict[str, nn.Module]:
        return {"vision": model.model.visual.blocks[-1], "projector": model.model.visual.merger}


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else tuple(int(x) for x in size)


def _patches(pixels: Tensor, patch: int, merge: int, temporal: int = 2) -> Tensor:
    """Images (B, C, H, W) -> the vision tower's flat patches (B * patches, C * temporal *
    patch * patch), merge windows contiguous, each image repeated over the temporal patch (the
    layout of Qwen2-VL's image processor)."""
    b, c, h, w = pixels.shape
    x = pixels.reshape(b, c, h // (patch * merge), merge, patch, w // (patch * merge), merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # batch, rows, cols of windows, merge rows, merge cols, channel, patch, patch
    x = x.unsqueeze(6).expand(*x.shape[:6], temporal, patch, patch)
    return x.reshape(b * (h // patch) * (w // patch), c * temporal * patch * patch)


def _unpatched(flat: Tensor, rows: int, cols: int, patch: int, merge: int, temporal: int = 2) -> Tensor:
    """The inverse of _patches for one image: (rows * cols, C * temporal * patch * patch) -> (C, H, W)."""
    c = flat.shape[1] // (temporal * patch * patch)
    x = flat.reshape(rows // merge, cols // merge, merge, merge, c, temporal, patch, patch)[:, :, :, :, :, 0]
    return x.permute(4, 0, 2, 5, 1, 3, 6).reshape(c, rows * patch, cols * patch)


FAMILIES = {
    "llava": Family("llava", "USER: <image>\n{question} ASSISTANT:"),
    "paligemma": Family("paligemma", "<image>{question}\n", start_after_image=True, first_position=1, bidirectional_prefix=True),
    "qwen2_vl": Qwen2VL("qwen2_vl", "<|im_start|>user\n<|vision_start|><image><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"),
    "qwen2_5_vl": Qwen2VL("qwen2_5_vl", "<|im_start|>user\n<|vision_start|><image><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"),
}


class Point(nn.Module):
    """A named point to read with a hook."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def _cache_name(module: nn.Module) -> str:
    # the KV cache argument is `past_key_values` in older transformers 5 releases, `cache` in newer ones
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


class Prompt:
    """A family's prompt template around a question: token ids of whole prompts, left-padded,
    and which of their tokens are the question's (the only ones a stage removes)."""

    def __init__(self, tokenizer, family: Family, template: str, image_id: int, n_image_tokens: int, pad_id: int):
        self.tokenizer, self.family, self.template = tokenizer, family, template
        self.pad_id = pad_id
        self.vocab = vocabulary(tokenizer)
        if template.count(IMAGE) != 1:
            raise MmdiagError(f"prompt: {template!r} must hold the image placeholder {IMAGE} exactly once; write e.g. {family.prompt!r}")
        if template.count(QUESTION) != 1 or template.index(QUESTION) < template.index(IMAGE):
            raise MmdiagError(f"prompt: {template!r} must hold {QUESTION} once, after {IMAGE}; write e.g. {family.prompt!r}")
        before, rest = template.split(IMAGE)
        between, after = rest.split(QUESTION)
        start = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.special = {t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, image_id, pad_id) if t is not None}
        image = [image_id] * n_image_tokens
        if family.start_after_image:
            self.prefix = self.ids(before) + image + start + self.ids(between)
        else:
            self.prefix = start + self.ids(before) + image + self.ids(between)
        self.suffix = self.ids(after)
        if pad_id in self.prefix + self.suffix:
            raise MmdiagError(f"prompt: {template!r} tokenises to the pad token; reword the template")

    def ids(self, text: str) -> list[int]:
        # the template's pieces are tokenised apart: spaces at their ends would be tokens of their own
        text = text.strip(" ")
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def __call__(self, questions: Sequence[str], length: int | None = None) -> Tensor:
        """Token ids (N, L) of the prompts, left-padded to `length` (default: the longest)."""
        rows = []
        for i, q in enumerate(questions):
            asked = self.ids(str(q))
            if not asked:
                raise MmdiagError(f"data.questions: question {i} is empty; give every sample a question")
            if self.special & set(asked):
                raise MmdiagError(f"data.questions: question {i} ({str(q)[:60]!r}) holds a special token (pad, start, end or image); remove it")
            rows.append(self.prefix + asked + self.suffix)
        longest = max(map(len, rows), default=0)
        length = length or longest
        if longest > length:
            raise MmdiagError(f"data.questions: a prompt has {longest} tokens, more than length={length}; raise length")
        return torch.tensor([[self.pad_id] * (length - len(r)) + r for r in rows], dtype=torch.long)

    def question(self, ids: Tensor) -> Tensor:
        """(B, L) bool: the question's tokens; every row checked against the template."""
        b, length = ids.shape
        real = ids != self.pad_id
        start = real.int().argmax(1)
        p, s = len(self.prefix), len(self.suffix)
        positions = torch.arange(length, device=ids.device).expand(b, length)
        opening = ids.gather(1, (start[:, None] + torch.arange(p, device=ids.device)).clamp(max=length - 1))
        ok = (
            (real == (positions >= start[:, None])).all(1)  # padding, then only real tokens
            & (length - start >= p + s)
            & (opening == torch.tensor(self.prefix, dtype=ids.dtype, device=ids.device)).all(1)
            & (ids[:, length - s :] == torch.tensor(self.suffix, dtype=ids.dtype, device=ids.device)).all(1)
        )
        if not ok.all():
            raise MmdiagError(f"inputs.text: row {int((~ok).nonzero()[0])} is not a left-padded prompt of this model's template {self.template!r}; build the data with pipeline.hf.vlm_samples")
        return (positions >= start[:, None] + p) & (positions < length - s)

    def labels(self, ids: Tensor) -> list[list[str]]:
        """Per position of each prompt: the whole word at its first piece, the token elsewhere."""
        return words(ids, ~self.question(ids), self.vocab)[1]


class VLMAdapter(ModelAdapter):
    modalities = ("image", "text")
    joint_fusion = True  # the question's tokens attend to the image's in the language model

    def __init__(
        self,
        model,
        processor,
        answers: Sequence[str] | None,
        *,
        prompt: str | None = None,
        class_names: Sequence[str] | None = None,
        prefix_reuse: bool = True,
        answer_length: int = 8,
        image_size: int | tuple[int, int] | None = None,
    ):
        config = model.config
        family = FAMILIES.get(config.model_type)
        if family is None:
            raise MmdiagError(f"model: {type(model).__name__} ({config.model_type!r}) is not a supported image-text-to-text model; mmdiag supports {', '.join(FAMILIES)}")
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise MmdiagError("model: the VLM was loaded without a processor (tokenizer and image processor); load it from a folder that has one, or pass processor=")
        self.module, self.processor, self.family, self.tokenizer = model.eval(), processor, family, tokenizer
        self.prefix_reuse = prefix_reuse
        text = config.text_config
        self.vocab_size = text.vocab_size
        check_vocab(tokenizer, self.vocab_size, family.name)
        self.image_id = config.image_token_id
        self.grid = family.grid(config, image_size)
        self.n_image_tokens = self.grid.tokens
        self.pad_id = self._special_ids(tokenizer)
        self.prompt = Prompt(tokenizer, family, prompt if prompt is not None else family.prompt, self.image_id, self.n_image_tokens, self.pad_id)
        # open mode (answers=None): each sample carries its own target answer, scored against the
        # model's own greedy answer; both ride at the end of the text input, `answer_length` tokens each
        self.open = answers is None
        if self.open and answer_length < 1:
            raise MmdiagError(f"answer_length: {answer_length} tokens cannot hold an answer; give at least 1")
        self.answer_length = answer_length if self.open else 0
        self.end_id = tokenizer.eos_token_id
        self.answers = list(OPEN_CLASSES) if self.open else [str(a) for a in answers]
        self.candidates = [] if self.open else self._candidates(self.answers)
        self.class_names = list(class_names) if class_names is not None else list(self.answers)
        if len(self.class_names) != len(self.answers):
            raise MmdiagError(f"class_names: {len(self.class_names)} names for {len(self.answers)} answers; give one per answer")
        self.single_token = not self.open and all(len(c) == 1 for c in self.candidates)
        self.candidate_tokens = self._padded(self.candidates)  # (K, T), padded with the pad token
        self.softcap = getattr(text, "final_logit_softcapping", None)
        n = text.num_hidden_layers
        self.depths = sorted({max(1, n // 3), max(1, 2 * n // 3)} - {n})
        self.points = {"decision": Point(), "vision": Point(), "projector": Point(), **{f"lm.layer{d}": Point() for d in self.depths}}
        self._cache_arg = _cache_name(self.module.model)

    # --- set-up checks -------------------------------------------------------------------
    def _special_ids(self, tokenizer) -> int:
        pad = tokenizer.pad_token_id
        if pad is None:
            raise MmdiagError("model: the tokenizer has no pad token; give it one of its own (prompts are left-padded to one length)")
        if pad in (tokenizer.bos_token_id, tokenizer.eos_token_id, self.image_id):
            raise MmdiagError("model: the tokenizer's pad token is also its start, end or image token; prompts are padded with it, so give it a pad token of its own")
        rows = len(self.embedding.weight)
        if max(pad, self.image_id) >= rows:
            raise MmdiagError(f"model: a special token id (pad {pad}, image {self.image_id}) is outside the {rows}-row embedding table; load the processor that belongs to this model")
        with torch.no_grad():
            table = self.embedding(torch.tensor([[pad, self.image_id]], device=self.embedding.weight.device))
            close = matches(table, table[0, 1])[0]  # the tolerance the placeholders are found with
        if close[0]:
            raise MmdiagError("model: the pad token's embedding is within rounding of the image token's, so padding would read as image placeholders; give the pad token a row of its own")
        return pad

    def _candidates(self, answers: list[str]) -> list[list[int]]:
        if len(answers) < 2:
            raise MmdiagError(f"answers: give at least two candidate answers, got {answers}")
        out, seen = [], {}
        for a in answers:
            ids = self.prompt.ids(a)
            if not ids:
                raise MmdiagError(f"answers: {a!r} tokenises to nothing; give a non-empty answer")
            if tuple(ids) in seen:
                raise MmdiagError(f"answers: {a!r} and {seen[tuple(ids)]!r} tokenise to the same tokens {ids}; give answers that differ")
            if self.pad_id in ids or self.image_id in ids:
                raise MmdiagError(f"answers: {a!r} tokenises to the pad or image token; reword it")
            seen[tuple(ids)] = a
            out.append(ids)
        for a, x in zip(answers, out):
            for b, y in zip(answers, out):
                if len(x) < len(y) and y[: len(x)] == x:
                    raise MmdiagError(f"answers: {a!r} is the start of {b!r} (its tokens are a prefix), so {b!r} could never score higher; give answers that differ before one ends")
        return out

    def _padded(self, answers: list[list[int]]) -> Tensor:
        tokens = torch.full((len(answers), max(map(len, answers), default=0)), self.pad_id, dtype=torch.long)
        for i, c in enumerate(answers):
            tokens[i, : len(c)] = torch.tensor(c)
        return tokens

    # --- the adapter -----------------------------------------------------------------------
    @property
    def embedding(self) -> nn.Embedding:
        return self.module.get_input_embeddings()

    @property
    def scale(self) -> float:
        """What the embedding module multiplies the table's rows by (Gemma: sqrt(width))."""
        return float(getattr(self.embedding, "scalar_embed_scale", 1.0))

    def row(self, token: int) -> Tensor:
        """Token `token`'s embedding as the model sees it (the module's output, not the table's row)."""
        return self.embedding.weight[token].detach() * self.scale

    def encode(self, inputs):
        self.check_inputs(inputs)
        pixels = inputs["image"].float()
        if pixels.dim() != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[2:]) != (self.grid.height, self.grid.width):
            raise MmdiagError(
                f"inputs.image: pixel values shaped {tuple(pixels.shape)}, the model takes (B, 3, {self.grid.height}, {self.grid.width}); "
                "process the images with the model's processor (pipeline.hf.vlm_samples)"
            )
        ids = inputs["text"]
        if ids.dim() != 2 or ids.is_floating_point() or (ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size)):
            raise MmdiagError(f"inputs.text: expected token ids (B, L) in 0..{self.vocab_size - 1}; build the data with pipeline.hf.vlm_samples")
        self.question(ids)
        embedded = self.embedding(ids)
        return {"image": pixels, "text": torch.cat([embedded, (ids != self.pad_id).to(embedded.dtype)[..., None]], -1)}

    def question(self, ids: Tensor) -> Tensor:
        """(B, L) bool: the question's tokens (in open mode, the answers after the prompt are not)."""
        spans = 2 * self.answer_length
        if ids.shape[1] <= spans:
            raise MmdiagError(f"inputs.text: rows of {ids.shape[1]} tokens cannot hold a prompt and two answers of {self.answer_length}; build the data with pipeline.hf.vlm_samples")
        asked = self.prompt.question(ids[:, : ids.shape[1] - spans])
        return torch.cat([asked, asked.new_zeros(len(ids), spans)], 1)

    def units(self, inputs, encoded):
        ids = inputs["text"]
        text = encoded["text"]
        deleted = torch.cat([self.row(self.pad_id).to(text.dtype), text.new_zeros(1)])  # the padding's row, presence 0
        return {
            "image": PatchGrid(patch=self.grid.unit, baseline=0.0).build(inputs["image"], encoded["image"]),
            "text": word_units(ids, text, ~self.question(ids), self.prompt.vocab, deleted, deletes=True),
        }

    @staticmethod
    def _split(text: Tensor) -> tuple[Tensor, Tensor]:
        """(the token embeddings (B, L, D), their presence (B, L) in [0, 1])."""
        return text[..., :-1], text[..., -1].clamp(0, 1)

    def _positions(self, embedded: Tensor, present: Tensor) -> Tensor:
        return self.family.positions(present, matches(embedded, self.row(self.image_id)), self.grid)

    @staticmethod
    def _next(positions: Tensor, steps: int, k: int = 1) -> Tensor:
        """The positions of `steps` tokens after the last, each row repeated k times."""
        after = positions[..., -1:] + 1 + torch.arange(steps, device=positions.device)
        return after.repeat_interleave(k, positions.dim() - 2)

    def _bias(self, present: Tensor, queries: int, prompt: int) -> Tensor:
        """(B, 1, queries, keys) the additive attention mask of the last `queries` of the keys
        whose presence is `present` (B, keys): log presence (the lowest number exactly at 0),
        causal, and both ways within the first `prompt` keys where the family reads its
        prefix both ways."""
        keys = present.shape[1]
        low = torch.finfo(present.dtype).min
        at = torch.arange(keys, device=present.device)
        seen = at[None, :] <= at[keys - queries :, None]
        if self.family.bidirectional_prefix:
            seen = seen | (at[None, :] < prompt)
        weight = torch.where(present > 0, present.clamp_min(torch.finfo(present.dtype).tiny).log(), low)
        return torch.where(seen, weight[:, None, None, :], low)

    def _exact_placeholders(self, embedded: Tensor) -> Tensor:
        # the model finds its placeholders by exact equality; a soft mask's base + 1 * (x - base) rounds
        image = self.row(self.image_id).to(embedded.dtype)
        return torch.where(matches(embedded, image)[..., None], image, embedded)

    def _logits(self, hidden: Tensor) -> Tensor:
        logits = self.module.lm_head(hidden)
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap

    def _prompt_pass(self, pixels: Tensor, embedded: Tensor, present: Tensor, cache: bool):
        embedded = self._exact_placeholders(embedded)
        positions = self._positions(embedded, present)
        length = embedded.shape[1]
        with self._reading_depths(len(pixels)):
            out = self.module.model(
                **self.family.vision_inputs(pixels, self.grid), inputs_embeds=embedded, attention_mask=self._bias(present, length, length),
                position_ids=positions, use_cache=cache,
            )  # fmt: skip
        last = self.points["decision"](out.last_hidden_state[:, -1])
        return self._logits(last).log_softmax(-1), out, positions

    def _cache_of(self, out):
        return out[self._cache_arg] if self._cache_arg in out else out.past_key_values

    @contextmanager
    def _reading_depths(self, batch: int):
        """While a stage reads an `lm.layer{d}` point, the output of decoder layer d feeds it its
        answer position's state (every layer's whole sequence is never kept); where the family's
        vision tower flattens the batch's patches, its outputs feed the `vision` and `projector`
        points, one row per image."""
        layers = self.module.model.language_model.layers
        sources = {f"lm.layer{d}": layers[d - 1] for d in self.depths} | self.family.feeds(self.module, self.points)
        read = [name for name in sources if self.points[name]._forward_hooks]

        def feed(name):
            def hook(_module, _inputs, out) -> None:  # returns None: the layer's own output goes on
                out = out if torch.is_tensor(out) else out[0]
                self.points[name](out[:, -1] if name.startswith("lm.") else out.reshape(batch, -1, out.shape[-1]))

            return hook

        handles = [sources[name].register_forward_hook(feed(name)) for name in read]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def forward(self, encoded):
        pixels = encoded["image"]
        embedded, present = self._split(encoded["text"])
        if self.single_token:
            return self._prompt_pass(pixels, embedded, present, cache=False)[0][:, self.candidate_tokens[:, 0].to(embedded.device)]
        prompt, present, tokens, valid, feed = self._answers(embedded, present)
        if not self.prefix_reuse:
            return self._full_sequences(pixels, prompt, present, tokens, valid, feed)
        logp, out, positions = self._prompt_pass(pixels, prompt, present, cache=True)
        b, k, t = tokens.shape
        first = logp.gather(1, tokens[:, :, 0])
        if t == 1:
            return first
        cache = self._cache_of(out)
        cache.batch_repeat_interleave(k)
        ahead = valid[:, :, :-1].reshape(b * k, t - 1).to(present.dtype)
        rest = self.module.model(
            inputs_embeds=feed[:, :, :-1].reshape(b * k, t - 1, -1),
            attention_mask=self._bias(torch.cat([present.repeat_interleave(k, 0), ahead], 1), t - 1, prompt.shape[1]),
            position_ids=self._next(positions, t - 1, k),
            use_cache=True,
            **{self._cache_arg: cache},
        )
        return first + self._later(self._logits(rest.last_hidden_state).log_softmax(-1), tokens, valid)

    def _answers(self, embedded: Tensor, present: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(the prompt's embeddings (B, L, D) and presence (B, L); each sample's K answers:
        tokens (B, K, T), which are real (B, K, T), their embeddings (B, K, T, D)). Closed set:
        the candidates; open mode: the two answers after the prompt, their ids read back from
        their embeddings (never removed, so exact rows of the table)."""
        b = len(embedded)
        if not self.open:
            tokens = self.candidate_tokens.to(embedded.device).expand(b, -1, -1)
            return embedded, present, tokens, tokens != self.pad_id, self.embedding(tokens).to(embedded.dtype)
        t = self.answer_length
        length = embedded.shape[1] - 2 * t
        spans = embedded[:, length:].reshape(b, 2, t, -1)
        tokens = self._nearest(spans.detach())
        return embedded[:, :length], present[:, :length], tokens, tokens != self.pad_id, spans

    def _nearest(self, e: Tensor, chunk: int = 4096) -> Tensor:
        """The token whose embedding is nearest each row of `e` (..., D), over the vocabulary a
        chunk at a time (a (..., V) table of distances would not fit for a large vocabulary)."""
        flat, weight = e.reshape(-1, e.shape[-1]), self.embedding.weight.detach()
        best = torch.full((len(flat),), torch.inf, device=e.device)
        index = torch.zeros(len(flat), dtype=torch.long, device=e.device)
        for start in range(0, len(weight), chunk):
            rows = weight[start : start + chunk].to(e.dtype) * self.scale
            distance = (rows * rows).sum(1) - 2 * flat @ rows.T  # |e|^2 left out: the same for every token
            low, at = distance.min(1)
            better = low < best
            best, index = torch.where(better, low, best), torch.where(better, at + start, index)
        return index.reshape(e.shape[:-1])

    @staticmethod
    def _later(logp: Tensor, tokens: Tensor, valid: Tensor) -> Tensor:
        """(B, K) the log-probabilities of the answers' later tokens, from the log-softmax of
        their continuations (B*K, T-1, V)."""
        b, k, t = tokens.shape
        taken = logp.gather(2, tokens[:, :, 1:].reshape(b * k, t - 1, 1))[..., 0]
        return (taken * valid[:, :, 1:].reshape(b * k, t - 1)).sum(1).reshape(b, k)

    def _full_sequences(self, pixels: Tensor, embedded: Tensor, present: Tensor, tokens: Tensor, valid: Tensor, feed: Tensor) -> Tensor:
        """Without prefix reuse: each answer appended to the whole prompt, K sequences a sample."""
        b, k, t = tokens.shape
        length = embedded.shape[1]
        embedded = self._exact_placeholders(embedded)
        positions = self._positions(embedded, present)
        ahead = valid[:, :, :-1].reshape(b * k, t - 1).to(present.dtype)
        whole = torch.cat([embedded.repeat_interleave(k, 0), feed[:, :, :-1].reshape(b * k, t - 1, -1)], 1)
        positions = torch.cat([positions.repeat_interleave(k, positions.dim() - 2), self._next(positions, t - 1, k)], -1)
        everything = torch.cat([present.repeat_interleave(k, 0), ahead], 1)
        out = self.module.model(
            **self.family.vision_inputs(pixels.repeat_interleave(k, 0), self.grid), inputs_embeds=whole,
            attention_mask=self._bias(everything, whole.shape[1], length), position_ids=positions, use_cache=False,
        )  # fmt: skip
        logp = self._logits(out.last_hidden_state[:, length - 1 :]).log_softmax(-1)  # (B*K, T, V)
        first = logp[:, 0].gather(1, tokens[:, :, 0].reshape(b * k, 1)).reshape(b, k)
        return first + self._later(logp[:, 1:], tokens, valid)

    @torch.no_grad()
    def greedy(self, pixels: Tensor, ids: Tensor, length: int, ban: Tensor | None = None) -> Tensor:
        """The model's own answers (N, length) to the prompts, greedy over every token but the
        pad and image tokens, to the end token (kept) or `length` tokens, padded; `ban` (N,): a
        first token a row's answer may not start with (-1: none)."""
        embedded = self.embedding(ids)
        present = (ids != self.pad_id).to(embedded.dtype)
        prompt = ids.shape[1]
        logp, out, positions = self._prompt_pass(pixels, embedded, present, cache=True)
        if ban is not None:
            banned = ban >= 0
            logp[banned, ban[banned]] = -torch.inf
        cache = self._cache_of(out)
        answers = torch.full((len(ids), length), self.pad_id, dtype=torch.long, device=ids.device)
        done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
        for step in range(length):
            logp[:, [self.pad_id, self.image_id]] = -torch.inf  # not answers: padding marks the end of a span, placeholders take image features
            logp[:, len(self.tokenizer) :] = -torch.inf  # rows the vocabulary was padded with: no token
            token = logp.argmax(-1)
            answers[:, step] = torch.where(done, self.pad_id, token)
            done |= token == self.end_id if self.end_id is not None else torch.zeros_like(done)
            if done.all() or step == length - 1:
                break
            present = torch.cat([present, torch.ones_like(present[:, :1])], 1)
            positions = self._next(positions, 1)
            out = self.module.model(
                inputs_embeds=self.embedding(token[:, None]), attention_mask=self._bias(present, 1, prompt), position_ids=positions, use_cache=True,
                **{self._cache_arg: cache},
            )  # fmt: skip
            logp = self._logits(out.last_hidden_state[:, -1]).log_softmax(-1)
        return answers

    def layers(self):
        if not self.prefix_reuse and not self.single_token:
            raise MmdiagError(
                "layers: with prefix_reuse=False each answer runs after its own copy of the prompt, so a layer sees K copies of a sample; "
                "load the model with prefix_reuse=True (the default) to read its layers"
            )
        return {**self.points, **self.family.towers(self.module, self.points)}

    def head(self):
        """The LM head's rows of the candidates' tokens, on the decision features; None when a
        candidate has more than one token (its later tokens depend on more than the answer
        position's state) or the model caps its logits (not linear then)."""
        if not self.single_token or self.softcap is not None:
            return None
        rows = [c[0] for c in self.candidates]
        lm = self.module.lm_head
        linear = nn.Linear(lm.in_features, len(rows), bias=lm.bias is not None).to(lm.weight.device)
        with torch.no_grad():
            linear.weight.copy_(lm.weight[rows])
            if lm.bias is not None:
                linear.bias.copy_(lm.bias[rows])
        return linear

    @property
    def one_label(self) -> bool:
        return self.open

    @property
    def head_caveat(self) -> str | None:
        if self.softcap is not None:
            return f"the language model caps its logits (tanh, final_logit_softcapping {self.softcap}), so they are not linear in the answer position's state"
        if self.single_token:
            return None
        if self.open:
            return "each sample scores its own two answers (its target and the model's), so no head is shared by the samples"
        return "a candidate answer has more than one token, so its log-likelihood is not linear in the answer position's state; the exact decomposition holds for one-token answers"


def load_vlm(
    path_or_id: str | Path,
    answers: Sequence[str] | None,
    *,
    prompt: str | None = None,
    processor=None,
    class_names: Sequence[str] | None = None,
    prefix_reuse: bool = True,
    answer_length: int = 8,
    image_size: int | tuple[int, int] | None = None,
    local_files_only: bool = False,
) -> VLMAdapter:
    """A VLM adapter from a local folder (written by save_pretrained) or a Hugging Face id in the
    local cache, scoring the closed set `answers`, or with answers=None each sample's own target
    answer against the model's (open mode, answers of at most `answer_length` tokens); the
    processor comes from the same place unless given. `prompt` holds <image> and {question};
    default: the family's own template. `image_size` (Qwen2-VL, which takes any size): the size
    every image is resized to, a multiple of the 28 px image token (default 448)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        model_type = AutoConfig.from_pretrained(str(path_or_id), local_files_only=local_files_only).model_type
    except (OSError, ValueError) as e:
        raise MmdiagError(f"model: cannot read a config at {str(path_or_id)!r} ({str(e).strip().splitlines()[0][:160]}); give a folder written by save_pretrained") from None
    if model_type not in FAMILIES:
        raise MmdiagError(f"model: {str(path_or_id)!r} is a {model_type!r} model; mmdiag's image-text-to-text adapter supports {', '.join(FAMILIES)}")
    model = pretrained(AutoModelForImageTextToText, path_or_id, f"a {model_type} model", local_files_only)
    processor = processor if processor is not None else processor_or_none(path_or_id, local_files_only)
    return VLMAdapter(model, processor, answers, prompt=prompt, class_names=class_names, prefix_reuse=prefix_reuse, answer_length=answer_length, image_size=image_size)


def vlm_samples(
    adapter: VLMAdapter,
    images: Sequence,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    meta: dict[str, Tensor] | None = None,
    truth: dict[str, dict[str, Tensor]] | None = None,
    length: int | None = None,
    truth_concepts: dict[str, dict[str, str]] | None = None,
    class_concepts: list[str] | None = None,
    counterfactuals: dict[str, dict[str, Sequence]] | None = None,
    name: str = "data",
) -> SampleSet:
    """A SampleSet for a VLM adapter: the images through its image processor, each question in
    its prompt template (left-padded to one length), each sample's answer one of the
    adapter's candidates (its label). Truth masks: images over the processed pixel grid, text
    over the prompt's token positions; `truth_concepts` ({modality: {region: concept of meta}})
    and `class_concepts` link them to the concepts, as in any SampleSet. `counterfactuals`:
    {concept: {"images": [...], "questions": [...], "answers": [...], "valid": [...]}}, each
    sample with the concept flipped (images and questions as for the samples, one per sample; the
    answers the flipped samples have, if known; which samples have one), made into the
    SampleSet's counterfactuals the same way (closed set only for questions and answers).

    In open mode (load_vlm(..., answers=None)) `answers` are each sample's own target answers:
    the text input then ends with the target (and the end token) and the model's best other
    answer (its greedy answer, or where that is the target, its best answer that starts
    otherwise), `answer_length` tokens each; the label is class 0 ("target"), so the model is
    right where the target's log-likelihood beats that answer's. Like the closed set, this ranks
    whole answers by likelihood, which can disagree with greedy decoding: a short answer that
    starts with a less likely token can outscore the greedy one."""
    images, questions, answers = list(images), [str(q) for q in questions], [str(a) for a in answers]
    if not images:
        raise MmdiagError("data: no images; give at least one sample")
    if not len(images) == len(questions) == len(answers):
        raise MmdiagError(f"data: {len(images)} images, {len(questions)} questions and {len(answers)} answers; give one of each per sample")
    unknown = [] if adapter.open else sorted({a for a in answers if a not in adapter.answers})
    if unknown:
        raise MmdiagError(f"data.answers: {unknown[0]!r} is not one of the model's candidate answers ({', '.join(adapter.answers)})")
    pixels = _pixels(adapter, images, "data.images")
    flips = _flips(counterfactuals or {}, len(images), adapter)
    if length is None:  # one length for the questions and their counterfactuals
        length = max(adapter.prompt(q).shape[1] for q in [questions, *(f["questions"] for f in flips.values() if f.get("questions") is not None)])
    ids = adapter.prompt(questions, length)
    display = {"caption": questions}
    if adapter.open:
        ids, display["model_answer"] = _with_answers(adapter, pixels, ids, answers)
        labels = torch.zeros(len(ids), dtype=torch.long)
    else:
        index = {a: i for i, a in enumerate(adapter.answers)}
        labels = torch.tensor([index[a] for a in answers], dtype=torch.long)
    made = {c: _counterfactual(adapter, f, length, c) for c, f in flips.items()}
    text = truth.get("text") if truth else None
    if text:  # masks over the prompt's positions: the answers after it are never a region
        truth = {**truth, "text": {r: torch.cat([m, m.new_zeros(len(m), ids.shape[1] - m.shape[1])], 1) if m.shape[1] < ids.shape[1] else m for r, m in text.items()}}
    return SampleSet(
        inputs={"image": pixels, "text": ids},
        labels=labels,
        meta=dict(meta or {}),
        truth=dict(truth or {}),
        truth_concepts=dict(truth_concepts or {}),
        class_concepts=class_concepts,
        counterfactuals=made,
        display={"text": words(ids, ~adapter.question(ids), adapter.prompt.vocab)[1], **display},
        class_names=list(adapter.class_names),
        name=name,
    )


def _pixels(adapter: VLMAdapter, images: list, field: str) -> Tensor:
    """The processor's pixel values (N, 3, H, W), one image at a time (one line naming the bad one)."""
    pixels = []
    for i, picture in enumerate(images):
        try:
            processed = adapter.processor.image_processor(images=[adapter.family.resized(picture, adapter.grid)], return_tensors="pt")
            pixels.append(adapter.family.pixels(processed, adapter.grid))
        except Exception as e:  # the processor's own errors, of many types
            raise MmdiagError(f"{field}: the processor cannot take image {i} ({type(e).__name__}: {' '.join(str(e).split())[:120]}); give RGB images (PIL or H x W x 3 uint8)") from None
    pixels = torch.stack(pixels)
    if tuple(pixels.shape[1:]) != (3, adapter.grid.height, adapter.grid.width):
        raise MmdiagError(
            f"{field}: the processor makes {tuple(pixels.shape[1:])} pixel values, the model takes (3, {adapter.grid.height}, {adapter.grid.width}); "
            "load the processor that belongs to this model (a Qwen2-VL processor keeps an image of image_size only where its min_pixels and max_pixels allow it)"
        )
    return pixels


FLIP_KEYS = ("images", "questions", "answers", "valid")


def _flips(given: dict, n: int, adapter: VLMAdapter) -> dict[str, dict]:
    """The counterfactuals' lists, checked (open answers flip images only)."""
    out = counterfactual_lists(given, n, FLIP_KEYS, ("images", "questions"))
    for concept, flip in out.items():
        if adapter.open and ("questions" in flip or "answers" in flip):
            raise MmdiagError(f"data.counterfactuals.{concept}: open answers take counterfactual images only; load the model with a closed set of answers to flip questions")
    return out


def _counterfactual(adapter: VLMAdapter, flip: dict, length: int, concept: str) -> Counterfactual:
    where = f"data.counterfactuals.{concept}"
    inputs = {}
    if "images" in flip:
        inputs["image"] = _pixels(adapter, flip["images"], f"{where}.images")
    if "questions" in flip:
        inputs["text"] = adapter.prompt([str(q) for q in flip["questions"]], length)
    labels = None
    if "answers" in flip:
        unknown = sorted({str(a) for a in flip["answers"] if str(a) not in adapter.answers})
        if unknown:
            raise MmdiagError(f"{where}.answers: {unknown[0]!r} is not one of the model's candidate answers ({', '.join(adapter.answers)})")
        labels = torch.tensor([adapter.answers.index(str(a)) for a in flip["answers"]], dtype=torch.long)
    valid = torch.tensor([bool(v) for v in flip["valid"]]) if "valid" in flip else None
    return Counterfactual(inputs, labels, valid)


def _with_answers(adapter: VLMAdapter, pixels: Tensor, ids: Tensor, answers: list[str], batch: int = 64) -> tuple[Tensor, list[str]]:
    """The prompts with each sample's target and the model's best other answer appended
    (`answer_length` tokens each, padded), and the model's own answers as text."""
    t, end = adapter.answer_length, [adapter.end_id] if adapter.end_id is not None else []
    targets = torch.full((len(ids), t), adapter.pad_id, dtype=torch.long)
    for i, a in enumerate(answers):
        tokens = adapter.prompt.ids(a)
        if not tokens:
            raise MmdiagError(f"data.answers: answer {i} ({a!r}) tokenises to nothing; give every sample a non-empty answer")
        if adapter.prompt.special & set(tokens):
            raise MmdiagError(f"data.answers: answer {i} ({a!r}) holds a special token (pad, start, end or image); remove it")
        if len(tokens + end) > t:
            raise MmdiagError(f"data.answers: answer {i} ({a!r}) is {len(tokens + end)} tokens with the end token, more than answer_length={t}; load the model with a larger answer_length")
        targets[i, : len(tokens + end)] = torch.tensor(tokens + end)
    device = adapter.embedding.weight.device
    own = torch.cat([adapter.greedy(pixels[s : s + batch].to(device), ids[s : s + batch].to(device), t).cpu() for s in range(0, len(ids), batch)])
    same = (own == targets).all(1)
    other = own.clone()
    if same.any():  # the model answers the target: its competitor is its best answer that starts otherwise
        rows = same.nonzero().flatten()
        other[rows] = adapter.greedy(pixels[rows].to(device), ids[rows].to(device), t, ban=targets[rows, 0].to(device)).cpu()
    spoken = [adapter.tokenizer.decode([x for x in row if x not in (adapter.pad_id, adapter.end_id)]).strip() for row in own.tolist()]
    return torch.cat([ids, targets, other], 1), spoken
