"""Generative vision-language models (LLaVA, PaliGemma) as classifiers over a closed set of
candidate answers.

The logit of candidate k is the log-likelihood of its tokens after the image and the prompt,
by teacher forcing: log p(a_k,1 | x) + log p(a_k,2 | x, a_k,1) + ... . When every candidate is
one token this is one forward pass (the log-softmax at the answer position, read at the
candidates' tokens); otherwise the prompt runs once with a KV cache that the K continuations
share (`prefix_reuse=False` runs K full sequences instead, for comparison).

Inputs: `image` = the processor's pixel values (B, 3, S, S); `text` = the prompt's token ids
(B, L), left-padded, made by `vlm_samples`: [pad...] prefix, question, suffix, where the prefix
holds the template's opening, the image placeholders and the start token as the family places
them. `encode` gives the pixels and the token embeddings; the model's own forward puts the
image features at the placeholders, found from the embeddings (placeholders are never removed,
so their rows are exact).

Units: the patch grid of the vision tower's pixel grid (a removed patch is 0 in normalised
pixel space, the processor's mean colour), and the words of the question (the pieces of one
word are one unit; pipeline.hf.words). Template tokens, placeholders, the start token and
padding are never removed; a removed word's pieces take the unknown token's embedding (not the
pad's, which the attention mask is found from).

Layers: `vision` (the vision tower's last hidden states), `projector` (the image features in the
language model's space), `lm.layer{d}` (the language model's hidden state at the answer
position after layer d) and `decision` (the final-normed state there, the LM head's input).
`head()` is the LM head's rows of the candidates' tokens: exact (up to the log-softmax's
normaliser, which is the same for every candidate) when every candidate is one token.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from pipeline.adapter import ModelAdapter
from pipeline.data import SampleSet
from pipeline.errors import MmdiagError
from pipeline.hf.common import check_vocab, matches, pretrained, processor_or_none, vocabulary
from pipeline.hf.words import word_units, words
from pipeline.units import PatchGrid

IMAGE, QUESTION = "<image>", "{question}"
# stage 2 runs the model under vmap, where the placeholder merge (masked_scatter) has no batching
# rule yet: torch warns once per call that it loops instead; the numbers are the same
warnings.filterwarnings("ignore", message=".*batching rule for aten::masked_scatter.*")


@dataclass(frozen=True)
class Family:
    """What differs between the supported architectures."""

    name: str
    prompt: str  # the default template
    start_after_image: bool  # PaliGemma: image tokens, then <bos>, then the prompt
    first_position: int  # the position id of the first real token
    bidirectional_prefix: bool  # PaliGemma: the image and prompt attend both ways (token_type_ids 0)


FAMILIES = {
    "llava": Family("llava", "USER: <image>\n{question} ASSISTANT:", start_after_image=False, first_position=0, bidirectional_prefix=False),
    "paligemma": Family("paligemma", "<image>{question}\n", start_after_image=True, first_position=1, bidirectional_prefix=True),
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

    def __init__(self, tokenizer, family: Family, template: str, image_id: int, n_image_tokens: int, pad_id: int, removed_id: int):
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
        image = [image_id] * n_image_tokens
        if family.start_after_image:
            self.prefix = self.ids(before) + image + start + self.ids(between)
        else:
            self.prefix = start + self.ids(before) + image + self.ids(between)
        self.suffix = self.ids(after)
        if {pad_id, removed_id} & set(self.prefix + self.suffix):
            raise MmdiagError(f"prompt: {template!r} tokenises to the pad or unknown token; reword the template")

    def ids(self, text: str) -> list[int]:
        # the template's pieces are tokenised apart: spaces at their ends would be tokens of their own
        text = text.strip(" ")
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def __call__(self, questions: Sequence[str], length: int | None = None) -> Tensor:
        """Token ids (N, L) of the prompts, left-padded to `length` (default: the longest)."""
        rows = []
        for i, q in enumerate(questions):
            if not str(q).strip():
                raise MmdiagError(f"data.questions: question {i} is empty; give every sample a question")
            rows.append(self.prefix + self.ids(str(q)) + self.suffix)
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
        prefix = torch.tensor(self.prefix, dtype=ids.dtype, device=ids.device)
        suffix = torch.tensor(self.suffix, dtype=ids.dtype, device=ids.device)
        for i in range(b):
            row, j = ids[i], int(start[i])
            if not real[i, j:].all() or length - j < p + s or not torch.equal(row[j : j + p], prefix) or not torch.equal(row[length - s :], suffix):
                raise MmdiagError(
                    f"inputs.text: row {i} is not a left-padded prompt of this model's template {self.template!r}; build the data with pipeline.hf.vlm_samples"
                )
        positions = torch.arange(length, device=ids.device).expand(b, length)
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
        answers: Sequence[str],
        *,
        prompt: str | None = None,
        class_names: Sequence[str] | None = None,
        prefix_reuse: bool = True,
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
        vision = config.vision_config
        self.image_size, self.patch = vision.image_size, vision.patch_size
        full = getattr(config, "vision_feature_select_strategy", "default") == "full"
        self.n_image_tokens = (self.image_size // self.patch) ** 2 + int(full)
        self.pad_id, self.removed_id = self._special_ids(tokenizer)
        self.prompt = Prompt(tokenizer, family, prompt if prompt is not None else family.prompt, self.image_id, self.n_image_tokens, self.pad_id, self.removed_id)
        self.answers = [str(a) for a in answers]
        self.candidates = self._candidates(self.answers)
        self.class_names = list(class_names) if class_names is not None else list(self.answers)
        if len(self.class_names) != len(self.answers):
            raise MmdiagError(f"class_names: {len(self.class_names)} names for {len(self.answers)} answers; give one per answer")
        self.single_token = all(len(c) == 1 for c in self.candidates)
        self.softcap = getattr(text, "final_logit_softcapping", None)
        n = text.num_hidden_layers
        self.depths = sorted({max(1, n // 3), max(1, 2 * n // 3)} - {n}) or []
        self.points = {"decision": Point(), **{f"lm.layer{d}": Point() for d in self.depths}}
        self._cache_arg = _cache_name(self.module.model)

    # --- set-up checks -------------------------------------------------------------------
    def _special_ids(self, tokenizer) -> tuple[int, int]:
        pad, unk = tokenizer.pad_token_id, tokenizer.unk_token_id
        if pad is None:
            raise MmdiagError("model: the tokenizer has no pad token; set tokenizer.pad_token (prompts are left-padded to one length)")
        if unk is None or unk == pad or unk == self.image_id:
            raise MmdiagError("model: the tokenizer needs an unknown token distinct from the pad and image tokens (a removed word takes its embedding)")
        weight = self.module.get_input_embeddings().weight
        if self.image_id >= len(weight):
            raise MmdiagError(f"model: the image token id {self.image_id} is outside the {len(weight)}-row embedding table; load the processor that belongs to this model")
        if torch.equal(weight[pad], weight[unk]):
            raise MmdiagError("model: the pad and unknown tokens have the same embedding, so a removed word would read as padding; give the unknown token its own row")
        return pad, unk

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
        return out

    # --- the adapter -----------------------------------------------------------------------
    @property
    def embedding(self) -> nn.Embedding:
        return self.module.get_input_embeddings()

    def encode(self, inputs):
        self.check_inputs(inputs)
        pixels = inputs["image"].float()
        if pixels.dim() != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[2:]) != (self.image_size, self.image_size):
            raise MmdiagError(
                f"inputs.image: pixel values shaped {tuple(pixels.shape)}, the model takes (B, 3, {self.image_size}, {self.image_size}); "
                "process the images with the model's processor (pipeline.hf.vlm_samples)"
            )
        ids = inputs["text"]
        if ids.dim() != 2 or ids.is_floating_point() or (ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size)):
            raise MmdiagError(f"inputs.text: expected token ids (B, L) in 0..{self.vocab_size - 1}; build the data with pipeline.hf.vlm_samples")
        self.prompt.question(ids)
        return {"image": pixels, "text": self.embedding(ids)}

    def units(self, inputs, encoded):
        ids = inputs["text"]
        removed = self.embedding.weight[self.removed_id].detach()
        return {
            "image": PatchGrid(patch=self.patch, baseline=0.0).build(inputs["image"], encoded["image"]),
            "text": word_units(ids, encoded["text"], ~self.prompt.question(ids), self.prompt.vocab, removed),
        }

    def _attention(self, embedded: Tensor) -> tuple[Tensor, Tensor]:
        """(attention mask, position ids) of a left-padded batch, from the embeddings."""
        real = (~matches(embedded, self.embedding.weight[self.pad_id])).long()
        positions = (real.cumsum(1) - 1 + self.family.first_position).clamp_min(0)
        return real, positions

    def _logits(self, hidden: Tensor) -> Tensor:
        logits = self.module.lm_head(hidden)
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap

    def _prompt_pass(self, pixels: Tensor, embedded: Tensor, cache: bool):
        mask, positions = self._attention(embedded)
        # the model finds its placeholders by exact equality; a soft mask's base + 1 * (x - base) rounds
        image = self.embedding.weight[self.image_id].to(embedded.dtype)
        embedded = torch.where(matches(embedded, image)[..., None], image, embedded)
        extra = {"token_type_ids": torch.zeros_like(mask)} if self.family.bidirectional_prefix else {}
        out = self.module.model(
            pixel_values=pixels, inputs_embeds=embedded, attention_mask=mask, position_ids=positions,
            output_hidden_states=True, use_cache=cache, **extra,
        )
        for d in self.depths:
            self.points[f"lm.layer{d}"](out.hidden_states[d][:, -1])
        last = self.points["decision"](out.last_hidden_state[:, -1])
        return self._logits(last).log_softmax(-1), out, mask, positions

    def forward(self, encoded):
        pixels, embedded = encoded["image"], encoded["text"]
        first = torch.tensor([c[0] for c in self.candidates], device=embedded.device)
        if self.single_token:
            return self._prompt_pass(pixels, embedded, cache=False)[0][:, first]
        if not self.prefix_reuse:
            return self._full_sequences(pixels, embedded)
        logp, out, mask, positions = self._prompt_pass(pixels, embedded, cache=True)
        cache = out[self._cache_arg] if self._cache_arg in out else out.past_key_values
        k, b = len(self.candidates), len(embedded)
        cache.batch_repeat_interleave(k)
        tokens, valid = self._padded_candidates(embedded.device)  # (K, T)
        feed = self.embedding(tokens[:, :-1]).to(embedded.dtype).repeat(b, 1, 1)  # (B*K, T-1, D)
        ahead = valid[:, :-1].long().repeat(b, 1)
        start = positions[:, -1:].repeat_interleave(k, 0) + 1
        step = {self._cache_arg: cache}
        if self.family.bidirectional_prefix:
            step["token_type_ids"] = torch.ones_like(ahead)
        rest = self.module.model(
            inputs_embeds=feed, attention_mask=torch.cat([mask.repeat_interleave(k, 0), ahead], 1),
            position_ids=start + torch.arange(feed.shape[1], device=feed.device), use_cache=True, **step,
        )
        later = self._logits(rest.last_hidden_state).log_softmax(-1)  # (B*K, T-1, V)
        return self._score(logp[:, first], later, tokens, valid, b)

    def _padded_candidates(self, device) -> tuple[Tensor, Tensor]:
        longest = max(map(len, self.candidates))
        tokens = torch.full((len(self.candidates), longest), self.pad_id, dtype=torch.long, device=device)
        for i, c in enumerate(self.candidates):
            tokens[i, : len(c)] = torch.tensor(c)
        return tokens, tokens != self.pad_id

    def _score(self, first: Tensor, later: Tensor, tokens: Tensor, valid: Tensor, b: int) -> Tensor:
        """Log-likelihoods (B, K): the first tokens' log-probabilities (B, K) plus the later
        tokens', read from the continuations' log-softmax (B*K, T-1, V)."""
        k = len(self.candidates)
        nxt = tokens[:, 1:].repeat(b, 1)
        taken = later.gather(2, nxt[..., None])[..., 0] * valid[:, 1:].repeat(b, 1)
        return first + taken.sum(1).reshape(b, k)

    def _full_sequences(self, pixels: Tensor, embedded: Tensor) -> Tensor:
        """Without prefix reuse: each candidate appended to the whole prompt, K sequences a sample."""
        k, b = len(self.candidates), len(embedded)
        tokens, valid = self._padded_candidates(embedded.device)
        feed = self.embedding(tokens[:, :-1]).to(embedded.dtype)
        mask, positions = self._attention(embedded)
        whole = torch.cat([embedded.repeat_interleave(k, 0), feed.repeat(b, 1, 1)], 1)
        ahead = valid[:, :-1].long().repeat(b, 1)
        mask = torch.cat([mask.repeat_interleave(k, 0), ahead], 1)
        length = embedded.shape[1]
        positions = torch.cat([positions.repeat_interleave(k, 0), positions[:, -1:].repeat_interleave(k, 0) + 1 + torch.arange(feed.shape[1], device=feed.device)], 1)
        extra = {}
        if self.family.bidirectional_prefix:
            extra["token_type_ids"] = torch.cat([torch.zeros(b * k, length, dtype=torch.long, device=mask.device), torch.ones_like(ahead)], 1)
        out = self.module.model(pixel_values=pixels.repeat_interleave(k, 0), inputs_embeds=whole, attention_mask=mask, position_ids=positions, use_cache=False, **extra)
        logp = self._logits(out.last_hidden_state[:, length - 1 :]).log_softmax(-1)  # (B*K, T, V)
        first = logp[:, 0].gather(1, tokens[:, :1].repeat(b, 1))[:, 0].reshape(b, k)
        return self._score(first, logp[:, 1:], tokens, valid, b)

    def layers(self):
        model = self.module.model
        return {"vision": model.vision_tower, "projector": model.multi_modal_projector, **self.points}

    def head(self):
        """The LM head's rows of the candidates' tokens, on the decision features; None when a
        candidate has more than one token (its later tokens depend on more than the answer
        position's state)."""
        if not self.single_token:
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
    def head_caveat(self) -> str | None:
        if self.single_token:
            return None
        return "a candidate answer has more than one token, so its log-likelihood is not linear in the answer position's state; the exact decomposition holds for one-token answers"


def load_vlm(
    path_or_id: str | Path,
    answers: Sequence[str],
    *,
    prompt: str | None = None,
    processor=None,
    class_names: Sequence[str] | None = None,
    prefix_reuse: bool = True,
    local_files_only: bool = False,
) -> VLMAdapter:
    """A VLM adapter from a local folder (written by save_pretrained) or a Hugging Face id in the
    local cache, scoring the closed set `answers`; the processor comes from the same place
    unless given. `prompt` holds <image> and {question}; default: the family's own template."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        model_type = AutoConfig.from_pretrained(str(path_or_id), local_files_only=local_files_only).model_type
    except (OSError, ValueError) as e:
        raise MmdiagError(f"model: cannot read a config at {str(path_or_id)!r} ({str(e).strip().splitlines()[0][:160]}); give a folder written by save_pretrained") from None
    if model_type not in FAMILIES:
        raise MmdiagError(f"model: {str(path_or_id)!r} is a {model_type!r} model; mmdiag's image-text-to-text adapter supports {', '.join(FAMILIES)}")
    model = pretrained(AutoModelForImageTextToText, path_or_id, f"a {model_type} model", local_files_only)
    processor = processor if processor is not None else processor_or_none(path_or_id, local_files_only)
    return VLMAdapter(model, processor, answers, prompt=prompt, class_names=class_names, prefix_reuse=prefix_reuse)


def vlm_samples(
    adapter: VLMAdapter,
    images: Sequence,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    meta: dict[str, Tensor] | None = None,
    truth: dict[str, dict[str, Tensor]] | None = None,
    length: int | None = None,
    name: str = "data",
) -> SampleSet:
    """A SampleSet for a VLM adapter: the images through its image processor, each question in
    its prompt template (left-padded to one length), each sample's answer one of the
    adapter's candidates (its label). Truth masks: images over the processed pixel grid, text
    over the prompt's token positions."""
    images, questions, answers = list(images), [str(q) for q in questions], [str(a) for a in answers]
    if not len(images) == len(questions) == len(answers):
        raise MmdiagError(f"data: {len(images)} images, {len(questions)} questions and {len(answers)} answers; give one of each per sample")
    unknown = sorted({a for a in answers if a not in adapter.answers})
    if unknown:
        raise MmdiagError(f"data.answers: {unknown[0]!r} is not one of the model's candidate answers ({', '.join(adapter.answers)})")
    pixels = []
    for i, picture in enumerate(images):
        try:
            pixels.append(adapter.processor.image_processor(images=[picture], return_tensors="pt")["pixel_values"][0].float())
        except Exception as e:  # the processor's own errors, of many types
            raise MmdiagError(f"data.images: the processor cannot take image {i} ({type(e).__name__}: {' '.join(str(e).split())[:120]}); give RGB images (PIL or H x W x 3 uint8)") from None
    pixels = torch.stack(pixels)
    if tuple(pixels.shape[1:]) != (3, adapter.image_size, adapter.image_size):
        raise MmdiagError(f"data.images: the processor makes {tuple(pixels.shape[1:])} pixel values, the model takes (3, {adapter.image_size}, {adapter.image_size}); load the processor that belongs to this model")
    ids = adapter.prompt(questions, length)
    index = {a: i for i, a in enumerate(adapter.answers)}
    return SampleSet(
        inputs={"image": pixels, "text": ids},
        labels=torch.tensor([index[a] for a in answers], dtype=torch.long),
        meta=dict(meta or {}),
        truth=dict(truth or {}),
        display={"text": adapter.prompt.labels(ids), "caption": questions},
        class_names=list(adapter.class_names),
        name=name,
    )
