"""Bundled evaluation: offline corpora and the perplexity protocol."""
