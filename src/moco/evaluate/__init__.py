"""Evaluation of learned representations.

``knn`` is imported here; the other tools (``linear``, ``finetune``, ``report``, and ``common``,
which loads checkpoints and data) are imported from their modules, e.g.
``from moco.evaluate.linear import run_lincls``.
"""

from moco.evaluate.knn import (extract_features, knn_accuracies, knn_accuracy, knn_predict, knn_predict_many,
                               topk_accuracy)

__all__ = ["extract_features", "knn_accuracies", "knn_accuracy", "knn_predict", "knn_predict_many", "topk_accuracy"]
