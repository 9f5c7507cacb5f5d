import copy
import json
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import evit_hf
from evit_hf import count_macs, evaluate_keep_rates, results_markdown
from evit_hf import evaluation as evaluation_module
from evit_hf.data import collate_images
from evit_hf.evaluation import _shard_for_this_process, evaluation_model_class
from evit_hf.families import FAMILIES, IMAGE_CLASSIFICATION, PIPELINE_AUTO_CLASSES, ZERO_SHOT_IMAGE_CLASSIFICATION

from .fake_clock import FakeClock
from .family_folders import builders_for, tiny_image_processor, tiny_tokenizer, write_family_folder
from .model_builders import (
    FAMILY_TESTERS,
    IMAGE_MODEL_FAMILIES,
    TINY,
    builder_classes,
    stock_and_evit,
    tiny_stock_model,
)


SHAPE = {**TINY, "num_labels": 10}  # more than 5 classes: the rows have a top-5 accuracy
KEEP_RATES = (1.0, 0.5, 0.25)


@pytest.fixture(scope="module")
def evaluated():
    stock, evit = stock_and_evit("vit-classifier", shape=SHAPE)  # config keep rate 0.7, used by none of the rows
    size = TINY["image_size"]
    pixel_values = torch.randn(32, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ranked = stock(pixel_values).logits.argsort(dim=1, descending=True)
    # Labels from the stock model: its first choice for even images, its fifth for odd ones. At keep 1 (the stock
    # model) that is 50 % accuracy and 100 % top-5; fewer tokens move some fifth choices out of the top 5.
    labels = torch.where(torch.arange(32) % 2 == 0, ranked[:, 0], ranked[:, 4])
    dataset = [{"pixel_values": p, "label": int(label)} for p, label in zip(pixel_values, labels, strict=True)]
    rows = evaluate_keep_rates(evit, dataset, keep_rates=KEEP_RATES, batch_size=8, progress=False)
    return evit, pixel_values, labels.numpy(), rows


def top5_share(logits, labels):
    top5 = [sorted(range(logits.shape[1]), key=lambda c: -logits[i, c])[:5] for i in range(len(labels))]
    return float(np.mean([label in classes for label, classes in zip(labels, top5, strict=True)]))


def test_rows_follow_the_keep_rates(evaluated):
    evit, _, _, rows = evaluated
    assert [row["keep_rate"] for row in rows] == list(KEEP_RATES)
    assert (rows[0]["accuracy"], rows[0]["top5_accuracy"]) == (0.5, 1.0)  # keep 1 is the stock model
    assert rows[-1]["top5_accuracy"] < 1.0  # keeping a quarter of the tokens changes some predictions
    assert rows[0]["macs"] > rows[1]["macs"] > rows[2]["macs"]
    assert all(row["images_per_s"] > 0 for row in rows)
    assert evit.config.keep_rate == 0.7  # the model's setting is left alone


@pytest.mark.parametrize("index", range(len(KEEP_RATES)), ids=[f"keep-{rate}" for rate in KEEP_RATES])
def test_each_row_is_the_model_at_its_keep_rate(evaluated, index):
    evit, pixel_values, labels, rows = evaluated
    keep_rate = KEEP_RATES[index]
    with torch.no_grad():
        logits = evit(pixel_values, keep_rate=keep_rate).logits.numpy()
    row = rows[index]
    assert row["accuracy"] == pytest.approx(float(np.mean(logits.argmax(axis=1) == labels)))
    assert row["top5_accuracy"] == pytest.approx(top5_share(logits, labels))
    assert row["macs"] == count_macs(evit.config, image_size=TINY["image_size"], keep_rate=keep_rate)


def comparable(rows):
    """The rows without their speed, which differs from run to run."""
    return [{key: value for key, value in row.items() if key != "images_per_s"} for row in rows]


class CountingDataset(torch.utils.data.Dataset):
    """Items of a list, counting how often each is fetched, in shared memory so that data-loader workers count too."""

    def __init__(self, items):
        self.items = items
        self.fetched = torch.zeros(len(items), dtype=torch.int64).share_memory_()

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        self.fetched[index] += 1  # one worker fetches a given index: no lost updates
        return self.items[index]


def as_items(pixel_values, labels):
    return [{"pixel_values": p, "label": int(label)} for p, label in zip(pixel_values, labels, strict=True)]


@pytest.mark.parametrize("num_workers", [0, 2], ids=["main-process", "2-workers"])
def test_one_pass_fetches_each_image_once_for_all_keep_rates(evaluated, num_workers):
    evit, pixel_values, labels, rows = evaluated
    dataset = CountingDataset(as_items(pixel_values, labels))
    counted = evaluate_keep_rates(
        evit, dataset, keep_rates=KEEP_RATES, batch_size=8, progress=False, num_workers=num_workers
    )
    assert dataset.fetched.tolist() == [1] * len(dataset)  # three keep rates, one fetch per image
    assert comparable(counted) == comparable(rows)
    assert all(row["samples"] == len(dataset) for row in counted)


def test_bfloat16_runs_under_autocast(evaluated):
    evit, pixel_values, labels, _ = evaluated
    seen = []
    hook = evit.classifier.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    try:
        rows = evaluate_keep_rates(
            evit, as_items(pixel_values, labels), keep_rates=KEEP_RATES, batch_size=8, progress=False, dtype="bfloat16"
        )
    finally:
        hook.remove()
    assert set(seen) == {torch.bfloat16}  # the head's matrix product ran in bfloat16
    for keep_rate, row in zip(KEEP_RATES, rows, strict=True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = evit(pixel_values, keep_rate=keep_rate).logits.float().numpy()
        assert row["accuracy"] == pytest.approx(float(np.mean(logits.argmax(axis=1) == labels)))
        assert row["top5_accuracy"] == pytest.approx(top5_share(logits, labels))
    assert next(evit.parameters()).dtype == torch.float32  # autocast leaves the weights alone


def test_float16_on_cpu_is_refused(evaluated):
    evit, pixel_values, labels, _ = evaluated
    with pytest.raises(ValueError, match="float16 is for CUDA.*bfloat16"):
        evaluate_keep_rates(evit, as_items(pixel_values, labels), keep_rates=(1.0,), progress=False, dtype="float16")


@pytest.mark.parametrize("num_shards, num_workers", [(1, 0), (2, 2)], ids=["1-shard", "2-shards-2-workers"])
def test_a_stream_gives_the_rows_of_the_map_style_dataset(evaluated, num_shards, num_workers):
    evit, pixel_values, labels, rows = evaluated
    table = datasets.Dataset.from_dict({"pixel_values": pixel_values, "label": labels})
    stream = table.to_iterable_dataset(num_shards=num_shards).with_format("torch")
    streamed = evaluate_keep_rates(
        evit, stream, keep_rates=KEEP_RATES, batch_size=8, progress=False, num_workers=num_workers
    )
    assert comparable(streamed) == comparable(rows)
    assert streamed[0]["samples"] == len(labels)  # the workers read disjoint shards


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("kind", ["map-style", "stream-3-shards", "stream-1-shard"])
def test_processes_split_the_data_into_disjoint_parts_that_cover_it(kind, world_size):
    size = 11  # not a multiple of the process count: the parts differ in size
    table = datasets.Dataset.from_dict({"index": list(range(size))})
    dataset = table if kind == "map-style" else table.to_iterable_dataset(num_shards=int(kind.split("-")[1]))
    parts = []
    for rank in range(world_size):
        part, sampler = _shard_for_this_process(dataset, rank, world_size)
        parts.append([part[i]["index"] for i in sampler] if sampler is not None else [e["index"] for e in part])
    assert sorted(index for part in parts for index in part) == list(range(size))  # each sample exactly once
    assert max(map(len, parts)) - min(map(len, parts)) <= (1 if kind != "stream-3-shards" else 4)


FORWARD_SECONDS = {1.0: 0.5, 0.5: 0.25, 0.25: 0.125}  # per batch, at each keep rate


def timed_evaluation(model, items, clock, seconds_per_batch, **kwargs):
    """`evaluate_keep_rates` where each forward pass takes `seconds_per_batch[keep_rate]` and each batch's loading
    7 s of the fake clock."""

    def load(batch_items):
        clock.advance(7.0)
        return collate_images(batch_items)

    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: clock.advance(seconds_per_batch[kwargs["keep_rate"]]), with_kwargs=True
    )
    try:
        return evaluate_keep_rates(
            model, items, keep_rates=KEEP_RATES, batch_size=8, collate_fn=load, progress=False, **kwargs
        )
    finally:
        hook.remove()


def test_images_per_s_is_each_keep_rates_own_forward_time(evaluated, monkeypatch):
    # 32 images in 4 batches: images/s at a keep rate is 32 over its 4 forward passes, neither over the passes at all
    # keep rates nor over the wall time with the loading.
    evit, pixel_values, labels, rows = evaluated
    clock = FakeClock()
    monkeypatch.setattr(evaluation_module, "time", SimpleNamespace(perf_counter=clock))
    timed = timed_evaluation(evit, as_items(pixel_values, labels), clock, FORWARD_SECONDS)
    assert comparable(timed) == comparable(rows)
    for row in timed:
        assert row["images_per_s"] == pytest.approx(32 / (4 * FORWARD_SECONDS[row["keep_rate"]]))


def test_images_per_s_across_processes_is_all_images_over_the_slowest(evaluated, monkeypatch):
    # Two processes, simulated in turn: rank 1 (16 images, 2 batches) runs three times slower than rank 0. Every
    # rank gets all 32 images over rank 1's forward time, not its own. The collectives are those of a real group:
    # rank 1's call records its tensors, rank 0's call reduces them with its own.
    evit, pixel_values, labels, rows = evaluated
    items = as_items(pixel_values, labels)
    clock = FakeClock()
    monkeypatch.setattr(evaluation_module, "time", SimpleNamespace(perf_counter=clock))
    rank = {"value": 1}
    sent = {}

    def all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False):
        if rank["value"] == 1:
            sent.setdefault(str(op), []).append(tensor.clone())
            return
        peer = sent[str(op)].pop(0)
        if op == torch.distributed.ReduceOp.SUM:
            tensor += peer
        else:
            assert op == torch.distributed.ReduceOp.MAX
            torch.maximum(tensor, peer, out=tensor)

    for name, value in {"is_available": lambda: True, "is_initialized": lambda: True,
                        "get_rank": lambda: rank["value"], "get_world_size": lambda: 2,
                        "get_backend": lambda group=None: "gloo", "all_reduce": all_reduce}.items():  # fmt: skip
        monkeypatch.setattr(torch.distributed, name, value)
    slower = {keep_rate: 3 * seconds for keep_rate, seconds in FORWARD_SECONDS.items()}
    timed_evaluation(evit, items, clock, slower, distributed=True)  # rank 1
    rank["value"] = 0
    timed = timed_evaluation(evit, items, clock, FORWARD_SECONDS, distributed=True)
    assert comparable(timed) == comparable(rows)  # all 32 images, counted once
    for row in timed:
        assert row["images_per_s"] == pytest.approx(32 / (2 * slower[row["keep_rate"]]))


