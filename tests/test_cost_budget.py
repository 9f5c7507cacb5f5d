import inspect

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    ViTConfig,
    ViTForImageClassification,
)

import evit_hf
from evit_hf.planning import keep_rate_for_macs
from evit_hf.resolution import resize_position_embeddings

from .model_builders import DEIT_SMALL as DEIT_SMALL_SHAPE
from .model_builders import (
    FAMILY_TESTERS,
    TESTERS,
    TINY,
    cached_stock_model,
    encoder_main_output,
    evit_settings,
    model_inputs,
)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)  # tiny models: one thread is fastest and steady on a busy machine; restored after


TINY_SHAPE = {key: value for key, value in TINY.items() if key not in ("num_labels", "initializer_range")}
DEIT_SMALL = {**DEIT_SMALL_SHAPE, "num_labels": 1000, "architectures": ["DeiTForImageClassification"]}


def test_keep_rate_for_the_macs_of_keep_0_7_is_0_7():
    config = DeiTConfig(**DEIT_SMALL)
    assert keep_rate_for_macs(config, evit_hf.count_macs(config, keep_rate=0.7)) == 0.7


@pytest.mark.parametrize("image_size", [224, 256, 288, 320])
def test_keep_rate_for_macs_is_the_largest_that_fits(image_size):
    config = DeiTConfig(**DEIT_SMALL)
    target = evit_hf.count_macs(config, image_size=224)  # the stock model at its own size: the paper's setting
    keep_rate = keep_rate_for_macs(config, target, image_size=image_size)
    assert evit_hf.count_macs(config, image_size=image_size, keep_rate=keep_rate) <= target
    if keep_rate < 1.0:
        assert evit_hf.count_macs(config, image_size=image_size, keep_rate=round(keep_rate + 0.01, 2)) > target
    assert (keep_rate == 1.0) == (image_size == 224)


def test_keep_rate_for_macs_follows_the_configured_reduction_layers():
    late = evit_hf.EViTDeiTConfig(**DEIT_SMALL, reduction_layers=[4, 7, 10])
    early = evit_hf.EViTDeiTConfig(**DEIT_SMALL, reduction_layers=[1, 2, 3])
    target = evit_hf.count_macs(DeiTConfig(**DEIT_SMALL), keep_rate=0.7)
    # Later reduction layers save less: they need a lower keep rate for the same budget.
    assert keep_rate_for_macs(late, target) < keep_rate_for_macs(early, target)


def test_a_budget_no_keep_rate_reaches_is_refused_with_its_cost():
    config = DeiTConfig(**DEIT_SMALL)
    cheapest = evit_hf.count_macs(config, keep_rate=0.01)
    with pytest.raises(ValueError, match=f"the smallest, 0.01, costs {cheapest:,}"):
        keep_rate_for_macs(config, cheapest - 1)
    assert keep_rate_for_macs(config, cheapest) == 0.01


@pytest.mark.parametrize("target", [0, -1.0, float("nan"), float("inf"), "3e9", True, None])
def test_bad_budgets_are_refused(target):
    with pytest.raises(ValueError, match="target_macs must be a positive number"):
        keep_rate_for_macs(DeiTConfig(**DEIT_SMALL), target)


RESIZABLE = {
    "vit-classifier": lambda: ViTForImageClassification(ViTConfig(**TINY_SHAPE, num_labels=5)),
    "deit-teacher": lambda: DeiTForImageClassificationWithTeacher(DeiTConfig(**TINY_SHAPE, num_labels=5)),
    "clip-vision-projection": lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_SHAPE, projection_dim=8)),
    "evit-vit-0.5": lambda: evit_hf.EViTForImageClassification(evit_hf.EViTConfig(**TINY_SHAPE, keep_rate=0.5)),
    "evit-deit-teacher-0.7": lambda: evit_hf.EViTDeiTForImageClassificationWithTeacher(
        evit_hf.EViTDeiTConfig(**TINY_SHAPE, keep_rate=0.7)
    ),
}


@pytest.mark.parametrize("name", sorted(RESIZABLE))
def test_resized_positions_equal_the_stock_interpolation_and_survive_saving(name, tmp_path):
    torch.manual_seed(0)
    model = RESIZABLE[name]().eval()
    pixel_values = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(pixel_values, interpolate_pos_encoding=True)[0]
        with pytest.raises(ValueError, match="doesn't match model"):
            model(pixel_values)
        assert resize_position_embeddings(model, 48) is model
        assert torch.equal(model(pixel_values)[0], expected)
    config = getattr(model.config, "vision_config", None) or model.config
    assert config.image_size == 48
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert reloaded.config.image_size == 48
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values)[0], expected)


