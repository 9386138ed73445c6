"""Contracts every stage shares: model adapters, samples, config, the run store, the device,
streamed sources, the one user-facing error type, and the embedded demo."""

from pipeline.adapter import ModelAdapter, TorchAdapter
from pipeline.data import Counterfactual, SampleSet
from pipeline.errors import MmdiagError
from pipeline.sources import StreamedSampleSet, hf_dataset, image_table, streamed
from pipeline.units import FeatureGroups, PatchGrid, Tokens, Units

__all__ = [
    "Counterfactual",
    "FeatureGroups",
    "MmdiagError",
    "ModelAdapter",
    "PatchGrid",
    "SampleSet",
    "StreamedSampleSet",
    "Tokens",
    "TorchAdapter",
    "Units",
    "hf_dataset",
    "image_table",
    "streamed",
]
