"""Every EViT model documents the forward arguments it takes, from the one shared description of each argument."""

import inspect

import pytest

from evit_hf.families import FAMILIES


def _models_with_a_forward(written_here: bool):
    for family in FAMILIES:
        for evit_class in dict.fromkeys([*family.models.values(), *family.submodels.values()]):
            # Encoders run the layer loop; the models around them take the inputs a user passes.
            if not hasattr(evit_class, "layer_class") and _forward_written_here(evit_class) == written_here:
                yield pytest.param(evit_class, id=evit_class.__name__)


def _forward_written_here(evit_class) -> bool:
    return evit_class.forward.__module__.startswith("evit_hf.")


@pytest.mark.parametrize("evit_class", list(_models_with_a_forward(written_here=False)))
def test_vision_language_models_keep_the_stock_forward(evit_class):
    # The number of image placeholders is fixed ahead of time by the configuration's schedule, so these models take
    # no per-call keep rate, and transformers' own forward (and its documentation) serves them unchanged.
    assert evit_class.__name__.startswith(("EViTLlava", "EViTVipLlava"))
    assert "keep_rate" not in inspect.signature(evit_class.forward).parameters


@pytest.mark.parametrize("evit_class", list(_models_with_a_forward(written_here=True)))
def test_forward_documents_every_argument_once(evit_class):
    documentation = evit_class.forward.__doc__ or ""
    parameters = inspect.signature(evit_class.forward).parameters
    arguments = [
        name for name, parameter in parameters.items() if name != "self" and parameter.kind.name != "VAR_KEYWORD"
    ]
    assert "keep_rate" in arguments
    for name in arguments:
        if name in ("input_ids", "position_ids") or (name == "attention_mask" and "input_ids" in arguments):
            assert "The text tower's inputs" in documentation  # two-tower models name them together
            continue
        assert documentation.count(f"\n            {name} (") == 1, f"{evit_class.__name__}.forward: {name}"
