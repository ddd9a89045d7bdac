"""Model families as plugins: one file per family (unet.py, pixart.py, sd3.py, flux.py), each
a `Family` (base.py) found through the entry-point group `paraflow.families` by its denoiser's
class (registry.py). The denoise loop and the strategies call a denoiser through `DenoiserCall`
(call.py): latent images in, the prediction out, whatever the family packs inside."""

from paraflow.families.base import Conditioning, Family
from paraflow.families.call import DenoiserCall, denoiser, denoiser_call, latent_shape
from paraflow.families.registry import family_of, family_of_class_name

__all__ = ["Conditioning", "DenoiserCall", "Family", "denoiser", "denoiser_call", "family_of",
           "family_of_class_name", "latent_shape"]
