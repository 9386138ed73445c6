"""Tiny random image-text-to-text models of each supported family, built from configs with the
demo's code-built tokenizer (nothing downloaded)."""

from __future__ import annotations

import torch

from mmdiag.pipeline.demo import vlm as demo
from mmdiag.pipeline.hf.vlm import VLMAdapter

PALIGEMMA_PROMPT = "<image>{question} ? assistant :"


def _pad_row(model):
    """A pad row that is not zero (nn.Embedding's padding_idx zeroes it at init; a checkpoint
    need not): the adapter must find the padding from the row the model sees."""
    with torch.no_grad():
        table = model.get_input_embeddings().weight
        table[demo.PAD_ID] = torch.randn(table.shape[1], generator=torch.Generator().manual_seed(7)) * table.std()
    return model


def llava(seed: int = 0):
    return _pad_row(demo.build(seed))


def paligemma(seed: int = 0):
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    text = GemmaConfig(vocab_size=len(demo.SPECIAL) + len(demo.PIECES), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=1, head_dim=16, max_position_embeddings=64, pad_token_id=demo.PAD_ID, bos_token_id=demo.BOS_ID, eos_token_id=demo.EOS_ID)  # fmt: skip
    config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=demo.IMAGE_ID, projection_dim=64)
    torch.manual_seed(seed)
    return _pad_row(PaliGemmaForConditionalGeneration(config).eval())  # Gemma scales its embeddings by sqrt(width)


FAMILIES = {"llava": (llava, demo.TEMPLATE), "paligemma": (paligemma, PALIGEMMA_PROMPT)}


def adapter(family: str, answers=("no", "yes"), seed: int = 0, **options) -> VLMAdapter:
    build, prompt = FAMILIES[family]
    return VLMAdapter(build(seed), demo.processor(), None if answers is None else list(answers), prompt=options.pop("prompt", prompt), **options)


def taught(answer, n: int = 2000, steps: int = 400, seed: int = 0):
    """A tiny LLaVA (demo-vlm's architecture) trained to answer the shapes questions by
    `answer(data) -> (N,) 0/1` ("no"/"yes"), and its adapter; plain AdamW, `steps` batches of 64."""
    from mmdiag.pipeline.demo import shapes

    data = demo.vqa(shapes.generate(n, p_mark=0.5, seed=seed, name="train"))
    labels = answer(data)
    model = demo.build(seed).train()
    yes_no = torch.tensor([demo.PIECES.index(f"▁{a}") + len(demo.SPECIAL) for a in demo.ANSWERS])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(len(labels), (64,), generator=generator)
        ids = data.inputs["text"][rows]
        mask = (ids != demo.PAD_ID).long()
        out = model(input_ids=ids, pixel_values=data.inputs["image"][rows], attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0))
        loss = torch.nn.functional.cross_entropy(out.logits[:, -1], yes_no[labels[rows]])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return demo.adapter(model.eval())
