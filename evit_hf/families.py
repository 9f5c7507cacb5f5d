"""The model families EViT supports, one record each: the one place that names them.

`apply_evit`, the Auto registration, `count_macs`, the benchmark, the command line and the tests iterate `FAMILIES`;
adding a family is its two model files (`configuration_evit_<family>.py`, `modeling_evit_<family>.py`), one record here
and its exports in `__init__.py`. This module is not copied next to the weights: the model files do not import it.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from transformers import (
    CLIPForImageClassification,
    CLIPModel,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersModel,
    DINOv3ViTBackbone,
    DINOv3ViTModel,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaNextForConditionalGeneration,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    MetaClip2ForImageClassification,
    MetaClip2Model,
    MetaClip2VisionModel,
    MetaClip2VisionModelWithProjection,
    VipLlavaForConditionalGeneration,
    VipLlavaModel,
    ViTForImageClassification,
    ViTModel,
)

from .configuration_evit import EViTConfig
from .configuration_evit_clip import EViTCLIPConfig, EViTCLIPVisionConfig
from .configuration_evit_deit import EViTDeiTConfig
from .configuration_evit_dinov2 import EViTDinov2Config, EViTDinov2WithRegistersConfig
from .configuration_evit_dinov3_vit import EViTDINOv3ViTConfig
from .configuration_evit_llava import EViTLlavaConfig
from .configuration_evit_metaclip_2 import EViTMetaClip2Config, EViTMetaClip2VisionConfig
from .configuration_evit_vipllava import EViTVipLlavaConfig
from .modeling_evit import EViTForImageClassification, EViTModel
from .modeling_evit_base import stock_class
from .modeling_evit_clip import (
    EViTCLIPForImageClassification,
    EViTCLIPModel,
    EViTCLIPVisionModel,
    EViTCLIPVisionModelWithProjection,
)
from .modeling_evit_deit import (
    EViTDeiTForImageClassification,
    EViTDeiTForImageClassificationWithTeacher,
    EViTDeiTModel,
)
from .modeling_evit_dinov2 import (
    EViTDinov2ForImageClassification,
    EViTDinov2Model,
    EViTDinov2WithRegistersForImageClassification,
    EViTDinov2WithRegistersModel,
)
from .modeling_evit_dinov3_vit import EViTDINOv3ViTModel
from .modeling_evit_llava import EViTLlavaForConditionalGeneration, EViTLlavaModel
from .modeling_evit_metaclip_2 import (
    EViTMetaClip2ForImageClassification,
    EViTMetaClip2Model,
    EViTMetaClip2VisionModel,
    EViTMetaClip2VisionModelWithProjection,
)
from .modeling_evit_vipllava import EViTVipLlavaForConditionalGeneration, EViTVipLlavaModel
from .processing_evit_llava import EViTLlavaProcessor


IMAGE_CLASSIFICATION = "image-classification"
ZERO_SHOT_IMAGE_CLASSIFICATION = "zero-shot-image-classification"
IMAGE_FEATURE_EXTRACTION = "image-feature-extraction"
IMAGE_TEXT_TO_TEXT = "image-text-to-text"
# The Auto class a pipeline task loads its model with.
PIPELINE_AUTO_CLASSES: Mapping[str, str] = MappingProxyType(
    {
        IMAGE_CLASSIFICATION: "AutoModelForImageClassification",
        ZERO_SHOT_IMAGE_CLASSIFICATION: "AutoModelForZeroShotImageClassification",
        IMAGE_FEATURE_EXTRACTION: "AutoModel",
        IMAGE_TEXT_TO_TEXT: "AutoModelForImageTextToText",
    }
)


def _architectures(config) -> str:
    return "".join(getattr(config, "architectures", None) or [])


def _classifier_macs(config, dim: int, inputs_per_dim: int = 1) -> int:
    return inputs_per_dim * dim * max(config.num_labels, 0)


def _is_base_model(config) -> bool:
    """Whether `config.architectures` names a base model (`ViTModel`, `EViTDeiTModel`, ...), not a model with a head.
    A configuration that names none counts as a classifier, as the spec's figures do."""
    architectures = getattr(config, "architectures", None) or []
    return bool(architectures) and all(name.endswith("Model") for name in architectures)