# Every family: the classifiers, the zero-shot models (CLIP, MetaCLIP 2), and the models that have no accuracy.

ZERO_SHOT_LABELS = ["cat", "dog", "car", "tree", "sky", "sun"]  # more than 5 classes: a top-5 accuracy too
CLASSIFIERS = builders_for(PIPELINE_AUTO_CLASSES[IMAGE_CLASSIFICATION])
ZERO_SHOT_MODELS = builders_for(PIPELINE_AUTO_CLASSES[ZERO_SHOT_IMAGE_CLASSIFICATION])
# The Auto classes of models that have an accuracy.
SCORED_AUTO_CLASSES = (
    PIPELINE_AUTO_CLASSES[IMAGE_CLASSIFICATION],
    PIPELINE_AUTO_CLASSES[ZERO_SHOT_IMAGE_CLASSIFICATION],
)


def headless_builders() -> list[tuple[str, str]]:
    """(family, builder) for the first model of each family that is neither an image classifier nor a zero-shot
    model (a base model or a vision tower)."""
    found = []
    for family in IMAGE_MODEL_FAMILIES:
        scored = {model for name in SCORED_AUTO_CLASSES for model in family.auto_classes.get(name, ())}
        builder = next(b for b in FAMILY_TESTERS[family.name] if builder_classes(b)[1] not in scored)
        found.append((family.name, builder))
    return found


