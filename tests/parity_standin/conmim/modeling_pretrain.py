"""Test stand-in for ConMIM's modeling_pretrain.py: a BEiT-layout ViT (q/v biases, gamma_1/2 layer scale, one shared
relative-position table) with the projector MLP, in the official state-dict layout. Written for the test."""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

BREAK = os.environ.get("PARITY_STANDIN_BREAK", "")


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.patch_shape = (img_size // patch_size, img_size // patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)

    def forward(self, x, bool_masked_pos=None):                      # (B, 3, H, W) -> (B, N, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class RelativePositionBias(nn.Module):
    """Table rows: every (dy, dx) offset, then cls->patch, patch->cls, cls->cls."""
    def __init__(self, window_size, num_heads):
        super().__init__()
        h, w = window_size
        n_off = (2 * h - 1) * (2 * w - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(n_off + 3, num_heads))
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        dy = ys.flatten()[:, None] - ys.flatten()[None]
        dx = xs.flatten()[:, None] - xs.flatten()[None]
        index = torch.full((h * w + 1, h * w + 1), n_off + 2)
        index[1:, 1:] = (dy + h - 1) * (2 * w - 1) + dx + w - 1
        index[0, 1:], index[1:, 0] = n_off, n_off + 1
        self.register_buffer("relative_position_index", index)

    def forward(self):                                                # -> (heads, 1+N, 1+N)
        return self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rel_pos_bias):
        B, T, D = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).view(B, T, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + rel_pos_bias
        return self.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, norm_layer, init_values):
        super().__init__()
        self.norm1, self.attn = norm_layer(dim), Attention(dim, num_heads)
        self.norm2, self.mlp = norm_layer(dim), Mlp(dim, int(dim * mlp_ratio))
        self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
        self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x, rel_pos_bias):
        x = x + self.gamma_1 * self.attn(self.norm1(x), rel_pos_bias)
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class VisionTransformerForMaskedImageModeling(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, vocab_size=8192, embed_dim=768, depth=12, dim=256,
                 mlp_dim=4096, num_heads=12, mlp_ratio=4.0, norm_layer=nn.LayerNorm, init_values=0.1, **unused):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.rel_pos_bias = RelativePositionBias(self.patch_embed.patch_shape, num_heads)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, norm_layer, init_values)
                                     for _ in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.lm_head = nn.Linear(embed_dim, vocab_size)
        self.projectors = nn.Sequential(
            nn.Linear(embed_dim, mlp_dim, bias=False), nn.BatchNorm1d(mlp_dim), nn.ReLU(),
            nn.Linear(mlp_dim, mlp_dim, bias=False), nn.BatchNorm1d(mlp_dim), nn.ReLU(),
            nn.Linear(mlp_dim, dim, bias=False), nn.BatchNorm1d(dim, affine=False))

    def load_state_dict(self, state_dict, strict=True):
        result = super().load_state_dict(state_dict, strict=strict)
        if BREAK == "weight":   # the test's broken stand-in: one weight off by 1e-2
            with torch.no_grad():
                self.blocks[0].attn.proj.weight[0, 0] += 1e-2
        return result

    def forward(self, x, bool_masked_pos, return_all_tokens=False, only_return_before_head=False,
                use_mlp_projectors=False, **unused):
        """Only the call the ConMIM loss makes: projected features of all patches (B, N, dim), cls dropped."""
        assert return_all_tokens and only_return_before_head and use_mlp_projectors
        t = self.patch_embed(x)
        m = bool_masked_pos.flatten(1).unsqueeze(-1).to(t.dtype)
        t = t * (1 - m) + self.mask_token * m
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        bias = self.rel_pos_bias()
        for blk in self.blocks:
            t = blk(t, bias)
        B, T, _ = t.shape
        return self.projectors(self.norm(t).flatten(0, 1)).view(B, T, -1)[:, 1:]
