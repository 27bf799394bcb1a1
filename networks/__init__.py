"""Adapter networks (LoRA, LoCon, LoHa) and their kohya-format files."""
