"""Explanations: Grad-CAM for any detector (the detector's own map otherwise, see
``DetectorOutput.forgery_map``) and the explanation gallery of an inference run."""
