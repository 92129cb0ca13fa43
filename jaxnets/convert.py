"""Weight conversion between PyTorch ``state_dict`` names/layouts and Flax NNX variables.

Everything here works on NumPy arrays and safetensors files, so a JAX-only user converts
PyTorch weights without installing torch. The rules, one small named function each, listed in
:data:`RULES` (a torch name ending and rank -> a Flax name ending), Hugging Face style:

* Linear ``weight`` (out, in) -> ``kernel`` (in, out): :func:`linear_torch_to_flax`, a transpose.
* Conv2d ``weight`` OIHW -> ``kernel`` HWIO: :func:`conv_torch_to_flax`; Conv1d OIW -> WIO:
  :func:`conv1d_torch_to_flax` (``jaxnets verify``'s mapping; the vocabulary has no conv1d).
* BatchNorm / LayerNorm ``weight`` (features,) -> ``scale``: :func:`norm_torch_to_flax`.
* BatchNorm ``running_mean`` -> ``mean`` and ``running_var`` -> ``var``:
  :func:`running_mean_torch_to_flax`, :func:`running_var_torch_to_flax` (values unchanged;
  both sides keep PyTorch's unbiased running variance, ``jaxnets.layers.unbiased_variance``).
* BatchNorm ``num_batches_tracked``: dropped (:func:`drop_num_batches_tracked`; it only matters
  for ``momentum=None``, which the vocabulary does not offer); flax -> torch leaves it out and
  the PyTorch side keeps its own.
* ``bias`` and dropout's ``draws`` counter: the same on both sides.
* Flatten order (CHW vs HWC) needs no rule here: the Flax models flatten in PyTorch's order
  (``jaxnets.layers.flatten_chw``), so the first Linear after a conv is a plain transpose. A
  user's port that flattens its NHWC activations directly needs
  :func:`linear_hwc_torch_to_flax` for that Linear (``jaxnets verify`` detects it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from jaxnets.errors import ConversionError


def linear_torch_to_flax(weight: np.ndarray) -> np.ndarray:
    """torch.nn.Linear computes x @ W.T with W (out, in); nnx.Linear computes x @ K, K (in, out)."""
    return np.ascontiguousarray(weight.T)


def linear_hwc_torch_to_flax(weight: np.ndarray, chw: tuple[int, int, int]) -> np.ndarray:
    """The first Linear after a flatten, for a port that flattens NHWC: weight (out, C*H*W)
    -> kernel (H*W*C, out)."""
    # Framework difference: torch flattens (C, H, W), an NHWC port (H, W, C): permute the inputs
    c, h, w = chw
    rows = weight.reshape(weight.shape[0], c, h, w).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(rows.reshape(weight.shape[0], -1).T)


def flat_chw_to_hwc(array: np.ndarray, chw: tuple[int, int, int]) -> np.ndarray:
    """A flattened activation (batch, C*H*W) in torch's order -> (batch, H*W*C), an NHWC port's."""
    c, h, w = chw
    return np.ascontiguousarray(array.reshape(-1, c, h, w).transpose(0, 2, 3, 1)
                                .reshape(array.shape[0], -1))


def linear_flax_to_torch(kernel: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(kernel.T)


def conv_torch_to_flax(weight: np.ndarray) -> np.ndarray:
    """torch.nn.Conv2d keeps its kernel OIHW; nnx.Conv (lax.conv with NHWC inputs) HWIO."""
    return np.ascontiguousarray(weight.transpose(2, 3, 1, 0))


def conv1d_torch_to_flax(weight: np.ndarray) -> np.ndarray:
    """torch.nn.Conv1d keeps its kernel OIW; nnx.Conv with one spatial dim (NLC inputs) WIO."""
    return np.ascontiguousarray(weight.transpose(2, 1, 0))


def conv_flax_to_torch(kernel: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))


def norm_torch_to_flax(weight: np.ndarray) -> np.ndarray:
    """BatchNorm/LayerNorm: torch's per-feature ``weight`` is Flax's ``scale``, same values."""
    return np.asarray(weight)


def torch_running_var_as_flax(new: np.ndarray, old: np.ndarray, momentum: float,
                              count: int) -> np.ndarray:
    """torch BatchNorm updates ``running_var`` with the *unbiased* batch variance (times
    count/(count-1)); nnx.BatchNorm with the biased one. From torch's update
    ``new = (1-m) old + m var_unbiased``, the value Flax computes from the same batch."""
    unbiased = (new - (1 - momentum) * old) / momentum
    return (1 - momentum) * old + momentum * unbiased * (count - 1) / count


def embedding_torch_to_flax(weight: np.ndarray) -> np.ndarray:
    """torch.nn.Embedding ``weight`` and nnx.Embed ``embedding`` are both (num, features)."""
    return np.asarray(weight)


def activation_torch_to_flax(array: np.ndarray) -> np.ndarray:
    """An image activation NCHW (torch) -> NHWC (Flax convolutions); other ranks unchanged."""
    return np.ascontiguousarray(array.transpose(0, 2, 3, 1)) if array.ndim == 4 else array


def activation_channels_last(array: np.ndarray) -> np.ndarray:
    """Any activation with a channel axis (rank >= 3), channels first (torch: NCL, NCHW) ->
    channels last (Flax convolutions: NLC, NHWC); lower ranks unchanged."""
    if array.ndim < 3:
        return array
    return np.ascontiguousarray(np.moveaxis(array, 1, -1))


def activation_channels_first(array: np.ndarray) -> np.ndarray:
    """The inverse of :func:`activation_channels_last`."""
    return np.ascontiguousarray(np.moveaxis(array, -1, 1)) if array.ndim >= 3 else array


def activation_flax_to_torch(array: np.ndarray) -> np.ndarray:
    """The inverse of :func:`activation_torch_to_flax`: NHWC -> NCHW."""
    return np.ascontiguousarray(array.transpose(0, 3, 1, 2)) if array.ndim == 4 else array


norm_flax_to_torch = norm_torch_to_flax


def running_mean_torch_to_flax(running_mean: np.ndarray) -> np.ndarray:
    """BatchNorm's ``running_mean`` is ``mean`` in Flax, same values."""
    return np.asarray(running_mean)


