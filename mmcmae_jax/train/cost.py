"""Floating-point operations of compiled computations, from XLA's own cost analysis.

Used by `benchmarks/train_speed.py` (achieved FLOP/s of the train step) and `benchmarks/ablation.py`
(equal pre-training compute for every objective). Nothing is run: the functions are lowered and
compiled on abstract shapes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmcmae_jax.objectives import Objective


def compiled_flops(compiled) -> float:
    """FLOPs of one call of a `jax.jit(...).lower(...).compile()` result, as XLA counts them."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per device program
        analysis = analysis[0]
    if not analysis or "flops" not in analysis:
        raise RuntimeError(f"XLA gave no FLOP count for this backend ({jax.default_backend()})")
    return float(analysis["flops"])


def abstract_batch(batch_size: int, image_size: int) -> dict:
    """ShapeDtypeStructs of a pre-training batch (the data contract of objectives.py)."""
    hw = (batch_size, image_size, image_size)
    return {"rgb": jax.ShapeDtypeStruct(hw + (3,), jnp.float32),
            "depth": jax.ShapeDtypeStruct(hw + (1,), jnp.float32),
            "depth_valid": jax.ShapeDtypeStruct(hw + (1,), jnp.float32)}


def abstract_frozen(objective: Objective, batch: dict, inputs=("rgb", "depth")) -> dict:
    """Shapes of the frozen distillation teachers (stage-1 encoders), or {} without a teacher."""
    if objective.teacher is None:
        return {}
    rng = jax.random.PRNGKey(0)
    return {f"{m}_encoder": jax.eval_shape(lambda x: objective.teacher.init(rng, x)["params"], batch[m])
            for m in inputs if m in batch}


def loss_and_grad_flops(objective: Objective, batch_size: int, image_size: int, inputs=("rgb", "depth")) -> float:
    """FLOPs of one forward and backward pass of `objective.loss` on a batch (no optimizer update)."""
    batch = abstract_batch(batch_size, image_size)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    params = jax.eval_shape(objective.init, jax.random.PRNGKey(0), batch)
    frozen = abstract_frozen(objective, batch, inputs)
    grad_fn = jax.jit(jax.value_and_grad(objective.loss, has_aux=True))
    return compiled_flops(grad_fn.lower(params, frozen, batch, rng).compile())
