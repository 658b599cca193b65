"""Detectors: every one is a ``Detector`` returning a ``DetectorOutput``."""
import os

# albumentations asks PyPI for a newer version on import unless this is set: no traffic at
# run time (the framework promises none), whichever of the three packages is imported first.
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
from detectors.base import Detector, DetectorOutput

__all__ = ["Detector", "DetectorOutput"]
