"""Contracts every stage shares: model adapters, samples, config, the run store, the device,
streamed sources, the one user-facing error type, and the embedded demo.

The names below load on first use, so that `import mmdiag.pipeline.errors` (the command line's first
import) does not pay for torch."""

import importlib

_WHERE = {
    "ModelAdapter": "mmdiag.pipeline.adapter",
    "TorchAdapter": "mmdiag.pipeline.adapter",
    "with_units": "mmdiag.pipeline.adapter",
    "Counterfactual": "mmdiag.pipeline.data",
    "SampleSet": "mmdiag.pipeline.data",
    "MmdiagError": "mmdiag.pipeline.errors",
    "StreamedSampleSet": "mmdiag.pipeline.sources",
    "hf_dataset": "mmdiag.pipeline.sources",
    "image_table": "mmdiag.pipeline.sources",
    "streamed": "mmdiag.pipeline.sources",
    "FeatureGroups": "mmdiag.pipeline.units",
    "PatchGrid": "mmdiag.pipeline.units",
    "Segments": "mmdiag.pipeline.units",
    "Tokens": "mmdiag.pipeline.units",
    "Units": "mmdiag.pipeline.units",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'mmdiag.pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
