"""Noisy Student self-training (Xie et al., CVPR 2020) in JAX."""
