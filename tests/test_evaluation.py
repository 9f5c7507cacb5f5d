from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch

from evit_hf import count_macs, evaluate_keep_rates
from evit_hf import evaluation as evaluation_module
from evit_hf.data import collate_images
from evit_hf.evaluation import _shard_for_this_process

from .fake_clock import FakeClock
from .model_builders import TINY, stock_and_evit


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
