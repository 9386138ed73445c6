"""The demo CNNs' fast forward (relu after each max pooling, channels-last) is the textbook
network: relu and max commute exactly, so outputs and gradients are equal to the bit in the same
memory layout, and channels-last convolutions differ from NCHW's by float rounding alone."""

import pytest
import torch
from torch.nn import functional as F

from mmdiag.pipeline.demo import models, shapes


def textbook(net: models._Fusion, inputs: dict, layout=torch.contiguous_format) -> torch.Tensor:
    """conv -> relu -> pool, FiLM before the relu."""
    t = net.text(net.words(inputs["text"]))
    x = F.max_pool2d(torch.relu(net.conv1((inputs["image"].contiguous(memory_format=layout) - 0.5) / 0.25)), 2)
    if isinstance(net, models.FiLMNet):
        film = lambda layer: layer(t)[:, :, None, None].chunk(2, dim=1)  # noqa: E731
        (g2, b2), (g3, b3) = film(net.film2), film(net.film3)
        x = F.max_pool2d(torch.relu((1 + g2) * net.conv2(x) + b2), 2)
        x = torch.relu((1 + g3) * net.conv3(x) + b3)
    else:
        x = torch.relu(net.conv3(F.max_pool2d(torch.relu(net.conv2(x)), 2)))
    return net.classify(torch.cat([x.amax(dim=(2, 3)), t], dim=1))


@pytest.mark.parametrize("arch", ["film", "late"])
@pytest.mark.parametrize("training", [False, True])
def test_fast_forward_is_the_textbook_network_to_the_bit(arch, training):
    torch.manual_seed(0)
    net = models.ARCHS[arch]().train(training)
    data = shapes.generate(64, p_mark=0.8, seed=3)
    image = data.inputs["image"].clone().requires_grad_(True)
    inputs = {"image": image, "text": data.inputs["text"]}
    fast = net(inputs)
    plain = textbook(net, inputs, torch.channels_last)
    assert torch.equal(fast, plain)
    torch.testing.assert_close(fast, textbook(net, inputs), rtol=1e-5, atol=1e-5)
    loss = lambda out: F.cross_entropy(out, data.labels)  # noqa: E731
    params = [image, *net.parameters()]
    for a, b in zip(torch.autograd.grad(loss(fast), params), torch.autograd.grad(loss(plain), params)):
        assert torch.equal(a, b)