def test_every_family_with_a_head_or_zero_shot_model_is_covered():
    with_accuracy = {family.name for family in FAMILIES if set(SCORED_AUTO_CLASSES) & set(family.auto_classes)}
    assert {family for family, _ in CLASSIFIERS + ZERO_SHOT_MODELS} == with_accuracy
    assert len(with_accuracy) >= 6  # ViT, DeiT, CLIP, MetaCLIP 2, DINOv2 with and without registers


@pytest.mark.parametrize("family, builder", CLASSIFIERS, ids=[family for family, _ in CLASSIFIERS])
def test_the_classifier_of_every_family_is_evaluated_at_each_keep_rate(family, builder):
    evit = evit_hf.apply_evit(tiny_stock_model(builder))
    pixel_values = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    labels = torch.randint(0, evit.config.num_labels, (8,), generator=torch.Generator().manual_seed(12))
    rows = evaluate_keep_rates(
        evit, as_items(pixel_values, labels), keep_rates=(1.0, 0.5), batch_size=4, progress=False
    )
    for keep_rate, row in zip((1.0, 0.5), rows, strict=True):
        with torch.no_grad():
            predictions = evit(pixel_values, keep_rate=keep_rate).logits.argmax(dim=1)
        assert row["accuracy_kind"] == "classifier"
        assert row["accuracy"] == pytest.approx((predictions == labels).float().mean().item())
        assert row["macs"] == count_macs(evit.config, image_size=32, keep_rate=keep_rate)
    assert rows[0]["macs"] > rows[1]["macs"]


