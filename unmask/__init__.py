"""unmask: a research framework for detecting AI-generated and forged face images."""
__version__ = "0.1.0"
