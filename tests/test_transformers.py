"""Every stage on plain PyTorch transformers: joint self-attention over image patches and words
built from `nn.TransformerEncoderLayer` or `nn.MultiheadAttention`, batch-first and
sequence-first. Their fused attention has no forward-mode AD; stage 2's mixed derivatives then
run with the math attention backend, and equal finite differences and the double-backward loop."""

import json

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mmdiag.pipeline import PatchGrid, Tokens, TorchAdapter
from mmdiag.pipeline.demo import shapes
from mmdiag.pipeline.demo.vocab import CLS_ID, PAD_ID, WORDS
from mmdiag.stages import attribution as attr
from mmdiag.stages import interaction as inter
from mmdiag.stages.unimodal import _randomised

from inprocess import diagnose
from ranges import holds, measured

WIDTH = 16


class Joint(nn.Module):
    """Image patches (8 px) and words in one sequence through one attention layer."""

    def __init__(self, layer: str = "encoder", batch_first: bool = True):
        super().__init__()
        self.layer_kind, self.batch_first = layer, batch_first
        self.embedding = nn.Embedding(len(WORDS), WIDTH, padding_idx=PAD_ID)
        self.patches = nn.Conv2d(3, WIDTH, 8, stride=8)
        if layer == "encoder":
            self.attention = nn.TransformerEncoderLayer(WIDTH, 2, 2 * WIDTH, dropout=0.0, batch_first=batch_first)
        else:
            self.attention = nn.MultiheadAttention(WIDTH, 2, batch_first=batch_first)
        self.fused = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU())
        self.head = nn.Linear(WIDTH, 2)

    def forward(self, inputs):
        image = self.patches(inputs["image"]).flatten(2).transpose(1, 2)
        words = self.embedding(inputs["text"]) if not inputs["text"].is_floating_point() else inputs["text"]
        h = torch.cat([image, words], 1)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.attention(h) if self.layer_kind == "encoder" else self.attention(h, h, h, need_weights=False)[0]
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(self.fused(h.mean(1)))


def adapter(layer: str, batch_first: bool, dtype=torch.float32) -> TorchAdapter:
    torch.manual_seed(0)
    net = Joint(layer, batch_first).to(dtype).eval()
    return TorchAdapter(
        net,
        ("image", "text"),
        {"image": PatchGrid(patch=8, baseline=0.5), "text": Tokens(pad_id=PAD_ID, special_ids=(CLS_ID,), vocab=WORDS)},
        embeddings={"text": "embedding"},
        layers={"fused": "fused", "decision": "fused"},
        head="head",
        class_names=shapes.CLASS_NAMES,
    )


LAYOUTS = [("encoder", True), ("encoder", False), ("mha", True), ("mha", False)]
IDS = ["encoder-layer batch-first", "encoder-layer sequence-first", "multihead batch-first", "multihead sequence-first"]


def game(model, data, dtype=torch.float32) -> attr.Game:
    inputs = {"image": data.inputs["image"].to(dtype), "text": data.inputs["text"]}
    encoded = {m: t.detach() for m, t in model.encode(inputs).items()}
    return attr.Game(model, encoded, model.units(inputs, encoded), model.forward(encoded).argmax(1))


@pytest.fixture(scope="module")
def data():
    return shapes.split("ood", n=120)


@pytest.mark.parametrize("layer, batch_first", LAYOUTS, ids=IDS)
def test_mixed_derivatives_of_fused_attention_equal_finite_differences(layer, batch_first, data):
    model = adapter(layer, batch_first, torch.float64)
    g = game(model, data.subset(torch.arange(3)), torch.float64)
    with pytest.raises(NotImplementedError, match="forward AD"):
        inter.mixed_gradients(g, "text", "image")  # what crashed stage 2
    block, path, why = inter.mixed_block(g, "text", "image")
    assert path == "forward-over-reverse, math attention" and "attention" in why
    with sdpa_kernel(SDPBackend.MATH):  # fused attention has no double backward either
        assert torch.allclose(block, inter.mixed_gradients_looped(g, "text", "image"), atol=1e-10)
    # central differences of the gated value, one unit pair at a time
    value, h = inter.gated_value(g), 1e-4
    ones = {m: torch.ones(3, u.n, dtype=torch.float64) for m, u in g.units.items()}
    for u, v in [(1, 0), (2, 5), (3, 9)]:

        def at(du, dv):
            gates = {m: x.clone() for m, x in ones.items()}
            gates["text"][:, u] += du
            gates["image"][:, v] += dv
            return value(gates)

        fd = (at(h, h) - at(h, -h) - at(-h, h) + at(-h, -h)) / (4 * h * h)
        assert torch.allclose(block[:, u, v], fd, atol=1e-6, rtol=1e-5), (u, v)