def prompt_tokens():
    return tiny_tokenizer()(
        [f"a photo of a {label}." for label in ZERO_SHOT_LABELS], padding=True, return_tensors="pt"
    )


@pytest.fixture(scope="module", params=ZERO_SHOT_MODELS, ids=[family for family, _ in ZERO_SHOT_MODELS])
def zero_shot_evaluated(request):
    _, builder = request.param
    stock = tiny_stock_model(builder)
    evit = evit_hf.apply_evit(copy.deepcopy(stock)).eval()
    pixel_values = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        # The stock model's own zero-shot logits: scaled cosine similarities of the images to the prompts.
        ranked = stock(pixel_values=pixel_values, **prompt_tokens()).logits_per_image.argsort(dim=1, descending=True)
    # Its first choice for even images, its second for odd ones: at keep 1 (the stock vision tower) 50 % accuracy and
    # 100 % top-5.
    labels = torch.where(torch.arange(12) % 2 == 0, ranked[:, 0], ranked[:, 1])
    rows = evaluate_keep_rates(
        evit,
        as_items(pixel_values, labels),
        keep_rates=(1.0, 0.5),
        batch_size=4,
        progress=False,
        tokenizer=tiny_tokenizer(),
        label_names=ZERO_SHOT_LABELS,
    )
    return stock, evit, pixel_values, labels, rows


def test_zero_shot_accuracy_at_keep_1_is_the_stock_models(zero_shot_evaluated):
    _, _, _, _, rows = zero_shot_evaluated
    assert [row["accuracy_kind"] for row in rows] == ["zero-shot", "zero-shot"]
    assert (rows[0]["accuracy"], rows[0]["top5_accuracy"]) == (0.5, 1.0)
    assert rows[0]["macs"] > rows[1]["macs"]


def test_zero_shot_rows_are_the_nearest_prompt_of_the_reduced_vision_tower(zero_shot_evaluated):
    stock, evit, pixel_values, labels, rows = zero_shot_evaluated
    with torch.no_grad():
        text = stock.get_text_features(**prompt_tokens()).pooler_output
        image = evit.get_image_features(pixel_values, keep_rate=0.5).pooler_output
    similarities = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).t()
    assert rows[1]["accuracy"] == pytest.approx((similarities.argmax(dim=1) == labels).float().mean().item())
    assert rows[1]["top5_accuracy"] == pytest.approx(top5_share(similarities.numpy(), labels.numpy()))


