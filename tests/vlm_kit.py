"""Tiny random image-text-to-text models of each supported family, built from configs with the
demo's code-built tokenizer (nothing downloaded)."""

from __future__ import annotations

import torch

from pipeline.demo import vlm as demo
from pipeline.hf.vlm import VLMAdapter

PALIGEMMA_PROMPT = "<image>{question} ? assistant :"


def llava(seed: int = 0):
    return demo.build(seed)


def paligemma(seed: int = 0):
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    text = GemmaConfig(vocab_size=len(demo.SPECIAL) + len(demo.PIECES), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=1, head_dim=16, max_position_embeddings=64, pad_token_id=demo.PAD_ID, bos_token_id=demo.BOS_ID, eos_token_id=demo.EOS_ID)  # fmt: skip
    config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=demo.IMAGE_ID, projection_dim=64)
    torch.manual_seed(seed)
    return PaliGemmaForConditionalGeneration(config).eval()


FAMILIES = {"llava": (llava, demo.TEMPLATE), "paligemma": (paligemma, PALIGEMMA_PROMPT)}


def adapter(family: str, answers=("no", "yes"), seed: int = 0, **options) -> VLMAdapter:
    build, prompt = FAMILIES[family]
    return VLMAdapter(build(seed), demo.processor(), None if answers is None else list(answers), prompt=options.pop("prompt", prompt), **options)
