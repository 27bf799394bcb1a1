"""Adapter networks (the algorithms in `networks.algorithms`) and their
kohya-format files.

Importing the package imports nothing else: `networks.algorithms` (the
algorithm registry) and `networks.file_header` are torch-free and used by the
GUI and the config schema; the other modules import torch.
"""