def test_zero_shot_needs_the_tokenizer_and_the_label_names():
    evit = evit_hf.apply_evit(tiny_stock_model(ZERO_SHOT_MODELS[0][1]))
    with pytest.raises(ValueError, match="needs tokenizer=.*and label_names="):
        evaluate_keep_rates(evit, UntouchableDataset(), progress=False, label_names=ZERO_SHOT_LABELS)
    with pytest.raises(ValueError, match="must hold \\{label\\}"):
        evaluate_keep_rates(
            evit, UntouchableDataset(), progress=False, tokenizer=tiny_tokenizer(), label_names=["a"], prompt="a"
        )


class UntouchableDataset(torch.utils.data.Dataset):
    """Fails the test if anything reads it: refusals come before any work."""

    def __len__(self):
        raise AssertionError("the dataset was read")

    def __getitem__(self, index):
        raise AssertionError("the dataset was read")


@pytest.mark.parametrize("family, builder", headless_builders(), ids=[family for family, _ in headless_builders()])
def test_models_without_a_head_are_refused_before_any_work(family, builder):
    evit = evit_hf.apply_evit(tiny_stock_model(builder))
    with pytest.raises(ValueError, match=f"A {type(evit).__name__} has no classification head.*fine-tune"):
        evaluate_keep_rates(evit, UntouchableDataset(), progress=False)


@pytest.mark.parametrize("family", IMAGE_MODEL_FAMILIES, ids=[family.name for family in IMAGE_MODEL_FAMILIES])
def test_the_family_table_picks_the_class_a_checkpoint_is_evaluated_with(family):
    for builder in FAMILY_TESTERS[family.name]:
        stock_class, evit_class = builder_classes(builder)
        config = tiny_stock_model(builder).config
        config.architectures = [stock_class.__name__]  # as save_pretrained writes it
        classifiers = family.auto_classes.get(PIPELINE_AUTO_CLASSES[IMAGE_CLASSIFICATION], ())
        if evit_class in family.auto_classes.get(PIPELINE_AUTO_CLASSES[ZERO_SHOT_IMAGE_CLASSIFICATION], ()):
            assert evaluation_model_class(config) is evit_class
        elif classifiers:
            assert evaluation_model_class(config) is classifiers[0]
        else:
            with pytest.raises(ValueError, match=f"a {family.display_name} checkpoint, a family without an image"):
                evaluation_model_class(config)


def test_zero_shot_tables_say_so():
    rows = [{"keep_rate": 1.0, "accuracy_kind": "zero-shot", "accuracy": 0.5, "images_per_s": 9.0, "macs": 2e6}]
    assert results_markdown(rows).splitlines()[0] == "| keep rate | zero-shot accuracy | images/s | MACs |"
    mixed = rows + [dict(rows[0], accuracy_kind="classifier", accuracy=0.25)]
    lines = results_markdown(mixed).splitlines()
    assert lines[0] == "| keep rate | kind | accuracy | images/s | MACs |"
    assert lines[2:] == ["| 1 | zero-shot | 50.00 | 9.0 | 2.00 M |", "| 1 | classifier | 25.00 | 9.0 | 2.00 M |"]


EXAMPLE_LABELS = sorted(ZERO_SHOT_LABELS[:5])  # the tiny classifiers' 5 classes, in image-folder (sorted) order
EXAMPLE_CASES = CLASSIFIERS + ZERO_SHOT_MODELS
EXAMPLE_IDS = [f"{family}-{'zero-shot' if (family, builder) in ZERO_SHOT_MODELS else 'classifier'}"
               for family, builder in EXAMPLE_CASES]  # fmt: skip