def running_var_torch_to_flax(running_var: np.ndarray) -> np.ndarray:
    """BatchNorm's ``running_var`` is ``var``; both sides hold the unbiased estimate."""
    return np.asarray(running_var)


running_mean_flax_to_torch = running_mean_torch_to_flax
running_var_flax_to_torch = running_var_torch_to_flax


def drop_num_batches_tracked(count: np.ndarray) -> None:
    """BatchNorm's ``num_batches_tracked`` has no Flax counterpart: dropped."""
    return None


@dataclass(frozen=True)
class Rule:
    """One renaming rule: a torch name ending of rank ``ndim`` <-> a Flax name ending."""

    layer: str
    torch_leaf: str
    flax_leaf: str | None
    ndim: int
    to_flax: Callable[[np.ndarray], np.ndarray | None]
    to_torch: Callable[[np.ndarray], np.ndarray] | None


RULES = (
    Rule("Linear", "weight", "kernel", 2, linear_torch_to_flax, linear_flax_to_torch),
    Rule("Conv2d", "weight", "kernel", 4, conv_torch_to_flax, conv_flax_to_torch),
    Rule("BatchNorm/LayerNorm", "weight", "scale", 1, norm_torch_to_flax, norm_flax_to_torch),
    Rule("BatchNorm", "running_mean", "mean", 1, running_mean_torch_to_flax,
         running_mean_flax_to_torch),
    Rule("BatchNorm", "running_var", "var", 1, running_var_torch_to_flax,
         running_var_flax_to_torch),
    Rule("BatchNorm", "num_batches_tracked", None, 0, drop_num_batches_tracked, None),
)


# torch BatchNorm/LayerNorm names -> Flax names (same layouts), from :data:`RULES`;
# torch's num_batches_tracked has no Flax counterpart (None) and is dropped
NORM_TORCH_TO_FLAX = {"bias": "bias", **{r.torch_leaf: r.flax_leaf for r in RULES
                                         if r.layer.startswith("BatchNorm")}}


