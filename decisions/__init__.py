"""What is decided about images and runs, as numbers: uncertainty metrics, referral and conformal sets, refusal
and its scores, whole-set shift checks, the calibration that binds them to one model's weights, and the statistics
of studies. Pure functions of tensors; nothing here writes a file (reports/ does) or knows Lightning."""
