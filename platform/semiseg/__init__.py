"""semiseg: label-efficient medical image segmentation, swept on Ray and tracked in MLflow."""

__version__ = "0.1.0"
