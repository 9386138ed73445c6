"""Contracts every stage shares: model adapters, samples, config, the run store, the device,
the one user-facing error type, and the embedded demo."""

from pipeline.adapter import ModelAdapter, TorchAdapter
from pipeline.data import Counterfactual, SampleSet
from pipeline.errors import MmdiagError
from pipeline.units import FeatureGroups, PatchGrid, Tokens, Units

__all__ = [
    "Counterfactual",
    "FeatureGroups",
    "MmdiagError",
    "ModelAdapter",
    "PatchGrid",
    "SampleSet",
    "Tokens",
    "TorchAdapter",
    "Units",
]