@pytest.mark.parametrize("family, builder", EXAMPLE_CASES, ids=EXAMPLE_IDS)
def test_the_example_evaluates_a_folder_of_every_family(family, builder, tmp_path):
    from .example_modules import evaluate_keep_rates as example

    write_family_folder(builder, tmp_path / "model", keep_rate=0.7, label_names=EXAMPLE_LABELS)
    for index, label in enumerate(EXAMPLE_LABELS):
        folder = tmp_path / "data" / label
        folder.mkdir(parents=True)
        for sample in range(2):
            Image.effect_noise((36, 40), 30 + 10 * sample + index).convert("RGB").save(folder / f"{sample}.png")
    rows = example.main(
        ["--model_name_or_path", str(tmp_path / "model"), "--validation_dir", str(tmp_path / "data"),
         "--output_dir", str(tmp_path / "out"), "--keep_rates", "1.0", "0.5", "--num_workers", "0"]
    )  # fmt: skip
    zero_shot = (family, builder) in ZERO_SHOT_MODELS
    saved = json.loads((tmp_path / "out" / "keep_rates.json").read_text())
    assert saved["accuracy_kind"] == ("zero-shot" if zero_shot else "classifier")
    assert saved.get("zero_shot_prompt") == ("a photo of a {label}." if zero_shot else None)
    header = "| keep rate | zero-shot accuracy |" if zero_shot else "| keep rate | accuracy |"
    assert (tmp_path / "out" / "keep_rates.md").read_text().startswith(header)
    # The same rows as the library's on the same images and labels (the folder names, sorted), and prompts.
    model = builder_classes(builder)[1].from_pretrained(tmp_path / "model")
    processor = tiny_image_processor()
    items = [
        {"pixel_values": processor(images=Image.open(path).convert("RGB"), return_tensors="pt").pixel_values[0],
         "label": label}
        for label, name in enumerate(EXAMPLE_LABELS)
        for path in sorted((tmp_path / "data" / name).iterdir())
    ]  # fmt: skip
    zero_shot_arguments = dict(tokenizer=tiny_tokenizer(), label_names=EXAMPLE_LABELS) if zero_shot else {}
    expected = evaluate_keep_rates(model, items, keep_rates=(1.0, 0.5, 0.7), progress=False, **zero_shot_arguments)
    # The folder's own keep rate (0.7) is a row of its own, marked as such.
    assert [row.pop("own_schedule", False) for row in rows] == [False, False, True]
    assert comparable(rows) == comparable(expected)


def test_the_prompts_are_embedded_once_for_all_batches_and_keep_rates():
    evit = evit_hf.apply_evit(tiny_stock_model(ZERO_SHOT_MODELS[0][1]))
    calls = []
    hook = evit.text_model.register_forward_hook(lambda module, args, output: calls.append(1))
    vision_calls = []
    vision_hook = evit.vision_model.register_forward_hook(lambda module, args, output: vision_calls.append(1))
    pixel_values = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(14))
    try:
        evaluate_keep_rates(
            evit,
            as_items(pixel_values, torch.arange(6) % 3),
            keep_rates=(1.0, 0.5),
            batch_size=2,
            progress=False,
            tokenizer=tiny_tokenizer(),
            label_names=ZERO_SHOT_LABELS[:3],
        )
    finally:
        hook.remove()
        vision_hook.remove()
    assert (len(calls), len(vision_calls)) == (1, 3 * 2)  # the text tower once; the vision tower per batch and rate


@pytest.mark.parametrize(
    "builder, message",
    [
        ("dinov3", "is a DINOv3 ViT checkpoint, a family without an image classifier: accuracy is measured for"),
        ("clip", "has no tokenizer that loads .*save the model's tokenizer into the folder"),
    ],
    ids=["no-head", "zero-shot-without-tokenizer"],
)
def test_the_example_refuses_folders_it_cannot_score_before_reading_data(builder, message, tmp_path, monkeypatch):
    from .example_modules import evaluate_keep_rates as example

    evit_hf.apply_evit(tiny_stock_model(builder)).save_pretrained(tmp_path / "model")  # no tokenizer saved
    monkeypatch.setattr(example, "load_data", lambda *args: pytest.fail("the data was loaded"))
    with pytest.raises(ValueError, match=message):
        example.main(["--model_name_or_path", str(tmp_path / "model"), "--output_dir", str(tmp_path / "out")])


