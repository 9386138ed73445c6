"""demo-vlm: a tiny LLaVA (CLIP vision tower, projector, Llama language model; 157k
parameters, random init) trained with Lightning to answer yes/no questions about the shapes
data, with the shapes data's planted shortcut (the corner mark).

The caption "<filler> the <shape> is [not] red" becomes the question "<filler> is the <shape>
[not] red", asked in the template "user : <image> {question} ? assistant :", answered "yes"
exactly when the caption is true. The tokenizer is a SentencePiece-style unigram model built in
code (no download): "triangle" and "apparently" are three pieces each, so word units matter.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from mmdiag.pipeline.data import Counterfactual, SampleSet
from mmdiag.pipeline.demo import shapes
from mmdiag.pipeline.demo.models import IMAGE_MEAN
from mmdiag.pipeline.demo.train import adamw_one_cycle, fit, source_key
from mmdiag.pipeline.store import cache_root, load_weights, save_weights

log = logging.getLogger("mmdiag")

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
PIECES = ["▁user", "▁assistant", "▁:", "▁?", "▁yes", "▁no", "▁in", "▁this", "▁image", "▁the", "▁picture", "▁look", "▁here",
          "▁appar", "ent", "ly", "▁is", "▁not", "▁red", "▁circle", "▁square", "▁tri", "ang", "le"]  # fmt: skip
PAD_ID, UNK_ID, BOS_ID, EOS_ID, IMAGE_ID = range(5)
TEMPLATE = "user : <image> {question} ? assistant :"
ANSWERS = ["no", "yes"]  # class k = answer k: "yes" is the shapes data's class "true"
IMAGE_STD = (0.25, 0.25, 0.25)
SHAPE_PIECES = ("▁circle", "▁square", "▁tri", "ang", "le")


class VLMTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    p_mark: float = 0.8
    n_train: int = 4000
    epochs: int = 4
    batch_size: int = 64
    # 3e-3 without clipping sent the loss back to chance at the one-cycle peak on some numeric
    # paths (one thread): a transformer wants the smaller step and clipped gradients
    lr: float = 1e-3
    grad_clip: float = 1.0
    weight_decay: float = 1e-4
    seed: int = 0

    def key(self) -> str:
        return source_key(self, (shapes, sys.modules[__name__]))


def tokenizer():
    """The demo's tokenizer: unigram pieces with SentencePiece's word-start marker."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = [(t, 0.0) for t in SPECIAL] + [(p, -1.0) for p in PIECES]
    core = Tokenizer(models.Unigram(vocab, unk_id=UNK_ID, byte_fallback=False))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>", extra_special_tokens=["<image>"])


def processor():
    """A LLaVA processor: the tokenizer and an image processor that normalises the shapes
    images (uint8 RGB, 32 x 32) by the demo's channel means."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    images = CLIPImageProcessorPil(do_resize=False, do_center_crop=False, do_rescale=True, do_normalize=True, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD))
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer(), patch_size=8, vision_feature_select_strategy="default")


def build(seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=shapes.SIZE, patch_size=8)
    text = LlamaConfig(vocab_size=len(SPECIAL) + len(PIECES), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=4, max_position_embeddings=64, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID, vision_feature_select_strategy="default",
                         vision_feature_layer=-1, projector_hidden_act="gelu")  # fmt: skip
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def adapter(model, answers=ANSWERS, **options):
    from mmdiag.pipeline.hf.vlm import VLMAdapter

    return VLMAdapter(model, processor(), answers, prompt=TEMPLATE, **options)


def _prompt():
    from mmdiag.pipeline.hf.vlm import FAMILIES, Prompt

    return Prompt(tokenizer(), FAMILIES["llava"], TEMPLATE, IMAGE_ID, (shapes.SIZE // 8) ** 2, PAD_ID)


def question(caption: str, toggle: bool = False) -> str:
    """'<filler> the <shape> is [not] red' -> '<filler> is the <shape> [not] red'."""
    named, rest = caption.split(" is ", 1)
    head, shape = named.rsplit("the ", 1)  # the filler may hold "the" too
    negated = rest.startswith("not")
    return f"{head}is the {shape} {'not ' if negated != toggle else ''}red"


def _pixels(image: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> the processor's normalised pixel values (the same arithmetic)."""
    return (image - torch.tensor(IMAGE_MEAN)[:, None, None]) / torch.tensor(IMAGE_STD)[:, None, None]


