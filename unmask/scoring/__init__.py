"""Scoring: the one loop that turns records into probabilities (``Scorer``), its runtimes
(eager PyTorch, ONNX Runtime), ONNX export, how views and frames combine into a file's
score, and the validation threshold."""
