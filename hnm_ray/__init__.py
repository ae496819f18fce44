"""hnm-ray: Ray-distributed hard-negative-mining MIL training for whole-slide images."""

__version__ = "0.1.0"
