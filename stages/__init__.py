"""The four analysis stages, registered in order as each one lands (see stages/registry.py)."""

from stages.base import Context, Stage, StageConfig, StageResult
from stages.registry import get, register, stages
from stages import composition, crossmodal, representation, unimodal

register(unimodal.STAGE)
register(crossmodal.STAGE)
register(representation.STAGE)
register(composition.STAGE)

__all__ = ["Context", "Stage", "StageConfig", "StageResult", "get", "register", "stages"]