def _images(size, count=2, seed=1):
    height, width = (size, size) if isinstance(size, int) else size
    return torch.randn(count, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _takes_the_flag(tester) -> bool:
    return "interpolate_pos_encoding" in inspect.signature(tester.stock_class.forward).parameters


def _runs_at_any_size(tester) -> bool:
    """Whether the model, unresized, runs at another size: with the flag, or by itself (DINOv2 interpolates at every
    size, DINOv3 has no learned positions). CLIP's classifiers take no flag."""
    return _takes_the_flag(tester) or tester.family.startswith("dino")


def _outputs(model, tester, pixel_values, on_the_fly=False):
    """The model's main output; with `on_the_fly`, with its positions interpolated to the input size as the stock
    model does (`interpolate_pos_encoding=True` where the family takes the flag)."""
    inputs = model_inputs(tester, pixel_values)
    if on_the_fly and _takes_the_flag(tester):
        inputs["interpolate_pos_encoding"] = True
    with torch.no_grad():
        return encoder_main_output(model(**inputs))


def _position_tables(model) -> list[torch.Tensor]:
    return [tensor for name, tensor in model.named_parameters() if "position_embedding" in name and "text" not in name]


@pytest.mark.parametrize("builder", list(TESTERS))
def test_a_resized_model_saves_a_folder_that_loads_and_runs_at_the_new_size(builder, tmp_path):
    # Every family, EViT through its Auto class, as a user reloads a folder that `--image_size` wrote.
    tester = TESTERS[builder]
    model = evit_hf.apply_evit(cached_stock_model(builder), keep_rate=0.5).eval()
    pixel_values = _images(48)
    on_the_fly = _outputs(model, tester, pixel_values, on_the_fly=True) if _runs_at_any_size(tester) else None
    assert resize_position_embeddings(model, 48) is model
    expected = _outputs(model, tester, pixel_values)
    if on_the_fly is not None:
        assert torch.equal(expected, on_the_fly)
    model.save_pretrained(tmp_path)
    reloaded = tester.auto_class.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert evit_settings(reloaded).image_size == 48
    torch.testing.assert_close(_outputs(reloaded, tester, pixel_values), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILY_TESTERS))
def test_a_resized_stock_model_reloads_with_its_own_class(family, tmp_path):
    builder = FAMILY_TESTERS[family][0]
    tester = TESTERS[builder]
    model = cached_stock_model(builder)
    pixel_values = _images(48)
    expected = _outputs(model, tester, pixel_values, on_the_fly=True)
    assert torch.equal(_outputs(resize_position_embeddings(model, 48), tester, pixel_values), expected)
    model.save_pretrained(tmp_path)
    reloaded = tester.stock_class.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_outputs(reloaded, tester, pixel_values), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
@pytest.mark.parametrize("family", list(FAMILY_TESTERS))
def test_resizing_again_resizes_the_current_table_and_keeps_it_frozen_or_trainable(family, frozen):
    # 32 -> 48 -> 32 -> 40: each resize gives what the model as it is then computes on the fly at the new size.
    builder = FAMILY_TESTERS[family][0]
    tester = TESTERS[builder]
    model = evit_hf.apply_evit(cached_stock_model(builder), keep_rate=0.5).eval()
    tables = _position_tables(model)
    for table in tables:
        table.requires_grad_(not frozen)
    shapes = [tuple(table.shape) for table in tables]
    for size in (48, 32, 40):
        pixel_values = _images(size)
        expected = _outputs(model, tester, pixel_values, on_the_fly=True)
        resize_position_embeddings(model, size)
        assert torch.equal(_outputs(model, tester, pixel_values), expected), size
        assert evit_settings(model).image_size == size
        assert all(table.requires_grad == (not frozen) for table in _position_tables(model)), size
    if tables:
        grid = 40 // tester.settings["patch_size"]
        prefix = 2 if family == "deit" else 1  # DINOv2's registers have no position
        assert [tuple(table.shape)[-2:] for table in _position_tables(model)] == [
            (prefix + grid * grid, shape[-1]) for shape in shapes
        ]


@pytest.mark.parametrize("image_size", [0, 3, -48, 48.0, "48", True])
def test_bad_image_sizes_are_refused(image_size):
    model = ViTForImageClassification(ViTConfig(**TINY_SHAPE))
    with pytest.raises(ValueError, match=r"image_size is the new side .* >= the patch size \(4\)"):
        resize_position_embeddings(model, image_size)
    assert model.config.image_size == 32


def _embedding_sizes(model) -> list[dict]:
    """Per position-embedding module: its size attributes, its patch embedding's, and the shapes of its own buffers
    and parameters (CLIP's `position_ids` [1, positions], the position table)."""
    records = []
    for module in model.modules():
        if not callable(getattr(module, "interpolate_pos_encoding", None)):
            continue
        record = {}
        for owner, prefix in ((module, ""), (getattr(module, "patch_embeddings", None), "patch_embeddings.")):
            for name in ("image_size", "num_patches", "num_positions"):
                if owner is not None and hasattr(owner, name):
                    record[prefix + name] = getattr(owner, name)
        record.update({name: tuple(buffer.shape) for name, buffer in module.named_buffers(recurse=False)})
        record.update({name: tuple(parameter.shape) for name, parameter in module.named_parameters()})
        records.append(record)
    return records


@pytest.mark.parametrize("family", list(FAMILY_TESTERS))
def test_resized_embeddings_are_those_of_a_model_built_at_the_new_size(family):
    # 32 -> 48 -> 32: after each resize, every size the embeddings keep (image size, patch count, position count, the
    # position ids and table) is what a model built from the resized configuration has.
    model = evit_hf.apply_evit(cached_stock_model(FAMILY_TESTERS[family][0]), keep_rate=0.5)
    for size in (48, 32):
        resize_position_embeddings(model, size)
        built = _embedding_sizes(type(model)(model.config))
        resized = _embedding_sizes(model)
        assert len(resized) == len(built), size
        for resized_record, built_record in zip(resized, built, strict=True):
            # Only what the built model has: a resized DINOv2 may carry an extra `image_size` nothing reads.
            assert {name: resized_record.get(name) for name in built_record} == built_record, size


def test_an_image_size_of_one_patch_is_accepted():
    model = ViTForImageClassification(ViTConfig(**TINY_SHAPE)).eval()
    resize_position_embeddings(model, TINY_SHAPE["patch_size"])
    assert model.config.image_size == TINY_SHAPE["patch_size"]
    assert tuple(model.vit.embeddings.position_embeddings.shape[:2]) == (1, 2)  # the class token and one patch
    with torch.no_grad():
        logits = model(torch.randn(1, 3, TINY_SHAPE["patch_size"], TINY_SHAPE["patch_size"])).logits
    assert torch.isfinite(logits).all()
