"""Data in and out of the engine: file reading/writing (``io`` and the modules behind it),
preprocessing (intensity, axis, the model-space letterbox) and training/evaluation datasets.
May import numpy, SimpleITK, slicerio, torch (letterbox only) and SlicerSGP.types/errors; never
slicer/qt/vtk, and never method/, training/, evaluation/, service/ or cli/."""