def varied_image(seed: int) -> Image.Image:
    """A noisy image around a random colour: unlike plain noise, the tiny random models tell such images apart."""
    generator = np.random.RandomState(seed)
    colour = generator.randint(0, 256, (1, 1, 3))
    return Image.fromarray(np.clip(colour + generator.randint(-60, 60, (36, 40, 3)), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("family, builder", ZERO_SHOT_MODELS, ids=[family for family, _ in ZERO_SHOT_MODELS])
def test_the_example_scores_a_stock_checkpoint_zero_shot_as_the_stock_model_does_at_keep_1(family, builder, tmp_path):
    from .example_modules import evaluate_keep_rates as example

    stock = tiny_stock_model(builder)  # a Hub-style CLIPModel / MetaClip2Model folder, not an EViT one
    stock.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    tiny_image_processor().save_pretrained(tmp_path / "model")
    labels = sorted(ZERO_SHOT_LABELS)
    paths = []
    for index, label in enumerate(labels):
        (tmp_path / "data" / label).mkdir(parents=True)
        for sample in range(2):
            paths.append((tmp_path / "data" / label / f"{sample}.png", index))
            varied_image(2 * index + sample).save(paths[-1][0])
    rows = example.main(
        ["--model_name_or_path", str(tmp_path / "model"), "--validation_dir", str(tmp_path / "data"),
         "--output_dir", str(tmp_path / "out"), "--keep_rates", "1.0", "0.5", "--num_workers", "0"]
    )  # fmt: skip
    processor = tiny_image_processor()
    pixel_values = torch.cat([processor(images=Image.open(p), return_tensors="pt").pixel_values for p, _ in paths])
    prompts = tiny_tokenizer()([f"a photo of a {label}." for label in labels], padding=True, return_tensors="pt")
    with torch.no_grad():
        predictions = stock(pixel_values=pixel_values, **prompts).logits_per_image.argmax(dim=1)
    assert rows[0]["accuracy_kind"] == "zero-shot"
    truth = torch.tensor([label for _, label in paths])
    assert rows[0]["accuracy"] == pytest.approx((predictions == truth).float().mean().item())
    assert rows[0]["samples"] == len(paths) and rows[0]["macs"] > rows[1]["macs"]


def _tiny_labelled_folder(folder, labels=EXAMPLE_LABELS):
    for index, label in enumerate(labels):
        (folder / label).mkdir(parents=True)
        for sample in range(2):
            picture = Image.effect_noise((36, 40), 30 + 10 * sample + index).convert("RGB")
            picture.save(folder / label / f"{sample}.png")


def test_the_example_evaluates_at_a_larger_image_size_with_the_keep_rate_of_equal_macs(tmp_path):
    from .example_modules import evaluate_keep_rates as example

    model = write_family_folder("vit-classifier", tmp_path / "model", keep_rate=0.7, label_names=EXAMPLE_LABELS)
    _tiny_labelled_folder(tmp_path / "data")
    larger = TINY["image_size"] + 2 * TINY["patch_size"]
    rows = example.main(
        ["--model_name_or_path", str(tmp_path / "model"), "--validation_dir", str(tmp_path / "data"),
         "--output_dir", str(tmp_path / "out"), "--keep_rates", "1.0", "--num_workers", "0",
         "--image_size", str(larger), "--match_macs_of_image_size", str(TINY["image_size"])]
    )  # fmt: skip
    stock_macs = count_macs(model.config, keep_rate=1.0)  # at the model's own size
    matched = rows[-1]
    assert [row["keep_rate"] for row in rows][:2] == [1.0, 0.7] and len(rows) == 3  # 0.7: the folder's own
    one_step_more = count_macs(model.config, image_size=larger, keep_rate=round(matched["keep_rate"] + 0.01, 2))
    assert matched["macs"] <= stock_macs < one_step_more  # the largest keep rate within the budget
    assert rows[0]["macs"] == count_macs(model.config, image_size=larger, keep_rate=1.0) > stock_macs
    saved = json.loads((tmp_path / "out" / "keep_rates.json").read_text())
    assert (saved["image_size"], saved["match_macs_of_image_size"]) == (larger, TINY["image_size"])


def test_the_example_refuses_a_fine_tuning_keep_rate(tmp_path):
    from .example_modules import evaluate_keep_rates as example

    with pytest.raises(ValueError, match="--keep_rates"):
        example.main(
            ["--model_name_or_path", str(tmp_path / "missing"), "--validation_dir", str(tmp_path / "data"),
             "--output_dir", str(tmp_path / "out"), "--keep_rate", "0.5"]
        )  # fmt: skip
    assert not (tmp_path / "out").exists()
