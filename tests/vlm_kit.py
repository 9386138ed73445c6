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


QWEN_SPECIAL = ["<|vision_start|>", "<|vision_end|>"]
QWEN_PROMPT = "<|vision_start|><image><|vision_end|> user : {question} ? assistant :"
QWEN_SIZE = 56  # 2 x 2 image tokens of 28 px, each 2 x 2 patches of 14 px


def qwen_processor():
    """What the adapter takes of a Qwen2-VL processor: a tokenizer (the demo's pieces with the
    vision start and end tokens) and Qwen2-VL's image processor (PIL backend) at 56 px.
    Qwen2VLProcessor itself wants a video processor, which needs torchvision."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vocab = [(t, 0.0) for t in demo.SPECIAL + QWEN_SPECIAL] + [(p, -1.0) for p in demo.PIECES]
    core = Tokenizer(models.Unigram(vocab, unk_id=demo.UNK_ID, byte_fallback=False))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="</s>", extra_special_tokens=["<image>", *QWEN_SPECIAL])
    images = Qwen2VLImageProcessorPil(min_pixels=QWEN_SIZE**2, max_pixels=QWEN_SIZE**2, image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25])
    return SimpleNamespace(tokenizer=tokenizer, image_processor=images)


def qwen2_vl(seed: int = 0, version: str = "2"):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    common = dict(depth=2, num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if version == "2.5":  # window attention in all but the last block, an MLP merger to the text width
        vision = dict(common, hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=56, fullatt_block_indexes=[1])
        Config, Model = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    else:
        vision = dict(common, embed_dim=32, hidden_size=64, mlp_ratio=2)
        Config, Model = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    text = dict(vocab_size=len(demo.SPECIAL) + len(QWEN_SPECIAL) + len(demo.PIECES), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                pad_token_id=demo.PAD_ID, bos_token_id=demo.BOS_ID, eos_token_id=demo.EOS_ID)  # fmt: skip
    first = len(demo.SPECIAL)
    config = Config(vision_config=vision, text_config=text, image_token_id=demo.IMAGE_ID, vision_start_token_id=first, vision_end_token_id=first + 1, video_token_id=demo.UNK_ID)
    torch.manual_seed(seed)
    return _pad_row(Model(config).eval())


FAMILIES = {
    "llava": (llava, demo.TEMPLATE, demo.processor),
    "paligemma": (paligemma, PALIGEMMA_PROMPT, demo.processor),
    "qwen2_vl": (qwen2_vl, QWEN_PROMPT, qwen_processor),
    "qwen2_5_vl": (lambda seed: qwen2_vl(seed, "2.5"), QWEN_PROMPT, qwen_processor),
}


def adapter(family: str, answers=("no", "yes"), seed: int = 0, **options) -> VLMAdapter:
    build, prompt, processor = FAMILIES[family]
    if family.startswith("qwen"):
        options.setdefault("image_size", QWEN_SIZE)
    return VLMAdapter(build(seed), processor(), None if answers is None else list(answers), prompt=options.pop("prompt", prompt), **options)


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
