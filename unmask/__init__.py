"""unmask: a research framework for detecting AI-generated and forged face images."""
import os

# albumentations asks PyPI for a newer version on import unless this is set: no traffic at
# run time (the framework promises none), whichever of the three packages is imported first.
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
__version__ = "0.1.0"
