"""dtd-ray: find the class-specific filters of deep CNNs (arXiv 2112.07719) on Ray."""

__version__ = "0.2.0"
