"""The model's matmuls, and what `model.matmul_precision = "bfloat16"` makes of them on every backend.

Under `jax.default_matmul_precision("bfloat16")` every matmul of the model rounds its operands to
bfloat16 and sums the products in float32, in the forward and the backward pass, and returns the dtype
of its inputs. TPUs run float32 matmuls this way by themselves. XLA's CPU backend ignores the setting,
but it runs a bfloat16 x bfloat16 -> float32 dot on the AMX units of recent Intel Xeons (through
YNNPACK), about 4x faster than a float32 dot; a bfloat16 -> bfloat16 dot it runs without AMX, no faster
than float32 (docs/results.md, "bfloat16 matmuls on the CPU"). So the model writes that dot itself.

Only the operands are rounded (in the backward pass, the incoming gradient too): activations, norms,
softmax and losses keep the model's dtype. With `model.dtype = "float32"` each matmul returns float32.

    with jax.default_matmul_precision("bfloat16"):
        y = matmul.einsum("mk,kn->mn", x, w)       # bf16 operands, float32 sums, x's dtype out
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

PRECISIONS = ("default", "bfloat16")  # the values of config.model.matmul_precision


def rounds_operands() -> bool:
    """True while tracing under jax.default_matmul_precision("bfloat16")."""
    return jax.config.jax_default_matmul_precision == "bfloat16"


def under_precision(fn, precision: str):
    """`fn`, traced under jax.default_matmul_precision(precision); unchanged for "default"."""
    if precision not in PRECISIONS:
        raise ValueError(f"matmul precision {precision!r} is not one of {PRECISIONS}")
    if precision == "default":
        return fn

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.default_matmul_precision(precision):
            return fn(*args, **kwargs)
    return wrapped


def einsum(spec: str, x: jax.Array, y: jax.Array, preferred_element_type=None) -> jax.Array:
    """jnp.einsum of two operands; with bfloat16 operands and float32 sums under the bfloat16 setting.

    `spec` must be matmul-like ("bhqd,bhkd->bhqk", "mk,kn->mn"): every index in two or three of the
    terms, so that each gradient is an einsum of the same kind.
    """
    if not rounds_operands():
        return jnp.einsum(spec, x, y, preferred_element_type=preferred_element_type)
    inputs, out = spec.split("->")
    a, b = inputs.split(",")
    for term, others in ((a, b + out), (b, a + out), (out, a + b)):
        if len(set(term)) != len(term) or not set(term) <= set(others):
            raise ValueError(f"einsum {spec!r} is not a matmul: every index must appear in exactly two or three terms, "
                             "once in each")
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(x, y))
    return _bf16_einsum((spec, jnp.dtype(x.dtype), jnp.dtype(y.dtype), out_dtype), x, y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bf16_einsum(static, x, y):
    return _bf16_einsum_fwd(static, x, y)[0]


def _bf16_einsum_fwd(static, x, y):
    spec, _, _, out_dtype = static
    xb, yb = x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)
    # Kept in bfloat16 for the backward pass: half the memory of float32 residuals, and what it needs.
    return jnp.einsum(spec, xb, yb, preferred_element_type=jnp.float32).astype(out_dtype), (xb, yb)


def _bf16_einsum_bwd(static, residuals, grad):
    # The gradient is rounded like any other operand; without this custom rule JAX would take the
    # float32 gradient into float32 dots, and the backward pass (2/3 of a training step's matmuls)
    # would not use AMX.
    spec, x_dtype, y_dtype, _ = static
    xb, yb = residuals
    inputs, out = spec.split("->")
    a, b = inputs.split(",")
    gb = grad.astype(jnp.bfloat16)
    dx = jnp.einsum(f"{out},{b}->{a}", gb, yb, preferred_element_type=jnp.float32).astype(x_dtype)
    dy = jnp.einsum(f"{a},{out}->{b}", xb, gb, preferred_element_type=jnp.float32).astype(y_dtype)
    return dx, dy


_bf16_einsum.defvjp(_bf16_einsum_fwd, _bf16_einsum_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """nn.Dense's matmul, inputs (..., K) x kernel (K, N), through `einsum` under the bfloat16 setting."""
    if not rounds_operands():
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type, **kwargs)
    if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())) or rhs.ndim != 2:
        raise ValueError(f"dense_dot_general expects (..., K) x (K, N), got {dimension_numbers} for "
                         f"{lhs.shape} x {rhs.shape}")
    rows = lhs.reshape(-1, lhs.shape[-1])
    out = einsum("mk,kn->mn", rows, rhs, preferred_element_type)
    return out.reshape(lhs.shape[:-1] + rhs.shape[1:])


# The model's dense layer: flax's, with the matmul above. Parameter names and layout are flax's.
Dense = functools.partial(nn.Dense, dot_general=dense_dot_general)
