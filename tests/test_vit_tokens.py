"""The one token path through timm ViTs equals forward_features when nothing is masked, for
each kind of ViT timm builds; it also takes other image sizes (resampled positions)."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from energyssl.vit_tokens import encode, features, patch_positions, patch_tokens, pooled

VARIANTS = {
    "class token": {},
    "no class token, average pool": {"class_token": False, "global_pool": "avg"},
    "registers": {"reg_tokens": 2},
    "no position for the prefix": {"no_embed_class": True},
    "pre-norm and fc-norm": {"pre_norm": True, "global_pool": "avg", "fc_norm": True},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_equals_forward_features_when_nothing_is_masked(variant):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=2,
                            **VARIANTS[variant]).eval()  # fmt: skip
    images = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(features(vit, images), vit.forward_features(images))
    torch.testing.assert_close(pooled(vit, images), vit.forward_head(vit.forward_features(images), pre_logits=True))
    kept = encode(vit, patch_tokens(vit, images)[:, :5])  # a subset of the patches
    assert kept.shape == (3, vit.num_prefix_tokens + 5, 64)


def test_other_image_sizes_get_resampled_positions():
    vit = VisionTransformer(img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=1, num_heads=2).eval()
    small = torch.randn(2, 1, 16, 16)
    assert features(vit, small).shape == (2, 1 + 4, 32)
    assert patch_positions(vit, (2, 2)).shape == (1, 4, 32)
    torch.testing.assert_close(patch_positions(vit, (4, 4)), vit.pos_embed[:, 1:])
