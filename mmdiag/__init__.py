"""mmdiag: diagnose a trained multimodal model.

The public API. The names load on first use, so that `import mmdiag` stays cheap (torch loads
with the first adapter or sample set)::

    import mmdiag
    d = mmdiag.diagnose(model="demo-late", data={"name": "shapes", "split": "ood", "n": 400})

The four floors live in subpackages: `mmdiag.pipeline` (adapters, samples, units, sources),
`mmdiag.stages` (the analysis stages), `mmdiag.reports` (error analysis and the HTML report)
and `mmdiag.flows` (the Prefect flow, the command line, benchmarks).
"""

import importlib

_WHERE = {
    "diagnose": "mmdiag.flows.diagnosis",
    "Diagnosis": "mmdiag.flows.diagnosis",
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
        raise AttributeError(f"module 'mmdiag' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
