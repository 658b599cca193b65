"""The data-set audit (spec T/ZFIDA 0003-2024, section 7.1): per-file measures of image and
face quality, consistency, diversity and video coherence, attack capability with detector
checkpoints, and the summaries and report (``audit.py``, ``unmask.tasks.audit``)."""
