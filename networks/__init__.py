"""Adapter networks (LoRA, LoCon, LoHa) and their kohya-format files.

Importing the package imports nothing else: `networks.file_header` is
torch-free and used by the GUI and the config checks; the other modules
import torch.
"""
