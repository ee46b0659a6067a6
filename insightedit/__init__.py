"""insightedit: InsightEdit (CVPR 2025) as a PyTorch Lightning model zoo for instruction-based image editing."""

__version__ = "0.1.0"
