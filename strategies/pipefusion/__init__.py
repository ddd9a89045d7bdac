"""PipeFusion: the transformer's blocks in pipeline stages, the image's patches flowing through
them with displaced keys/values (strategy.py)."""

from paraflow.strategies.pipefusion.strategy import PipeFusion

__all__ = ["PipeFusion"]
