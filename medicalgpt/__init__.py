"""MedicalGPT's training pipeline as a package; the stage scripts stand on it (docs/DESIGN.md).

Importing any part of it first holds back the libraries' import-time notices (medicalgpt/console.py).
"""

from medicalgpt import console  # noqa: F401
