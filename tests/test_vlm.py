"""Generative VLMs (LLaVA, PaliGemma) as closed-set answer scorers: their scores against
log-likelihoods computed independently from the model's own logits, word units, the methods'
identities through them, every stage, and bad input."""

import json

import numpy as np
import pytest
import torch

from mmdiag.pipeline import stats
from mmdiag.pipeline.demo import vlm as demo
from mmdiag.pipeline.errors import MmdiagError
from mmdiag.pipeline.hf.vlm import VLMAdapter, load_vlm, vlm_samples
from mmdiag.pipeline.hf.words import piece_style, word_slots
from mmdiag.pipeline.units import Units
from mmdiag.stages import attribution as attr

import vlm_kit
from inprocess import diagnose
from ranges import holds, measured

FAMILIES = ["llava", "paligemma", "qwen2_vl", "qwen2_5_vl"]
QUESTIONS = ["is the circle red", "apparently is the triangle not red", "look", "in this image is the square red"]
MANY = ("no", "yes", "triangle", "apparently red")  # two of them several tokens long


def pictures(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]


def samples(adapter, n=4):
    answers = [adapter.answers[i % 2] for i in range(n)]
    return vlm_samples(adapter, pictures(n), [QUESTIONS[i % 4] for i in range(n)], answers)


def model_inputs(adapter, picture, pixels, seq, prompt: int) -> dict:
    """What model(input_ids=seq, ...) needs besides the ids, as its own processor makes it: the
    pixel values (Qwen2-VL: its flat patches and grid from the picture, and the token types its
    get_rope_index reads), PaliGemma's token types (0 for the `prompt` tokens, 1 after)."""
    if adapter.family.name == "paligemma":
        return {"pixel_values": pixels, "token_type_ids": torch.cat([torch.zeros(prompt), torch.ones(seq.shape[1] - prompt)]).long()[None]}
    if adapter.family.name.startswith("qwen"):
        return dict(adapter.processor.image_processor(images=[adapter.family.resized(picture, adapter.grid)], return_tensors="pt"), mm_token_type_ids=(seq == adapter.image_id).int())
    return {"pixel_values": pixels}


def reference(adapter, data):
    """Each candidate appended to the unpadded prompt, scored from model(...).logits on the
    processor's own pixel values (Qwen2-VL: its flat patches and grid, positions by the model's
    get_rope_index)."""
    out = torch.zeros(len(data), len(adapter.candidates))
    for i, picture in enumerate(pictures(len(data))):
        ids = data.inputs["text"][i][data.inputs["text"][i] != adapter.pad_id]
        for k, c in enumerate(adapter.candidates):
            seq = torch.cat([ids, torch.tensor(c)])[None]
            logp = adapter.module(input_ids=seq, **model_inputs(adapter, picture, data.inputs["image"][i : i + 1], seq, len(ids))).logits[0].log_softmax(-1)
            out[i, k] = sum(logp[len(ids) - 1 + j, t] for j, t in enumerate(c))
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("answers,reuse", [(("no", "yes"), True), (MANY, True), (MANY, False)])
def test_candidate_scores_are_the_log_likelihoods_of_the_models_own_logits(family, answers, reuse):
    adapter = vlm_kit.adapter(family, answers=answers, prefix_reuse=reuse)
    data = samples(adapter)
    assert adapter.single_token == (len(answers) == 2)
    assert (data.inputs["text"][:, 0] == adapter.pad_id).any()  # prompts of several lengths, left-padded
    with torch.no_grad():
        assert torch.allclose(adapter(data.inputs), reference(adapter, data), atol=1e-5)


def _naive_greedy(adapter, ids, picture, pixels, length, ban=None):
    """The model's greedy answer by recomputing the whole sequence at every step."""
    seq = ids.clone()
    for step in range(length):
        logits = adapter.module(input_ids=seq[None], **model_inputs(adapter, picture, pixels, seq[None], len(ids))).logits[0, -1]
        logits[[adapter.pad_id, adapter.image_id] + ([ban] if ban is not None and step == 0 else [])] = -torch.inf
        token = logits.argmax()
        seq = torch.cat([seq, token[None]])
        if token == demo.EOS_ID:
            break
    return seq[len(ids) :].tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("reuse", [True, False])
