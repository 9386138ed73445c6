"""Contracts every stage shares: model adapters, samples, config, the run store, the device,
streamed sources, the one user-facing error type, and the embedded demo.

The names below load on first use, so that `import pipeline.errors` (the command line's first
import) does not pay for torch."""

import importlib

_WHERE = {
    "ModelAdapter": "pipeline.adapter",
    "TorchAdapter": "pipeline.adapter",
    "Counterfactual": "pipeline.data",
    "SampleSet": "pipeline.data",
    "MmdiagError": "pipeline.errors",
    "StreamedSampleSet": "pipeline.sources",
    "hf_dataset": "pipeline.sources",
    "image_table": "pipeline.sources",
    "streamed": "pipeline.sources",
    "FeatureGroups": "pipeline.units",
    "PatchGrid": "pipeline.units",
    "Tokens": "pipeline.units",
    "Units": "pipeline.units",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
