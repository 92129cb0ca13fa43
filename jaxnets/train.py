"""Training in JAX: grad + Optax update + metrics in one jitted step; an epoch is one jitted
``lax.scan`` over its index batches, with the whole (preprocessed) dataset already on the device.

:class:`Trainer` has a twin in ``torchref.train`` with the same methods, so the runner and the
side-by-side comparison drive either one.
"""

from __future__ import annotations

import time
from contextlib import closing
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from jaxnets.conv import sharded_conv
from jaxnets.convert import flat_arrays, flax_state, load_flax_params, mismatches
from jaxnets.data import Dataset, epoch_batches, input_layout, model_arrays, prefetch, preprocess
from jaxnets.errors import CheckpointError
from jaxnets.losses import LOSSES, METRICS, check_label_range
from jaxnets.models import build_model
from jaxnets.numerics import read_jax_numerics
from jaxnets.optim import make_optimizer
from jaxnets.parallel import (
    describe_mesh,
    fetch_global,
    replicate,
    replicated,
    shard_batch_constraint,
)
from jaxnets.report import EpochStats, check_finite, describe, split_epochs
from jaxnets.spec import data_input_shape, model_layers

DTYPES = ("float32", "float64")


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {DTYPES}")
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise RuntimeError("float64 in JAX needs x64 mode on for the whole run: work inside "
                           "`with jaxnets.numerics.jax_numerics('float64'):`")
    return dtype


def xla_cpu_options(fusions: tuple[str, ...] | None) -> dict[str, str]:
    """XLA compiler options that set XLA:CPU's YNNPACK library fusions to ``fusions`` (names
    of XLA's LibraryFusionType without the prefix; () for none), or XLA's default for None;
    nothing off the CPU.

    ``train.xla_cpu_fusions = "none"`` gives (): dots, convolutions and reductions of the
    training step and of the evaluation run in XLA's own loops and Eigen. Why per config:
    measured on a quiet 2-core Xeon (one process, interleaved, best of 3-5), default against
    none. Training, ms per scanned step: convnet_mnist 7.0 / 5.5 (its thin 1->10 and 10->20
    convolutions and their bias-gradient reductions are slower in YNNPACK: the conv1 bias
    gradient, a reduction of (64, 24, 24, 10) to 10, took 0.4 ms), lenet_mnist 5.8 / 5.8,
    vgg_bn_fashion 13.0 / 13.2, resnet_gelu_fashion 13.9 / 14.1, simplenet_mnist 25.1 / 25.7,
    mlp_mnist 2.4 / 2.8. Evaluation, ms per pass over 10,000 test images: lenet_mnist 312 /
    286, vgg_bn_fashion 637 / 526, resnet_gelu_fashion 927 / 864, convnet_mnist 283 / 279,
    mlp_mnist 53 / 52, simplenet_mnist 550 / 849 (its 20->20 5x5 convolutions gain from
    YNNPACK); ``python bench/xla_fusions.py CONFIG ...`` measures both. (Naming ELTWISE
    explicitly made resnet's exact GELU 3.3x slower: XLA expands erfc into a polynomial and
    the eltwise fusion broadcast each coefficient to a full tensor.)

    Those figures predate the oneDNN convolutions (jaxnets.onednn), which leave XLA no
    convolution in float32. Measured again with them (same machine and script, best of 5),
    default against none: training convnet_mnist 3.40 / 2.70, lenet_mnist 2.86 / 2.56,
    vgg_bn_fashion 9.48 / 9.90, resnet_gelu_fashion 9.60 / 9.26, simplenet_mnist 10.86 /
    10.86, stride2_same_mnist 1.68 / 1.67 ms a step; evaluation 143 / 131, 150 / 118, 385 /
    267, 595 / 531, 574 / 459, 73 / 74 ms a pass. So the four configs keep "none", and
    simplenet_mnist now sets it too (its convolutions no longer run in YNNPACK)."""
    if fusions is None or jax.default_backend() != "cpu":
        return {}
    return {"xla_cpu_experimental_ynn_fusion_type": ",".join(
        f"LIBRARY_FUSION_TYPE_{name}" for name in fusions)}


def configured_fusions(setting: str) -> tuple[str, ...] | None:
    """``train.xla_cpu_fusions`` -> :func:`xla_cpu_options`' argument (training and
    evaluation alike)."""
    return None if setting == "default" else ()


