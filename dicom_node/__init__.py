"""NoduleAI's DICOM node: the part of the service that speaks to the hospital network."""

__version__ = "0.1.0"
