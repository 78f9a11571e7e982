"""The registry builds presets and holds every model to the method contract (mimkit.protocols.MIMMethod)."""

from __future__ import annotations

import dataclasses

import pytest
from torch import nn

import mimkit
from mimkit.protocols import AfterOptimizerStep, CountsFlops, Encoder, ExtraReconstructions, MIMMethod
from mimkit.registry import _PRESETS, create_model, register_model


@dataclasses.dataclass(frozen=True)
class _Config:
    width: int = 4


class _NotAMethod(nn.Module):
    def __init__(self, config: _Config):
        super().__init__()
        self.config = config
        self.encoder = nn.Linear(config.width, config.width)


def test_a_model_without_the_method_contract_is_refused():
    register_model("not_a_method_for_tests", _NotAMethod, _Config())
    try:
        with pytest.raises(
            TypeError, match="lacks method, patch_size, grid_size, mask_generator, forward_encoder"
        ):
            create_model("not_a_method_for_tests")
    finally:
        del _PRESETS["not_a_method_for_tests"]


@pytest.mark.parametrize("name", mimkit.list_models("*_tiny_*"))
def test_every_method_fulfils_the_contract_and_says_which_hooks_it_has(name):
    model = create_model(name)
    assert isinstance(model, MIMMethod) and isinstance(model.encoder, Encoder)
    method = model.method
    assert isinstance(model, AfterOptimizerStep) == (method == "cae")  # CAE's EMA teacher
    assert isinstance(model, ExtraReconstructions) == (method == "cae")
    assert isinstance(model, CountsFlops) == (method == "mae")  # an analytic count; the others are measured
