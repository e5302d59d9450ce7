"""Pruning: N:M masks (magnitude, Wanda, SparseGPT) and ARMOR's wrapped 2:4 factorization."""