def _vit_head_macs(config, dim: int) -> int:
    """The classifier, or for a base model its pooler (a dense layer on the class token; transformers builds it by
    default, and a configuration does not say whether a model was built without it)."""
    if _is_base_model(config):
        return dim * (getattr(config, "pooler_output_size", None) or dim)
    return _classifier_macs(config, dim)


def _deit_head_macs(config, dim: int) -> int:
    if _is_base_model(config):
        return _vit_head_macs(config, dim)
    heads = 2 if "WithTeacher" in _architectures(config) else 1  # class and distillation heads
    return heads * _classifier_macs(config, dim)


def _clip_head_macs(config, dim: int) -> int:
    """The image projection of a whole CLIP model or of a vision tower with projection; the linear head of a
    classifier (on the mean of the non-prefix tokens); nothing for a vision tower alone."""
    architectures = _architectures(config)
    if "ForImageClassification" in architectures:
        return _classifier_macs(config, dim)
    if hasattr(config, "vision_config") or "WithProjection" in architectures:
        return dim * config.projection_dim
    return 0


def _dinov2_head_macs(config, dim: int) -> int:
    # The classifier reads [class token, mean of the other tokens]: 2 * dim inputs.
    return _classifier_macs(config, dim, 2) if "ForImageClassification" in _architectures(config) else 0


def _plain_mlp_macs(config) -> int:
    """fc1 and fc2 of `intermediate_size` hidden features."""
    return 2 * config.hidden_size * config.intermediate_size


def _dinov2_mlp_macs(config) -> int:
    """`mlp_ratio` x hidden features; SwiGLU (`use_swiglu_ffn`) has gate, up and down projections, two thirds as wide
    rounded up to a multiple of 8."""
    hidden_features = int(config.hidden_size * config.mlp_ratio)
    if getattr(config, "use_swiglu_ffn", False):
        hidden_features = (int(hidden_features * 2 / 3) + 7) // 8 * 8
        return 3 * config.hidden_size * hidden_features
    return 2 * config.hidden_size * hidden_features


def _dinov3_mlp_macs(config) -> int:
    """Up and down projections of `intermediate_size` features, and a gate projection in the gated MLP."""
    return (3 if config.use_gated_mlp else 2) * config.hidden_size * config.intermediate_size


def _no_head_macs(config, dim: int) -> int:
    return 0


def _one_prefix_token(config) -> int:
    return 1


def _class_and_registers(config) -> int:
    return 1 + getattr(config, "num_register_tokens", 0)


