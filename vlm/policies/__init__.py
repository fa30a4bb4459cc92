"""Image policies: how one picture becomes tower crops and LLM tokens. Importing this registers the built-ins.

`single` (one crop, today's behaviour) and `anyres` (LLaVA-NeXT: a base thumbnail plus a grid of tiles chosen
for the image's aspect ratio, a learned newline after each row of tiles). `image_token_count` is the one place
the number of placeholder tokens an image takes is computed.
"""

from . import anyres, single  # noqa: F401  (registration side effect)
from .base import ImagePolicy, ImagePolicyConfig, Layout, pool_patches, pooled_patch_count
from .pixels import fill_colour, policy_pixels, tile_size_of
from .registry import (
    available_image_policies,
    get_image_policy,
    image_policy_config_from_dict,
    image_token_count,
    register_image_policy,
)

__all__ = [
    "ImagePolicy",
    "ImagePolicyConfig",
    "Layout",
    "available_image_policies",
    "fill_colour",
    "get_image_policy",
    "image_policy_config_from_dict",
    "image_token_count",
    "policy_pixels",
    "pool_patches",
    "pooled_patch_count",
    "register_image_policy",
    "tile_size_of",
]
