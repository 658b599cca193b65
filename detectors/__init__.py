"""Detectors: every one is a ``Detector`` returning a ``DetectorOutput``."""
from detectors.base import Detector, DetectorOutput

__all__ = ["Detector", "DetectorOutput"]
