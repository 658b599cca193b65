"""Evaluators: metric objects fed by the scorer's one loop (per batch) and computed on its
scored files; a new metric is a new evaluator, never a new loop."""
