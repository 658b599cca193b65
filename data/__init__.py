"""Data sets, decoding, canonicalisation and augmentation for unmask."""
import os

# albumentations asks PyPI for a newer version on import unless this is set: no traffic at
# run time (the framework promises none), whichever of the three packages is imported first.
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