class Trainer:
    """Trains one Flax model on one dataset. ``framework`` names the side in reports."""

    framework = "jax"
    # how train_epochs' seconds are measured, for reports
    timing = ("wall-clock seconds from the first step's dispatch until every step's results "
              "are on the host; compilation timed apart; with a progress bar, the bar advances "
              "between compiled blocks of train.log_every steps (no host callback inside the "
              "compiled code)")

    def __init__(self, cfg: dict[str, Any], dataset: Dataset, model: nnx.Module | None = None,
                 dtype: str = "float32", mesh: jax.sharding.Mesh | None = None):
        """``dtype="float64"`` needs JAX's x64 mode on while the trainer is made and used
        (``jaxnets.numerics.jax_numerics("float64")``). The data goes to JAX's default device
        (``jax_numerics(device=...)`` chooses it), or with a ``mesh``
        (``jaxnets.parallel.data_mesh``) to every device of it, each batch split over them."""
        self.cfg = cfg
        self.mesh = mesh
        self.dtype = check_dtype(dtype)
        devices = 1 if mesh is None else mesh.size
        self.model = model if model is not None else build_model(
            {**cfg["model"], "conv": sharded_conv(cfg["model"]["conv"], devices)}, cfg["seed"],
            data_input_shape(cfg))
        if dtype != "float32":  # floats only: dropout's draw counters stay integers
            nnx.update(self.model, jax.tree.map(
                lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                nnx.state(self.model)))
        self.optimizer = make_optimizer(cfg["optimizer"])
        # Optax sees the parameters only; the rest (BatchNorm statistics, dropout draw counters)
        # is state the forward pass updates in train mode
        graphdef, params, other = nnx.split(self.model, nnx.Param, ...)
        self.params, self.other = params, other
        self.opt_state = self.optimizer.init(params)
        # the whole dataset goes to the device once; epochs gather their batches there
        arrays = [a.astype(dtype) if a.dtype.kind == "f" else a
                  for a in model_arrays(dataset, cfg, "jax")]
        self.host_x, self.host_y = arrays[0], arrays[1]  # for the streaming path
        if cfg["train"]["loss"] == "cross_entropy":
            classes = model_layers(cfg["model"], data_input_shape(cfg))[-1].out_shape[-1]
            for labels, split in ((arrays[1], "training"), (arrays[3], "test")):
                check_label_range(labels, classes, f"{dataset.name} {split} labels")
        self.train_x, self.train_y, self.test_x, self.test_y = jax.device_put(arrays)
        if mesh is not None:  # data parallel: state and data on every device (jaxnets.parallel)
            self.params, self.other, self.opt_state, self.train_x, self.train_y, self.test_x, \
                self.test_y = replicate((self.params, self.other, self.opt_state, self.train_x,
                                         self.train_y, self.test_x, self.test_y), mesh)
        shard_batch = shard_batch_constraint(mesh)
        self._bar = None
        self._compiled: dict = {}
        self.compile_seconds = 0.0
        loss_fn = LOSSES[cfg["train"]["loss"]]
        num_correct = METRICS[cfg["train"]["metric"]]
        skip_nonfinite = cfg["train"]["on_nonfinite"] == "skip"

        def apply(params, other, x, train=False):
            """(outputs, other state after the pass): train mode updates BatchNorm's running
            statistics and dropout's draw counters; eval mode returns ``other`` unchanged."""
            model = nnx.merge(graphdef, params, other, copy=True)
            outputs = model(x, train)
            return outputs, nnx.split(model, nnx.Param, ...)[2]

        def train_step(carry, batch):
            """(params, other, opt_state), (x, y) -> (params, other', opt_state'), metrics."""
            params, other, opt_state = carry
            x, y = shard_batch(batch)  # with a mesh: the global batch split over its devices

            def objective(p, o):  # o as an argument: NNX mutates state of its own trace only
                outputs, new_other = apply(p, o, x, True)
                return loss_fn(outputs, y), (outputs, new_other)

            (loss_value, (outputs, new_other)), grads = jax.value_and_grad(
                objective, has_aux=True)(params, other)
            updates, new_opt_state = self.optimizer.update(grads, opt_state, params)
            new = (optax.apply_updates(params, updates), new_other, new_opt_state)
            skipped = jnp.zeros((), bool)
            if skip_nonfinite:  # a NaN/Inf loss or gradient: every state stays as it was
                finite = jnp.isfinite(loss_value) & jnp.all(jnp.stack(
                    [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
                new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new,
                                   (params, other, opt_state))
                skipped = ~finite
            return new, (loss_value, num_correct(outputs, y), skipped)

        def train_epoch(params, other, opt_state, x_all, y_all, index_batches):
            """index_batches: (num_batches, batch_size) int. Returns per-step losses/corrects."""
            def body(carry, idx):
                return train_step(carry, (x_all[idx], y_all[idx]))

            (params, other, opt_state), metrics = jax.lax.scan(
                body, (params, other, opt_state), index_batches)
            return params, other, opt_state, metrics

        def eval_batch(params, other, x, y):
            outputs = apply(params, other, x)[0]
            return loss_fn(outputs, y) * x.shape[0], num_correct(outputs, y)

        eval_size = cfg["train"]["eval_batch_size"]

        def eval_batches(params, other, x, y):
            """Every whole batch of ``eval_size`` in one call: per-batch loss sums and
            correct counts, (num_batches,) each (no host round trip between batches)."""
            # batches sliced by index from x, not x reshaped into the map: the reshaped
            # input went into XLA's while loop as a copy of the whole test set (31 MB for
            # 10,000 MNIST images: 15.5 against 3.8 ms of a 784->10 pass over it, 2-core
            # Xeon; stride2_same_mnist's evaluation spent 16 of its 103 ms in that copy)
            def batch(i):
                start = i * eval_size
                return eval_batch(params, other,
                                  jax.lax.dynamic_slice_in_dim(x, start, eval_size),
                                  jax.lax.dynamic_slice_in_dim(y, start, eval_size))

            return jax.lax.map(batch, jnp.arange(x.shape[0] // eval_size))

        def loss_and_gradients(params, other, x, y):
            """In train mode (batch statistics, the next dropout masks); state not kept."""
            return jax.value_and_grad(lambda p, o: loss_fn(apply(p, o, x, True)[0], y))(
                params, other)

        options = xla_cpu_options(configured_fusions(cfg["train"]["xla_cpu_fusions"]))
        self.apply = jax.jit(lambda params, other, x: apply(params, other, x)[0],
                             compiler_options=options)
        self._loss_and_gradients = jax.jit(loss_and_gradients)

        def one_step(params, other, opt_state, x_all, y_all, idx):
            """One step as its own jitted call (the benchmark's ``jit_step`` mode)."""
            (params, other, opt_state), metrics = train_step(
                (params, other, opt_state), (x_all[idx], y_all[idx]))
            return params, other, opt_state, metrics

        def batch_step(params, other, opt_state, x, y):
            """One step on a batch sent from the host (the ``stream`` path)."""
            (params, other, opt_state), metrics = train_step((params, other, opt_state), (x, y))
            return params, other, opt_state, metrics

        self._train_batch = jax.jit(batch_step, compiler_options=options)
        self._train_epoch = jax.jit(train_epoch, compiler_options=options)
        self._train_step = jax.jit(one_step, compiler_options=options)
        self._eval_batch = jax.jit(eval_batch, compiler_options=options)
        self._eval_batches = jax.jit(eval_batches, compiler_options=options)

    @property
    def num_train(self) -> int:
        return int(self.train_x.shape[0])

    def data_device(self) -> str:
        """The device the training data lives on, as JAX reports it."""
        return ", ".join(sorted(str(d) for d in self.train_x.devices()))

    def _index_sharding(self):
        """Where index batches go: every device of the mesh, or JAX's default device."""
        return None if self.mesh is None else replicated(self.mesh)

    def _put_index(self, index_batches: np.ndarray) -> jax.Array:
        """(steps, batch) indices on the device(s), every process giving its same copy."""
        index_batches = np.asarray(index_batches, np.int32)
        return (jnp.asarray(index_batches) if self.mesh is None
                else replicate(index_batches, self.mesh))

    def parallel(self) -> dict[str, Any]:
        """Devices and processes this trainer uses, for reports."""
        return describe_mesh(self.mesh)

    def numerics(self) -> dict[str, Any]:
        """JAX's numerics settings as JAX reports them now (``jaxnets.numerics``)."""
        return read_jax_numerics()

    def train_epoch(self, epoch: int, progress: bool = True) -> EpochStats:
        """One pass over the training set in the order :func:`epoch_batches` gives for ``epoch``."""
        return self.train_epochs(range(epoch, epoch + 1), progress)[0]

    def train_epochs(self, epochs: range, progress: bool = True, scan: bool = True,
                     stream: bool = False) -> list[EpochStats]:
        """Consecutive epochs; when no epoch has a smaller last batch, all of them run as one
        scan (the toys' 1000 full-batch steps take a few calls, not 1000). ``scan=False``
        dispatches every step as its own jitted call instead; ``stream=True`` also gathers each
        batch on the host and sends it to the device two batches ahead (:func:`prefetch`), the
        path for data that does not fit on the device. Same numbers in every mode."""
        plan = [epoch_batches(self.num_train, self.cfg["train"]["batch_size"], self.cfg["seed"],
                              e, self.cfg["train"]["shuffle"]) for e in epochs]
        if all(rest is None for _, rest in plan):
            chunks = [np.concatenate([full for full, _ in plan])]
        else:
            chunks = [c for full, rest in plan for c in (full, None if rest is None else rest[None])
                      if c is not None and len(c)]
        start = time.perf_counter()
        compiled_before = self.compile_seconds  # compilation is timed apart, not as training
        self._bar = tqdm(total=sum(len(c) for c in chunks), desc=f"jax   {describe(epochs)}",
                         leave=False, disable=not progress)
        losses, correct, skipped = [], [], []
        try:
            if stream:
                steps = self._stream_steps(plan)
            elif not scan:
                steps = self._dispatch_steps(chunks)
            else:
                steps = self._scan_steps(chunks, progress)
            with closing(steps):  # an interrupted epoch stops the prefetch thread at once
                for step_losses, step_correct, step_skipped in steps:
                    losses.append(step_losses)
                    correct.append(step_correct)
                    skipped.append(step_skipped)
            losses = np.concatenate([np.asarray(x) for x in losses])  # waits for the device
            correct = np.concatenate([np.asarray(x) for x in correct])
            skipped = np.concatenate([np.asarray(x) for x in skipped])
        finally:
            self._bar.close()
            self._bar = None
        seconds = time.perf_counter() - start - (self.compile_seconds - compiled_before)
        if self.cfg["train"]["on_nonfinite"] == "stop":
            check_finite(losses, plan, epochs, self.framework)
        return split_epochs(losses, correct, plan, seconds, self.cfg["train"]["metric"],
                            skipped)

    def _scan_steps(self, chunks: list[np.ndarray], progress: bool):
        """Each chunk of index batches as one compiled scan: (losses, corrects) per chunk.
        With a progress bar, a chunk runs as scans of ``train.log_every`` steps and the bar
        advances between them, once each block's results are in: the compiled code never
        calls back to the host, so the bar costs the timed steps nothing (same numbers)."""
        block = self.cfg["train"]["log_every"] if progress else None
        for index_batches in chunks:
            for start in range(0, len(index_batches), block or len(index_batches)):
                part = index_batches[start:start + block] if block else index_batches
                run = self._compiled_epoch(part.shape)
                self.params, self.other, self.opt_state, metrics = run(
                    self.params, self.other, self.opt_state, self.train_x, self.train_y,
                    self._put_index(part))
                if progress:
                    self._bar.update(len(part))
                    self._bar.set_postfix(loss=f"{float(metrics[0][-1]):.4f}", refresh=False)
                yield metrics

    def _dispatch_steps(self, chunks: list[np.ndarray]):
        """Every step its own jitted call, gathering its batch from the on-device dataset."""
        for index_batches in chunks:
            for idx in jnp.asarray(index_batches, jnp.int32):
                self.params, self.other, self.opt_state, metrics = self._train_step(
                    self.params, self.other, self.opt_state, self.train_x, self.train_y, idx)
                self._bar.update(1)
                yield tuple(m[None] for m in metrics)

    def _stream_steps(self, plan):
        """Every step its own jitted call on a batch gathered on the host and sent ahead."""
        batches = ((jax.device_put(self.host_x[idx]), jax.device_put(self.host_y[idx]))
                   for full, rest in plan for idx in (*full, *([] if rest is None else [rest])))
        with closing(prefetch(batches)) as prefetched:  # an early stop ends its thread
            for x, y in prefetched:
                self.params, self.other, self.opt_state, metrics = self._train_batch(
                    self.params, self.other, self.opt_state, x, y)
                self._bar.update(1)
                yield tuple(m[None] for m in metrics)

    def _compiled_epoch(self, shape: tuple[int, int]):
        """The epoch function compiled ahead of time for this batch shape; the compilation
        seconds are added to ``compile_seconds`` instead of to the epoch's training time."""
        # the numerics settings change the compiled code (jaxnets.numerics)
        key = (shape, jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision)
        if key not in self._compiled:
            start = time.perf_counter()
            index = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self._index_sharding())
            self._compiled[key] = self._train_epoch.lower(
                self.params, self.other, self.opt_state, self.train_x, self.train_y,
                index).compile()
            self.compile_seconds += time.perf_counter() - start
        return self._compiled[key]

    def evaluate(self, x: jax.Array | None = None, y: jax.Array | None = None
                 ) -> tuple[float, float | None]:
        """Mean loss and accuracy (None for metric "none") over the test set, or over the
        given preprocessed arrays."""
        x = self.test_x if x is None else x
        y = self.test_y if y is None else y
        size = self.cfg["train"]["eval_batch_size"]
        whole = len(x) // size * size
        sums, counts = [], []
        if whole:
            batch_sums, batch_counts = self._eval_batches(self.params, self.other, x, y)
            sums, counts = list(np.asarray(batch_sums)), list(np.asarray(batch_counts))
        if whole < len(x):  # the last, smaller batch
            batch_loss, batch_correct = self._eval_batch(self.params, self.other, x[whole:],
                                                         y[whole:])
            sums.append(batch_loss)
            counts.append(batch_correct)
        loss_sum, correct = 0.0, 0
        for batch_loss, batch_correct in zip(sums, counts, strict=True):  # in batch order
            loss_sum += float(batch_loss)
            correct += int(batch_correct)
        accuracy = None if self.cfg["train"]["metric"] == "none" else correct / len(x)
        return loss_sum / len(x), accuracy

    def predict(self, raw_x: np.ndarray) -> np.ndarray:
        """Model outputs for raw examples (as a :class:`Dataset` holds them), in batches."""
        x = preprocess(raw_x, self.cfg["data"], input_layout(self.cfg, "jax")).astype(self.dtype)
        size = self.cfg["train"]["eval_batch_size"]
        return np.concatenate([np.asarray(self.apply(self.params, self.other, x[i:i + size]))
                               for i in range(0, len(x), size)]) if len(x) else np.zeros((0,))

    def loss_and_gradients(self, x: np.ndarray, y: np.ndarray
                           ) -> tuple[float, dict[str, np.ndarray]]:
        """The loss of one batch and its gradient for every parameter (Flax names, layouts)."""
        loss, grads = self._loss_and_gradients(self.params, self.other, x, y)
        return float(loss), flat_arrays(grads)

    def forward_layers(self, x: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """Every step's output (NHWC where 4-D), with the current parameters, in eval mode."""
        nnx.update(self.model, self.params, self.other)
        return [(name, np.asarray(out)) for name, out in self.model.forward_layers(x)]

    def weights(self) -> dict[str, np.ndarray]:
        """Current parameters and state as ``{"layers.0.kernel": array, "bn.mean": ...}``
        (Flax names and layouts). With several processes every process calls it (a gather)."""
        nnx.update(self.model, *fetch_global((self.params, self.other)))
        return flax_state(self.model)

    def load_weights(self, arrays: dict[str, np.ndarray]) -> None:
        """Replace the parameters and state (Flax names and layouts) and restart the optimizer
        state."""
        load_flax_params(self.model, arrays)
        _, self.params, self.other = nnx.split(self.model, nnx.Param, ...)
        self.opt_state = self.optimizer.init(self.params)
        self._replicate_state()

    def _replicate_state(self) -> None:
        """With a mesh: parameters, other state and optimizer state on every device of it."""
        if self.mesh is not None:
            self.params, self.other, self.opt_state = replicate(
                (self.params, self.other, self.opt_state), self.mesh)

    def optimizer_arrays(self) -> dict[str, np.ndarray]:
        """The Optax state as named arrays (the pytree paths), for a checkpoint."""
        leaves = jax.tree_util.tree_flatten_with_path(fetch_global(self.opt_state))[0]
        return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}

    def restore(self, weights: dict[str, np.ndarray], optimizer: dict[str, np.ndarray]) -> None:
        """Parameters and optimizer state from a checkpoint, bit for bit."""
        self.load_weights(weights)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(self.opt_state)
        expected = {jax.tree_util.keystr(path): leaf for path, leaf in leaves}
        problems = mismatches({k: v.shape for k, v in expected.items()}, optimizer)
        if problems:
            raise CheckpointError(f"the optimizer state does not match "
                                  f"{self.cfg['optimizer']['name']} for this model "
                                  f"({len(problems)} problems): " + "; ".join(problems[:5]))
        self.opt_state = jax.tree_util.tree_unflatten(
            treedef, [jnp.asarray(optimizer[k], dtype=v.dtype) for k, v in expected.items()])
        self._replicate_state()