def test_open_answers_score_each_samples_target_against_the_models_own(family, reuse):
    adapter = vlm_kit.adapter(family, answers=None, prefix_reuse=reuse, answer_length=6)
    targets = ["yes", "no", "apparently red", "triangle"]
    data = vlm_samples(adapter, pictures(4), QUESTIONS, targets)
    assert (data.labels == 0).all() and data.class_names == ["target", "model's answer"]
    t, rows = 6, data.inputs["text"]
    prompt = rows.shape[1] - 2 * t
    end = demo.EOS_ID
    with torch.no_grad():
        scores = adapter(data.inputs)
        for i, picture in enumerate(pictures(4)):
            ids = rows[i, :prompt][rows[i, :prompt] != adapter.pad_id]
            target, other = rows[i, prompt : prompt + t], rows[i, prompt + t :]
            assert target[target != adapter.pad_id].tolist() == adapter.prompt.ids(targets[i]) + [end]
            own = _naive_greedy(adapter, ids, picture, data.inputs["image"][i : i + 1], t)
            if own != target[target != adapter.pad_id].tolist():
                assert other[other != adapter.pad_id].tolist() == own  # the competitor is the model's own answer
            for k, span in enumerate((target, other)):
                span = span[span != adapter.pad_id]
                seq = torch.cat([ids, span])[None]
                logp = adapter.module(input_ids=seq, **model_inputs(adapter, picture, data.inputs["image"][i : i + 1], seq, len(ids))).logits[0].log_softmax(-1)
                assert abs(float(scores[i, k]) - sum(float(logp[len(ids) - 1 + j, tok]) for j, tok in enumerate(span.tolist()))) < 1e-4
    assert adapter.head() is None and "its own two answers" in adapter.head_caveat
    units = adapter.units(data.inputs, adapter.encode(data.inputs))["text"]
    assert (units.mask[:, prompt:, 0] == -1).all()  # the answers are never removed
    with pytest.raises(MmdiagError, match="data.answers: answer 0 .* more than answer_length=6"):
        vlm_samples(adapter, pictures(1), ["look"], ["apparently apparently"])


def test_where_the_model_says_the_target_its_competitor_is_its_best_answer_that_starts_otherwise():
    adapter = vlm_kit.adapter("llava", answers=None, answer_length=6, seed=4)  # a seed whose answers end within 6 tokens on some rows
    questions = [QUESTIONS[i % 4] for i in range(16)]
    first = vlm_samples(adapter, pictures(16), questions, ["yes"] * 16)
    own = first.inputs["text"][:, -6:]  # the competitor of "yes": the model's own answer
    said = [i for i, row in enumerate(own.tolist()) if demo.EOS_ID in row and adapter.prompt.ids(first.display["model_answer"][i]) + [demo.EOS_ID] == [x for x in row if x != adapter.pad_id]]
    assert said, "no answer of this model ends within answer_length"
    again = vlm_samples(adapter, [pictures(16)[i] for i in said], [questions[i] for i in said], [first.display["model_answer"][i] for i in said])
    target, other = again.inputs["text"][:, -12:-6], again.inputs["text"][:, -6:]
    assert torch.equal(target, own[said])  # the target is what the model says
    for row in range(len(said)):
        ids = again.inputs["text"][row, :-12][again.inputs["text"][row, :-12] != adapter.pad_id]
        banned = _naive_greedy(adapter, ids, None, again.inputs["image"][row : row + 1], 6, ban=int(target[row, 0]))
        assert other[row][other[row] != adapter.pad_id].tolist() == banned


def test_left_padding_does_not_change_a_samples_score():
    adapter = vlm_kit.adapter("llava")
    data = samples(adapter)
    longer = adapter.prompt(data.display["caption"], data.inputs["text"].shape[1] + 5)
    with torch.no_grad():
        assert torch.allclose(adapter(data.inputs), adapter({"image": data.inputs["image"], "text": longer}), atol=1e-5)


@pytest.mark.parametrize(
    "pieces,style,expected",
    [
        (["▁tri", "ang", "le", "▁is", "▁red"], "start", [0, 0, 0, 3, 4]),
        (["tri", "##ang", "##le", "is", "red"], "continue", [0, 0, 0, 3, 4]),
        (["tri", "ang", "le</w>", "is</w>", "red</w>"], "end", [0, 0, 0, 3, 4]),
        (["Ġtri", "ang", "le", "Ġis"], "start", [0, 0, 0, 3]),
    ],
)
def test_the_pieces_of_a_word_are_one_unit(pieces, style, expected):
    assert word_slots(pieces, [False] * len(pieces), style) == expected
    fixed = [False, True] + [False] * (len(pieces) - 2)  # a fixed token ends the word before it
    assert word_slots(pieces, fixed, style)[:3] == [0, -1, 2]


