"""One trainer for every stage: a stage is an `Objective` (model + loss) and a config.

The train state is a plain dict {"step", "params", "opt_state"}. The step is one `jax.jit` over a
(data, fsdp) mesh with explicit NamedShardings for state, teachers and batch, and donates the old state.
Each step draws its randomness from `fold_in(seed, step)`, and the input iterator is checkpointed with
the state, so a resumed run repeats an uninterrupted one exactly.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mmcmae_jax.device_batch import host_fields, prepare_batch
from mmcmae_jax.errors import NonFiniteError
from mmcmae_jax.objectives import Objective
from mmcmae_jax.progress import say
from mmcmae_jax.train import sharding
from mmcmae_jax.train.checkpoint import Checkpointer, PreemptionFlag
from mmcmae_jax.train.metrics import MetricWriter
from mmcmae_jax.train.optim import make_optimizer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    step: int
    metrics: dict          # the last logged scalars
    history: list          # every logged scalars dict, in order
    preempted: bool = False
    first_step: int = 0    # the step this call started from (> 0 when it resumed)
    seconds: float = 0.0   # wall time of this call, start-up and compilation included
    seconds_per_step: float | None = None  # mean step time after the first (compiling) step; None: too few


def make_train_step(objective: Objective, optimizer, schedule, state_sharding, frozen_sharding, mesh,
                    depth_trim: float):
    """(the jitted step (state, frozen, batch, seed, watch) -> (state, metrics, watch), initial_watch).

    `batch` is the compact host batch (device_batch.py); the step makes the model's fields from it
    (`depth_trim`: the data config's).

    `watch` stays on the device: the first step whose metrics (loss, grad_norm, ...) are not all finite,
    and those metrics. The host reads it only where it reads the metrics anyway (`check_finite`), so a bad
    step is reported with its own number whatever log_every is, at no per-step synchronisation. The old
    state and watch are donated."""

    # Jitted on its own so that its trace is made once: `initial_watch` reads its output shapes and
    # `train_step` calls it (XLA inlines the inner call: the compiled step is the same).
    @jax.jit
    def step_and_metrics(state, frozen, batch, seed):
        rng = jax.random.fold_in(seed, state["step"])
        batch = prepare_batch(batch, objective.batch_keys, depth_trim)
        grad_fn = jax.value_and_grad(objective.loss, has_aux=True)
        (loss, metrics), grads = grad_fn(state["params"], frozen, batch, rng)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                     "opt_state": opt_state}
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                       learning_rate=schedule(state["step"]))
        return new_state, metrics

    def train_step(state, frozen, batch, seed, watch):
        new_state, metrics = step_and_metrics(state, frozen, batch, seed)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(metrics)]))
        first = (watch["step"] < 0) & ~finite
        watch = {"step": jnp.where(first, new_state["step"], watch["step"]),
                 "metrics": jax.tree.map(lambda kept, new: jnp.where(first, new, kept), watch["metrics"], metrics)}
        return new_state, metrics, watch

    replicated = sharding.replicated(mesh)

    def initial_watch(state, frozen, batch, seed):
        shapes = jax.eval_shape(step_and_metrics, state, frozen, batch, seed)[1]
        return jax.jit(lambda: {"step": jnp.full((), -1, jnp.int32),
                                "metrics": jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)},
                       out_shardings=replicated)()

    step = jax.jit(train_step, donate_argnums=(0, 4),
                   in_shardings=(state_sharding, frozen_sharding, sharding.batch_sharding(mesh), replicated,
                                 replicated),
                   out_shardings=(state_sharding, replicated, replicated))
    return step, initial_watch


def check_finite(step: int, watch: dict):
    """Stop on the first non-finite loss or gradient the device recorded in `watch`, naming its step and
    the terms that went bad; `step` is the current one."""
    bad_step = int(jax.device_get(watch["step"]))
    if bad_step < 0:
        return
    metrics = jax.device_get(watch["metrics"])
    bad = sorted(k for k, v in metrics.items() if not np.all(np.isfinite(np.asarray(v))))
    values = ", ".join(f"{k}={float(np.asarray(metrics[k])):g}" for k in bad)
    later = f"; the run went on to step {step} without writing a checkpoint" if step > bad_step else ""
    raise NonFiniteError(f"non-finite values at step {bad_step}: {values}. The update of that step was skipped"
                         f"{later}, and no checkpoint was written after it; lower the learning rate, check the "
                         "input data, or resume from the last checkpoint.")


def make_train_iterator(config: ml_collections.ConfigDict, data_field: str = "config.data", labels: bool = False):
    """The grain iterator of this process's share of every global batch, at the model's image size;
    `data_field` names config.data in errors; `labels`: decode and send the class labels."""
    from mmcmae_jax.data import pipeline_from_config
    from mmcmae_jax.errors import ConfigError
    if config.batch_size % jax.process_count():
        raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the "
                         f"{jax.process_count()} processes")
    try:
        return pipeline_from_config(config.data, batch_size=config.batch_size // jax.process_count(),
                                    image_size=config.model.image_size, seed=config.seed, train=True,
                                    name=data_field, labels=labels)
    except FileNotFoundError as err:  # a path that does not exist: name the field that gave it
        raise ConfigError(f"{data_field}.path={config.data.path!r}: {err}") from None


def make_trainer_optimizer(config: ml_collections.ConfigDict, update_scale: Callable | None = None):
    """(optimizer, schedule) of a run: clipped AdamW with warm-up and cosine from config.optim. A step
    with a non-finite gradient moves no parameter, and the host stops the run when it reads the step's
    metrics."""
    return make_optimizer(config.optim, config.total_steps, config.batch_size, update_scale)


def train(config: ml_collections.ConfigDict, workdir: str, data_iterator: Iterator, objective: Objective,
          name: str = "train", images_fn: Callable | None = None, frozen: dict | None = None,
          initial_params: Callable | None = None, update_scale: Callable | None = None,
          evaluate_fn: Callable | None = None) -> TrainResult:
    """Train `objective` for config.total_steps, resuming from `workdir` if it holds checkpoints.

    data_iterator: yields per-process host batches (device_batch.py); has get_state()/set_state().
    images_fn(step, params, global host batch, writer): picture summaries every config.image_every steps.
    evaluate_fn(step, params) -> {name: number} or None: an evaluation every config.eval_every steps
      (a fine-tuning field; not at the last step, which the command evaluates after the run), logged
      to metrics.jsonl and TensorBoard. Called on every process.
    frozen: host arrays the loss reads but never trains (distillation teachers, a frozen encoder).
    initial_params(params) -> params: on a fresh start, replaces parts of the initialised parameters
      (e.g. encoders from a checkpoint) with host arrays; not applied when resuming.
    update_scale(params) -> pytree of floats: per-leaf multipliers of the learning rate (layer decay).
    """
    started = time.perf_counter()
    mesh = sharding.make_mesh(config.mesh.fsdp)
    global_batch = config.batch_size
    if global_batch % mesh.size:
        raise ValueError(f"config.batch_size={global_batch} must be divisible by the {mesh.size} devices")
    optimizer, schedule = make_trainer_optimizer(config, update_scale)

    first_batch = next(data_iterator)
    keys = list(host_fields(objective.batch_keys))
    missing = [k for k in keys if k not in first_batch]
    if missing:
        raise KeyError(f"the input batches lack {missing}, which {name} reads (it has {sorted(first_batch)})")
    depth_trim = config.data.depth_trim
    host_sample = {k: jax.ShapeDtypeStruct((global_batch,) + first_batch[k].shape[1:], first_batch[k].dtype)
                   for k in keys}
    sample = {k: jnp.zeros(s.shape, s.dtype) for k, s in jax.eval_shape(
        lambda b: prepare_batch(b, objective.batch_keys, depth_trim), host_sample).items()}

    def init_state(rng):
        params = objective.init(rng, sample)
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}

    abstract_state = jax.eval_shape(init_state, jax.random.key(config.seed))
    state_sharding = sharding.state_shardings(abstract_state, mesh)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                                every_steps=config.checkpoint_every, async_save=config.async_checkpoint)

    frozen = {} if frozen is None else frozen
    frozen_sharding = sharding.state_shardings(jax.eval_shape(lambda: frozen), mesh)
    frozen = sharding.put_global(frozen, frozen_sharding)

    if checkpointer.latest_step() is not None:
        # The first batch drawn above is thrown away: the iterator is rewound to the checkpoint.
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, state_sharding)
        state, step = checkpointer.restore(abstract, data_iterator)
        log.info("%s: resumed from step %d in %s", name, step, checkpointer.directory)
        say(name, f"resuming from the checkpoint of step {step}")
        pending_first = None
    else:
        state = jax.jit(init_state, out_shardings=state_sharding)(jax.random.key(config.seed))
        if initial_params is not None:
            state = dict(state, params=replace_params(state["params"], initial_params(state["params"]),
                                                      state_sharding["params"]))
        pending_first = first_batch
    step = first_step = int(state["step"])
    eval_every = config.get("eval_every", 0) if evaluate_fn is not None else 0

    train_step, initial_watch = make_train_step(objective, optimizer, schedule, state_sharding, frozen_sharding, mesh,
                                                depth_trim)
    seed = jax.jit(lambda: jax.random.key(config.seed + 1), out_shardings=sharding.replicated(mesh))()
    watch = initial_watch(state, frozen, sharding.global_batch({k: first_batch[k] for k in keys}, mesh), seed)
    writer = MetricWriter(workdir, name, config.total_steps)
    # One process: our SIGTERM handler. Several: JAX's preemption sync (via orbax's reached_preemption)
    # stops every process at the same step; a handler of ours would replace JAX's own.
    preemption = PreemptionFlag(install=jax.process_count() == 1)
    history, last = [], {}
    try:
        writer.start(step)
        while step < config.total_steps:
            local = pending_first if pending_first is not None else next(data_iterator)
            pending_first = None
            batch = sharding.global_batch({k: local[k] for k in keys}, mesh)
            state, metrics, watch = train_step(state, frozen, batch, seed, watch)
            step += 1
            if step == first_step + 1:  # the step that compiled: time the run from its end
                jax.block_until_ready(metrics)
                writer.first_step_done(step)
            checkpointer.check_saved(step)
            stop = preemption.raised or checkpointer.manager.reached_preemption(step)
            final = step == config.total_steps
            if step % config.log_every == 0 or final or stop or checkpointer.manager.should_save(step):
                # Every step that logs or saves first checks every step since the start for non-finite values.
                check_finite(step, watch)
                last = writer.write(step, jax.device_get(metrics), global_batch)
                history.append(dict(step=step, **last))
            aside = time.perf_counter()  # pictures and evaluations: not training, left out of img/s
            if images_fn is not None and config.image_every and (step % config.image_every == 0 or final):
                images_fn(step, state["params"], batch, writer)
            if eval_every and step % eval_every == 0 and not (final or stop):
                check_finite(step, watch)
                results = evaluate_fn(step, state["params"])
                if results is not None:
                    writer.write_evaluation(step, results)
            writer.set_aside(time.perf_counter() - aside)
            checkpointer.save(step, state, data_iterator, force=stop or final)
            if stop:
                say(name, f"preempted: checkpoint of step {step} written to {checkpointer.directory}")
                break
        checkpointer.wait()
        return TrainResult(step, last, history, preempted=step < config.total_steps, first_step=first_step,
                           seconds=time.perf_counter() - started, seconds_per_step=writer.seconds_per_step())
    finally:
        preemption.restore_handler()
        writer.close()
        checkpointer.close()


def replace_params(params: dict, new: dict, shardings: dict) -> dict:
    """`new` is `params` with some top-level entries replaced by host arrays: place those on the mesh."""
    return {key: value if value is params[key] else sharding.put_global(value, shardings[key])
            for key, value in new.items()}
