"""Packed storage: packing.py (bit packing), packed.py (PackedLinear, the format registry and the
affine integer formats), one module per further format family. Importing the package imports
every family, so that any checkpoint naming a format can be read."""
from quantkit.formats import llm_int8, lut, packed, sparse  # noqa: F401
