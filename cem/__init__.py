"""cem: context-embedded emotion analysis of faces in photos."""

__version__ = "0.1.0"
