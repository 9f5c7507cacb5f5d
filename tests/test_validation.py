"""keep_rate, reduction_layers and fuse_inattentive_tokens get one validation, whatever path sets them.

Every path that can set a setting (constructor, `from_pretrained` keyword arguments of configs, models and Auto
classes, config.json, assignment, `update`, `apply_evit`, the forward's `keep_rate`) must reject every bad value with
the constructor's `ValueError`, store unsorted layers sorted, and leave nothing that saves a folder the EViT classes
cannot load.
"""

import json
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageClassification, PreTrainedConfig

import evit_hf
from evit_hf import EViTConfig, EViTDeiTConfig

from .model_builders import (
    FAMILIES,
    FAMILY_TESTERS,
    TESTERS,
    TINY,
    cached_stock_and_evit,
    cached_stock_model,
    stock_and_evit,
)


LAYERS_IN_RANGE = r"reduction_layers holds 0-based layer indices in \[0, 3\] for a model with 4 layers"
LAYERS_AS_LIST = r"reduction_layers must be a list of 0-based layer indices in \[0, 3\], or None for the defaults"
KEEP_RATE_NUMBER = r"keep_rate must be a number in \(0, 1\], such as 0.7"
KEEP_RATE_RANGE = r"keep_rate must be in \(0, 1\] \(the share of candidate tokens each reduction layer keeps\)"
FUSE_BOOL = "fuse_inattentive_tokens must be True or False"
LAYERS_IN_RANGE_OF_2 = r"reduction_layers holds 0-based layer indices in \[0, 1\] for a model with 2 layers"

