from .confusion import ConfusionMatrix, segmentation_scores, incremental_scores  # noqa: F401
