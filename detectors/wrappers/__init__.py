"""Detectors around a detector, each a config group of its own, applied by
``unmask.core.build.build_detector`` in one fixed order: ``osn`` (OSN-noise robust training),
then ``attribution`` (a forgery-type head)."""
