"""M3 stage 1 and stage 2 in PyTorch with timm's transformer blocks: the reference of train_speed.py.

The computation of `mmcmae_jax.objectives` at the same shapes: stage 1 is two ViT encoders on the
whole frame, per-patch projection heads and the patch InfoNCE with batch negatives; stage 2 is two
encoders on their visible patches (80 % masked, independently), the noise-level embedding, the light
decoder over RGB context and every depth position, the depth reconstruction, denoising and smooth-L1
distillation losses, and two frozen teacher encoders on the clean frames. One train step is forward,
backward, gradient clipping and AdamW, as in our trainer. Weights are not shared with the JAX model;
only the work is the same.
"""
from __future__ import annotations

import math
from functools import partial

import numpy as np

from mmcmae_jax.models.vit import parse_variant, sincos_pos_embed_2d
from mmcmae_jax.port.timm_import import import_timm

timm, torch = import_timm()
nn, F = torch.nn, torch.nn.functional
from timm.models.vision_transformer import Block  # noqa: E402  (after import_timm's torchvision fix)

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def blocks(width: int, depth: int, heads: int) -> nn.Sequential:
    return nn.Sequential(*[Block(width, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=LayerNorm)
                           for _ in range(depth)])


def gather_tokens(x, idx):
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


class Encoder(nn.Module):
    """ViT encoder (timm's layout: patch_embed, cls_token, fixed sin-cos positions, blocks, norm)."""

    def __init__(self, channels: int, variant: str, image_size: int):
        super().__init__()
        spec = parse_variant(variant)
        grid = image_size // spec.patch_size
        self.patch_embed = nn.Conv2d(channels, spec.width, spec.patch_size, spec.patch_size)
        self.register_buffer("pos", torch.tensor(sincos_pos_embed_2d(spec.width, grid, grid))[None])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.width))
        self.blocks = blocks(spec.width, spec.depth, spec.num_heads)
        self.norm = LayerNorm(spec.width)

    def forward(self, images, keep_idx=None):
        """images (B, C, H, W) -> patch tokens (B, K, D) after the final norm (cls token dropped)."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos
        if keep_idx is not None:
            x = gather_tokens(x, keep_idx)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.norm(self.blocks(x))[:, 1:]


def random_masks(batch: int, num_patches: int, ratio: float, device):
    """MAE's masking: keep the first K of a random permutation. (keep_idx, restore_idx, mask 1=hidden)."""
    keep = int(round(num_patches * (1 - ratio)))
    shuffle = torch.rand(batch, num_patches, device=device).argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :keep] = 0
    return shuffle[:, :keep], restore, torch.gather(mask, 1, restore)