@dataclass(frozen=True)
class EViTFamily:
    """One model family: what converts to what, how it registers, and what `count_macs` and the benchmark need.

    Attributes:
        name: the family's short name (test ids, `evit-hf benchmark` shape families).
        display_name: its name in messages and cards.
        config_classes: its EViT configurations; the first holds the settings (for CLIP-style models, the vision
            tower's configuration does, and the composite one reads them there).
        models: stock model class -> EViT class, for every model `apply_evit` converts. The sub-models that change
            class with each (base models, encoders) are each EViT class's `evit_submodels`.
        auto_classes: transformers Auto class name -> the EViT models it loads, the default first where one
            configuration has several (`config.architectures` picks, as for stock DeiT).
        pipelines: the pipeline tasks its models serve.
        num_prefix_tokens: the always-kept, never-scored tokens in front, from the configuration that holds the
            settings.
        mlp_macs_per_token: multiply-accumulates of one token through a layer's MLP, from that configuration.
        head_macs: of the head on the final tokens, from the model's own configuration (`config.architectures` says
            which head) and the hidden size.
        benchmark_shapes: `evit-hf benchmark --model` names -> configuration keyword arguments (random weights).
        benchmark_models: (stock model, EViT model) that the benchmark builds for those shapes.
        reference_image_processor: checkpoints converted from the reference code save `EViTImageProcessor`.
        kept_token_picture_model: the model `evit-hf visualize` loads a folder of the family with, if it draws the
            family's kept tokens: one that reads every saved model of the family (a vision tower reads the whole
            CLIP model, a base model reads its classifier).
        refused_models: models of the family that `apply_evit` refuses -> the reason.
        classifier_key_mapping: checkpoint key pattern -> key in the family's first image classifier, for a head that
            another of its classifiers saves under another name (the class head of a distilled DeiT), so that
            fine-tuning starts from it (`from_pretrained(..., key_mapping=...)`).
        count_macs: for families whose cost is not one image through the tower and a head (vision-language models:
            the tower up to the feature layer, the projector, the language model's prefill), the function
            `count_macs` hands the configuration to: `(config, image_size, keep_rate, **options) -> int`.
        processor_class: the processor its saved folders name (vision-language models: placeholders per image).
    """

    name: str
    display_name: str
    config_classes: tuple[type, ...]
    models: Mapping[type, type]
    auto_classes: Mapping[str, tuple[type, ...]]
    pipelines: frozenset[str]
    num_prefix_tokens: Callable[[object], int]
    mlp_macs_per_token: Callable[[object], int]
    head_macs: Callable[[object, int], int]
    benchmark_shapes: Mapping[str, Mapping] = field(default_factory=dict)
    benchmark_models: tuple[type, type] | None = None
    reference_image_processor: bool = False
    kept_token_picture_model: type | None = None
    refused_models: Mapping[type, str] = field(default_factory=dict)
    classifier_key_mapping: Mapping[str, str] = field(default_factory=dict)
    count_macs: Callable[..., int] | None = None
    processor_class: type | None = None

    @property
    def model_types(self) -> tuple[str, ...]:
        """Every `model_type` its configurations read: theirs and the stock ones."""
        return tuple(
            model_type
            for config_class in self.config_classes
            for model_type in (config_class.model_type, *config_class.source_model_types)
        )

    @property
    def submodels(self) -> dict[type, type]:
        """Stock sub-model class -> EViT class, for the sub-models that change class with the models."""
        return {
            stock_class(submodel): submodel
            for evit_class in self.models.values()
            for submodel in evit_class.evit_submodels
        }

    @property
    def layers_and_attention(self) -> dict[type, tuple[str, str]]:
        """EViT class that runs the layer loop -> (path of its layers in it, attribute of each layer's attention):
        where the conversion changes classes. The model files hold them (`layers_name`, `attention_block`)."""
        classes = [*self.models.values(), *self.submodels.values()]
        return {
            model_class: (model_class.layers_name, model_class.layer_class.attention_block[1])
            for model_class in classes
            if hasattr(model_class, "layer_class")
        }

    @property
    def benchmark_classes(self) -> tuple[type, type, type, type] | None:
        """(stock configuration, stock model, EViT configuration, EViT model) of the benchmark's models."""
        if self.benchmark_models is None:
            return None
        stock, evit = self.benchmark_models
        return (stock.config_class, stock, evit.config_class, evit)


_NEEDS_WHOLE_GRID = (
    "its projector and packing need the whole patch grid (image tiles with unpadding and image-newline tokens), and "
    "a reorganized sequence has fewer tokens, in another order, and a fused one; convert a LLaVA or VipLLaVA model "
    "(one image of a fixed size, features in sequence) instead."
)


def _vision_language_macs(config, image_size, keep_rate, **options) -> int:
    from .vision_language import count_vision_language_macs

    return count_vision_language_macs(config, image_size=image_size, keep_rate=keep_rate, **options)


