"""A toy attribution method registered the way a user's plugin would (docs: Extending): each
unit's own effect, v({i}) - v({}), times a setting of its own. tests/test_extending.py runs it
through a whole diagnosis."""

import torch
from pydantic import BaseModel, Field

from mmdiag.stages import methods
from mmdiag.stages.attribution import Game


class LeaveOneInSettings(BaseModel):
    scale: float = Field(default=1.0, gt=0)


def leave_one_in(game: Game, call: methods.Call) -> tuple[torch.Tensor, None]:
    """scale x (f(only unit i) - f(no unit)), per present unit (absent units: 0)."""
    b, f = game.present.shape
    alone = torch.eye(f, dtype=torch.bool, device=game.present.device).expand(b, f, f) & game.present[:, None, :]
    v = game.value(torch.cat([alone, torch.zeros(b, 1, f, dtype=torch.bool, device=alone.device)], 1))
    return call.settings.scale * (v[:, :f] - v[:, f:]) * game.present, None


methods.register(methods.Method("leave_one_in", leave_one_in, settings=LeaveOneInSettings, local=True, cards=-1, paper="a test's toy"))