def patchify(images, patch: int):
    """(B, C, H, W) -> (B, N, P*P*C), as mmcmae_jax.models.vit.patchify."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def masked_mse(pred, target, patch_weight, valid):
    weight = patch_weight[..., None] * valid
    return (torch.square(pred - target) * weight).sum() / weight.sum().clamp_min(1.0)


class Stage2(nn.Module):
    """M3 stage 2 with the defaults of mmcmae_jax.config (decoder 4 x 256, 8 heads, mask 0.8 + 0.8)."""

    def __init__(self, variant: str, image_size: int, decoder_depth=4, decoder_width=256, decoder_heads=8,
                 mask_ratio=0.8, sigma_max=1.0):
        super().__init__()
        spec = parse_variant(variant)
        self.patch, self.mask_ratio, self.sigma_max = spec.patch_size, mask_ratio, sigma_max
        grid = image_size // spec.patch_size
        self.rgb_encoder, self.depth_encoder = Encoder(3, variant, image_size), Encoder(1, variant, image_size)
        self.teachers = nn.ModuleList([Encoder(3, variant, image_size), Encoder(1, variant, image_size)])
        self.teachers.requires_grad_(False)
        self.sigma_embed = nn.Sequential(nn.Linear(256, spec.width), nn.SiLU(), nn.Linear(spec.width, spec.width))
        self.rgb_decoder_embed = nn.Linear(spec.width, decoder_width)
        self.depth_decoder_embed = nn.Linear(spec.width, decoder_width)
        self.rgb_modality = nn.Parameter(torch.zeros(1, 1, decoder_width))
        self.depth_modality = nn.Parameter(torch.zeros(1, 1, decoder_width))
        self.depth_mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        self.register_buffer("decoder_pos", torch.tensor(sincos_pos_embed_2d(decoder_width, grid, grid))[None])
        self.decoder = blocks(decoder_width, decoder_depth, decoder_heads)
        self.decoder_norm = LayerNorm(decoder_width)
        self.depth_head = nn.Linear(decoder_width, spec.patch_size ** 2)
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(128) / 128))

    def loss(self, rgb, depth, valid):
        b, n = rgb.shape[0], (rgb.shape[2] // self.patch) * (rgb.shape[3] // self.patch)
        sigma = torch.rand(b, device=rgb.device) * self.sigma_max
        noise = sigma[:, None, None, None] * torch.randn_like(depth) * valid
        rgb_keep, _, _ = random_masks(b, n, self.mask_ratio, rgb.device)
        depth_keep, depth_restore, depth_mask = random_masks(b, n, self.mask_ratio, rgb.device)

        rgb_tokens = self.rgb_encoder(rgb, rgb_keep)
        depth_tokens = self.depth_encoder(depth + noise, depth_keep)
        pooled = (rgb_tokens.amax(dim=1), depth_tokens.amax(dim=1))
        angles = 1000.0 * sigma[:, None] * self.freqs[None]
        sigma_features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
        depth_tokens = depth_tokens + self.sigma_embed(sigma_features)[:, None].to(depth_tokens.dtype)

        pos = self.decoder_pos.expand(b, -1, -1)
        context = self.rgb_decoder_embed(rgb_tokens) + gather_tokens(pos, rgb_keep) + self.rgb_modality
        visible = self.depth_decoder_embed(depth_tokens)
        hidden = self.depth_mask_token.expand(b, n - visible.shape[1], -1).to(visible.dtype)
        target_seq = gather_tokens(torch.cat([visible, hidden], dim=1), depth_restore) + pos + self.depth_modality
        x = self.decoder_norm(self.decoder(torch.cat([target_seq, context], dim=1)))
        pred = self.depth_head(x[:, :n]).float()

        valid_patches = patchify(valid, self.patch)
        loss = masked_mse(pred, patchify(depth, self.patch), depth_mask, valid_patches)
        loss = loss + masked_mse(pred, patchify(noise, self.patch), 1 - depth_mask, valid_patches)
        with torch.no_grad():
            targets = [t(x).amax(dim=1) for t, x in zip(self.teachers, (rgb, depth))]
        return loss + sum(F.smooth_l1_loss(p.float(), t.float()) for p, t in zip(pooled, targets))


class Stage1(nn.Module):
    """M3 stage 1: two encoders on the whole frame, projection heads 2048 -> 256, batch-negative InfoNCE."""

    def __init__(self, variant: str, image_size: int, proj_hidden=2048, proj_dim=256, temperature=0.1):
        super().__init__()
        width = parse_variant(variant).width
        self.temperature = temperature
        self.rgb_encoder, self.depth_encoder = Encoder(3, variant, image_size), Encoder(1, variant, image_size)
        self.rgb_proj, self.depth_proj = [nn.Sequential(nn.Linear(width, proj_hidden), nn.GELU(),
                                                        nn.Linear(proj_hidden, proj_dim)) for _ in range(2)]

    def loss(self, rgb, depth, valid):
        del valid
        z_rgb = F.normalize(self.rgb_proj(self.rgb_encoder(rgb)).float().flatten(0, 1), dim=-1)
        z_depth = F.normalize(self.depth_proj(self.depth_encoder(depth)).float().flatten(0, 1), dim=-1)
        logits = z_rgb @ z_depth.T / self.temperature
        labels = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def make_step(stage: int, variant: str, image_size: int, device: str, compile: bool, bf16: bool):
    """(step(batch) -> loss, the model). A step is forward, backward, clip to norm 1, AdamW."""
    model = (Stage1 if stage == 1 else Stage2)(variant, image_size).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95),
                                  weight_decay=0.05)
    loss_fn = torch.compile(model.loss) if compile else model.loss

    def step(batch):
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(*batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.detach()

    return step, model


def random_batch(batch: int, image_size: int, device: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (batch, 1, image_size, image_size)
    rgb = torch.from_numpy(rng.normal(size=(batch, 3, image_size, image_size)).astype(np.float32))
    depth = torch.from_numpy(rng.normal(size=shape).astype(np.float32))
    valid = torch.from_numpy((rng.random(shape) > 0.05).astype(np.float32))
    return tuple(t.to(device) for t in (rgb, depth, valid))


def matmul_flops(stage: int, variant: str, image_size: int, batch: int) -> int:
    """Matmul and convolution FLOPs of one train step (forward + backward), counted by PyTorch's
    FlopCounterMode on the meta device (nothing is computed)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = (Stage1 if stage == 1 else Stage2)(variant, image_size)
        inputs = (torch.empty(batch, 3, image_size, image_size), torch.empty(batch, 1, image_size, image_size),
                  torch.empty(batch, 1, image_size, image_size))
    counter = FlopCounterMode(display=False)
    with counter:
        model.loss(*inputs).backward()
    return counter.get_total_flops()
