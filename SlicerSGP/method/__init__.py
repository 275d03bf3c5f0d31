"""The SAM2-SGP network and one volume's inference: model, encoding, support, 3D memory,
one slice's PMG/PMA step, propagation, assembly, and the ``Segmenter`` facade.

May import torch, sam2, numpy, ``SlicerSGP.data`` (preprocessing), ``SlicerSGP.weights``,
``SlicerSGP.build_model`` (only the Segmenter, to build or load its network: the builder imports
model.py and pma.py) and the top-level types/errors; never training/, evaluation/, service/ or
cli/.
"""
