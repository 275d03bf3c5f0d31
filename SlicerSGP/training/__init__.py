"""Training SAM2-SGP: settings (config), episodes and the support bank (episodes), the eq. (9)
loss (losses), the Trainer and ``train()`` (trainer), the resume state (checkpoints) and what a
trained checkpoint records of its run (checkpoint_metadata; the builder writes the checkpoint).

May import ``SlicerSGP.method``, ``SlicerSGP.build_model``, ``SlicerSGP.data``,
``SlicerSGP.weights`` and the top-level types/errors; never evaluation/, service/ or cli/ (no
argparse here).
"""