def norm_state_torch_to_flax(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A norm layer's tensors ``{"weight", "bias", "running_mean", "running_var",
    "num_batches_tracked"}`` -> ``{"scale", "bias", "mean", "var"}``: renamed, values kept."""
    return {NORM_TORCH_TO_FLAX[name]: np.asarray(value) for name, value in tensors.items()
            if NORM_TORCH_TO_FLAX.get(name)}


def _convert(tensors: Mapping[str, np.ndarray], to_flax: bool) -> dict[str, np.ndarray]:
    own = {(r.torch_leaf if to_flax else r.flax_leaf, r.ndim): r for r in RULES}
    foreign = {r.flax_leaf if to_flax else r.torch_leaf for r in RULES} - {
        r.torch_leaf if to_flax else r.flax_leaf for r in RULES}
    leaves = {leaf for leaf, _ in own}
    out, problems = {}, []
    for name, value in tensors.items():
        value = np.asarray(value)
        prefix, _, leaf = name.rpartition(".")
        rule = own.get((leaf, value.ndim))
        if leaf in foreign or (leaf in leaves and rule is None):
            problems.append(f"{name} {value.shape}")
        elif rule is None:
            out[name] = value
        else:
            new_leaf = rule.flax_leaf if to_flax else rule.torch_leaf
            converted = (rule.to_flax if to_flax else rule.to_torch)(value)
            if converted is not None:
                out[f"{prefix}.{new_leaf}" if prefix else new_leaf] = converted
    if problems:
        source = "PyTorch" if to_flax else "Flax"
        raise ConversionError(
            f"no rule converts: {'; '.join(problems)} (expected {source} names: "
            + ", ".join(sorted({f"{r.torch_leaf if to_flax else r.flax_leaf} ({r.ndim}-D, "
                                f"{r.layer})" for r in RULES if r.flax_leaf}))
            + "; are the weights from the other framework?)")
    return out


def torch_to_flax(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{"fc.weight": (out, in), "conv1.weight": OIHW, "bn.running_var": ...}`` ->
    ``{"fc.kernel": (in, out), "conv1.kernel": HWIO, "bn.var": ...}`` by :data:`RULES`."""
    return _convert(tensors, to_flax=True)


