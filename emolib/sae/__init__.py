"""Sparse autoencoders: activation caches, training corpora, training, quality, the per-model suite, interventions."""
