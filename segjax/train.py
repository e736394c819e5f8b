"""train_and_evaluate: mesh, data, model, state, jitted steps, the loop and its cadence."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from segjax import (
    checkpointing,
    evaluate,
    instances,
    intervals,
    optim,
    parallel,
    preemption,
    preflight,
    pretrain,
    provenance,
    report,
    seeds,
    state,
    steps,
    surface,
    workdirs,
    writers,
)
from segjax.data import pipeline, sources
from segjax.errors import ConfigError, NonFiniteLossError
from segjax.flops import count_flops
from segjax.models import build_model, unetpp


def model_summary(model, variables, sample) -> dict[str, float]:
    """Parameter count and inference forward FLOPs per example (convolutions and matrix products,
    `segjax.flops`: the same on every backend). For a pruned U-Net++ (`inference_head`) also the
    parameters inference uses."""
    flops = count_flops(functools.partial(model.apply, train=False), variables, sample) / sample.shape[0]
    summary = {"params": state.param_count(variables["params"]), "flops": flops}
    if getattr(model, "inference_head", 0):
        summary["params_inference"] = unetpp.inference_param_count(
            variables["params"], model.depth, model.inference_head
        )
    return summary


def make_tx(config, model):
    """The run's optimizer (`optim.*`), with `model`'s encoder held fixed under `model.freeze_encoder`
    and the weight average of `optim.ema_decay` outermost (so it averages every parameter)."""
    tx = optim.build(config.optim, config.train.steps)
    if config.model.freeze_encoder:
        tx = pretrain.frozen_encoder_tx(tx, pretrain.encoder_scopes(model))
    return optim.with_weight_average(tx, config.optim.ema_decay)


def window_means(outputs: list[dict]) -> dict[str, np.ndarray]:
    """Each train-step output averaged over the steps of a logging window (host copies, oldest
    first), leaving out the non-finite steps that `train.nonfinite='skip'` skipped (NaN if all
    were); `nonfinite_steps` counts the steps skipped for any replica. Outputs with a leading
    replica axis (seeds; pmap's devices) are averaged per replica."""
    finite = np.stack([np.asarray(o["finite"], bool) for o in outputs])
    kept = np.maximum(finite.sum(axis=0), 1)
    means = {}
    for key in outputs[0]:
        if key != "finite":
            values = np.stack([np.asarray(o[key], np.float64) for o in outputs])
            total = np.where(finite, values, 0.0).sum(axis=0)
            means[key] = np.where(finite.any(axis=0), total / kept, np.nan)
    means["nonfinite_steps"] = np.float64((~finite.reshape(len(outputs), -1).all(axis=1)).sum())
    return means


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False, allow_config_changes: bool = False
) -> dict:
    """Train `config` in `workdir` (resuming from its latest checkpoint) and return final metrics.
    One run trains in a workdir at a time (`workdirs.lock`: BusyError for the second)."""
    preflight.check(config)
    with contextlib.ExitStack() as held:
        if jax.process_index() == 0:
            held.enter_context(workdirs.lock(workdir))
        preempt = held.enter_context(preemption.Preemption())  # both stages: pretraining and training
        return _train_and_evaluate(config, workdir, overwrite, allow_config_changes, held, preempt)


