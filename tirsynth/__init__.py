"""tirsynth: synthetic thermal-infrared datasets from labelled RGB corpora."""

__version__ = "0.1.0"
