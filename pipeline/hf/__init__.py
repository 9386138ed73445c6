"""Adapters for Hugging Face vision-language models: CLIP (image-text matching and zero-shot
classification) and ViLT (visual question answering), loaded from a local folder or a Hugging
Face id, and `hf_samples`, which turns images and texts into a SampleSet with the model's own
processor (`hf_readers` gives the same processing to the streamed sources of pipeline.sources). Nothing here downloads unless you load a hub id that is not in the local cache."""

from mmdiag.pipeline.hf.clip import CLIPAdapter, CLIPZeroShotAdapter, load_clip
from mmdiag.pipeline.hf.common import BottleneckSite, hf_readers, hf_samples
from mmdiag.pipeline.hf.vilt import ViltAdapter, load_vilt

__all__ = ["BottleneckSite", "CLIPAdapter", "CLIPZeroShotAdapter", "ViltAdapter", "hf_readers", "hf_samples", "load_clip", "load_vilt"]