# Every bad value, with the start of the message that says what is allowed (TINY has 4 layers).
BAD_SETTINGS = [
    pytest.param({"reduction_layers": [99]}, LAYERS_IN_RANGE + r"; got 99 in \[99\]\.", id="layers-99"),
    pytest.param({"reduction_layers": [-1]}, LAYERS_IN_RANGE + r"; got -1 in \[-1\]\.", id="layers-minus-1"),
    pytest.param({"reduction_layers": [4]}, LAYERS_IN_RANGE + r"; got 4 in \[4\]\.", id="layers-one-past-the-end"),
    pytest.param({"reduction_layers": [1, 1]}, r"reduction_layers must not repeat a layer", id="layers-repeated"),
    pytest.param({"reduction_layers": [1.5]}, LAYERS_IN_RANGE + r"; got 1.5 in \[1.5\]\.", id="layers-float"),
    pytest.param({"reduction_layers": ["3"]}, LAYERS_IN_RANGE + r"; got '3' in \['3'\]\.", id="layers-string-item"),
    pytest.param({"reduction_layers": [True]}, LAYERS_IN_RANGE + r"; got True in \[True\]\.", id="layers-bool-item"),
    pytest.param(
        {"reduction_layers": "3"}, LAYERS_AS_LIST + r" \(\[1, 2, 3\] for 4 layers\); got '3'\.", id="layers-string"
    ),
    pytest.param({"reduction_layers": 3}, LAYERS_AS_LIST + r" \(\[1, 2, 3\] for 4 layers\); got 3\.", id="layers-int"),
    pytest.param({"keep_rate": float("nan")}, KEEP_RATE_NUMBER + "; got nan", id="keep-nan"),
    pytest.param({"keep_rate": float("inf")}, KEEP_RATE_NUMBER + "; got inf", id="keep-inf"),
    pytest.param({"keep_rate": 1.5}, KEEP_RATE_RANGE + ", got 1.5", id="keep-1.5"),
    pytest.param({"keep_rate": 0}, KEEP_RATE_RANGE + ", got 0", id="keep-0"),
    pytest.param({"keep_rate": -0.1}, KEEP_RATE_RANGE + ", got -0.1", id="keep-minus-0.1"),
    pytest.param({"keep_rate": True}, KEEP_RATE_NUMBER + "; got True", id="keep-True"),
    pytest.param({"keep_rate": "0.7"}, KEEP_RATE_NUMBER + "; got '0.7'", id="keep-string"),
    pytest.param({"keep_rate": None}, KEEP_RATE_NUMBER + "; got None", id="keep-None"),
    pytest.param({"fuse_inattentive_tokens": 1}, FUSE_BOOL + ", got 1", id="fuse-1"),
    pytest.param({"fuse_inattentive_tokens": "yes"}, FUSE_BOOL + ", got 'yes'", id="fuse-string"),
    pytest.param({"fuse_inattentive_tokens": None}, FUSE_BOOL + ", got None", id="fuse-None"),
]
# The forward's keep_rate=None means "the config's", so it is not a bad value there.
BAD_FORWARD_KEEP_RATES = [param for param in BAD_SETTINGS if param.values[0].get("keep_rate", None) is not None]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A saved tiny model of every EViT family, and plain ViT and DeiT (with teacher) checkpoints."""
    saved = {}
    for family in TESTERS:
        stock, evit = cached_stock_and_evit(family)
        saved[family] = tmp_path_factory.mktemp(family)
        evit.save_pretrained(saved[family])
        if family in ("vit-classifier", "deit-teacher"):
            saved[f"plain-{family}"] = tmp_path_factory.mktemp(f"plain-{family}")
            stock.save_pretrained(saved[f"plain-{family}"])
    return saved


@pytest.fixture(scope="module")
def deit_classifier():
    return stock_and_evit("deit-classifier")[1]


def assign(config_class, settings):
    config = config_class(**TINY)
    for name, value in settings.items():
        setattr(config, name, value)
    return config


def update(config_class, settings):
    config = config_class(**TINY)
    config.update(settings)
    return config


def apply_evit(family, settings):
    return evit_hf.apply_evit(cached_stock_model(family), **settings)


# The other families' configurations and models, one tester each (its first model class): constructor, loading a saved
# folder, apply_evit.
OTHER_FAMILY_TESTERS = [
    TESTERS[names[0]] for family, names in FAMILY_TESTERS.items() if not set(names) & set(FAMILIES)
]
OTHER_FAMILY_PATHS = {}
for tester in OTHER_FAMILY_TESTERS:
    OTHER_FAMILY_PATHS[tester.evit_config_class.__name__] = lambda folders, settings, tester=tester: (
        tester.evit_config_class(**tester.settings, **settings)
    )
    OTHER_FAMILY_PATHS[f"{tester.evit_class.__name__}.from_pretrained"] = lambda folders, settings, tester=tester: (
        tester.evit_class.from_pretrained(folders[tester.name], **settings)
    )
    OTHER_FAMILY_PATHS[f"apply_evit-{tester.name}"] = lambda folders, settings, tester=tester: apply_evit(
        tester.name, settings
    )


# Every path that takes the settings: name -> function(folders, settings) returning the config or model it made.
PATHS = {
    "EViTConfig": lambda folders, settings: EViTConfig(**TINY, **settings),
    "EViTDeiTConfig": lambda folders, settings: EViTDeiTConfig(**TINY, **settings),
    "EViTConfig.from_pretrained": lambda folders, settings: EViTConfig.from_pretrained(
        folders["vit-classifier"], **settings
    ),
    "EViTDeiTConfig.from_pretrained": lambda folders, settings: EViTDeiTConfig.from_pretrained(
        folders["deit-teacher"], **settings
    ),
    "EViTConfig.from_pretrained-plain-vit": lambda folders, settings: EViTConfig.from_pretrained(
        folders["plain-vit-classifier"], **settings
    ),
    "AutoConfig-vit": lambda folders, settings: AutoConfig.from_pretrained(folders["vit-classifier"], **settings),
    "AutoConfig-deit": lambda folders, settings: AutoConfig.from_pretrained(folders["deit-teacher"], **settings),
    **{
        f"{FAMILIES[family][1].__name__}.from_pretrained": (
            lambda folders, settings, family=family: FAMILIES[family][1].from_pretrained(folders[family], **settings)
        )
        for family in FAMILIES
    },
    "EViTForImageClassification.from_pretrained-plain-vit": lambda folders, settings: (
        evit_hf.EViTForImageClassification.from_pretrained(folders["plain-vit-classifier"], **settings)
    ),
    "EViTDeiTForImageClassificationWithTeacher.from_pretrained-plain-deit": lambda folders, settings: (
        evit_hf.EViTDeiTForImageClassificationWithTeacher.from_pretrained(folders["plain-deit-teacher"], **settings)
    ),
    "AutoModelForImageClassification-vit": lambda folders, settings: AutoModelForImageClassification.from_pretrained(
        folders["vit-classifier"], **settings
    ),
    "AutoModelForImageClassification-deit": lambda folders, settings: AutoModelForImageClassification.from_pretrained(
        folders["deit-teacher"], **settings
    ),
    "assign-vit": lambda folders, settings: assign(EViTConfig, settings),
    "assign-deit": lambda folders, settings: assign(EViTDeiTConfig, settings),
    "update-vit": lambda folders, settings: update(EViTConfig, settings),
    "apply_evit-vit": lambda folders, settings: apply_evit("vit-classifier", settings),
    "apply_evit-deit-base": lambda folders, settings: apply_evit("deit-base", settings),
    **OTHER_FAMILY_PATHS,
}


def constructor_message(settings) -> str:
    with pytest.raises(ValueError) as error:
        EViTConfig(**TINY, **settings)
    return str(error.value)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("settings, message", BAD_SETTINGS)
def test_every_path_rejects_every_bad_value_with_the_same_message(path, settings, message, folders):
    with pytest.raises(ValueError, match=f"^{message}") as error:
        PATHS[path](folders, settings)
    assert str(error.value) == constructor_message(settings)


@pytest.mark.parametrize("loader", ["EViTConfig", "EViTForImageClassification", "AutoConfig", "AutoModel"])
@pytest.mark.parametrize("settings, message", BAD_SETTINGS)
def test_a_hand_edited_config_json_with_a_bad_value_raises_on_load(loader, settings, message, folders, tmp_path):
    folder = shutil.copytree(folders["vit-classifier"], tmp_path / "edited")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **settings}))  # NaN and Infinity as JSON writes them
    load = {
        "EViTConfig": EViTConfig.from_pretrained,
        "EViTForImageClassification": evit_hf.EViTForImageClassification.from_pretrained,
        "AutoConfig": AutoConfig.from_pretrained,
        "AutoModel": AutoModelForImageClassification.from_pretrained,
    }[loader]
    with pytest.raises(ValueError, match=f"^{message}"):
        load(folder)


@pytest.mark.parametrize("settings, message", BAD_FORWARD_KEEP_RATES)
def test_forward_keep_rate_is_checked_like_the_config(settings, message, deit_classifier, pixel_values):
    with pytest.raises(ValueError, match=f"^{message}") as error:
        deit_classifier(pixel_values, keep_rate=settings["keep_rate"])
    assert str(error.value) == constructor_message(settings)


@pytest.mark.parametrize("config_class", [EViTConfig, EViTDeiTConfig], ids=["vit", "deit"])
@pytest.mark.parametrize("settings, message", BAD_SETTINGS)
def test_a_rejected_assignment_leaves_the_config_as_it_was(config_class, settings, message, tmp_path):
    config = config_class(**TINY, keep_rate=0.5, reduction_layers=[0, 2], fuse_inattentive_tokens=False)
    name, value = next(iter(settings.items()))
    with pytest.raises(ValueError, match=f"^{message}"):
        setattr(config, name, value)
    assert (config.keep_rate, config.reduction_layers, config.fuse_inattentive_tokens) == (0.5, [0, 2], False)
    config.save_pretrained(tmp_path)
    assert config_class.from_pretrained(tmp_path).to_dict() == config.to_dict()


def config_of(made):
    """The configuration holding the EViT settings of a configuration or a model."""
    config = made if isinstance(made, PreTrainedConfig) else made.config
    return config.vision_config if hasattr(config, "vision_config") else config


@pytest.mark.parametrize("path", PATHS)
def test_every_path_stores_layers_sorted_and_round_trips(path, folders, tmp_path):
    made = PATHS[path](folders, {"reduction_layers": [3, 1], "keep_rate": 1, "fuse_inattentive_tokens": False})
    config = config_of(made)
    assert config.reduction_layers == [1, 3]
    assert config.keep_rate == 1.0 and type(config.keep_rate) is float
    assert config.fuse_inattentive_tokens is False

    made.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["reduction_layers"], saved["keep_rate"], saved["fuse_inattentive_tokens"]) == ([1, 3], 1.0, False)
    loaded = config_of(type(made).from_pretrained(tmp_path))
    assert type(loaded) is type(config)
    assert (loaded.reduction_layers, loaded.keep_rate, loaded.fuse_inattentive_tokens) == ([1, 3], 1.0, False)


# Model `from_pretrained` hands its keyword arguments to the configuration's, so the configuration paths cover it.
CONFIG_PATHS = [path for path in PATHS if "Config" in path or path.startswith(("assign", "update", "apply_evit"))]


@pytest.mark.parametrize("path", CONFIG_PATHS)
def test_a_tuple_of_layers_is_stored_as_a_sorted_list(path, folders):
    config = config_of(PATHS[path](folders, {"reduction_layers": (3, 0, 2)}))
    assert config.reduction_layers == [0, 2, 3] and type(config.reduction_layers) is list


@pytest.mark.parametrize("config_class", [EViTConfig, EViTDeiTConfig], ids=["vit", "deit"])
def test_assignment_sorts_normalizes_and_none_means_the_defaults(config_class):
    config = config_class(**TINY)
    config.reduction_layers = (2, 0)
    assert config.reduction_layers == [0, 2] and type(config.reduction_layers) is list
    config.keep_rate = 1
    assert config.keep_rate == 1.0 and type(config.keep_rate) is float
    config.reduction_layers = None
    assert config.reduction_layers == evit_hf.default_reduction_layers(TINY["num_hidden_layers"])
    config.reduction_layers = []  # no reduction layer: the stock model
    assert config.reduction_layers == []


def test_a_hand_edited_config_json_with_unsorted_layers_loads_sorted(folders, tmp_path):
    folder = shutil.copytree(folders["vit-classifier"], tmp_path / "edited")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "reduction_layers": [3, 0]}))
    assert evit_hf.EViTForImageClassification.from_pretrained(folder).config.reduction_layers == [0, 3]


@pytest.mark.parametrize("config_class", [EViTConfig, EViTDeiTConfig], ids=["vit", "deit"])
def test_lowering_num_hidden_layers_below_a_reduction_layer_is_refused(config_class):
    config = config_class(**TINY, reduction_layers=[1, 3])
    with pytest.raises(ValueError, match=LAYERS_IN_RANGE_OF_2 + r"; got 3 in \[1, 3\]\.") as error:
        config.num_hidden_layers = 2
    assert "first set reduction_layers to layers below 2" in str(error.value)
    assert (config.num_hidden_layers, config.reduction_layers) == (4, [1, 3])
    config.reduction_layers = [0, 1]  # the fix the message names
    config.num_hidden_layers = 2
    assert (config.num_hidden_layers, config.reduction_layers) == (2, [0, 1])
    config.num_hidden_layers = 12  # deeper always fits
    assert config.reduction_layers == [0, 1]


def test_a_refused_depth_leaves_a_model_that_saves_and_loads(tmp_path, pixel_values):
    _, model = stock_and_evit("vit-classifier", reduction_layers=[1, 3])
    with pytest.raises(ValueError, match="first set reduction_layers to layers below 2"):
        model.config.num_hidden_layers = 2
    model.save_pretrained(tmp_path)
    loaded = evit_hf.EViTForImageClassification.from_pretrained(tmp_path)
    assert (loaded.config.num_hidden_layers, loaded.config.reduction_layers) == (4, [1, 3])
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values).logits, model(pixel_values).logits)


@pytest.mark.parametrize(
    "kwargs",
    [{"num_hidden_layers": 2, "reduction_layers": [0, 1]}, {"reduction_layers": [0, 1], "num_hidden_layers": 2}],
    ids=["depth-first", "layers-first"],
)
@pytest.mark.parametrize(
    "loader", [EViTConfig.from_pretrained, AutoConfig.from_pretrained], ids=["EViTConfig", "Auto"]
)
def test_from_pretrained_takes_a_new_depth_with_layers_in_either_order(loader, kwargs, folders, tmp_path):
    config = loader(folders["vit-classifier"], **kwargs)
    assert (config.num_hidden_layers, config.reduction_layers) == (2, [0, 1])
    config.save_pretrained(tmp_path)
    assert EViTConfig.from_pretrained(tmp_path).reduction_layers == [0, 1]


def test_from_pretrained_refuses_a_depth_the_saved_layers_do_not_fit(folders):
    with pytest.raises(ValueError, match=LAYERS_IN_RANGE_OF_2 + r"; got 2 in \[1, 2, 3\]\."):
        evit_hf.EViTForImageClassification.from_pretrained(folders["vit-classifier"], num_hidden_layers=2)


def test_a_plain_checkpoint_loaded_at_a_new_depth_gets_that_depths_default_layers(folders):
    config = EViTConfig.from_pretrained(folders["plain-vit-classifier"], num_hidden_layers=2)
    assert (config.num_hidden_layers, config.reduction_layers) == (2, [0, 1])


def test_a_failed_apply_evit_leaves_the_model_stock():
    stock, _ = stock_and_evit("deit-teacher")
    config = stock.config
    with pytest.raises(ValueError, match="keep_rate must be in"):
        evit_hf.apply_evit(stock, keep_rate=1.5)
    assert type(stock).__name__ == "DeiTForImageClassificationWithTeacher" and stock.config is config
