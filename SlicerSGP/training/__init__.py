"""Training SAM2-SGP: settings and presets (config), episodes and the support bank (episodes),
the eq. (9) loss (losses), the Trainer and ``train()`` (trainer), what a run writes (checkpoints).

May import ``SlicerSGP.method``, ``SlicerSGP.data``, ``SlicerSGP.weights`` and the top-level
types/errors; never evaluation/, service/ or cli/ (no argparse here).
"""
