import numpy as np
import pytest
from transformers import EvalPrediction

from evit_hf import Accuracy, TopKAccuracy, classification_metrics


def test_accuracy_by_hand():
    assert Accuracy().compute(predictions=[0, 1, 2, 2, 4], references=[0, 2, 2, 1, 4]) == {"accuracy": 3 / 5}
    assert Accuracy().compute(predictions=np.array([3, 3]), references=np.array([1, 2])) == {"accuracy": 0.0}


LOGITS = np.array(
    [
        [0.1, 0.9, 0.3, 0.2, 0.0, -1.0],  # ranks the classes 1, 2, 3, 0, 4, 5
        [2.0, -1.0, 0.5, 1.5, 1.0, 0.0],  # 0, 3, 4, 2, 5, 1
        [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],  # 5, then the tied classes lowest first: 0, 1, 2, 3, 4
    ],
    dtype=np.float32,
)


@pytest.mark.parametrize(
    "k, references, expected",
    [
        (1, [1, 0, 5], 1.0),
        (1, [2, 3, 0], 0.0),
        (2, [2, 4, 0], 2 / 3),  # places 2, 3, 2
        (3, [0, 2, 1], 1 / 3),  # places 4, 4, 3
        (4, [0, 2, 3], 2 / 3),  # places 4, 4, 5
        (5, [4, 1, 3], 2 / 3),  # places 5, 6, 5
        (5, [5, 5, 4], 1 / 3),  # places 6, 5, 6
    ],
    ids=["top1-all", "top1-none", "top2", "top3", "top4", "top5", "top5-last-tied-class-out"],
)
def test_top_k_accuracy_by_hand(k, references, expected):
    assert TopKAccuracy(k=k).compute(predictions=LOGITS, references=references) == {
        f"top{k}_accuracy": pytest.approx(expected)
    }


# Ties among 20 classes: the highest value, 2, is shared by classes 2, 3, 7, 12, 15 and 17.
TIED_ROW = [1, 1, 2, 2, 1, 1, 1, 2, 0, 1, 0, 1, 2, 1, 1, 2, 1, 2, 0, 1]


@pytest.mark.parametrize(
    "k, reference, counted",
    [(1, 2, True), (1, 3, False), (1, 17, False), (5, 15, True), (5, 17, False), (6, 17, True), (7, 0, True)],
    ids=["top1-first-tied", "top1-second-tied", "top1-last-tied", "top5-fifth", "top5-sixth", "top6-sixth", "top7"],
)
def test_top_k_breaks_ties_towards_the_lower_class_like_argmax(k, reference, counted):
    logits = np.array([TIED_ROW], dtype=np.float32)
    assert int(np.argmax(logits[0])) == 2
    result = TopKAccuracy(k=k).compute(predictions=logits, references=[reference])
    assert result == {f"top{k}_accuracy": float(counted)}


def test_top_1_accuracy_agrees_with_accuracy_on_ties():
    rows = np.array([TIED_ROW, TIED_ROW[::-1], [0.0] * 20, [5.0] * 10 + [3.0] * 10], dtype=np.float32)
    for reference in range(20):
        references = [reference] * len(rows)
        accuracy = Accuracy().compute(predictions=rows.argmax(axis=1), references=references)["accuracy"]
        assert TopKAccuracy(k=1).compute(predictions=rows, references=references)["top1_accuracy"] == accuracy


def eval_prediction(logits, labels, as_tuple):
    predictions = (logits, np.zeros((len(labels), 3, 4), dtype=np.float32)) if as_tuple else logits
    return EvalPrediction(predictions=predictions, label_ids=np.array(labels))


@pytest.mark.parametrize("as_tuple", [False, True], ids=["logits", "tuple-of-logits-first"])
def test_classification_metrics_few_classes(as_tuple):
    logits = np.array([[0.2, 0.7, 0.1], [0.5, 0.5, 0.0], [0.0, 0.1, 0.9], [1.0, 2.0, 3.0]], dtype=np.float32)
    # predictions 1, 0 (the first of a tie), 2, 2
    metrics = classification_metrics(num_labels=3)(eval_prediction(logits, [1, 1, 2, 0], as_tuple))
    assert metrics == {"accuracy": 0.5}  # no top-5 with 5 classes or fewer


@pytest.mark.parametrize("as_tuple", [False, True], ids=["logits", "tuple-of-logits-first"])
def test_classification_metrics_with_top5(as_tuple):
    logits = np.tile(np.arange(8, dtype=np.float32), (4, 1))  # every row ranks 7, 6, 5, 4, 3, then 2, 1, 0
    logits[1] = logits[1, ::-1]  # row 1 ranks 0, 1, 2, 3, 4, ...
    metrics = classification_metrics(num_labels=8)(eval_prediction(logits, [7, 0, 3, 2], as_tuple))
    assert metrics == {"accuracy": pytest.approx(0.5), "top5_accuracy": pytest.approx(0.75)}