def _vision_tower_mlp_macs(config) -> int:
    return _plain_mlp_macs(config)


_VIT_SHAPE = dict(patch_size=16, num_labels=1000, layer_norm_eps=1e-6)


def _vision_language_family(name, display_name, config_class, models, **more) -> EViTFamily:
    """The record of a LLaVA-style family: `models` maps its stock (base, generation) classes to EViT's; what differs
    from family to family (benchmark shapes, refused models) comes in `more`."""
    base_model, generation_model = models.values()
    return EViTFamily(
        name=name,
        display_name=display_name,
        config_classes=(config_class,),
        models=MappingProxyType(models),
        auto_classes=MappingProxyType(
            {"AutoModelForImageTextToText": (generation_model,), "AutoModel": (base_model,)}
        ),
        pipelines=frozenset({IMAGE_TEXT_TO_TEXT}),
        num_prefix_tokens=_one_prefix_token,
        mlp_macs_per_token=_vision_tower_mlp_macs,
        head_macs=_no_head_macs,
        kept_token_picture_model=generation_model,
        count_macs=_vision_language_macs,
        processor_class=EViTLlavaProcessor,
        **more,
    )


FAMILIES: tuple[EViTFamily, ...] = (
    EViTFamily(
        name="vit",
        display_name="ViT",
        config_classes=(EViTConfig,),
        models=MappingProxyType({ViTModel: EViTModel, ViTForImageClassification: EViTForImageClassification}),
        auto_classes=MappingProxyType(
            {"AutoModel": (EViTModel,), "AutoModelForImageClassification": (EViTForImageClassification,)}
        ),
        pipelines=frozenset({IMAGE_CLASSIFICATION, IMAGE_FEATURE_EXTRACTION}),
        num_prefix_tokens=_one_prefix_token,
        mlp_macs_per_token=_plain_mlp_macs,
        head_macs=_vit_head_macs,
        # DeiT without distillation is a ViT.
        benchmark_shapes=MappingProxyType(
            {
                "deit-tiny": dict(
                    _VIT_SHAPE, hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768
                ),
                "deit-small": dict(
                    _VIT_SHAPE, hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536
                ),
                "deit-base": dict(
                    _VIT_SHAPE, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
                ),
                "vit-base": dict(
                    _VIT_SHAPE, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
                ),
            }
        ),
        benchmark_models=(ViTForImageClassification, EViTForImageClassification),
        reference_image_processor=True,
        kept_token_picture_model=EViTForImageClassification,
    ),
    EViTFamily(
        name="deit",
        display_name="DeiT",
        config_classes=(EViTDeiTConfig,),
        models=MappingProxyType(
            {
                DeiTModel: EViTDeiTModel,
                DeiTForImageClassification: EViTDeiTForImageClassification,
                DeiTForImageClassificationWithTeacher: EViTDeiTForImageClassificationWithTeacher,
            }
        ),
        auto_classes=MappingProxyType(
            {
                "AutoModel": (EViTDeiTModel,),
                "AutoModelForImageClassification": (
                    EViTDeiTForImageClassification,
                    EViTDeiTForImageClassificationWithTeacher,
                ),
            }
        ),
        pipelines=frozenset({IMAGE_CLASSIFICATION, IMAGE_FEATURE_EXTRACTION}),
        num_prefix_tokens=lambda config: 2,  # class and distillation tokens
        mlp_macs_per_token=_plain_mlp_macs,
        head_macs=_deit_head_macs,
        reference_image_processor=True,
        kept_token_picture_model=EViTDeiTForImageClassificationWithTeacher,
        classifier_key_mapping=MappingProxyType({r"^cls_classifier\.": "classifier."}),
    ),
    EViTFamily(
        name="clip",
        display_name="CLIP",
        config_classes=(EViTCLIPVisionConfig, EViTCLIPConfig),
        models=MappingProxyType(
            {
                CLIPVisionModel: EViTCLIPVisionModel,
                CLIPVisionModelWithProjection: EViTCLIPVisionModelWithProjection,
                CLIPModel: EViTCLIPModel,
                CLIPForImageClassification: EViTCLIPForImageClassification,
            }
        ),
        auto_classes=MappingProxyType(
            {
                "AutoModel": (EViTCLIPModel, EViTCLIPVisionModel, EViTCLIPVisionModelWithProjection),
                "AutoModelForImageClassification": (EViTCLIPForImageClassification,),
                "AutoModelForZeroShotImageClassification": (EViTCLIPModel,),
            }
        ),
        # Vision towers (CLIPVisionModel) serve feature extraction.
        pipelines=frozenset({IMAGE_CLASSIFICATION, ZERO_SHOT_IMAGE_CLASSIFICATION, IMAGE_FEATURE_EXTRACTION}),
        num_prefix_tokens=_one_prefix_token,
        mlp_macs_per_token=_plain_mlp_macs,
        head_macs=_clip_head_macs,
        benchmark_shapes=MappingProxyType(
            {
                # openai/clip-vit-base-patch16's vision tower and projection (197 tokens at 224 px).
                "clip-vit-b16": dict(
                    hidden_size=768,
                    num_hidden_layers=12,
                    num_attention_heads=12,
                    intermediate_size=3072,
                    projection_dim=512,
                    patch_size=16,
                    layer_norm_eps=1e-5,
                    num_labels=1000,
                ),
            }
        ),
        benchmark_models=(CLIPVisionModelWithProjection, EViTCLIPVisionModelWithProjection),
        kept_token_picture_model=EViTCLIPVisionModel,
    ),
    EViTFamily(
        name="metaclip_2",
        display_name="MetaCLIP 2",
        config_classes=(EViTMetaClip2VisionConfig, EViTMetaClip2Config),
        models=MappingProxyType(
            {
                MetaClip2VisionModel: EViTMetaClip2VisionModel,
                MetaClip2VisionModelWithProjection: EViTMetaClip2VisionModelWithProjection,
                MetaClip2Model: EViTMetaClip2Model,
                MetaClip2ForImageClassification: EViTMetaClip2ForImageClassification,
            }
        ),
        auto_classes=MappingProxyType(
            {
                "AutoModel": (EViTMetaClip2Model, EViTMetaClip2VisionModel, EViTMetaClip2VisionModelWithProjection),
                "AutoModelForImageClassification": (EViTMetaClip2ForImageClassification,),
                "AutoModelForZeroShotImageClassification": (EViTMetaClip2Model,),
            }
        ),
        # Vision towers (MetaClip2VisionModel) serve feature extraction.
        pipelines=frozenset({IMAGE_CLASSIFICATION, ZERO_SHOT_IMAGE_CLASSIFICATION, IMAGE_FEATURE_EXTRACTION}),
        num_prefix_tokens=_one_prefix_token,
        mlp_macs_per_token=_plain_mlp_macs,
        head_macs=_clip_head_macs,
        kept_token_picture_model=EViTMetaClip2VisionModel,
    ),
    EViTFamily(
        name="dinov2",
        display_name="DINOv2",
        config_classes=(EViTDinov2Config,),
        models=MappingProxyType(
            {Dinov2Model: EViTDinov2Model, Dinov2ForImageClassification: EViTDinov2ForImageClassification}
        ),
        auto_classes=MappingProxyType(
            {"AutoModel": (EViTDinov2Model,), "AutoModelForImageClassification": (EViTDinov2ForImageClassification,)}
        ),
        pipelines=frozenset({IMAGE_CLASSIFICATION, IMAGE_FEATURE_EXTRACTION}),
        num_prefix_tokens=_one_prefix_token,
        mlp_macs_per_token=_dinov2_mlp_macs,
        head_macs=_dinov2_head_macs,
        benchmark_shapes=MappingProxyType(
            {
                # facebook/dinov2-small with an ImageNet classifier, at 224 px: 16 x 16 patches of 14 px (257 tokens).
                "dinov2-small": dict(
                    hidden_size=384,
                    num_hidden_layers=12,
                    num_attention_heads=6,
                    mlp_ratio=4,
                    patch_size=14,
                    num_labels=1000,
                    layer_norm_eps=1e-6,
                ),
                # facebook/dinov2-base, same head and input.
                "dinov2-base": dict(
                    hidden_size=768,
                    num_hidden_layers=12,
                    num_attention_heads=12,
                    mlp_ratio=4,
                    patch_size=14,
                    num_labels=1000,
                    layer_norm_eps=1e-6,
                ),
            }
        ),
        benchmark_models=(Dinov2ForImageClassification, EViTDinov2ForImageClassification),
        kept_token_picture_model=EViTDinov2Model,
    ),
    EViTFamily(
        name="dinov2_with_registers",
        display_name="DINOv2 with registers",
        config_classes=(EViTDinov2WithRegistersConfig,),
        models=MappingProxyType(
            {
                Dinov2WithRegistersModel: EViTDinov2WithRegistersModel,
                Dinov2WithRegistersForImageClassification: EViTDinov2WithRegistersForImageClassification,
            }
        ),
        auto_classes=MappingProxyType(
            {
                "AutoModel": (EViTDinov2WithRegistersModel,),
                "AutoModelForImageClassification": (EViTDinov2WithRegistersForImageClassification,),
            }
        ),
        pipelines=frozenset({IMAGE_CLASSIFICATION, IMAGE_FEATURE_EXTRACTION}),
        num_prefix_tokens=_class_and_registers,
        mlp_macs_per_token=_dinov2_mlp_macs,
        head_macs=_dinov2_head_macs,
        kept_token_picture_model=EViTDinov2WithRegistersModel,
    ),
    EViTFamily(
        name="dinov3_vit",
        display_name="DINOv3 ViT",
        config_classes=(EViTDINOv3ViTConfig,),
        models=MappingProxyType({DINOv3ViTModel: EViTDINOv3ViTModel}),
        auto_classes=MappingProxyType({"AutoModel": (EViTDINOv3ViTModel,)}),
        pipelines=frozenset({IMAGE_FEATURE_EXTRACTION}),
        num_prefix_tokens=_class_and_registers,
        mlp_macs_per_token=_dinov3_mlp_macs,
        head_macs=_no_head_macs,
        benchmark_shapes=MappingProxyType(
            {
                # facebook/dinov3-vits16-pretrain-lvd1689m at 224 px: 14 x 14 patches of 16 px, 4 registers.
                "dinov3-vits16": dict(
                    hidden_size=384,
                    num_hidden_layers=12,
                    num_attention_heads=6,
                    intermediate_size=1536,
                    patch_size=16,
                    num_register_tokens=4,
                    layerscale_value=1e-5,
                    layer_norm_eps=1e-5,
                    num_labels=1000,
                ),
            }
        ),
        benchmark_models=(DINOv3ViTModel, EViTDINOv3ViTModel),
        kept_token_picture_model=EViTDINOv3ViTModel,
        refused_models=MappingProxyType(
            {
                DINOv3ViTBackbone: (
                    "it returns feature maps on the full patch grid, and a reorganized sequence has fewer tokens, in "
                    "another order, and a fused one; use DINOv3ViTModel (pooled output, kept tokens) instead."
                )
            }
        ),
    ),
    _vision_language_family(
        "llava",
        "LLaVA",
        EViTLlavaConfig,
        {LlavaModel: EViTLlavaModel, LlavaForConditionalGeneration: EViTLlavaForConditionalGeneration},
        benchmark_shapes=MappingProxyType(
            {
                # LLaVA-1.5's vision tower (CLIP ViT-L/14 at 336 px: 576 patches, feature layer -2) and a small
                # language model (random weights) that a CPU prefills in a fraction of a second.
                "llava-1.5-tower-small-lm": dict(
                    vision_config=dict(
                        hidden_size=1024,
                        num_hidden_layers=24,
                        num_attention_heads=16,
                        intermediate_size=4096,
                        image_size=336,
                        patch_size=14,
                        layer_norm_eps=1e-5,
                        projection_dim=768,
                    ),
                    text_config=dict(
                        model_type="llama",
                        hidden_size=512,
                        num_hidden_layers=4,
                        num_attention_heads=8,
                        num_key_value_heads=8,
                        intermediate_size=1376,
                        vocab_size=32064,
                        max_position_embeddings=2048,
                    ),
                    image_token_index=32000,
                ),
            }
        ),
        benchmark_models=(LlavaForConditionalGeneration, EViTLlavaForConditionalGeneration),
        refused_models=MappingProxyType(
            {
                LlavaNextForConditionalGeneration: _NEEDS_WHOLE_GRID,
                LlavaNextVideoForConditionalGeneration: _NEEDS_WHOLE_GRID,
                LlavaOnevisionForConditionalGeneration: _NEEDS_WHOLE_GRID,
            }
        ),
    ),
    _vision_language_family(
        "vipllava",
        "VipLLaVA",
        EViTVipLlavaConfig,
        {VipLlavaModel: EViTVipLlavaModel, VipLlavaForConditionalGeneration: EViTVipLlavaForConditionalGeneration},
    ),
)


