"""Calibration data: text windows (text.py), and for image models synthetic images distilled
from BatchNorm statistics (zeroq.py, genie.py; `distill` picks one by name)."""


def distill(model, method: str = "genie", n: int = 1024, **kw):
    """n synthetic calibration inputs for an image model (see quantkit.calib.synthetic.distill)."""
    from quantkit.calib.synthetic import distill as _distill
    return _distill(model, method, n, **kw)
