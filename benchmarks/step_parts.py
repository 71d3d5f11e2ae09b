"""Three parts of the train step, each against the formulation it replaced, measured in the same run.

    python benchmarks/step_parts.py               # ViT-B/16 shapes, about 3 min on 2 CPU cores
    python benchmarks/step_parts.py --variant 64x2x2/16 --batch 2   # a quick check of the script

1. Attention (mmcmae_jax.models.vit.dot_product_attention: heads before tokens, the softmax normalised
   after the values are summed) against jax.nn.dot_product_attention (tokens before heads) and against
   the heads-first softmax it replaced, forward and forward + backward, over a ViT's
   full frame (the teachers) and over the 40 tokens a stage-2 encoder sees; PyTorch's fused
   scaled_dot_product_attention forward beside them when PyTorch is installed.
2. The optimizer update (mmcmae_jax.train.optim.make_optimizer: one global norm for the clip and the
   non-finite check) against optax's clip_by_global_norm + adamw behind optax.apply_if_finite, on the
   parameter tree of the stage-2 model.
3. The teachers' work: our ViT encoder's forward over a batch of full 224 px frames, and timm's
   VisionTransformer.forward_features on the same shapes when PyTorch and timm are installed.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from einops import rearrange

from train_speed import timed


def seconds_per_call(fn, *args, repeats: int) -> float:
    return timed(lambda: jax.block_until_ready(fn(*args)), repeats, 1)


def attention_layouts(batch: int, tokens: int, heads: int, head_dim: int, repeats: int) -> dict:
    from mmcmae_jax.models.vit import dot_product_attention
    qkv = jnp.asarray(np.random.default_rng(0).normal(size=(batch, tokens, 3 * heads * head_dim)), jnp.float32)

    def tokens_first(qkv):  # the previous formulation: jax.nn.dot_product_attention on (B, N, H, D)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b n h d", three=3, h=heads)
        return rearrange(jax.nn.dot_product_attention(q, k, v), "b n h d -> b n (h d)")

    def heads_first_softmax(qkv):  # the step between: heads first, probabilities normalised before the values
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=heads)
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k) * head_dim ** -0.5
        return rearrange(jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(logits, axis=-1), v), "b h n d -> b n (h d)")

    def heads_first(qkv):
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=heads)
        return rearrange(dot_product_attention(q, k, v), "b h n d -> b n (h d)")

    out = {}
    for name, fn in (("jax.nn.dot_product_attention", tokens_first),
                     ("heads first, softmax, then values", heads_first_softmax),
                     ("ours (heads first, normalised last)", heads_first)):
        forward = jax.jit(fn)
        backward = jax.jit(jax.grad(lambda x, fn=fn: jnp.sum(fn(x) ** 2)))
        out[name] = (seconds_per_call(forward, qkv, repeats=repeats), seconds_per_call(backward, qkv, repeats=repeats))
    np.testing.assert_allclose(jax.jit(heads_first)(qkv), jax.jit(tokens_first)(qkv), rtol=1e-4, atol=1e-5)
    try:
        from mmcmae_jax.port.timm_import import import_timm
        _, torch = import_timm()
        t_qkv = torch.from_numpy(np.array(qkv))

        def torch_sdpa():
            q, k, v = t_qkv.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, -1)
        with torch.no_grad():
            out["PyTorch scaled_dot_product_attention"] = (seconds_per_call(torch_sdpa, repeats=repeats), None)
    except ImportError:
        pass
    return out


def optimizer_updates(variant: str, repeats: int) -> dict:
    from mmcmae_jax.config import training_config
    from mmcmae_jax.objectives import make_objective
    from mmcmae_jax.train.optim import decay_mask
    from mmcmae_jax.train.trainer import make_trainer_optimizer

    config = training_config(2)
    config.model.variant = variant
    objective = make_objective(config)
    size = config.model.image_size
    sample = {"rgb": jnp.zeros((1, size, size, 3)), "depth": jnp.zeros((1, size, size, 1)),
              "depth_valid": jnp.ones((1, size, size, 1))}
    params = jax.jit(objective.init)(jax.random.key(0), sample)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    ours, schedule = make_trainer_optimizer(config)
    optim = config.optim
    previous = optax.apply_if_finite(optax.chain(
        optax.clip_by_global_norm(optim.grad_clip),
        optax.adamw(schedule, optim.b1, optim.b2, weight_decay=optim.weight_decay, mask=decay_mask)), 2**30)

    out = {"parameters": sum(x.size for x in jax.tree.leaves(params))}
    for name, optimizer in (("optax clip + adamw + apply_if_finite", previous), ("ours (make_optimizer)", ours)):
        def step(params, state, grads, optimizer=optimizer):
            updates, state = optimizer.update(grads, state, params)
            return optax.apply_updates(params, updates), state
        step = jax.jit(step, donate_argnums=(0, 1))
        holder = {"params": jax.tree.map(jnp.copy, params)}
        holder["state"] = optimizer.init(holder["params"])

        def run():
            holder["params"], holder["state"] = step(holder["params"], holder["state"], grads)
            return holder["params"]
        out[name] = seconds_per_call(run, repeats=repeats)
    return out


def encoder_forward(variant: str, batch: int, repeats: int) -> dict:
    from mmcmae_jax.models.vit import ViTEncoder, parse_variant
    encoder = ViTEncoder(variant)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(batch, 224, 224, 3)), jnp.float32)
    params = encoder.init(jax.random.key(0), images)
    forward = jax.jit(lambda p, x: encoder.apply(p, x)[0])
    out = {"ours (JAX)": seconds_per_call(forward, params, images, repeats=repeats)}
    try:
        from mmcmae_jax.port.timm_import import import_timm
        timm, torch = import_timm()
        spec = parse_variant(variant)
        model = timm.models.vision_transformer.VisionTransformer(
            img_size=224, patch_size=spec.patch_size, embed_dim=spec.width, depth=spec.depth,
            num_heads=spec.num_heads, num_classes=0).eval()
        torch_images = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            out["timm (PyTorch eager)"] = seconds_per_call(model.forward_features, torch_images, repeats=repeats)
    except ImportError:
        pass
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="B/16")
    parser.add_argument("--batch", type=int, default=16, help="frames in the attention measurement")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from mmcmae_jax.models.vit import parse_variant
    spec = parse_variant(args.variant)
    print(f"backend {jax.default_backend()}: {jax.devices()[0].device_kind}; ViT {args.variant}, float32", flush=True)

    full_frame = (224 // spec.patch_size) ** 2 + 1
    for tokens, what in ((full_frame, "a full 224 px frame (the teachers)"), (40, "40 tokens (a stage-2 encoder)")):
        print(f"attention, batch {args.batch}, {spec.num_heads} heads, {tokens} tokens = {what}:", flush=True)
        rows = attention_layouts(args.batch, tokens, spec.num_heads, spec.width // spec.num_heads, args.repeats)
        reference = rows["jax.nn.dot_product_attention"]
        for name, (forward, both) in rows.items():
            line = f"  {name:38s} forward {forward * 1e3:7.1f} ms ({reference[0] / forward:.2f}x)"
            if both is not None:
                line += f"  forward+backward {both * 1e3:7.1f} ms ({reference[1] / both:.2f}x)"
            print(line, flush=True)

    rows = encoder_forward(args.variant, args.batch, max(2, args.repeats // 2))
    print(f"encoder forward, batch {args.batch} of 224 px frames (the teachers' work; speed-up against ours):",
          flush=True)
    for name, seconds in rows.items():
        print(f"  {name:38s} {seconds * 1e3:7.1f} ms ({rows['ours (JAX)'] / seconds:.2f}x)", flush=True)

    rows = optimizer_updates(args.variant, max(2, args.repeats // 2))
    print(f"optimizer update of the stage-2 model ({rows.pop('parameters') / 1e6:.1f} M parameters):", flush=True)
    reference = rows["optax clip + adamw + apply_if_finite"]
    for name, seconds in rows.items():
        print(f"  {name:38s} {seconds * 1e3:7.1f} ms ({reference / seconds:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
