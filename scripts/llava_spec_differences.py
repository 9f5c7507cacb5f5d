"""The largest differences between EViT LLaVA / VipLLaVA and the literal reference of the spec, per schedule.

Runs the tiny random models of the test suite (CPU, float32, no network) for every schedule of `tests/test_llava.py`,
both feature-select strategies and both attention backends, and prints a Markdown table: the largest absolute
difference of the image features and of the logits from the reference, and, at keep rate 1, from the stock model.

    python scripts/llava_spec_differences.py
"""

import copy
import itertools
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evit_hf  # noqa: E402
from tests import spec_reference  # noqa: E402
from tests.llava_builders import IMAGE_TOKEN_ID, prompt_ids, tiny_pixels, tiny_stock  # noqa: E402
from tests.test_llava import SCHEDULES  # noqa: E402


def _largest(got, want) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True))


def _against_the_spec(kind, schedule, strategy, attn_implementation, **stock_settings):
    reduction_layers, keep_rate = schedule
    stock = tiny_stock(kind, attn_implementation, **stock_settings)
    evit = evit_hf.apply_evit(copy.deepcopy(stock), keep_rate=keep_rate, reduction_layers=reduction_layers)
    vision = evit.config.vision_config
    rates = (
        vision.keep_rate if isinstance(vision.keep_rate, list) else [vision.keep_rate] * len(vision.reduction_layers)
    )
    pixel_values = tiny_pixels()
    with torch.no_grad():
        features = evit.get_image_features(pixel_values).pooler_output
        want = spec_reference.reference_llava_image_features(
            stock,
            pixel_values,
            dict(zip(vision.reduction_layers, rates, strict=True)),
            vision.fuse_inattentive_tokens,
            evit.config.feature_hidden_states,
            strategy == "full",
        )
        input_ids = prompt_ids(evit_hf.num_image_tokens(evit.config))
        logits = evit(input_ids=input_ids, pixel_values=pixel_values).logits
        want_logits = spec_reference.reference_llava_logits(stock, input_ids, want, IMAGE_TOKEN_ID)
    return evit_hf.num_image_tokens(evit.config), _largest(features, want), float((logits - want_logits).abs().max())


def _keep_1_against_stock(attn_implementation):
    stock = tiny_stock("llava", attn_implementation)
    evit = evit_hf.apply_evit(copy.deepcopy(stock), keep_rate=1.0)
    pixel_values = tiny_pixels()
    input_ids = prompt_ids(evit_hf.num_image_tokens(evit.config))
    with torch.no_grad():
        logits = float((evit(input_ids=input_ids, pixel_values=pixel_values).logits
                        - stock(input_ids=input_ids, pixel_values=pixel_values).logits).abs().max())  # fmt: skip
        generated = [
            model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=8, do_sample=False)
            for model in (evit, stock)
        ]
    return logits, torch.equal(*generated)


def main() -> None:
    torch.manual_seed(0)
    columns = ["model", "schedule (layers, keep rate)", "strategy", "attention", "image tokens"]
    columns += ["features: largest difference", "logits: largest difference"]
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|")
    for (name, schedule), strategy, backend in itertools.product(
        SCHEDULES.items(), ["default", "full"], ["eager", "sdpa"]
    ):
        tokens, features, logits = _against_the_spec(
            "llava", schedule, strategy, backend, vision_feature_select_strategy=strategy
        )
        print(f"| LLaVA | {name} {schedule} | {strategy} | {backend} | {tokens} | {features:.2e} | {logits:.2e} |")
    for schedule, backend in itertools.product([([0], 0.5), ([3], 0.4), ([0, 3], [0.6, 0.5])], ["eager", "sdpa"]):
        tokens, features, logits = _against_the_spec(
            "vipllava", schedule, "default", backend, vision_feature_layer=(-2, 1)
        )
        print(f"| VipLLaVA | {schedule} | default | {backend} | {tokens} | {features:.2e} | {logits:.2e} |")
    for backend in ("eager", "sdpa"):
        logits, same_generate = _keep_1_against_stock(backend)
        print(f"\nkeep 1 against stock LLaVA ({backend}): logits differ by at most {logits:.2e}; "
              f"generate() {'equal' if same_generate else 'DIFFERENT'}")  # fmt: skip


if __name__ == "__main__":
    main()
