"""The adapter contract, checked on the demo models with random weights."""

import pytest
import torch

from mmdiag.pipeline.adapter import TorchAdapter
from mmdiag.pipeline.demo import shapes
from mmdiag.pipeline.demo.models import ARCHS, IMAGE_MEAN, demo_adapter
from mmdiag.pipeline.demo.vocab import CLS_ID, PAD_ID
from mmdiag.pipeline.errors import MmdiagError
from mmdiag.pipeline.units import FeatureGroups


@pytest.fixture(scope="module")
def batch():
    return shapes.split("ood", n=16).inputs


@pytest.mark.parametrize("arch", ["film", "late"])
def test_forward_of_encode_is_the_models_own_output(arch, batch):
    adapter = demo_adapter(ARCHS[arch]().eval())
    with torch.no_grad():
        assert torch.allclose(adapter.forward(adapter.encode(batch)), adapter.module(batch), atol=1e-6)


@pytest.mark.parametrize("arch", ["film", "late"])
def test_removing_every_unit_gives_the_baseline_input(arch, batch):
    adapter = demo_adapter(ARCHS[arch]().eval())
    encoded = adapter.encode(batch)
    units = adapter.units(batch, encoded)
    removed = {m: u.apply(encoded[m], torch.zeros(len(batch["text"]), u.n, dtype=torch.bool)) for m, u in units.items()}
    # built independently: a mean-coloured image and a caption of [CLS] then padding
    ids = batch["text"]
    blank_text = torch.where(ids == CLS_ID, ids, torch.full_like(ids, PAD_ID))
    blank_image = torch.tensor(IMAGE_MEAN).reshape(1, 3, 1, 1).expand_as(batch["image"])
    assert torch.allclose(removed["image"], blank_image)
    with torch.no_grad():
        assert torch.allclose(adapter.forward(removed), adapter.module({"image": blank_image, "text": blank_text}), atol=1e-6)
    # special tokens are never removed: [CLS] and [PAD] are not units
    present = units["text"].present
    assert not present[ids == CLS_ID].any() and not present[ids == PAD_ID].any()
    assert torch.equal(present, (ids != CLS_ID) & (ids != PAD_ID))


def test_reading_named_layers(batch):
    adapter = demo_adapter(ARCHS["film"]().eval())
    with adapter.reading(["text", "decision"]) as seen, torch.no_grad():
        adapter(batch)
    assert seen["text"].shape == (16, 32) and seen["decision"].shape == (16, 64)
    assert adapter.head().out_features == 2
    with pytest.raises(MmdiagError, match="no layer 'nope'"):
        with adapter.reading(["nope"]):
            pass


def test_bad_modalities_and_layers():
    net = ARCHS["late"]()
    with pytest.raises(MmdiagError, match="missing"):
        demo_adapter(net).encode({"image": torch.rand(1, 3, 32, 32)})
    with pytest.raises(MmdiagError, match="no unit spec"):
        TorchAdapter(net, ("image", "text"), units={"image": FeatureGroups([0])})
    with pytest.raises(MmdiagError, match="not one of the modalities"):
        TorchAdapter(net, ("image",), units={"image": FeatureGroups([0]), "audio": FeatureGroups([0])})
    with pytest.raises(MmdiagError, match="no submodule"):
        TorchAdapter(net, ("image",), units={"image": FeatureGroups([0])}, layers={"x": "conv9"})


def test_lightning_module_takes_the_generic_adapter():
    import lightning as L

    class Tabular(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 2), torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x["left"]) + self.b(x["right"])

    module = Tabular().eval()
    adapter = TorchAdapter(module, ("left", "right"), units={"left": FeatureGroups([0, 0, 1, 1]), "right": FeatureGroups([0, 1, 2])}, head="a")
    x = {"left": torch.rand(5, 4), "right": torch.rand(5, 3)}
    assert torch.allclose(adapter(x), module(x))
    units = adapter.units(x, adapter.encode(x))
    assert units["left"].n == 2 and units["right"].n == 3
