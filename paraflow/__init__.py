"""paraflow: text-to-image diffusion on one or many devices.

The Python API lives in `paraflow.api` (`compose`, `generate`); the CLI is `python -m paraflow`.
"""

__version__ = "0.1.0"
