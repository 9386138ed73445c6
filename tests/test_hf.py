"""Hugging Face CLIP and ViLT adapters on tiny models built from configs with random weights,
saved and loaded through a temporary folder: nothing is downloaded."""

import json
import logging

import numpy as np
import pytest
import torch

from mmdiag.pipeline.errors import MmdiagError
from mmdiag.pipeline.hf import CLIPAdapter, CLIPZeroShotAdapter, ViltAdapter, hf_samples, load_clip, load_vilt
from mmdiag.stages import attribution as attr
from mmdiag.stages.m2ib_layer import m2ib_layer, m2ib_maps
from mmdiag.stages.unimodal import _randomised

LETTERS = "abcdefghijklmnopqrstuvwxyz"
CLIP_VOCAB = ["<|startoftext|>", "<|endoftext|>", *LETTERS, *(c + "</w>" for c in LETTERS)]
CAPTIONS = ["a red cat", "two dogs", "the sky", "a big mat", "hi", "blue car here"]


def clip_config(**text):
    from transformers import CLIPConfig

    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    text = {"vocab_size": len(CLIP_VOCAB), "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1, **tiny, **text}
    return CLIPConfig(text_config=text, vision_config=dict(image_size=32, patch_size=8, **tiny), projection_dim=16)


def clip_processor(folder, image_size=32):
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(CLIP_VOCAB)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")  # no merges: a word is its letters
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    return CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def save_clip(folder, seed=0, image_size=32, **text):
    from transformers import CLIPModel

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    CLIPModel(clip_config(**text)).save_pretrained(folder)
    clip_processor(folder, image_size).save_pretrained(folder)
    return folder


def images(n, size=(40, 48), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_clip(tmp_path_factory.mktemp("clip") / "model")


@pytest.fixture(scope="module")
def clip(clip_dir):
    return load_clip(clip_dir, local_files_only=True)


@pytest.fixture(scope="module")
def pairs(clip):
    return hf_samples(clip, images(len(CAPTIONS)), CAPTIONS, [1, 0] * 3)


def game(adapter, data, target=1):
    encoded = {m: t.detach() for m, t in adapter.encode(data.inputs).items()}
    return attr.Game(adapter, encoded, adapter.units(data.inputs, encoded), torch.full((len(data),), target))


def test_forward_of_encode_equals_the_models_own_output(clip, clip_dir, pairs):
    ids, pixels = pairs.inputs["text"], pairs.inputs["image"]
    mask = clip.processor.tokenizer(CAPTIONS, padding=True, return_tensors="pt")["attention_mask"]
    with torch.no_grad():
        own = clip.clip(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits_per_image
        logits = clip(pairs.inputs)
    assert torch.allclose(logits[:, 1] - logits[:, 0], own.diagonal(), atol=1e-5)  # (-s/2, s/2), threshold 0
    zero_shot = load_clip(clip_dir, prompts=CAPTIONS[:3], local_files_only=True)
    assert isinstance(zero_shot, CLIPZeroShotAdapter) and zero_shot.modalities == ("image",)
    with torch.no_grad():
        assert torch.allclose(zero_shot({"image": pixels}), own[:, :3], atol=1e-5)
    assert [u.n for u in clip.units(pairs.inputs, clip.encode(pairs.inputs)).values()] == [16, ids.shape[1]]


def test_the_head_composes_the_logits_exactly(clip, clip_dir, pairs):
    for adapter in (CLIPAdapter(clip.clip, clip.processor, threshold=2.5), load_clip(clip_dir, prompts=CAPTIONS, local_files_only=True)):
        with torch.no_grad(), adapter.reading(["decision"]) as seen:
            logits = adapter(pairs.inputs)
            assert torch.allclose(adapter.head()(seen["decision"]), logits, atol=1e-5)
    assert {"vision.layer1", "text.layer0", "image_embeds", "text_embeds", "decision"} <= set(clip.layers())


def test_shapley_values_sum_to_the_score_difference(clip, pairs):
    g = game(clip, pairs)
    phi = attr.shapley_sampling(g, pairs=2, generator=torch.Generator().manual_seed(0))
    ends = g.value(torch.stack([torch.zeros_like(g.present), torch.ones_like(g.present)], 1))
    assert torch.allclose(phi.sum(1), ends[:, 1] - ends[:, 0], atol=1e-4)


def test_mixed_second_derivatives_run_through_clip_with_either_attention(clip, clip_dir, pairs):
    """Stage 2 differentiates forward-mode, which the default (sdpa) attention's fused kernels do
    not support: it runs them with the math backend, and gets what eager attention gives."""
    from mmdiag.stages.interaction import mixed_block

    assert clip.clip.config._attn_implementation == "sdpa"  # the adapter leaves the model's choice alone
    g = game(clip, pairs.subset(torch.arange(2)))
    block, path, why = mixed_block(g, "text", "image")
    assert path == "forward-over-reverse, math attention" and "forward AD" in why
    assert block.shape == (2, g.units["text"].n, 16) and torch.isfinite(block).all() and block.abs().sum() > 0
    eager = load_clip(clip_dir, local_files_only=True)
    eager.clip.set_attn_implementation("eager")
    eager_block, eager_path, _ = mixed_block(game(eager, pairs.subset(torch.arange(2))), "text", "image")
    assert eager_path == "forward-over-reverse"
    assert torch.allclose(block, eager_block, atol=1e-5, rtol=1e-4)


def test_word_units_make_a_words_pieces_one_unit(clip_dir, pairs, vilt_dir):
    words = load_clip(clip_dir, text_units="words", local_files_only=True)
    units = words.units(pairs.inputs, words.encode(pairs.inputs))["text"]
    slots = units.mask[0, :, 0]
    assert [units.labels[0][s] for s in slots[slots >= 0].unique().tolist()] == ["a", "red", "cat"]  # "red" is 3 letters, one unit
    assert int(units.present[0].sum()) == 3 and (slots[slots >= 0] >= 0).sum() == 7
    g = game(words, pairs)
    phi = attr.shapley_sampling(g, pairs=2, generator=torch.Generator().manual_seed(0))
    ends = g.value(torch.stack([torch.zeros_like(g.present), torch.ones_like(g.present)], 1))
    assert torch.allclose(phi.sum(1), ends[:, 1] - ends[:, 0], atol=1e-4)
    vilt = load_vilt(vilt_dir, text_units="words", local_files_only=True)
    asked = hf_samples(vilt, images(2), QUESTIONS[:2], [0, 1])
    tokens = load_vilt(vilt_dir, local_files_only=True)
    mask = lambda a: a.units(asked.inputs, a.encode(asked.inputs))["text"].mask  # noqa: E731
    assert torch.equal(mask(vilt), mask(tokens))  # whole-word vocabulary: a token is a word
    with pytest.raises(MmdiagError, match="text_units: 'letters' is not one of tokens, words"):
        load_clip(clip_dir, text_units="letters", local_files_only=True)


def test_integrated_gradients_completeness_keeps_the_special_tokens(clip, pairs):
    g = game(clip, pairs)
    removed = g.removed()["text"]
    special = g.units["text"].mask[..., 0] < 0  # start, end and padding
    assert torch.equal(removed[special], g.encoded["text"][special])
    assert special[:, 0].all() and (pairs.inputs["text"] == clip.eos_id).any(1).all()
    scores, delta = attr.integrated_gradients(g, steps=16)
    gap = g.value(torch.stack([torch.ones_like(g.present), torch.zeros_like(g.present)], 1))
    assert (delta.abs() / (gap[:, 0] - gap[:, 1]).abs().clamp_min(1e-6)).max() < 0.01


def test_m2ib_maps_per_token_and_patch_change_with_randomised_weights(clip, pairs):
    maps = m2ib_maps(clip, pairs.inputs)
    b, length = pairs.inputs["text"].shape
    assert maps["text"].shape == (b, length) and maps["image"].shape == (b, 4, 4) and maps["image_pixels"].shape == (b, 32, 32)
    assert all((m >= 0).all() and m.sum() > 0 for m in maps.values())
    special = clip.units(pairs.inputs, clip.encode(pairs.inputs))["text"].mask[..., 0] < 0
    assert (maps["text"][special] == 0).all()  # start, end and padding are no units
    random = _randomised(clip, seed=1)
    redrawn = m2ib_maps(random, pairs.inputs)
    assert not torch.allclose(redrawn["image"], maps["image"], rtol=0.05)
    assert not torch.allclose(redrawn["text"], maps["text"], rtol=0.05)
    # the input-level M2IB of stage 1 runs on CLIP as well
    g = game(clip, pairs)
    stats = attr.BottleneckStats.of(g.encoded)
    assert attr.m2ib(g, "image", stats, attr.IBAConfig(beta=0.1, smooth=0.0, steps=2, copies=2)).shape == (b, 16)


def test_bottleneck_sites_continue_the_towers(clip, pairs):
    encoded = clip.encode(pairs.inputs)
    with torch.no_grad():
        clean = clip.shared_embeddings(encoded)
        for modality, layer in (("image", "vision.layer0"), ("text", "text.layer1")):
            site = clip.bottleneck_site(modality, layer, encoded)
            assert torch.allclose(site.rest(site.hidden), clean[modality], atol=1e-5)
    assert clip.m2ib_layers == {"image": "vision.layer1", "text": "text.layer1"}
    g = game(clip, pairs)
    for bad in ("vision.layer2", "text.layer0", "layer9"):
        with pytest.raises(MmdiagError, match="not a hidden layer"):
            m2ib_layer(g, "image", bad)


def test_bad_input_is_refused_or_fixed_with_a_warning(clip, clip_dir, tmp_path, caplog):
    from transformers import CLIPModel

    with pytest.raises(MmdiagError, match="eos_token_id 49407 is outside the vocabulary"):
        CLIPAdapter(CLIPModel(clip_config(eos_token_id=49407)))
    with pytest.raises(MmdiagError, match="eos_token_id 2 means 'pool at the highest id', 53"):
        CLIPAdapter(CLIPModel(clip_config(eos_token_id=2)), clip.processor)
    with pytest.raises(MmdiagError, match="processor makes 64x64 images"):
        load_clip(save_clip(tmp_path / "big", image_size=64), local_files_only=True)
    with pytest.raises(MmdiagError, match="tokenizer has 54 tokens but the CLIP config's vocabulary has 40"):
        CLIPAdapter(CLIPModel(clip_config(vocab_size=40)), clip.processor)
    with pytest.raises(MmdiagError, match="cannot load a CLIP model from"):
        load_clip(tmp_path / "nowhere", local_files_only=True)
    with pytest.raises(MmdiagError, match=r"model takes \(B, 3, 32, 32\)"):
        clip.encode({"image": torch.zeros(1, 3, 40, 40), "text": torch.tensor([[0, 1]])})
    log = logging.getLogger("mmdiag")
    log.addHandler(caplog.handler)
    try:
        data = hf_samples(clip, images(2), ["a cat", "the quick brown fox jumps"], [1, 1])
    finally:
        log.removeHandler(caplog.handler)
    assert "1 of 2 texts are longer than the model's 16 tokens; truncated" in caplog.text
    assert data.inputs["text"].shape[1] == 16 and data.inputs["text"][1, -1] == clip.eos_id
    with torch.no_grad():
        assert torch.isfinite(clip(data.inputs)).all()


VILT_WORDS = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"what is the color of shape a circle red blue there not ? yes no".split()]
QUESTIONS = ["what is the color of the shape?", "is there a red circle?", "is there not a blue shape?", "is the circle red?"]


def save_vilt(folder, seed=0):
    from transformers import BertTokenizer, ViltConfig, ViltForQuestionAnswering, ViltImageProcessor, ViltProcessor

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VILT_WORDS) + "\n")
    processor = ViltProcessor(image_processor=ViltImageProcessor(size={"shortest_edge": 32}, size_divisor=8), tokenizer=BertTokenizer(str(folder / "vocab.txt")))
    answers = ["yes", "no", "red", "blue"]
    config = ViltConfig(
        vocab_size=len(VILT_WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8,
        max_position_embeddings=16, initializer_range=0.2, num_labels=4, id2label=dict(enumerate(answers)), label2id={a: i for i, a in enumerate(answers)},
    )  # fmt: skip
    torch.manual_seed(seed)
    ViltForQuestionAnswering(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vilt_dir(tmp_path_factory):
    return save_vilt(tmp_path_factory.mktemp("vilt") / "model")


def test_vilt_forward_of_encode_equals_the_models_own_output(vilt_dir):
    vilt = load_vilt(vilt_dir, local_files_only=True)
    assert vilt.class_names == ["yes", "no", "red", "blue"]
    data = hf_samples(vilt, images(4, size=(32, 32)), QUESTIONS, [0, 1, 2, 3])
    tokens = vilt.processor.tokenizer(QUESTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        own = vilt.module(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=data.inputs["image"]).logits
        assert torch.allclose(vilt(data.inputs), own, atol=1e-5)
    g = game(vilt, data, target=0)
    phi = attr.shapley_sampling(g, pairs=1, generator=torch.Generator().manual_seed(0))
    ends = g.value(torch.stack([torch.zeros_like(g.present), torch.ones_like(g.present)], 1))
    assert torch.allclose(phi.sum(1), ends[:, 1] - ends[:, 0], atol=1e-4)
    with torch.no_grad(), vilt.reading(["decision"]) as seen:
        logits = vilt(data.inputs)
        assert torch.allclose(vilt.head()(seen["decision"]), logits, atol=1e-5)
    from transformers import ViltImageProcessor, ViltProcessor

    odd = ViltProcessor(image_processor=ViltImageProcessor(size={"shortest_edge": 36}, size_divisor=12), tokenizer=vilt.processor.tokenizer)
    with pytest.raises(MmdiagError, match="pads images to multiples of 12 px, the model's patches are 8 px"):
        ViltAdapter(vilt.module, odd)


USER_MODULE = """
import numpy as np
import torch
from mmdiag.pipeline.hf import hf_samples, load_vilt

FOLDER = {folder!r}
QUESTIONS = ["what is the color of the shape?", "is there a red circle?", "is there not a blue shape?", "is the circle red?"]


def model():
    return load_vilt(FOLDER, local_files_only=True)


def data(split, n, seed):
    n = n or 24
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]
    questions = [QUESTIONS[i % 4] for i in range(n)]
    negation = torch.tensor(["not" in q for q in questions], dtype=torch.long)
    return hf_samples(model(), images, questions, rng.integers(0, 4, n), meta={{"negation": negation}}, name=split)
"""


@pytest.mark.slow
def test_vilt_through_every_stage_of_the_flow(vilt_dir, user_flow):
    run, _ = user_flow("tinyvilt", USER_MODULE.format(folder=str(vilt_dir)), "{methods: [grad_x_input], n_correct: 4, max_errors: 4, sanity_samples: 0}")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"]["n"] == 24
    assert all(summary[s] for s in ("unimodal", "crossmodal", "representation", "composition"))
    assert summary["unimodal"]["n_explained"] > 0 and summary["crossmodal"]["n_reference"] == 8
    assert "probes" in summary["representation"]


def test_stage1_m2ib_after_a_hidden_layer(clip, pairs):
    """Stage 1's `m2ib` with `m2ib_layers: auto`: the paper's bottleneck after a hidden layer of
    each tower, maps over the same units as every other method."""
    from mmdiag.pipeline.resolve import predict
    from mmdiag.stages.base import Context
    from mmdiag.stages.unimodal import UnimodalConfig, run

    ctx = Context(clip, pairs, torch.device("cpu"), 0, predict(clip, pairs, torch.device("cpu")))
    config = UnimodalConfig(methods=["m2ib"], n_correct=4, max_errors=4, sanity_samples=0, iba_steps=2, iba_copies=2, m2ib_layers="auto")
    result = run(ctx, config, {})
    maps = result.arrays["attr.m2ib.pred"]
    assert maps.shape[1] == result.arrays["sizes"].sum() and (maps >= 0).all() and maps.sum() > 0
    with pytest.raises(MmdiagError, match="m2ib_layers.image"):
        run(ctx, config.model_copy(update={"m2ib_layers": {"image": "vision.layer99"}}), {})


def test_hf_samples_make_counterfactuals_as_they_make_the_samples(clip):
    texts, flipped = ["a cat", "a dog", "a cat on a mat", "a dog"], ["a dog", "a cat", "a dog on a long red mat today", "a cat"]
    data = hf_samples(clip, images(4), texts, [1, 0, 1, 0], meta={"animal": torch.tensor([0, 1, 0, 1])},
                      counterfactuals={"animal": {"images": images(4, seed=1), "texts": flipped, "labels": [0, 1, 0, 1], "valid": [True, True, True, False]}})  # fmt: skip
    cf = data.counterfactuals["animal"]
    # made as the samples are: the same pixels, and the texts padded to one width with theirs
    alone = hf_samples(clip, images(4, seed=1), flipped, [0, 1, 0, 1])
    assert torch.equal(cf.inputs["image"], alone.inputs["image"]) and torch.equal(cf.inputs["text"], alone.inputs["text"])
    assert data.inputs["text"].shape == cf.inputs["text"].shape
    pad = clip.processor.tokenizer.pad_token_id
    plain = hf_samples(clip, images(4), texts, [1, 0, 1, 0]).inputs["text"]
    assert torch.equal(data.inputs["text"][:, : plain.shape[1]], plain) and (data.inputs["text"][:, plain.shape[1] :] == pad).all()
    assert cf.labels.tolist() == [0, 1, 0, 1] and cf.valid.tolist() == [True, True, True, False]
    with pytest.raises(MmdiagError, match=r"counterfactuals\.animal\.texts: 3 entries for 4 samples"):
        hf_samples(clip, images(4), texts, [1, 0, 1, 0], meta={"animal": torch.tensor([0, 1, 0, 1])}, counterfactuals={"animal": {"texts": flipped[:3]}})
