"""The shared ViT: identical copies in every file (drift guard), timm key layout, timm interop to 1e-4."""
import re

import pytest
import torch

from conftest import ROOT
from finetune import VisionTransformer, from_timm_layout, to_timm_layout, rel_pos_index, sincos_pos_embed

FILES = ["finetune.py", "conmim.py", "cim_correlate.py", "cim_corrupt.py"]
BLOCK = re.compile(r"^# >>> shared:vit.*?^# <<< shared:vit$", re.S | re.M)


def test_shared_vit_block_is_identical_everywhere():
    blocks = {f: BLOCK.findall((ROOT / f).read_text()) for f in FILES if (ROOT / f).exists()}
    assert "finetune.py" in blocks
    for f, found in blocks.items():
        assert len(found) == 1, f"{f}: expected one '# >>> shared:vit' ... '# <<< shared:vit' block"
        assert found[0] == blocks["finetune.py"][0], f"{f}: shared ViT block differs from finetune.py's copy"


def timm_vit(**kw):
    timm = pytest.importorskip("timm")   # test extra (requirements-test.txt)
    return timm.models.vision_transformer.VisionTransformer(num_classes=0, global_pool="token", **kw).eval()


def timm_beit(**kw):
    timm = pytest.importorskip("timm")
    return timm.models.beit.Beit(num_classes=0, global_pool="token", use_abs_pos_emb=False, use_rel_pos_bias=True, **kw).eval()


ARGS = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3)


@pytest.mark.parametrize("pos_embed", ["learned", "sincos"])
@pytest.mark.parametrize("init_values", [None, 0.1])
def test_timm_vit_interop(pos_embed, init_values):
    ours = VisionTransformer(**ARGS, pos_embed=pos_embed, init_values=init_values).eval()
    theirs = timm_vit(**ARGS, init_values=init_values)
    theirs.load_state_dict(to_timm_layout(ours.state_dict()), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(theirs.forward_features(x), ours(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("rel_pos", ["shared", "block"])
def test_timm_beit_interop_and_back(rel_pos):
    ours = VisionTransformer(**ARGS, pos_embed="none", rel_pos=rel_pos, init_values=0.1).eval()
    with torch.no_grad():   # non-trivial tables and biases, so the test can fail
        for n, p in ours.named_parameters():
            if "relative_position" in n or n.endswith("qkv.bias"):
                p.normal_()
    sd = to_timm_layout(ours.state_dict())
    theirs = timm_beit(**ARGS, init_values=0.1)
    theirs.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(theirs.forward_features(x), ours(x), atol=1e-4, rtol=0)
    back = VisionTransformer(**ARGS, pos_embed="none", rel_pos="block", init_values=0.1).eval()
    back.load_state_dict(from_timm_layout(sd), strict=True)   # what finetune.py does
    torch.testing.assert_close(back(x), ours(x), atol=1e-4, rtol=0)


def test_state_dict_keys_follow_timm():
    keys = set(VisionTransformer(**ARGS, init_values=0.1).state_dict())
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "blocks.1.norm1.weight",
            "blocks.1.attn.qkv.weight", "blocks.1.attn.qkv.bias", "blocks.1.attn.proj.weight", "blocks.1.ls1.gamma",
            "blocks.1.norm2.bias", "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.bias", "blocks.1.ls2.gamma",
            "norm.weight", "norm.bias"} <= keys
    assert len(keys) == 6 + 2 * 14   # nothing else


def test_sincos_and_rel_index():
    pe = sincos_pos_embed(16, 3, 5)
    assert pe.shape == (15, 16)
    assert torch.equal(pe[0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))   # sin 0, cos 0 (x, y)
    assert not torch.equal(pe[1, :8], pe[0, :8]) and torch.equal(pe[1, 8:], pe[0, 8:])   # next column: x part moves
    idx = rel_pos_index(3, 5)
    num = 5 * 9
    assert idx.shape == (16, 16) and idx[0, 0] == num + 2 and idx[0, 1] == num and idx[1, 0] == num + 1
    assert idx[1:, 1:].diagonal().unique().numel() == 1 and idx[1:, 1:].max() == num - 1 and idx[1:, 1:].min() == 0


def test_other_grid_sizes_and_drop_path():
    m = VisionTransformer(**ARGS, pos_embed="learned", drop_path=0.5)
    assert m(torch.randn(1, 3, 16, 24)).shape == (1, 1 + 4 * 6, 48)   # positions interpolated on the fly
    m.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(m(x), m(x))   # no stochastic depth in eval
