"""Faces: detection + landmarks (``types``, ``blazeface``, ``facemesh``, ``mtcnn``), a
per-data-set detection cache (``cache``), crops with a margin and optional alignment
(``crop``), and the configured pipeline the data sets and inference use (``pipeline``)."""
