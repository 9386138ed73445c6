"""Model and data factories for the bad-input battery: one good pair, and one factory per
mistake a user can make in their own code."""

import torch

from mmdiag.pipeline import FeatureGroups, SampleSet, TorchAdapter
from mmdiag.pipeline.units import Tokens

N = 24


class Net(torch.nn.Module):
    def __init__(self, width: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(width, 2), torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.a(x["audio"]) + self.b(x["tabular"])


def _units():
    return {"audio": FeatureGroups([0, 1, 2], modality="audio"), "tabular": FeatureGroups([0, 1], modality="tabular")}


def build():
    return TorchAdapter(Net(), ("audio", "tabular"), units=_units(), class_names=["a", "b"])


def _parts(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        inputs={"audio": torch.randn(n, 3, generator=g), "tabular": torch.randn(n, 2, generator=g)},
        labels=torch.randint(0, 2, (n,), generator=g),
        meta={"loud": torch.randint(0, 2, (n,), generator=g)},
        class_names=["a", "b"],
    )


def load(split, n, seed):
    return SampleSet(**_parts(n or N, seed))


def _with(**changes):
    parts = _parts()
    for key, value in changes.items():
        parts[key] = value(parts) if callable(value) else value
    return SampleSet(**parts)


# --- data factories, each with one mistake


def data_raises(split, n, seed):
    raise ValueError("the bucket is empty")


def data_not_a_sampleset(split, n, seed):
    return {"inputs": {}}


def data_none(split, n, seed):
    return None


def data_unknown_split(split, n, seed):
    return {"val": load(split, n, seed)}[split]


def data_no_arguments():
    return load("x", None, 0)


def data_float_labels(split, n, seed):
    return _with(labels=lambda p: p["labels"].float())


def data_2d_labels(split, n, seed):
    return _with(labels=lambda p: p["labels"][:, None])


def data_labels_out_of_range(split, n, seed):
    return _with(labels=lambda p: p["labels"] + 5)


def data_negative_labels(split, n, seed):
    return _with(labels=lambda p: p["labels"] - 3)


def data_empty(split, n, seed):
    return _with(labels=torch.zeros(0, dtype=torch.long), inputs={"audio": torch.zeros(0, 3), "tabular": torch.zeros(0, 2)}, meta={})


def data_no_inputs(split, n, seed):
    return _with(inputs={})


def data_rows_mismatch(split, n, seed):
    return _with(inputs=lambda p: {**p["inputs"], "audio": p["inputs"]["audio"][:-2]})


def data_nan(split, n, seed):
    return _with(inputs=lambda p: {**p["inputs"], "audio": p["inputs"]["audio"].index_fill(0, torch.tensor([3]), float("nan"))})


def data_inf(split, n, seed):
    return _with(inputs=lambda p: {**p["inputs"], "tabular": p["inputs"]["tabular"].index_fill(0, torch.tensor([1]), float("inf"))})


def data_1d_input(split, n, seed):
    return _with(inputs=lambda p: {**p["inputs"], "audio": p["inputs"]["audio"][:, 0]})


def data_list_input(split, n, seed):
    return _with(inputs=lambda p: {**p["inputs"], "audio": p["inputs"]["audio"].tolist()})


def data_bool_meta(split, n, seed):
    return _with(meta=lambda p: {"loud": p["meta"]["loud"].bool()})


def data_float_meta(split, n, seed):
    return _with(meta=lambda p: {"loud": p["meta"]["loud"].float()})


def data_short_meta(split, n, seed):
    return _with(meta=lambda p: {"loud": p["meta"]["loud"][:5]})


def data_short_display(split, n, seed):
    return _with(display={"caption": ["x"] * 3})


def data_display_not_list(split, n, seed):
    return _with(display={"caption": "one caption for all"})


def data_truth_rows(split, n, seed):
    return _with(truth={"audio": {"peak": torch.zeros(3, 3, dtype=torch.bool)}})


def data_truth_1d(split, n, seed):
    return _with(truth={"audio": {"peak": torch.zeros(N, dtype=torch.bool)}})


def data_truth_narrow(split, n, seed):
    return _with(truth={"audio": {"peak": torch.zeros(N, 2, dtype=torch.bool)}})


def data_truth_unknown_modality(split, n, seed):
    return _with(truth={"video": {"peak": torch.zeros(N, 3, dtype=torch.bool)}})


def data_class_names_not_strings(split, n, seed):
    return _with(class_names=[0, 1])


def data_bad_link(split, n, seed):
    return _with(truth_concepts={"audio": {"peak": "loud"}})


def data_unknown_class_concept(split, n, seed):
    return _with(class_concepts=["colour"])


def data_missing_modality(split, n, seed):
    return _with(inputs=lambda p: {"audio": p["inputs"]["audio"]})


def data_three_classes(split, n, seed):
    return _with(class_names=["a", "b", "c"])


def data_one_class(split, n, seed):
    return _with(labels=torch.zeros(N, dtype=torch.long))


def data_lone_surrogates(split, n, seed):
    """Not a mistake: captions and a class name with a lone surrogate (from a file name decoded
    with surrogateescape, say), which are only shown."""
    return _with(display={"caption": [f"caption {i} \ud800" for i in range(N)]}, class_names=["a", "b\udcff"])


# --- model factories, each with one mistake


def model_raises():
    raise RuntimeError("CUDA out of memory (pretend)")


def model_not_an_adapter():
    return Net()


def model_none():
    return None


def model_missing_units():
    return TorchAdapter(Net(), ("audio", "tabular"), units={"audio": _units()["audio"]})


def model_unknown_unit_modality():
    return TorchAdapter(Net(), ("audio", "tabular"), units={**_units(), "video": FeatureGroups([0])})


def model_missing_layer():
    return TorchAdapter(Net(), ("audio", "tabular"), units=_units(), layers={"deep": "encoder.deep"})


def model_wrong_width():
    return TorchAdapter(Net(width=5), ("audio", "tabular"), units=_units())


class _OneD(Net):
    def forward(self, x):
        return super().forward(x)[:, 0]


def model_1d_output():
    return TorchAdapter(_OneD(), ("audio", "tabular"), units=_units())


class _ThreeD(Net):
    def forward(self, x):
        return super().forward(x)[:, None]


def model_3d_output():
    return TorchAdapter(_ThreeD(), ("audio", "tabular"), units=_units())


class _Nan(Net):
    def forward(self, x):
        return super().forward(x) * float("nan")


def model_nan_output():
    return TorchAdapter(_Nan(), ("audio", "tabular"), units=_units())


class _Raises(Net):
    def forward(self, x):
        raise ValueError("shape mismatch deep inside")


def model_forward_raises():
    return TorchAdapter(_Raises(), ("audio", "tabular"), units=_units())


def model_bad_units():
    return TorchAdapter(Net(), ("audio", "tabular"), units={**_units(), "audio": FeatureGroups([0, 1])})


class _NeedsIds(torch.nn.Module):
    """Takes token ids only: given embedded text (what `embeddings` makes encode return) it fails."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4 + 2, 2)

    def forward(self, x):
        words = self.embedding(x["audio"]).mean(1)
        return self.head(torch.cat([words, x["tabular"]], 1))


def model_embedding_mismatch():
    return TorchAdapter(_NeedsIds(), ("audio", "tabular"), units={"audio": Tokens(pad_id=0), "tabular": FeatureGroups([0, 1])}, embeddings={"audio": "embedding"})


def data_tokens(split, n, seed):
    return _with(inputs=lambda p: {"audio": torch.randint(1, 10, (N, 5)), "tabular": p["inputs"]["tabular"]})


def build_with(cache, device):
    """A factory that asks for the flow's cache folder and device."""
    assert cache.is_dir() or not cache.exists()
    return build()
