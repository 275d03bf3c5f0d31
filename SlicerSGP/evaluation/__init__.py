"""Evaluation: Dice/IoU/HD95 (metrics), running or finding predictions (evaluate), CSV/JSON and
contour montages (reports), what clinicians use today on the same slices (baselines: Fill
between slices, nearest copy), and the comparison with SAM2's video predictor (bench).

May import ``SlicerSGP.method``, ``SlicerSGP.data``, ``SlicerSGP.training`` (its support-bank
rule), ``SlicerSGP.weights`` and the top-level types/errors; never service/ or cli/.
"""
