"""Robustness and generalization studies: pixel perturbations, adversarial attacks, the
perturbation grid (the spec's D_r) and leave-one-generator-out (D_g)."""