def test_piece_style_is_read_from_the_vocabulary():
    assert piece_style(["a</w>", "b"]) == "end" and piece_style(["a", "##b"]) == "continue" and piece_style(["▁a", "b"]) == "start"
    assert piece_style(["what", "is", "red"]) == "continue"  # whole words: each its own unit


def test_units_are_the_questions_words_and_the_template_is_never_removed():
    adapter = vlm_kit.adapter("llava")
    data = samples(adapter)
    encoded = adapter.encode(data.inputs)
    units = adapter.units(data.inputs, encoded)["text"]
    ids = data.inputs["text"]
    row = 1  # "apparently is the triangle not red": "apparently" and "triangle" are three pieces each
    slots = units.mask[row, :, 0]
    taken = slots[slots >= 0]
    assert len(taken) == 10 and len(taken.unique()) == 6
    assert [units.labels[row][s] for s in taken.unique().tolist()] == ["apparently", "is", "the", "triangle", "not", "red"]
    fixed = slots < 0
    assert torch.isin(ids[row][fixed], torch.tensor([adapter.pad_id, adapter.image_id, demo.BOS_ID])).sum() >= adapter.n_image_tokens + 1
    assert (ids[row][~fixed] != adapter.image_id).all()
    removed = units.apply(encoded["text"], torch.zeros(len(data), units.n, dtype=torch.bool))
    assert torch.equal(removed[:, :][units.mask[..., 0] < 0], encoded["text"][units.mask[..., 0] < 0])  # template, placeholders, padding kept
    assert (removed[row][~fixed][:, -1] == 0).all() and (encoded["text"][row][~fixed][:, -1] == 1).all()  # a removed word is absent
    assert adapter.units(data.inputs, encoded)["image"].n == 16  # the 8 px patches of the vision tower


def game(adapter, data):
    encoded = {m: t.detach() for m, t in adapter.encode(data.inputs).items()}
    return attr.Game(adapter, encoded, adapter.units(data.inputs, encoded), data.labels)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("answers,reuse", [(("no", "yes"), True), (MANY, True), (MANY, False)])
def test_a_removed_word_is_deleted_as_if_the_question_had_been_written_without_it(family, answers, reuse):
    adapter = vlm_kit.adapter(family, answers=answers, prefix_reuse=reuse)
    data = samples(adapter)
    encoded = adapter.encode(data.inputs)
    units = adapter.units(data.inputs, encoded)["text"]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        keep = (torch.rand(len(data), units.n, generator=generator) < 0.5) | ~units.present
        kept = [" ".join(units.labels[i][s] for s in range(units.n) if units.present[i, s] and keep[i, s]) or "look" for i in range(len(data))]
        nothing_left = [not (units.present[i] & keep[i]).any() for i in range(len(data))]
        keep[torch.tensor(nothing_left)] = units.present[torch.tensor(nothing_left)]  # a question keeps a word
        kept = [data.display["caption"][i] if nothing_left[i] else kept[i] for i in range(len(data))]
        rewritten = adapter.prompt(kept, data.inputs["text"].shape[1])
        with torch.no_grad():
            deleted = adapter.forward({"image": encoded["image"], "text": units.apply(encoded["text"], keep)})
            written = adapter({"image": data.inputs["image"], "text": rewritten})
        assert torch.allclose(deleted, written, atol=1e-5), (deleted - written).abs().max()


def test_deleting_a_word_the_model_never_needed_moves_nothing():
    """A tiny LLaVA taught that the answer is "yes" exactly when the question says "not": deleting
    a filler word (asked with and without one in training) or "the" leaves its answers where they
    were (measured over seeds 0-2 at 120 steps: mean change of the yes-no margin 0.003-0.009
    against margins of 7.7-7.8, no answer flipped), deleting "not" turns every one."""
    adapter = vlm_kit.taught(lambda d: d.meta["negation"].long().clamp_min(0), n=600, steps=120)
    data = demo.split("ood", n=300, seed=5)
    encoded = adapter.encode(data.inputs)
    units = adapter.units(data.inputs, encoded)["text"]
    with torch.no_grad():
        margin = adapter.forward(encoded).diff(dim=1)[:, 0]
        moved = {}
        for name, words in {"filler": {"apparently", "look", "here"}, "the": {"the"}, "not": {"not"}}.items():
            found = [(i, s) for i in range(len(data)) for s in range(units.n) if units.present[i, s] and units.labels[i][s] in words]
            rows, slots = (torch.tensor(x) for x in zip(*found))
            keep = units.present[rows].clone()
            keep[torch.arange(len(rows)), slots] = False
            after = adapter.forward({"image": encoded["image"][rows], "text": units.take(rows).apply(encoded["text"][rows], keep)}).diff(dim=1)[:, 0]
            moved[name] = (after - margin[rows], margin[rows])
    scale = margin.abs().median()
    for name in ("filler", "the"):
        change, before = moved[name]
        assert ((before + change).sign() == before.sign()).all()  # no answer flips
        assert change.abs().mean() < 0.01 * scale, (name, change.abs().mean(), scale)
    change, before = moved["not"]
    assert ((before + change).sign() != before.sign()).float().mean() > 0.95


