"""Evaluation of frozen representations."""

from moco.evaluate.knn import extract_features, knn_accuracy, knn_predict, topk_accuracy

__all__ = ["extract_features", "knn_accuracy", "knn_predict", "topk_accuracy"]