def _record_auto_class_names() -> None:
    """Tells each EViT model every Auto class its family's record lists it under (`auto_class_names`), which its
    saved folders' `auto_map` names."""
    for family in FAMILIES:
        names_by_model = {}
        for auto_class_name, model_classes in family.auto_classes.items():
            for model_class in model_classes:
                names_by_model.setdefault(model_class, []).append(auto_class_name)
        for model_class, names in names_by_model.items():
            model_class.auto_class_names = tuple(names)


_record_auto_class_names()

# Models whose images have no class token: nothing to score the patch tokens with.
NO_CLASS_TOKEN_MODEL_TYPES = ("siglip", "siglip_vision_model", "siglip2", "siglip2_vision_model")

FAMILIES_BY_NAME: Mapping[str, EViTFamily] = MappingProxyType({family.name: family for family in FAMILIES})


def family_for_model_type(model_type: str) -> EViTFamily | None:
    """The family whose configurations read checkpoints of `model_type` (stock or EViT), or `None`."""
    return next((family for family in FAMILIES if model_type in family.model_types), None)


def family_for_model(model) -> EViTFamily | None:
    """The family that converts `model`'s exact class (stock or EViT), or `None` (a subclass may have its own
    forward). `model` may also be the class itself."""
    model_class = model if isinstance(model, type) else type(model)
    return next(
        (family for family in FAMILIES if model_class in family.models or model_class in family.models.values()),
        None,
    )


def benchmark_shapes() -> dict[str, tuple[EViTFamily, Mapping]]:
    """Every `evit-hf benchmark --model` shape name -> (its family, its configuration keyword arguments)."""
    return {name: (family, shape) for family in FAMILIES for name, shape in family.benchmark_shapes.items()}


def model_types_with(pipeline: str) -> tuple[str, ...]:
    """The `model_type`s (stock and EViT) of the families whose models serve `pipeline`."""
    return tuple(
        model_type for family in FAMILIES if pipeline in family.pipelines for model_type in family.model_types
    )


__all__ = [
    "FAMILIES",
    "FAMILIES_BY_NAME",
    "NO_CLASS_TOKEN_MODEL_TYPES",
    "PIPELINE_AUTO_CLASSES",
    "EViTFamily",
    "benchmark_shapes",
    "family_for_model",
    "family_for_model_type",
    "model_types_with",
]