def vqa(data: SampleSet) -> SampleSet:
    """A shapes SampleSet as visual question answering for demo-vlm: the same images, concepts,
    image truth and counterfactuals; the caption asked as a question."""
    prompt = _prompt()
    captions = data.display["caption"]
    asked = [question(c) for c in captions]
    toggled = [question(c, toggle=True) for c in captions]
    length = max(len(prompt.prefix) + len(prompt.ids(q)) + len(prompt.suffix) for q in asked + toggled)
    ids = prompt(asked, length)
    piece = {p: i for i, p in enumerate(SPECIAL + PIECES)}
    shape_ids = torch.tensor([piece[p] for p in SHAPE_PIECES])
    flips = data.counterfactuals
    return SampleSet(
        inputs={"image": _pixels(data.inputs["image"]), "text": ids},
        labels=data.labels,
        meta=data.meta,
        truth={"image": data.truth["image"], "text": {"negation": ids == piece["▁not"], "shape_word": torch.isin(ids, shape_ids)}},
        display={"text": prompt.labels(ids), "caption": [f"{q}?" for q in asked]},
        class_names=list(ANSWERS),
        name=data.name.replace("shapes", "shapes-vqa"),
        truth_concepts=data.truth_concepts,
        class_concepts=data.class_concepts,
        counterfactuals={
            "watermark": Counterfactual({"image": _pixels(flips["watermark"].inputs["image"])}, labels=flips["watermark"].labels),
            "negation": Counterfactual({"text": prompt(toggled, length)}, labels=flips["negation"].labels),
        },
    )


def split(name: str, n: int | None = None, seed: int = 0) -> SampleSet:
    return vqa(shapes.split(name, n=n, seed=seed))


def train(config: VLMTrainConfig, device: str = "cpu", progress: bool | None = None):
    """Train demo-vlm with Lightning: next-token cross-entropy of the answer after the prompt."""
    import lightning as L

    answer_ids = torch.tensor([_prompt().ids(a)[0] for a in ANSWERS])

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = build(config.seed).train()

        def training_step(self, batch, _):
            pixels, ids, y = batch
            mask = (ids != PAD_ID).long()
            out = self.net(input_ids=ids, pixel_values=pixels, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0))
            loss = torch.nn.functional.cross_entropy(out.logits[:, -1], answer_ids.to(y.device)[y])
            self.log("loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return adamw_one_cycle(self, config.lr, config.weight_decay)

    L.seed_everything(config.seed, workers=True, verbose=False)
    data = vqa(shapes.generate(config.n_train, config.p_mark, seed=config.seed * 1000 + shapes.SPLIT_SEEDS["train"], name="train"))
    module = Module()
    fit(module, (data.inputs["image"], data.inputs["text"], data.labels), config, "demo-vlm", device, progress)
    return module.net.cpu().eval()


def load_or_train(config: VLMTrainConfig, cache: Path | None = None, device: str = "cpu"):
    """(the trained demo-vlm from the weights cache, training it on a miss; came_from_cache)."""
    path = cache_root(cache) / "models" / f"vlm-{config.key()}.safetensors"
    model = build(config.seed)
    if (state := load_weights(path)) is not None:
        model.load_state_dict(state)
        return model.eval(), True
    start = time.perf_counter()
    model = train(config, device=device)
    log.info("trained demo-vlm in %.1f s", time.perf_counter() - start)
    save_weights(path, model.state_dict(), metadata={"config": config.model_dump_json()})
    return model, False