def flax_to_torch(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of :func:`torch_to_flax` (``num_batches_tracked`` left out)."""
    return _convert(params, to_flax=False)


def flat_arrays(state: nnx.State) -> dict[str, np.ndarray]:
    """An NNX state (parameters, or their gradients) as ``{"layers.0.kernel": array, ...}``."""
    return {".".join(map(str, path)): np.asarray(var.get_value() if hasattr(var, "get_value")
                                                 else var)
            for path, var in nnx.to_flat_state(state)}


def flax_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters as ``{"layers.0.kernel": array, ...}``."""
    return flat_arrays(nnx.state(model, nnx.Param))


def flax_state(model: nnx.Module) -> dict[str, np.ndarray]:
    """Parameters and the other state (BatchNorm's ``mean``/``var``, dropout's ``draws``):
    what a checkpoint holds."""
    return flat_arrays(nnx.state(model))


def mismatches(expected: Mapping[str, tuple[int, ...]], arrays: Mapping[str, np.ndarray]
               ) -> list[str]:
    """Every name missing from ``arrays``, unexpected in it, or of another shape than
    ``expected`` (name -> shape), as readable phrases."""
    problems = [f"missing {name} {tuple(shape)}" for name, shape in expected.items()
                if name not in arrays]
    problems += [f"unexpected {name} {tuple(np.shape(arrays[name]))}"
                 for name in arrays if name not in expected]
    problems += [f"shape of {name}: model {tuple(shape)}, weights {tuple(np.shape(arrays[name]))}"
                 for name, shape in expected.items()
                 if name in arrays and tuple(np.shape(arrays[name])) != tuple(shape)]
    return problems


def load_flax_params(model: nnx.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Set every parameter and state variable of ``model`` from ``arrays``, by name.

    Names and shapes must match exactly, except that state other than parameters (BatchNorm
    statistics, dropout counters) may be absent and then keeps its value; otherwise one
    :class:`ConversionError` lists every missing, unexpected and mis-shaped entry.
    """
    flat = nnx.to_flat_state(nnx.state(model))
    expected = {".".join(map(str, path)): (path, var) for path, var in flat
                if isinstance(var, nnx.Param) or ".".join(map(str, path)) in arrays}
    problems = mismatches({name: var.get_value().shape for name, (_, var) in expected.items()},
                          arrays)
    if problems:
        raise ConversionError(
            f"weights do not match {type(model).__name__} ({len(problems)} problems): "
            + "; ".join(problems)
        )
    updated = [(path, var.replace(jnp.asarray(arrays[name], dtype=var.get_value().dtype)))
               for name, (path, var) in expected.items()]
    nnx.update(model, nnx.from_flat_state(updated))


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise ConversionError(f"{path}: file not found") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConversionError(f"{path}: not a readable safetensors file ({exc})") from None


def write_safetensors(arrays: Mapping[str, np.ndarray], path: str | os.PathLike,
                      framework: str | None = None) -> None:
    """Write atomically: a temporary file, then a rename, so a crash never leaves half a file.
    ``framework`` ("jax" or "torch"): whose names and layouts the arrays are in, recorded in the
    file's metadata (read back by :func:`weights_framework`)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    # reshape: np.ascontiguousarray makes a 0-d array (a dropout or BatchNorm counter) 1-d
    save_file({k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in arrays.items()}, tmp,
              metadata=None if framework is None else {"framework": framework})
    os.replace(tmp, path)


def weights_framework(path: str | os.PathLike) -> str | None:
    """The framework a safetensors file records that its weights are in ("jax" or "torch"), as
    :func:`write_safetensors` and checkpoints record it; None for a file without the record."""
    try:
        with safe_open(str(path), "np") as f:
            recorded = (f.metadata() or {}).get("framework")
    except FileNotFoundError:
        raise ConversionError(f"{path}: file not found") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConversionError(f"{path}: not a readable safetensors file ({exc})") from None
    return recorded if recorded in ("jax", "torch") else None


def load_torch_weights(model: nnx.Module, path: str | os.PathLike) -> None:
    """Load a PyTorch ``state_dict`` saved as safetensors into a Flax model."""
    load_flax_params(model, torch_to_flax(read_safetensors(path)))


def read_torch_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A PyTorch ``state_dict`` saved with ``torch.save`` (``.pt``/``.pth``), read with
    ``torch.load(weights_only=True)``: tensors only, never arbitrary pickled code."""
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{path}: reading a .pt/.pth file needs PyTorch "
                              f"(pip install torch==2.13.0); safetensors files do not") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConversionError(f"{path}: file not found") from None
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch bolds part of its message
        unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if unsafe:
            raise ConversionError(
                f"{path}: refused: it holds a pickled reference to {unsafe.group(1)}, code that "
                f"would run on loading, not just tensors (only safetensors and weights-only "
                f"PyTorch files are read)") from None
        reason = (text.strip().splitlines() or [type(exc).__name__])[0]
        raise ConversionError(f"{path}: unreadable as a weights-only PyTorch file "
                              f"({reason})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path}: expected a state_dict (a dict of tensors), got "
                              f"{type(state).__name__}")
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


def convert_file(source: str, target: str, src: str | os.PathLike,
                 dst: str | os.PathLike) -> dict[str, np.ndarray]:
    """``jaxnets convert``: weights from one framework's names and layouts to the other's.

    ``src``: safetensors (or a ``.pt``/``.pth`` state_dict when ``source`` is torch); ``dst`` is
    always written as safetensors. Returns the converted arrays.
    """
    if {source, target} != {"torch", "jax"}:
        raise ConversionError(f"--from {source} --to {target}: convert between 'torch' and "
                              f"'jax' (one each)")
    suffix = os.path.splitext(str(src))[1].lower()
    if suffix in (".pt", ".pth"):
        if source != "torch":
            raise ConversionError(f"{src}: a .pt/.pth file holds PyTorch weights: use --from torch")
        arrays = read_torch_file(src)
    else:
        arrays = read_safetensors(src)
    converted = torch_to_flax(arrays) if source == "torch" else flax_to_torch(arrays)
    write_safetensors(converted, dst, framework=target)
    return converted