class NoJvp(torch.autograd.Function):
    """A custom op with a backward but no forward derivative."""

    @staticmethod
    def forward(x):
        return x.tanh()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


def test_an_op_without_forward_derivative_falls_back_to_double_backward(data):
    model = adapter("encoder", True)
    model.module.fused = nn.Sequential(nn.Linear(WIDTH, WIDTH), type("Custom", (nn.Module,), {"forward": lambda self, x: NoJvp.apply(x)})())
    g = game(model, data.subset(torch.arange(4)))
    block, path, why = inter.mixed_block(g, "text", "image")
    assert path == "reverse-over-reverse, math attention" and "NoJvp" in why
    with sdpa_kernel(SDPBackend.MATH):
        assert torch.allclose(block, inter.mixed_gradients_looped(g, "text", "image"))


def test_the_sanity_check_redraws_attention_weights_too():
    model = adapter("mha", True)
    random = _randomised(model, seed=3)
    assert not torch.equal(model.module.attention.in_proj_weight, random.module.attention.in_proj_weight)


@pytest.mark.parametrize("layer, batch_first", LAYOUTS, ids=IDS)
def test_every_stage_runs_on_a_plain_transformer(layer, batch_first, data):
    quick = {
        "unimodal": {
            "methods": ["grad_x_input", "integrated_gradients", "occlusion", "shapley", "iba"],
            "n_correct": 8,
            "max_errors": 8,
            "ig_steps": 8,
            "shapley_pairs": 1,
            "iba_steps": 2,
            "iba_copies": 2,
            "sanity_samples": 4,
        },
        "crossmodal": {"n_reference": 12, "shapley_draws": 4},
    }
    summary, results, analysis = diagnose(adapter(layer, batch_first), data, quick)
    assert {"unimodal", "crossmodal", "representation", "composition", "intervention"} <= set(results)
    assert summary["crossmodal"]["methods"]["mixed_gradients"]["path"] == "forward-over-reverse, math attention"
    assert summary["unimodal"]["methods"]["shapley"]["completeness_error"] < 1e-4
    json.dumps(analysis, allow_nan=False)


@pytest.mark.slow
@pytest.mark.trained
def test_the_demo_transformer_is_diagnosed_by_the_flow(cache, tmp_path, monkeypatch):
    from mmdiag.flows import flow
    from mmdiag.flows.cli import main
    from mmdiag.flows.flow import QUICK_STAGES

    # quick stage 1; EMAP on 150 references (its full - additive gap is the property asserted)
    stages = {**QUICK_STAGES, "crossmodal": {"n_reference": 150, "shapley_draws": 4}}
    made = flow.demo_configs
    monkeypatch.setattr(flow, "demo_configs", lambda *a, **k: [c.model_copy(update={"stages": stages}) for c in made(*a, **k)])

    assert main(["demo", "--models", "demo-transformer", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "demo-transformer" / "summary.json").read_text())
    assert all(summary[s] for s in ("unimodal", "crossmodal", "representation", "composition", "intervention"))
    assert summary["crossmodal"]["methods"]["mixed_gradients"]["path"] == "forward-over-reverse, math attention"
    slices = {s["where"]: s["accuracy"] for s in summary["model"]["slices"]}
    # the shortcut on grey photos (a quarter of them): by construction about 0.25
    holds("accuracy where the mark agrees - where it disagrees", slices["shortcut_agrees=1"] - slices["shortcut_agrees=0"], above=0.15)
    # and some interaction: 0.047-0.28 over 5 seeds x 4 settings (make portability)
    holds("EMAP: full - additive accuracy", summary["crossmodal"]["full_accuracy"] - summary["crossmodal"]["additive_accuracy"], above=0.025)
    for name, value in (
        ("ood", summary["model"]["splits"]["ood"]["accuracy"]),
        ("ood, mark agrees", slices["shortcut_agrees=1"]),
        ("ood, mark disagrees", slices["shortcut_agrees=0"]),
        ("anti", summary["model"]["splits"]["anti"]["accuracy"]),
        ("EMAP full", summary["crossmodal"]["full_accuracy"]),
        ("EMAP additive", summary["crossmodal"]["additive_accuracy"]),
    ):
        measured(f"table: {name}", value)
    # the first annotated suggestion; a feature discovery found may rank beside it: training
    # seeds 1 and 2 (of 0-2 tried) also err towards 'true' on high-contrast images without the mark (reducing
    # the contrast repairs 0.56 of its errors, a random colour change as large 0.21), a second
    # error mode of about its size (priority 0.144 against the mark's 0.143)
    ids = [s["id"] for s in summary["suggestions"]]
    assert next(s["id"] for s in summary["suggestions"] if "feature" not in s) == "shortcut:watermark" and ids.index("shortcut:watermark") <= 1, ids
