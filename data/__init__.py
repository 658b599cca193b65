"""Data sets, decoding, canonicalisation and augmentation for unmask."""
