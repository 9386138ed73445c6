"""Discovery (the features a model follows, found with no annotations), the four analysis
stages and the interventions the report rests on, registered in the order the flow runs them
(see stages/registry.py)."""

from mmdiag.stages import composition, crossmodal, discovery, intervention, representation, unimodal
from mmdiag.stages.base import Context, Stage, StageConfig, StageResult, extended
from mmdiag.stages.registry import get, register, stages

register(discovery.STAGE)
register(unimodal.STAGE)
register(crossmodal.STAGE)
register(representation.STAGE)
register(composition.STAGE)
register(intervention.STAGE)

__all__ = ["Context", "Stage", "StageConfig", "StageResult", "extended", "get", "register", "stages"]
