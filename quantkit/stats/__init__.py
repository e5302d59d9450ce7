"""Statistics of the calibration data: the one Hessian accumulator and its collection, traces,
token importance, sensitivities."""
from quantkit.stats.hessian import collect_hessians  # noqa: F401  (the one place Hessians are collected)
