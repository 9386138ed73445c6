"""The model adapter: everything a stage knows about a model.

A new model costs one adapter: name its modalities, turn raw inputs into continuous tensors
(`encode`), compute logits from them (`forward`), say how each modality splits into units
(`units`), and name the layers worth reading (`layers`, `head`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from mmdiag.pipeline.errors import MmdiagError
from mmdiag.pipeline.units import Units, UnitSpec


class ModelAdapter(ABC):
    modalities: tuple[str, ...]
    class_names: list[str]
    module: nn.Module
    # the architecture lets units of different modalities act on each other before the head
    # (joint attention, FiLM): an additive model of this kind learnt no interaction, it was not built without one
    joint_fusion: bool = False
    # every sample's label is the same class by construction (an open-answer VLM: "target"), so
    # a data set of one label is not a mistake
    one_label: bool = False

    @abstractmethod
    def encode(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Raw inputs -> one continuous tensor per modality (pixels, token embeddings...)."""

    @abstractmethod
    def forward(self, encoded: Mapping[str, Tensor]) -> Tensor:
        """Continuous tensors -> logits (B, C), or a score (B,) for matching models."""

    @abstractmethod
    def units(self, inputs: Mapping[str, Tensor], encoded: Mapping[str, Tensor]) -> dict[str, Units]:
        """How each modality of this batch splits into attribution units."""

    def layers(self) -> dict[str, nn.Module]:
        """Named representation layers, read with forward hooks."""
        return {}

    def head(self) -> nn.Linear | None:
        """The final linear layer, when the model has one (exact logit decomposition)."""
        return None

    def shared_embeddings(self, encoded: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """For models with a shared embedding space (CLIP-like): each modality's embedding in
        that space, computed from that modality alone, (B, D) each. Enables M2IB."""
        raise MmdiagError("methods: m2ib needs a model with a shared embedding space (an adapter with shared_embeddings)")

    @property
    def has_shared_space(self) -> bool:
        return type(self).shared_embeddings is not ModelAdapter.shared_embeddings

    def separate(self, encoded: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """For late-fusion models, whose modalities meet only in `fuse`: each modality's
        features, computed from that modality alone. EMAP then encodes each modality once and
        evaluates only the fusion on its N^M recombinations."""
        raise MmdiagError("model: this adapter declares no late fusion (separate and fuse)")

    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        """Logits from the features `separate` gives: fuse(separate(x)) == forward(x)."""
        raise MmdiagError("model: this adapter declares no late fusion (separate and fuse)")

    @property
    def has_late_fusion(self) -> bool:
        return type(self).fuse is not ModelAdapter.fuse

    @property
    def fusion(self) -> str | None:
        """Where the modalities meet: "late" (separate and fuse, proven by the pre-flight),
        "joint" (declared), None (not declared)."""
        return "late" if self.has_late_fusion else "joint" if self.joint_fusion else None

    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor:
        return self.forward(self.encode(inputs))

    def to(self, device: torch.device) -> ModelAdapter:
        self.module.to(device)
        return self

    def eval(self) -> ModelAdapter:
        self.module.eval()
        return self

    def check_inputs(self, inputs: Mapping[str, Tensor]) -> None:
        missing = [m for m in self.modalities if m not in inputs]
        if missing:
            raise MmdiagError(f"inputs: modality {missing[0]!r} is missing; the model takes {', '.join(self.modalities)}")

    @contextmanager
    def reading(self, names: Sequence[str]) -> Iterator[dict[str, Tensor]]:
        """Within the block, every forward pass stores the outputs of the named layers."""
        layers = self.layers()
        unknown = [n for n in names if n not in layers]
        if unknown:
            raise MmdiagError(f"layers: the model has no layer {unknown[0]!r}; it has {', '.join(layers) or 'none'}")
        seen: dict[str, Tensor] = {}

        def hook(name):
            def store(_module, _inputs, output):
                seen[name] = output if torch.is_tensor(output) else output[0]  # a tuple or a ModelOutput: its first field

            return store

        handles = [layers[n].register_forward_hook(hook(n)) for n in names]
        try:
            yield seen
        finally:
            for h in handles:
                h.remove()


class TorchAdapter(ModelAdapter):
    """Any `torch.nn.Module` or `LightningModule` whose forward takes a dict of modality tensors.

    Discrete modalities (token ids) name their embedding submodule in `embeddings`: `encode`
    applies it, and the module's forward must then accept the embedded (float) tensor for that
    modality as well as the ids. `layers` and `head` name submodules by their dotted path.
    A late-fusion module names its two halves in `fusion`: (method giving {modality: features}
    from the encoded inputs, each from its own modality; method giving the logits from them);
    `joint_fusion=True` says the modalities act on each other inside the module (attention
    over both, FiLM), which the diagnosis uses to tell a model that cannot combine them from one
    that did not learn to.
    """

    def __init__(
        self,
        module: nn.Module,
        modalities: Sequence[str],
        units: Mapping[str, UnitSpec],
        *,
        embeddings: Mapping[str, str] | None = None,
        layers: Mapping[str, str] | None = None,
        head: str | None = None,
        class_names: Sequence[str] | None = None,
        fusion: tuple[str, str] | None = None,
        joint_fusion: bool = False,
    ):
        if fusion and joint_fusion:
            raise MmdiagError("fusion: a model is either late fusion (fusion=) or joint (joint_fusion=True), not both")
        self.module = module
        self.joint_fusion = joint_fusion
        self.fusion_names = fusion
        for name in fusion or ():
            if not callable(getattr(module, name, None)):
                raise MmdiagError(f"fusion: the module has no method {name!r}; name its (separate, fuse) methods")
        self.modalities = tuple(modalities)
        self.unit_specs = dict(units)
        self.embedding_names = dict(embeddings or {})
        self.layer_names = dict(layers or {})
        self.head_name = head
        self.class_names = list(class_names or [])
        for table, what in ((self.unit_specs, "units"), (self.embedding_names, "embeddings")):
            for m in table:
                if m not in self.modalities:
                    raise MmdiagError(f"{what}: {m!r} is not one of the modalities {', '.join(self.modalities)}")
        missing = [m for m in self.modalities if m not in self.unit_specs]
        if missing:
            raise MmdiagError(f"units: no unit spec for modality {missing[0]!r}; give one per modality")
        for path in [*self.embedding_names.values(), *self.layer_names.values(), *([head] if head else [])]:
            self._submodule(path)

    def _submodule(self, path: str) -> nn.Module:
        try:
            return self.module.get_submodule(path)
        except AttributeError:
            raise MmdiagError(f"layers: the model has no submodule {path!r}; check the dotted path") from None

    def embed(self, modality: str):
        name = self.embedding_names.get(modality)
        return self._submodule(name) if name else None

    @property
    def _dtype(self) -> torch.dtype:
        """The model's floating dtype (float32 unless it was cast, e.g. to float64 for checks)."""
        return next((p.dtype for p in self.module.parameters() if p.is_floating_point()), torch.float32)

    def encode(self, inputs):
        self.check_inputs(inputs)
        out = {}
        for m in self.modalities:
            embed = self.embed(m)
            out[m] = embed(inputs[m]) if embed is not None else inputs[m].to(self._dtype)
        return out

    def forward(self, encoded):
        return self.module({m: encoded[m] for m in self.modalities})

    def separate(self, encoded):
        if self.fusion_names is None:
            return super().separate(encoded)
        return getattr(self.module, self.fusion_names[0])({m: encoded[m] for m in self.modalities})

    def fuse(self, features):
        if self.fusion_names is None:
            return super().fuse(features)
        return getattr(self.module, self.fusion_names[1])(features)

    @property
    def has_late_fusion(self) -> bool:
        return self.fusion_names is not None

    def units(self, inputs, encoded):
        return {m: self.unit_specs[m].build(inputs[m], encoded[m], self.embed(m)) for m in self.modalities}

    def layers(self):
        return {name: self._submodule(path) for name, path in self.layer_names.items()}

    def head(self):
        return self._submodule(self.head_name) if self.head_name else None


def with_units(adapter: ModelAdapter, images: UnitSpec | None = None, **units: UnitSpec) -> ModelAdapter:
    """The same model with other units for some modalities: `images` for every modality whose
    encoded input is an image (B, C, H, W), e.g. `with_units(model, images=Segments(16))` (SLIC
    superpixels instead of the patch grid), and any modality by name. Every stage removes and
    scores the new units; nothing else changes (a shallow copy: the same module)."""
    unknown = [m for m in units if m not in adapter.modalities]
    if unknown:
        raise MmdiagError(f"units: the model has no modality {unknown[0]!r}; it has {', '.join(adapter.modalities)}")
    new = copy.copy(adapter)
    new.units = functools.partial(_replaced, adapter.units, images, units)
    return new


def _replaced(original, images: UnitSpec | None, units: Mapping[str, UnitSpec], inputs: Mapping[str, Tensor], encoded: Mapping[str, Tensor]) -> dict[str, Units]:
    out = dict(original(inputs, encoded))
    for m, x in encoded.items():
        spec = units.get(m) or (images if x.dim() == 4 else None)
        if spec is not None:
            out[m] = spec.build(inputs[m], x, None)
    return out


def setup(adapter: ModelAdapter) -> str:
    """A hash of what the adapter is besides its module's weights: its class and every plain
    setting it holds (numbers, strings, their lists and mappings; unit splits and other
    dataclasses by their fields; mmdiag's own helper objects, such as a prompt template, by
    theirs; other tensors and modules by their content), so that a cache key changes with a
    VLM's answers or prompt, CLIP's prompts or threshold, or the units `with_units` gives."""
    described = {"class": f"{type(adapter).__module__}.{type(adapter).__qualname__}", **_plain(vars(adapter), skip=adapter.module)}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def _plain(value, skip=None, depth: int = 0):
    """A JSON-able description of a setting, or None for what is no setting (a tokenizer, a
    processor: their vocabulary shows in the ids the settings hold)."""
    from mmdiag.pipeline.store import fingerprint_module, fingerprint_tensors

    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if value is skip:
        return None
    if isinstance(value, torch.Tensor):
        return fingerprint_tensors({"t": value.detach()})
    if isinstance(value, nn.Module):
        return fingerprint_module(value)
    if isinstance(value, functools.partial):  # a with_units override: its unit splits
        return [_plain(a, skip, depth + 1) for a in value.args[1:]] + [_plain(value.keywords, skip, depth + 1)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__qualname__, **{f.name: _plain(getattr(value, f.name), skip, depth + 1) for f in dataclasses.fields(value)}}
    if isinstance(value, (list, tuple)):
        return [_plain(v, skip, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, skip, depth + 1) for k, v in value.items()}
    if depth < 2 and type(value).__module__.startswith("mmdiag.") and hasattr(value, "__dict__"):
        return {"type": type(value).__qualname__, **{k: _plain(v, skip, depth + 1) for k, v in sorted(vars(value).items())}}
    return None
