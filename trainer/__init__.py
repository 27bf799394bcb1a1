"""Training, model loading and sampling for SD 1.x adapters.

Kept import-light: importing the package must not pull torch or diffusers,
so the GUI process can import its helpers cheaply.
"""
