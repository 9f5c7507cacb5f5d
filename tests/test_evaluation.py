import numpy as np
import pytest
import torch

from evit_hf import count_macs, evaluate_keep_rates

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
