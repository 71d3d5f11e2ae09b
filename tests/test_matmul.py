"""model.matmul_precision = "bfloat16": bfloat16 operands and float32 sums, forward and backward,
against NumPy on the rounded operands; and that every matmul of the objectives takes that form."""
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from mmcmae_jax.config import ConfigError, validate
from mmcmae_jax.models import matmul
from mmcmae_jax.objectives import make_objective
from mmcmae_jax.transfer import objective as transfer_objective
from conftest import drawn_params, tiny_batch, tiny_config
from test_transfer_model import tiny as tiny_finetune_config


def rounded(x) -> np.ndarray:
    """x rounded to bfloat16 (round to nearest even), as float64."""
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


@pytest.mark.parametrize("spec, x_shape, y_shape", [
    ("mk,kn->mn", (24, 40), (40, 16)),
    ("bhqd,bhkd->bhqk", (2, 3, 5, 8), (2, 3, 7, 8)),   # attention logits
    ("bhqk,bhkd->bhqd", (2, 3, 5, 7), (2, 3, 7, 8)),   # attention values
])
def test_bfloat16_einsum_against_numpy(spec, x_shape, y_shape):
    rng = np.random.default_rng(0)
    x, y = (rng.normal(size=s).astype(np.float32) for s in (x_shape, y_shape))
    out_shape = np.einsum(spec, x, y).shape
    weights = rng.normal(size=out_shape).astype(np.float32)  # d loss / d out

    def loss(x, y):
        out = matmul.einsum(spec, x, y)
        return jnp.sum(out * weights), out

    with jax.default_matmul_precision("bfloat16"):
        (_, out), (dx, dy) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, y)
    assert out.dtype == dx.dtype == dy.dtype == jnp.float32
    inputs, out_terms = spec.split("->")
    a, b = inputs.split(",")
    np.testing.assert_allclose(out, np.einsum(spec, rounded(x), rounded(y)), rtol=1e-5, atol=1e-5)
    # The backward pass rounds the incoming gradient and the saved operands the same way.
    np.testing.assert_allclose(dx, np.einsum(f"{out_terms},{b}->{a}", rounded(weights), rounded(y)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dy, np.einsum(f"{a},{out_terms}->{b}", rounded(x), rounded(weights)), rtol=1e-5, atol=1e-5)
    # The rounding is real: the exact product differs by far more than float32 sums would.
    exact = np.einsum(spec, x.astype(np.float64), y.astype(np.float64))
    assert np.max(np.abs(np.asarray(out) - exact)) > 1e-3
    # Without the setting it is jnp.einsum, in float32.
    np.testing.assert_allclose(matmul.einsum(spec, x, y), exact, rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_give_bfloat16_outputs_and_non_matmuls_are_refused():
    x = jnp.ones((4, 8), jnp.bfloat16)
    with jax.default_matmul_precision("bfloat16"):
        assert matmul.einsum("mk,kn->mn", x, x.T).dtype == jnp.bfloat16
        assert matmul.einsum("mk,kn->mn", x, x.T, preferred_element_type=jnp.float32).dtype == jnp.float32
        with pytest.raises(ValueError, match="is not a matmul"):
            matmul.einsum("mk,kn->m", x, x.T)  # n summed away on one side only


def dot_operand_types(lowered_text: str) -> list:
    """The operand types of every dot_general in StableHLO text, e.g. ['bf16', 'f32'], except those at
    HIGHEST precision: jax.image.resize's interpolation (the DPT head's upsampling) asks for that and
    is no matmul of the model."""
    return [re.findall(r"tensor<[0-9x]*x(\w+)>", line.split(":", 1)[1])[:2]
            for line in lowered_text.splitlines()
            if "stablehlo.dot_general" in line and "precision = [HIGHEST, HIGHEST]" not in line]


def lowered_loss_and_grad(objective, params, frozen, batch):
    return jax.jit(jax.value_and_grad(objective.loss, has_aux=True)).lower(params, frozen, batch,
                                                                          jax.random.key(2)).as_text()


def test_every_matmul_of_stage_2_and_of_fine_tuning_takes_bfloat16_operands():
    config = tiny_config(2)
    config.model.matmul_precision = "bfloat16"
    objective = make_objective(config)
    batch = tiny_batch()
    # Drawn parameters: compiling the initialisers would cost more than the rest of the test.
    assert {leaf.dtype for leaf in jax.tree.leaves(jax.eval_shape(objective.init, jax.random.key(1), batch))} == {
        jnp.dtype(jnp.float32)}
    params = drawn_params(objective.init, jax.random.key(1), batch, scale=0.05)
    frozen = {f"{m}_encoder": drawn_params(objective.teacher.init, jax.random.key(3), batch[m], scale=0.05,
                                           seed=i + 1)["params"] for i, m in enumerate(("rgb", "depth"))}
    dots = dot_operand_types(lowered_loss_and_grad(objective, params, frozen, batch))
    # Forward and backward of every Dense and attention matmul, in the model and the teachers.
    assert len(dots) > 50 and all(d == ["bf16", "bf16"] for d in dots), dots
    # Gradients in float32 (their types, without compiling the backward pass).
    (_, _), grads = jax.eval_shape(jax.value_and_grad(objective.loss, has_aux=True), params, frozen, batch,
                                   jax.random.key(2))
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    # Close to the float32 loss on the same parameters and randomness, and not the same number.
    loss = float(jax.jit(objective.loss)(params, frozen, batch, jax.random.key(2))[0])
    config.model.matmul_precision = "default"
    default = make_objective(config)
    assert all(d == ["f32", "f32"] for d in dot_operand_types(lowered_loss_and_grad(default, params, frozen, batch)))
    loss32 = float(jax.jit(default.loss)(params, frozen, batch, jax.random.key(2))[0])
    assert loss != loss32 and abs(loss - loss32) < 0.02 * abs(loss32)

    config = tiny_finetune_config("depth")
    config.model.matmul_precision = "bfloat16"
    objective = transfer_objective.make_transfer_objective(config)
    batch = {"rgb": jax.random.normal(jax.random.key(0), (2, 32, 32, 3)),
             "depth_m": jax.random.uniform(jax.random.key(1), (2, 32, 32, 1), minval=0.5, maxval=5.0)}
    params = jax.eval_shape(objective.init, jax.random.key(2), batch)  # lowering needs only the shapes
    dots = dot_operand_types(lowered_loss_and_grad(objective, params, {}, batch))
    assert len(dots) > 10 and all(d == ["bf16", "bf16"] for d in dots), dots


def test_bad_matmul_precision_is_named():
    config = tiny_config(1)
    config.model.matmul_precision = "tf32"
    with pytest.raises(ConfigError, match=r"config\.model\.matmul_precision"):
        validate(config)  # the commands check a config once, before building the objective