def _train_and_evaluate(config, workdir: str, overwrite: bool, allow_config_changes: bool, held, preempt) -> dict:
    use_pmap = config.parallel.mode == "pmap"
    axis = parallel.PMAP_AXIS if use_pmap else None
    model = build_model(config.model, instances.num_outputs(config), norm_axis_name=axis)
    workdirs.prepare(config, workdir, overwrite, allow_config_changes, held, dataset=sources.dataset_id(config.data))
    mesh = parallel.make_mesh()
    pidx, pcount = jax.process_index(), jax.process_count()
    splits = sources.open_splits(config.data, with_instances=config.instances.enabled)
    targets, _ = instances.hooks(config)
    num_seeds = config.train.num_seeds
    replica_seeds = seeds.replica_seeds(config.train.seed, num_seeds)
    host_batch = parallel.host_batch_size(config.train.batch_size)
    train_ds = [
        pipeline.train_dataset(splits["train"], config.data, host_batch, s, pidx, pcount, targets)
        for s in replica_seeds
    ]
    sample = jnp.asarray(train_ds[0][0]["image"][:1])

    tx = make_tx(config, model)
    best = config.train.best_metric
    ckpt = checkpointing.Checkpointer(workdir, config.train.keep_checkpoints, best, config.train.best_mode)
    provenance.record(workdir, "train", start_step=ckpt.latest_step() or 0)
    if num_seeds == 1:
        train_state = state.create(model, tx, sample, config.train.seed)
        if config.pretrain.steps and ckpt.latest_step() is None:  # the classic recipe's first stage
            stage = os.path.join(workdir, workdirs.PRETRAIN_FOLDER)
            encoder = pretrain.run(config, stage, model, splits, mesh, preempt)
            if encoder is None:  # SIGTERM: the pretraining stage saved its step; rerun to resume it
                ckpt.close()
                return {"step": 0, "preempted": True}
            train_state = pretrain.load_encoder(train_state, encoder)
        summary = model_summary(model, train_state.variables(), sample)
    else:
        train_state = seeds.create_states(model, tx, sample, replica_seeds)
        summary = model_summary(model, seeds.replica(train_state, 0).variables(), sample)
        logging.info("training %d replicas (seeds %s) in one vmapped step", num_seeds, replica_seeds)
        if jax.default_backend() == "cpu":
            logging.warning(
                "train.num_seeds=%d on CPU: vmapped replicas beat sequential runs only for tiny steps (1.7x at "
                "batch 1 x 16^2, 0.2x at 16 x 32^2: grouped convolutions; benchmarks/RESULTS.md); on a GPU 4.6x",
                num_seeds,
            )
    logging.info(
        "model %s: %.3fM params, %.3f GFLOPs/example forward",
        config.model.arch,
        summary["params"] / 1e6,
        summary["flops"] / 1e9,
    )
    # replicated global arrays in both modes: what checkpoints save and restore on any number of hosts
    train_state = jax.device_put(train_state, parallel.replicated(mesh))

    iterators = [pipeline.train_iterator(ds, config.data) for ds in train_ds]
    data_iter = iterators[0] if num_seeds == 1 else seeds.StackedIterator(iterators)
    if ckpt.latest_step() is not None:
        train_state, data_state = ckpt.restore(train_state)
        data_iter.set_state(data_state)
        logging.info("resumed from %s at step %d", workdir, int(np.max(train_state.step)))
    step = int(np.max(train_state.step))

    train_step = functools.partial(
        steps.train_step,
        model=model,
        loss_cfg=config.loss,
        grad_accum_steps=config.train.grad_accum_steps,
        axis_name=axis,
    )
    eval_step = steps.make_eval_step(config, model, axis)
    if use_pmap:  # one state replica per local device; checkpoints hold one unreplicated copy
        logging.info("parallel.mode=pmap over %d local devices (cross-replica batch norm)", jax.local_device_count())
        train_state = parallel.replicate(train_state)
        pmapped_train = jax.pmap(train_step, axis_name=axis, donate_argnums=0)
        pmapped_eval = jax.pmap(eval_step, axis_name=axis)

        def train_fn(s, host_batch):
            return pmapped_train(s, parallel.split_for_devices(host_batch))

        def eval_fn(s, host_batch):
            return parallel.merge_eval_outputs(pmapped_eval(s, parallel.split_for_devices(host_batch)))

        def put_batch(host_batch):
            return host_batch

        def checkpointable(s):
            return parallel.unreplicate_global(s, mesh)
    else:
        repl, batch_sh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
        train_batch_sh = batch_sh
        if num_seeds > 1:  # replicas along a leading axis; every replica sees the same eval batch
            train_step, eval_step = jax.vmap(train_step), jax.vmap(eval_step, in_axes=(0, None))
            train_batch_sh = seeds.batch_sharding(mesh)
        train_fn = jax.jit(
            train_step, in_shardings=(repl, train_batch_sh), out_shardings=(repl, repl), donate_argnums=0
        )
        eval_fn = jax.jit(eval_step, in_shardings=(repl, batch_sh), out_shardings=repl)

        def put_batch(host_batch):
            return parallel.to_global(host_batch, mesh, train_batch_sh)

        def checkpointable(s):
            return s

    writer = writers.MetricWriter(workdir)
    names = instances.class_names(config)

    # the latest evaluation's per-image table; with replicas, each in its seed_<s>/ (as metrics.json)
    table = [os.path.join(workdir, f"seed_{s}" if num_seeds > 1 else "", writers.PER_IMAGE_FILE) for s in replica_seeds]

    def run_eval(stop=None) -> dict | None:
        """The validation scores (None if `stop()` turned True during the pass: nothing scored)."""
        put = (lambda b: b) if use_pmap else None
        per_seed = evaluate.evaluate_split(
            config,
            eval_fn,
            train_state,
            splits["validation"],
            mesh,
            num_seeds=num_seeds,
            put=put,
            per_image_csv=table,
            stop=stop,
        )
        if per_seed is None or num_seeds == 1:
            return per_seed
        seed_results.clear()
        seed_results.extend(per_seed)
        combined = seeds.mean_and_spread(per_seed)
        for k, r in enumerate(per_seed):
            combined[f"seed{replica_seeds[k]}/val/miou"] = r["val/miou"]
        return combined

    total = config.train.steps
    lr_schedule = optim.schedule(config.optim, total)
    seed_results: list[dict] = []
    convention = evaluate.convention(config)
    logging.info("metrics convention: %s", convention)
    last_train, results, pending, window = {}, {}, None, []
    window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
    bar = tqdm(
        total=total, initial=step, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0, disable=pidx != 0
    )

    def check_finite(prev_step: int, out: dict) -> None:
        finite = np.asarray(out["finite"])
        if not finite.all():
            which = "" if num_seeds == 1 else f" for seeds {np.asarray(replica_seeds)[~finite].tolist()}"
            msg = (
                f"non-finite loss/gradient at step {prev_step}{which} (loss={np.asarray(out['loss']).tolist()}); "
                "the update was not applied"
            )
            if config.train.nonfinite == "stop":
                raise NonFiniteLossError(
                    msg + "; stopping (last good checkpoint kept). Lower optim.lr or set train.nonfinite='skip'"
                )
            logging.warning(msg + "; skipping the batch")

    def is_eval_step(n: int) -> bool:
        return n % config.eval.every == 0 or n == total

    def evaluate_at(n: int) -> dict | None:
        """Evaluate at step `n`: log, print, keep as best if it is. None if a SIGTERM interrupted."""
        scores = run_eval(stop=preempt.reached)
        if scores is None:
            logging.warning("SIGTERM during the evaluation at step %d: abandoned it (resuming redoes it)", n)
            return None
        writer.write(n, scores)
        bar.write(
            f"step {n}: val/miou={scores['val/miou']:.4f} val/mdice={scores['val/mdice']:.4f} "
            f"val/accuracy={scores['val/accuracy']:.4f}"
        )
        if best not in scores:  # a backstop: preflight checked it against evaluate.run_score_keys
            raise ConfigError(
                f"train.best_metric={best!r} is not among this run's validation scores; choose "
                f"one of {sorted(k for k in scores if k.startswith('val/'))}"
            )
        if math.isfinite(scores[best]):
            ckpt.save_if_best(n, checkpointable(train_state), data_iter.get_state(), scores)
        return scores

    try:
        if step and is_eval_step(step) and not _evaluated(workdir, step):  # its evaluation was cut short
            results = evaluate_at(step)
            if results is None:
                return {"step": step, "preempted": True}
        while step < total:
            wait_start = time.perf_counter()
            host_batch = next(data_iter)
            data_wait += time.perf_counter() - wait_start
            train_state, out = train_fn(train_state, put_batch(host_batch))
            window.append(out)  # read back once per log: no transfer per step
            if pending is not None:  # read the previous step's outputs while this one runs
                check_finite(*pending)
            pending = (step, out)
            step += 1
            window_steps += 1
            bar.update(1)
            if step % config.train.log_every == 0 or step == total:
                check_finite(*pending)
                pending = None
                elapsed = time.perf_counter() - window_start
                rate = window_steps / elapsed
                means = window_means(jax.device_get(window))
                window.clear()
                last_train = {f"train/{k}": float(np.mean(v)) for k, v in means.items()}
                last_train["train/nonfinite_steps"] = int(means["nonfinite_steps"])
                if num_seeds > 1:
                    for k, s in enumerate(replica_seeds):
                        last_train[f"seed{s}/train/loss"] = float(means["loss"][k])
                last_train["train/steps_per_sec"] = rate
                last_train["train/lr"] = float(lr_schedule(step - 1))
                # time the loop waited for the input pipeline: an upper bound on device idle time
                last_train["train/data_wait_fraction"] = data_wait / elapsed
                writer.write(step, last_train)
                bar.set_postfix(loss=f"{last_train['train/loss']:.4f}", steps_s=f"{rate:.2f}")
                window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
            # the checkpoint first: it is written while the evaluation runs, and a SIGTERM during
            # the evaluation finds this step saved (the evaluation is then redone on resume)
            stop = preempt.reached()
            saved = step % config.train.checkpoint_every == 0 or step == total or stop
            if saved:
                ckpt.save(step, checkpointable(train_state), data_iter.get_state())
            if not stop and is_eval_step(step):
                evaluated = evaluate_at(step)
                if evaluated is not None:
                    results = evaluated
                else:  # a SIGTERM during the evaluation
                    stop = True
                    if not saved:
                        ckpt.save(step, checkpointable(train_state), data_iter.get_state())
            if stop:
                logging.warning("SIGTERM: saved a checkpoint at step %d; exiting (rerun the command to resume)", step)
                return {"step": step, "preempted": True}  # `finally` waits for the save
        if pending is not None:
            check_finite(*pending)
        if not results:  # resumed a finished run: evaluate the final state once more
            results = run_eval()
    finally:
        bar.close()
        ckpt.wait()
        ckpt.close()
        writer.close()
    if pcount > 1:  # nobody leaves (and tears down the coordination service) while others still save
        parallel.host_barrier("segjax: training finished")

    final = {"step": step, **{k: v for k, v in last_train.items()}, **results, **summary}
    if "train/loss" not in final:
        final["train/loss"] = _last_logged(workdir, "train/loss")
    final["metrics_convention"] = convention
    if pidx == 0 and num_seeds > 1:  # each replica's own metrics.json, as a single-seed run writes it
        for s, r in zip(replica_seeds, seed_results, strict=True):
            os.makedirs(os.path.join(workdir, f"seed_{s}"), exist_ok=True)
            mine = {"step": step, "seed": s, **r, **summary, "metrics_convention": convention}
            writers.write_summary(os.path.join(workdir, f"seed_{s}", writers.SUMMARY_FILE), mine)
    if pidx == 0:
        writers.write_summary(os.path.join(workdir, writers.SUMMARY_FILE), final)
        print(f"\nResults at step {step} on {config.data.name}/validation ({convention}):")
        print(report.results_table(final, names, distance_unit=surface.unit(config)))
        intervals.print_results(table, config, out=os.path.join(workdir, writers.INTERVALS_FILE))
        if num_seeds > 1:
            print(
                f"(means over {num_seeds} seeds; val/miou per seed: "
                + ", ".join(f"{r['val/miou']:.4f}" for r in seed_results)
                + f"; std {final.get('val/miou_std', float('nan')):.4f})"
            )
    return final


def _evaluated(workdir: str, step: int) -> bool:
    """Whether the log holds validation scores at `step` (process 0's reading, for every process)."""
    logged = False
    if jax.process_index() == 0 and os.path.exists(os.path.join(workdir, writers.LOG_FILE)):
        logged = any(row["step"] == step and "val/miou" in row for row in writers.read_log(workdir))
    return parallel.decided_by_process_0("evaluated", logged)


def _last_logged(workdir: str, key: str):
    """`key` at the last step that logged it (None if none did)."""
    if not os.path.exists(os.path.join(workdir, writers.LOG_FILE)):
        return None
    return next((row[key] for row in reversed(writers.read_log(workdir)) if key in row), None)
