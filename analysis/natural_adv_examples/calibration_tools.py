"""Official name of the ImageNet-A calibration tools; they live in :mod:`ibot.eval.robustness`.

``calib_err(confidence, correct, p='2', beta=100)`` (RMS calibration error, adaptive bins, the last
bin skipped as officially) and ``aurra(confidence, correct)``; ``show_calibration_results`` prints
both as the official script does. The official module's unused helpers (temperature tuning,
soft-F1, FPR at 95 % recall, AUROC/AUPR) are not provided: scikit-learn has the latter.
"""
from ibot.eval.robustness import aurra, calib_err

__all__ = ["calib_err", "aurra", "show_calibration_results"]


def show_calibration_results(confidence, correct, method_name="Baseline", beta=100):
    """Print and return ``{"rms_calib_error": .., "aurra": ..}`` (fractions) of (N,) confidences / 0-1 hits."""
    rms, area = calib_err(confidence, correct, p="2", beta=beta), aurra(confidence, correct)
    print("\t\t\t\t" + method_name)
    print("RMS Calib Error (%): \t\t{:.2f}".format(100 * rms))
    print("AURRA (%): \t\t\t{:.2f}".format(100 * area))
    return {"rms_calib_error": rms, "aurra": area}