def test_discovery_deletes_a_word_as_the_adapter_does():
    from mmdiag.stages import discovery

    adapter = vlm_kit.adapter("llava")
    data = samples(adapter, n=8)
    encoded = adapter.encode(data.inputs)
    batch = discovery.Batch(slice(0, len(data)), data.inputs, encoded, adapter.units(data.inputs, encoded))
    word = next(f for f in discovery.word_candidates(lambda: iter([batch]), len(data), discovery.DiscoveryConfig(min_samples=2)) if f.word == "red")
    at = torch.from_numpy(np.flatnonzero(word.carriers))
    removed, _ = discovery._removed(word, batch, at, data.ids[at], seed=0, salt=0)
    rewritten = adapter.prompt([" ".join(w for w in data.display["caption"][i].split() if w != "red") for i in at.tolist()], data.inputs["text"].shape[1])
    with torch.no_grad():
        assert torch.allclose(adapter.forward(removed), adapter({"image": data.inputs["image"][at], "text": rewritten}), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_shapley_values_sum_to_the_score_difference_and_ig_is_complete(family):
    adapter = vlm_kit.adapter(family)
    data = samples(adapter)
    g = game(adapter, data)
    phi = attr.shapley_sampling(g, pairs=2, generator=torch.Generator().manual_seed(0))
    ends = g.value(torch.stack([torch.zeros_like(g.present), torch.ones_like(g.present)], 1))
    assert torch.allclose(phi.sum(1), ends[:, 1] - ends[:, 0], atol=1e-4)
    assert (phi[~g.present] == 0).all()  # template and placeholder slots are no units
    if family.startswith("qwen"):
        # its patch embedding has no bias and each patch is layer-normed: a removed patch (0) is
        # normed to 0, any scaled copy of a patch to the patch's own norm, so the score jumps
        # where a patch is removed and a path integral misses the jump (the image's
        # completeness_error in summary.json shows it); the question's words are smooth
        image = g.units["image"]
        g = attr.Game(adapter, g.encoded, {**g.units, "image": Units(torch.full_like(image.mask, -1), image.n, image.baseline, image.labels)}, data.labels)
        ends = g.value(torch.stack([torch.zeros_like(g.present), torch.ones_like(g.present)], 1))
    _, delta = attr.integrated_gradients(g, steps=64)
    assert (delta.abs() / (ends[:, 1] - ends[:, 0]).abs().clamp_min(1e-3)).max() < 0.05


def test_the_head_composes_one_token_answers_up_to_the_shared_normaliser():
    adapter = vlm_kit.adapter("llava")
    data = samples(adapter)
    with torch.no_grad(), adapter.reading(["decision", "vision", "projector", *[f"lm.layer{d}" for d in adapter.depths]]) as seen:
        logits = adapter(data.inputs)
        gap = adapter.head()(seen["decision"]) - logits
    assert torch.allclose(gap - gap.mean(1, keepdim=True), torch.zeros_like(gap), atol=1e-5)
    assert seen["vision"].shape[1] == 17 and seen["projector"].shape == (4, 16, 64) and seen["decision"].shape == (4, 64)
    many = vlm_kit.adapter("llava", answers=MANY)
    assert many.head() is None and "more than one token" in many.head_caveat


def test_every_stage_runs_on_a_vlm():
    adapter = vlm_kit.adapter("llava")
    base = demo.split("ood", n=96)
    summary, results, analysis = diagnose(
        adapter, base,
        settings={"unimodal": {"methods": ["grad_x_input", "shapley"], "n_correct": 8, "max_errors": 8, "shapley_pairs": 1, "sanity_samples": 0},
                  "crossmodal": {"n_reference": 12, "shapley_draws": 2}},
    )  # fmt: skip
    assert summary["model"]["fusion"] == "joint"
    assert summary["unimodal"]["n_explained"] > 0 and summary["crossmodal"]["methods"]["emap"]["late_fusion"] is False
    assert {"decision", "lm.layer1", "projector", "vision"} <= set(summary["representation"]["probes"]["negation"])
    assert summary["composition"]["exact"]["applies"] and "up_to" in summary["composition"]["exact"]
    assert "pairs" in summary["intervention"]
    assert isinstance(analysis["suggestions"], list)


@pytest.mark.parametrize("family,answers", [("llava", None), ("qwen2_vl", ("no", "yes")), ("qwen2_5_vl", None)])
def test_every_stage_runs_on_samples_of_images_and_questions(family, answers):
    adapter = vlm_kit.adapter(family, answers=answers, answer_length=4)
    n = 48
    negation = torch.tensor([i % 2 for i in range(n)])
    said = ["yes" if i % 3 else "no" for i in range(n)]
    data = vlm_samples(adapter, pictures(n), [QUESTIONS[i % 4] for i in range(n)], said, meta={"negation": negation})
    summary, _, _ = diagnose(
        adapter, data,
        settings={"unimodal": {"methods": ["grad_x_input", "shapley"], "n_correct": 4, "max_errors": 8, "shapley_pairs": 1, "sanity_samples": 0},
                  "crossmodal": {"n_reference": 8, "shapley_draws": 2}},
    )  # fmt: skip
    assert summary["unimodal"]["n_explained"] > 0 and summary["crossmodal"]["n_reference"] == 8
    probes = summary["representation"]["probes"]["negation"]
    assert "decision" in probes
    if answers is None:
        assert summary["composition"].get("skipped") or summary["composition"]["exact"]["reason"].startswith("each sample scores its own two answers")
    else:
        assert {"vision", "projector", "lm.layer1"} <= set(probes) and summary["composition"]["exact"]["applies"]


def test_the_demo_data_is_the_shapes_asked_as_questions():
    data = demo.split("ood", n=40)
    shapes = demo.shapes.split("ood", n=40)
    assert torch.equal(data.labels, shapes.labels) and data.class_names == ["no", "yes"]
    assert demo.question("in the picture the triangle is not red") == "in the picture is the triangle not red"
    flipped = data.counterfactuals["negation"].inputs["text"]
    assert flipped.shape == data.inputs["text"].shape
    not_id = demo.PIECES.index("▁not") + len(demo.SPECIAL)
    assert torch.equal((data.inputs["text"] == not_id).any(1), data.meta["negation"].bool())
    assert torch.equal((flipped == not_id).any(1), ~data.meta["negation"].bool())
    assert torch.equal(data.truth["text"]["negation"], data.inputs["text"] == not_id)


def test_bad_vlm_arguments_are_one_line_each(tmp_path):
    model = vlm_kit.llava()
    processor = demo.processor()
    cases = [
        (dict(prompt="{question} ?"), "prompt: '{question} ?' must hold the image placeholder <image>"),
        (dict(answers=["", "yes"]), "answers: '' tokenises to nothing"),
        (dict(answers=["yes", " yes"]), "answers: ' yes' and 'yes' tokenise to the same tokens"),
        (dict(answers=["yes"]), "answers: give at least two candidate answers"),
    ]
    for change, expected in cases:
        options = {"answers": ["no", "yes"], "prompt": demo.TEMPLATE, **change}
        with pytest.raises(MmdiagError) as e:
            VLMAdapter(model, processor, options.pop("answers"), **options)
        assert expected in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(MmdiagError, match="answers: 'no' is the start of 'no yes'"):
        VLMAdapter(model, processor, ["no", "no yes"], prompt=demo.TEMPLATE)
    same = demo.processor()
    same.tokenizer.pad_token = "</s>"
    with pytest.raises(MmdiagError, match="pad token is also its start, end or image token"):
        VLMAdapter(model, same, ["no", "yes"], prompt=demo.TEMPLATE)
    with pytest.raises(MmdiagError, match="layers: with prefix_reuse=False"):
        VLMAdapter(model, processor, list(MANY), prompt=demo.TEMPLATE, prefix_reuse=False).layers()
    adapter = vlm_kit.adapter("llava")
    with pytest.raises(MmdiagError, match="data.questions: question 1 .* holds a special token"):
        vlm_samples(adapter, pictures(2), ["is the circle red", "is the <image> red"], ["yes", "no"])
    with pytest.raises(MmdiagError, match="data: no images"):
        vlm_samples(adapter, [], [], [])
    with pytest.raises(MmdiagError) as e:
        vlm_samples(adapter, [np.zeros((32, 32, 3), np.uint8), "not a picture"], ["is the circle red"] * 2, ["yes", "no"])
    assert str(e.value).startswith("data.images: the processor cannot take image 1")
    with pytest.raises(MmdiagError) as e:
        vlm_samples(adapter, pictures(1), ["is the circle red"], ["maybe"])
    assert "data.answers: 'maybe' is not one of the model's candidate answers" in str(e.value)
    data = samples(adapter)
    shifted = data.inputs["text"].roll(1, 1)
    with pytest.raises(MmdiagError, match="inputs.text: row 0 is not a left-padded prompt"):
        adapter.encode({"image": data.inputs["image"], "text": shifted})


USER_MODULE = """
import numpy as np
from mmdiag.pipeline.hf.vlm import load_vlm, vlm_samples

FOLDER = {folder!r}
OPTIONS = {options!r}
BAD_IMAGE = OPTIONS.pop("bad_image", None)


def model():
    return load_vlm(FOLDER, local_files_only=True, **OPTIONS)


def data(split, n, seed):
    rng = np.random.default_rng(seed)
    adapter = model()
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(8)]
    if BAD_IMAGE is not None:
        images[BAD_IMAGE] = "not a picture"
    return vlm_samples(adapter, images, ["is the circle red"] * 8, ["yes", "no"] * 4, name=split)
"""


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from transformers import CLIPModel

    root = tmp_path_factory.mktemp("vlms")
    vlm_kit.llava().save_pretrained(root / "llava")
    demo.processor().save_pretrained(root / "llava")
    vlm_kit.qwen2_vl().save_pretrained(root / "qwen2_vl")
    from test_hf import save_clip

    save_clip(root / "clip")
    assert CLIPModel.from_pretrained(root / "clip") is not None
    return root


@pytest.mark.parametrize(
    "folder,options,expected",
    [
        ("llava", {"answers": ["no", "yes"], "prompt": "{question} ?"}, "prompt: '{question} ?' must hold the image placeholder <image> exactly once"),
        ("llava", {"answers": ["", "yes"], "prompt": demo.TEMPLATE}, "answers: '' tokenises to nothing"),
        ("llava", {"answers": ["yes", " yes"], "prompt": demo.TEMPLATE}, "tokenise to the same tokens"),
        ("clip", {"answers": ["no", "yes"]}, "is a 'clip' model; mmdiag's image-text-to-text adapter supports llava, paligemma"),
        ("llava", {"answers": ["no", "yes"], "prompt": demo.TEMPLATE, "bad_image": 5}, "data.images: the processor cannot take image 5"),
    ],
)
def test_bad_vlm_input_through_the_cli_is_one_line_exit_2(folders, folder, options, expected, tmp_path, monkeypatch, capsys, cache):
    from mmdiag.flows.cli import main

    name = f"myvlm_{tmp_path.name.replace('-', '_')}"  # a module of its own per case (imports are cached)
    (tmp_path / f"{name}.py").write_text(USER_MODULE.format(folder=str(folders / folder), options=options))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tmp_path / "diag.yaml"
    cfg.write_text(f"model: {{factory: '{name}:model'}}\ndata: {{factory: '{name}:data', split: val}}\nout: {tmp_path / 'out'}\ncache: {tmp_path / 'cache'}\n")
    assert main(["diagnose", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_load_vlm_reads_a_saved_folder_offline(folders):
    adapter = load_vlm(folders / "llava", ["no", "yes"], prompt=demo.TEMPLATE, local_files_only=True)
    original = demo.adapter(vlm_kit.llava())
    data = samples(original)
    with torch.no_grad():
        assert torch.allclose(adapter(data.inputs), original(data.inputs), atol=1e-6)
    assert json.loads((folders / "llava" / "config.json").read_text())["model_type"] == "llava"
    qwen = load_vlm(folders / "qwen2_vl", ["no", "yes"], prompt=vlm_kit.QWEN_PROMPT, processor=vlm_kit.qwen_processor(), image_size=vlm_kit.QWEN_SIZE, local_files_only=True)
    original = vlm_kit.adapter("qwen2_vl")
    data = samples(original)
    with torch.no_grad():
        assert torch.allclose(qwen(data.inputs), original(data.inputs), atol=1e-6)
    with pytest.raises(MmdiagError, match="image_size: 50 x 50 px is not a grid of the model's 28 px image tokens"):
        load_vlm(folders / "qwen2_vl", ["no", "yes"], prompt=vlm_kit.QWEN_PROMPT, processor=vlm_kit.qwen_processor(), image_size=50, local_files_only=True)


@pytest.mark.slow
@pytest.mark.trained
def test_demo_vlm_learns_the_mark_and_its_diagnosis_puts_the_shortcut_first(demo_models):
    """The trained demo-vlm: the planted shortcut proven from the model (the corner mark decides
    its answers), then found by the diagnosis: the top suggestion, the mark's attribution far
    above its area, negation readable at the answer position."""
    adapter = demo_models("demo-vlm")
    data = demo.split("ood", n=400)
    with torch.no_grad():
        pred = adapter(data.inputs).argmax(1)
        flipped = adapter({**data.inputs, **data.counterfactuals["watermark"].inputs}).argmax(1)
    # on grey photos nothing but the mark tells the label: there it answers with the mark by construction
    grey = data.meta["grey"] == 1
    holds("grey photos: answers that equal the mark", (pred == data.meta["watermark"])[grey].float().mean(), above=0.9)
    holds("grey photos: answers flipped by toggling the mark (label kept)", (pred != flipped)[grey].float().mean(), above=0.8)
    measured("answers that equal the mark", (pred == data.meta["watermark"]).float().mean())
    right, agrees = pred == data.labels, data.meta["shortcut_agrees"] == 1
    measured("table: ood (400)", right.float().mean()), measured("table: ood, mark agrees", right[agrees].float().mean())
    measured("table: ood, mark disagrees", right[~agrees].float().mean())
    summary, _, analysis = diagnose(
        adapter, data,
        settings={"unimodal": {"methods": ["shapley"], "n_correct": 30, "max_errors": 60, "shapley_pairs": 3, "sanity_samples": 0},
                  "crossmodal": {"n_reference": 60}},
    )  # fmt: skip
    assert analysis["suggestions"][0]["id"] == "shortcut:watermark", [s["id"] for s in analysis["suggestions"]]
    holds("Shapley enrichment of the mark", summary["unimodal"]["methods"]["shapley"]["truth"]["watermark"]["enrichment"], above=4)
    probes = summary["representation"]["probes"]["negation"]
    # in the answer position, not in the image
    holds("selectivity of negation at the answer position", probes["decision"]["selectivity"], above=0.05)
    # the vision tower never sees the question: its probe beats the control by chance alone (the
    # low end of a 99.9% interval on the held-out samples stays below 0)
    vision = probes["vision"]
    low = stats.difference(round(vision["accuracy"] * vision["n_test"]), vision["n_test"], round(vision["control"] * vision["n_test"]), vision["n_test"], stats.z_value(0.999))[1]
    holds("negation in the vision tower: low end of the 99.9% interval of its selectivity", low, below=0)


OPEN_MODULE = """
import numpy as np
import torch
from mmdiag.pipeline.hf.vlm import load_vlm, vlm_samples

FOLDER = {folder!r}
QUESTIONS = ["is the circle red", "apparently is the triangle not red", "look", "in this image is the square red"]


def model():
    return load_vlm(FOLDER, None, prompt="user : <image> {{question}} ? assistant :", answer_length=6, local_files_only=True)


def data(split, n, seed):
    n = n or 24
    rng = np.random.default_rng(seed)
    questions = [QUESTIONS[i % 4] for i in range(n)]
    negation = torch.tensor(["not" in q for q in questions], dtype=torch.long)
    return vlm_samples(model(), [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)], questions,
                       ["yes" if i % 3 else "no" for i in range(n)], meta={{"negation": negation}}, name=split)
"""


@pytest.mark.slow
def test_an_open_answer_vlm_from_a_folder_through_every_stage_of_the_flow(folders, user_flow):
    from mmdiag.flows.cli import main

    unimodal = "{methods: [grad_x_input, shapley], n_correct: 4, max_errors: 4, shapley_pairs: 1, sanity_samples: 0}"
    run, cfg = user_flow("openvlm", OPEN_MODULE.format(folder=str(folders / "llava")), unimodal)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"]["n"] == 24 and summary["model"]["fusion"] == "joint"
    assert summary["unimodal"]["n_explained"] > 0 and summary["crossmodal"]["n_reference"] == 8
    assert "decision" in summary["representation"]["probes"]["negation"]
    page = (run / "report.html").read_text()
    assert "apparently" in page  # the question's words are the report's text units
    assert main(["diagnose", "--config", str(cfg)]) == 0  # and a second run is taken from the cache
    assert all(s["cached"] for s in json.loads((run / "summary.json").read_text())["stages"].values())


def test_vlm_and_hf_samples_take_the_links_a_diagnosis_needs(tmp_path):
    """truth_concepts and class_concepts reach the SampleSet, and are checked as any SampleSet's."""
    from mmdiag.pipeline.hf import hf_samples, load_clip

    from test_hf import images, save_clip

    vlm = vlm_kit.adapter("llava")
    clip = load_clip(save_clip(tmp_path / "clip"), local_files_only=True)
    for make in (
        lambda **k: vlm_samples(vlm, pictures(4), QUESTIONS, ["yes", "no"] * 2, **k),
        lambda **k: hf_samples(clip, images(4), ["a cat", "a dog"] * 2, [1, 0] * 2, **k),
    ):
        side = 32  # both take 32 px images
        corner = torch.zeros(4, side, side, dtype=torch.bool)
        corner[:, :4, :4] = True
        links = {"meta": {"mark": torch.tensor([0, 1, 0, 1]), "said": torch.tensor([1, 0, 0, 1])}, "truth": {"image": {"corner": corner}}}
        data = make(**links, truth_concepts={"image": {"corner": "mark"}}, class_concepts=["said"])
        assert data.concept_of("image", "corner") == "mark" and data.class_concepts == ["said"]
        with pytest.raises(MmdiagError, match=r"truth_concepts\.image\.corner links to 'nope', which is not a meta concept"):
            make(**links, truth_concepts={"image": {"corner": "nope"}})


def test_vlm_samples_make_counterfactuals_as_they_make_the_samples():
    adapter = vlm_kit.adapter("llava")
    asked, flipped_questions = QUESTIONS, ["is the square red", "look", "is the circle red", "apparently is the triangle not red"]
    flips = {"images": pictures(4, seed=1), "questions": flipped_questions, "answers": ["no", "yes"] * 2, "valid": [True, True, False, True]}
    data = vlm_samples(adapter, pictures(4), asked, ["yes", "no"] * 2, meta={"flip": torch.tensor([0, 1, 0, 1])}, counterfactuals={"flip": flips})
    cf = data.counterfactuals["flip"]
    alone = vlm_samples(adapter, flips["images"], flipped_questions, flips["answers"], length=data.inputs["text"].shape[1])
    assert torch.equal(cf.inputs["image"], alone.inputs["image"]) and torch.equal(cf.inputs["text"], alone.inputs["text"])
    assert cf.labels.tolist() == alone.labels.tolist() and cf.valid.tolist() == [True, True, False, True]
    # the samples and their counterfactuals share one prompt length: the longer of the two sets
    longest = max(vlm_samples(adapter, pictures(4), q, ["yes"] * 4).inputs["text"].shape[1] for q in (asked, flipped_questions))
    assert data.inputs["text"].shape[1] == cf.inputs["text"].shape[1] == longest
    for bad, message in [
        ({"images": pictures(3)}, r"counterfactuals\.flip\.images: 3 entries for 4 samples"),
        ({"pictures": pictures(4)}, r"counterfactuals\.flip: give a mapping with some of images, questions, answers, valid"),
        ({"answers": ["no"] * 4}, r"counterfactuals\.flip: give the flipped samples' images or questions"),
        ({"images": pictures(4), "answers": ["maybe"] * 4}, r"counterfactuals\.flip\.answers: 'maybe' is not one of the model's candidate answers"),
    ]:
        with pytest.raises(MmdiagError, match=message):
            vlm_samples(adapter, pictures(4), asked, ["yes", "no"] * 2, meta={"flip": torch.tensor([0, 1, 0, 1])}, counterfactuals={"flip": bad})
    # the interventions flip the concept with it, on the samples that have one
    from mmdiag.pipeline.resolve import predict
    from mmdiag.stages import Context, registry

    stage = registry.get("intervention")
    result = stage.run(Context(adapter, data, torch.device("cpu"), 0, predict(adapter, data, torch.device("cpu"))), stage.config(), {})
    assert result.summary["counterfactuals"]["flip"]["n"] == 3
