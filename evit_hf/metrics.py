"""Classification metrics as `evaluate` modules that need no network.

`evaluate.load("accuracy")` downloads the metric's script from the Hub. These are `evaluate.Metric`s defined here,
with the same names and result keys ("accuracy"; "top5_accuracy" for top-k), so evaluation works offline.
"""

import datasets
import evaluate
import numpy as np


class Accuracy(evaluate.Metric):
    """Share of predictions equal to the reference label: `{"accuracy": float}`."""

    def _info(self):
        return evaluate.MetricInfo(
            description="Accuracy: the share of predictions that equal the reference label.",
            citation="",
            inputs_description="predictions: predicted labels (int); references: true labels (int).",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        return {"accuracy": float((predictions == references).mean())}


class TopKAccuracy(evaluate.Metric):
    """Share of references among the `k` highest logits: `{f"top{k}_accuracy": float}`. Ties go to the lower class.

    Args:
        k (`int`, *optional*, defaults to 5): how many of the highest logits count.
    """

    def __init__(self, k: int = 5, **kwargs):
        self.k = k
        super().__init__(**kwargs)

    def _info(self):
        return evaluate.MetricInfo(
            description="Top-k accuracy: the share of references among the k highest-scoring classes.",
            citation="",
            inputs_description="predictions: logits per class (list of float); references: true labels (int).",
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        logits, references = np.asarray(predictions), np.asarray(references)
        # A stable sort: among tied logits the lower class comes first, as np.argmax picks it (top-1 equals accuracy).
        top_k = np.argsort(-logits, axis=1, kind="stable")[:, : self.k]
        return {f"top{self.k}_accuracy": float((top_k == references[:, None]).any(axis=1).mean())}


def classification_metrics(num_labels: int):
    """A `compute_metrics` function for `Trainer`: accuracy, and top-5 accuracy where there are more than 5 classes."""
    accuracy = Accuracy()
    top5 = TopKAccuracy(k=5) if num_labels > 5 else None

    def compute_metrics(eval_prediction) -> dict[str, float]:
        logits = eval_prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        references = eval_prediction.label_ids
        results = accuracy.compute(predictions=logits.argmax(axis=-1), references=references)
        if top5 is not None:
            results.update(top5.compute(predictions=logits, references=references))
        return results

    return compute_metrics


__all__ = ["Accuracy", "TopKAccuracy", "classification_metrics"]
