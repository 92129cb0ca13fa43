"""Which torch tensor becomes which Flax variable, by which layout rule: proposed, written as
an editable ``mapping.toml``, read back, and applied.

The proposal pairs parameterised layers by execution order and kind (Linear/nnx.Linear,
Conv2d/nnx.Conv, Conv1d/nnx.Conv with one spatial dim, BatchNorm/nnx.BatchNorm,
LayerNorm/nnx.LayerNorm, Embedding/nnx.Embed) and checks every converted shape; what it
cannot pair it lists, it never guesses. The layout rules are the named functions of
:mod:`jaxnets.convert`, each entry naming its rule; the HWC flatten rule is proven on the
layer's own input (:func:`prove_flatten_orders`).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from jaxnets import convert
from jaxnets.errors import ConfigError

RULES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "same": np.array,  # a copy: a torch tensor's NumPy view would follow its in-place updates
    "linear_torch_to_flax": convert.linear_torch_to_flax,
    "conv_torch_to_flax": convert.conv_torch_to_flax,
    "conv1d_torch_to_flax": convert.conv1d_torch_to_flax,
    "embedding_torch_to_flax": convert.embedding_torch_to_flax,
}
_NORM = {name: (flax, "same") for name, flax in convert.NORM_TORCH_TO_FLAX.items() if flax}
# kind -> {torch tensor name: (flax variable name, rule)}
PARAM_RULES: dict[str, dict[str, tuple[str, str]]] = {
    "linear": {"weight": ("kernel", "linear_torch_to_flax"), "bias": ("bias", "same")},
    "conv": {"weight": ("kernel", "conv_torch_to_flax"), "bias": ("bias", "same")},
    "conv1d": {"weight": ("kernel", "conv1d_torch_to_flax"), "bias": ("bias", "same")},
    "batchnorm": _NORM,
    "layernorm": _NORM,
    "embedding": {"weight": ("embedding", "embedding_torch_to_flax")},
}
DROPPED = {"num_batches_tracked"}  # torch bookkeeping with no Flax counterpart
# the first Linear after a flatten, for a port that flattens NHWC: "linear_hwc_torch_to_flax(C,H,W)"
HWC_RULE = "linear_hwc_torch_to_flax"
_HWC = re.compile(rf"{HWC_RULE}\((\d+),(\d+),(\d+)\)")


def hwc_rule(chw: tuple[int, int, int]) -> str:
    return f"{HWC_RULE}({','.join(map(str, chw))})"


def rule_chw(name: str) -> tuple[int, int, int] | None:
    """(C, H, W) of an HWC flatten rule's name, else None."""
    found = _HWC.fullmatch(name.replace(" ", ""))
    return tuple(int(v) for v in found.groups()) if found else None


def rule_function(name: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """The function a rule's name stands for (None for an unknown name)."""
    chw = rule_chw(name)
    if chw is not None:
        return lambda weight: convert.linear_hwc_torch_to_flax(weight, chw)
    return RULES.get(name)


def torch_kind(module) -> str | None:
    from torch import nn

    kinds = {nn.Linear: "linear", nn.Conv2d: "conv", nn.Conv1d: "conv1d",
             nn.BatchNorm1d: "batchnorm", nn.BatchNorm2d: "batchnorm",
             nn.LayerNorm: "layernorm", nn.Embedding: "embedding"}
    return next((k for cls, k in kinds.items() if isinstance(module, cls)), None)


def flax_kind(module: nnx.Module) -> str | None:
    """The layer kind of a Flax module: by its nnx class, or as the module declares it in a
    ``torch_kind`` class attribute (a hand-written port of a torch layer, such as the zoo's
    BatchNorm with torch's conventions)."""
    kinds = {nnx.Linear: "linear", nnx.Conv: "conv", nnx.BatchNorm: "batchnorm",
             nnx.LayerNorm: "layernorm", nnx.Embed: "embedding"}
    kind = next((k for cls, k in kinds.items() if isinstance(module, cls)),
                getattr(type(module), "torch_kind", None))
    return "conv1d" if kind == "conv" and len(module.kernel_size) == 1 else kind


def torch_tensors(module) -> dict[str, np.ndarray]:
    """A module's own parameters and buffers (not its children's)."""
    named = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    return {n: t.detach().cpu().numpy() for n, t in named if n not in DROPPED}


def flax_variables(module: nnx.Module) -> dict[str, np.ndarray]:
    """A leaf module's parameters and batch statistics, ``{"kernel": array, "mean": ...}``."""
    from torchref.verify.capture import flat

    return flat(nnx.state(module, (nnx.Param, nnx.BatchStat)))


@dataclass
class Mapping:
    """``layers``: (torch module, flax module) pairs in execution order; ``params``: torch
    tensor name -> (flax variable path, rule name); ``problems``: what could not be paired."""

    layers: list[tuple[str, str]] = field(default_factory=list)
    params: dict[str, tuple[str, str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def to_toml(self) -> str:
        lines = ["# jaxnets verify: torch tensor -> Flax variable, and the layout rule that",
                 "# converts it. Edit and pass back with --mapping. Rules:",
                 f"# {', '.join(RULES)}, {HWC_RULE}(C,H,W)",
                 "", "[layers]  # torch module = flax module, in execution order"]
        lines += [f'"{t}" = "{f}"' for t, f in self.layers]
        lines += ["", "[params]"]
        lines += [f'"{t}" = {{ flax = "{f}", rule = "{r}" }}'
                  for t, (f, r) in self.params.items()]
        if self.problems:
            lines += ["", "# not mapped:"] + [f"#   {p}" for p in self.problems]
        return "\n".join(lines) + "\n"

    def torch_to_flax(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Torch-named tensors (weights or their gradients) -> Flax paths and layouts."""
        return {f: rule_function(r)(tensors[t]) for t, (f, r) in self.params.items()
                if t in tensors}

    def input_to_flax(self, layer: str, array: np.ndarray) -> np.ndarray:
        """A torch layer's input (or its gradient), already in the Flax model's layout, in
        the order its Flax layer reads: flattened (C, H, W) -> (H, W, C) under the HWC rule."""
        chw = rule_chw(self.params.get(f"{layer}.weight", ("", ""))[1])
        return array if chw is None else convert.flat_chw_to_hwc(array, chw)


def _modules(torch_model, flax_model) -> tuple[dict, dict]:
    return (dict(torch_model.named_modules()),
            {".".join(map(str, p)): m for p, m in nnx.iter_modules(flax_model)})


def propose(torch_model, flax_model, torch_order: list[str], flax_order: list[str]) -> Mapping:
    """Pair the parameterised leaf layers of both models in execution order (the order
    names of the first call of each), checking kind and every converted shape."""
    torch_mods, flax_mods = _modules(torch_model, flax_model)
    torch_layers = [n for n in dict.fromkeys(o.split("#")[0] for o in torch_order)
                    if torch_tensors(torch_mods[n])]
    flax_layers = [n for n in dict.fromkeys(o.split("#")[0] for o in flax_order)
                   if flax_variables(flax_mods[n])]
    mapping, j = Mapping(), 0
    for name in torch_layers:
        module, kind = torch_mods[name], torch_kind(torch_mods[name])
        if kind is None:
            mapping.problems.append(f"torch {name} ({type(module).__name__}): no rule for this "
                                    f"layer type; map its tensors by hand")
            continue
        rules = PARAM_RULES[kind]
        tensors = torch_tensors(module)
        wanted = {rules[t][0]: RULES[rules[t][1]](v).shape for t, v in tensors.items()
                  if t in rules}
        for k in range(j, len(flax_layers)):
            candidate = flax_mods[flax_layers[k]]
            found = {n: v.shape for n, v in flax_variables(candidate).items()}
            if flax_kind(candidate) == kind and found == wanted:
                skipped = flax_layers[j:k]
                mapping.problems += [f"flax {s}: skipped while pairing torch {name}"
                                     for s in skipped]
                mapping.layers.append((name, flax_layers[k]))
                for t in tensors:
                    mapping.params[f"{name}.{t}"] = (f"{flax_layers[k]}.{rules[t][0]}",
                                                     rules[t][1])
                j = k + 1
                break
        else:
            shapes = ", ".join(f"{n} {tuple(s)}" for n, s in wanted.items())
            mapping.problems.append(f"torch {name} ({type(module).__name__}, needs {shapes}): "
                                    f"no Flax layer of that kind and shapes follows "
                                    f"{flax_layers[j - 1] if j else 'the start'}")
    mapping.problems += [f"flax {n}: not paired with any torch layer" for n in flax_layers[j:]]
    return mapping


def read_mapping(path: str | Path, torch_model, flax_model) -> Mapping:
    """A ``mapping.toml`` (as :meth:`Mapping.to_toml` writes it), checked against both
    models: every problem (a missing tensor or variable, an unknown rule, a shape that does
    not convert) is listed at once in one ConfigError."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--mapping {path}: file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--mapping {path}: not valid TOML ({exc})") from None
    mapping, problems = Mapping(), []
    torch_all = {n: t.detach().cpu().numpy() for n, t in
                 [*torch_model.named_parameters(), *torch_model.named_buffers()]
                 if n.rpartition(".")[2] not in DROPPED}
    flax_all = flax_variables(flax_model)
    for t, entry in (data.get("params") or {}).items():
        if not isinstance(entry, dict) or set(entry) != {"flax", "rule"}:
            problems.append(f"params.{t}: expected {{ flax = ..., rule = ... }}")
            continue
        f, rule = entry["flax"], entry["rule"]
        if t not in torch_all:
            problems.append(f"torch has no tensor {t}")
        if f not in flax_all:
            problems.append(f"flax has no variable {f}")
        if rule_function(rule) is None:
            problems.append(f"{t}: unknown rule {rule!r} (known: {', '.join(RULES)}, "
                            f"{HWC_RULE}(C,H,W))")
        elif t in torch_all and f in flax_all:
            try:
                converted = np.shape(rule_function(rule)(torch_all[t]))
            except ValueError:  # an HWC rule whose C*H*W is not the weight's input size
                converted = None
            if converted != flax_all[f].shape:
                problems.append(f"{t} {torch_all[t].shape} by {rule} gives {converted}, "
                                f"flax {f} is {flax_all[f].shape}")
        mapping.params[t] = (f, rule)
    targets = [f for f, _ in mapping.params.values()]
    problems += [f"flax {f} is mapped {targets.count(f)} times"
                 for f in dict.fromkeys(targets) if targets.count(f) > 1]
    problems += [f"torch {t} is not mapped" for t in torch_all if t not in mapping.params]
    problems += [f"flax {f} is not mapped" for f in flax_all if f not in targets]
    mapping.layers = [(str(t), str(f)) for t, f in (data.get("layers") or {}).items()]
    if problems:
        raise ConfigError(f"--mapping {path}: {len(problems)} problems: " + "; ".join(problems))
    return mapping


def load_into_flax(mapping: Mapping, torch_model, flax_model: nnx.Module) -> None:
    """Set every mapped Flax variable from the torch model's tensors (in the Flax model's
    own dtype)."""
    tensors = {n: t.detach().cpu().numpy() for n, t in
               [*torch_model.named_parameters(), *torch_model.named_buffers()]}
    set_flax_variables(flax_model, mapping.torch_to_flax(tensors))


def set_flax_variables(flax_model: nnx.Module, values: dict[str, Any]) -> None:
    state = nnx.state(flax_model, (nnx.Param, nnx.BatchStat))
    updated = []
    for path, var in nnx.to_flat_state(state):
        name = ".".join(map(str, path))
        if name in values:
            dtype = var.get_value().dtype
            updated.append((path, var.replace(np.asarray(values[name]).astype(dtype))))
    nnx.update(flax_model, nnx.from_flat_state(updated))


def prove_flatten_orders(mapping: Mapping, torch_calls: list, flax_inputs: dict[str, Any]
                         ) -> list[str]:
    """For each Linear fed a flattened image (a 4-D activation of C*H*W values per example
    earlier in the torch run), run it alone on its Flax input under both orders: the plain
    transpose (a port that flattens in torch's (C, H, W) order) and the HWC rule (a port that
    flattens NHWC). Where only the HWC rule reproduces torch's output, the mapping takes it.
    Returns the torch layers switched to it."""
    switched = []
    for index, call in enumerate(torch_calls):
        entry = mapping.params.get(f"{call.name}.weight")
        flax_layer = dict(mapping.layers).get(call.name)
        if entry is None or entry[1] != "linear_torch_to_flax" or flax_layer not in flax_inputs:
            continue
        weight = call.module.weight.detach().cpu().numpy().astype(np.float64)
        chw = _flattened_shape(torch_calls[:index], weight.shape[1])
        if chw is None:
            continue
        x = np.asarray(flax_inputs[flax_layer], np.float64)
        want = call.output.detach().cpu().numpy().astype(np.float64)
        bias = 0.0 if call.module.bias is None else call.module.bias.detach().cpu().numpy()
        error = {rule: np.abs(x @ rule_function(rule)(weight) + bias - want).max()
                 for rule in ("linear_torch_to_flax", hwc_rule(chw))}
        # the right order reproduces torch's output up to rounding (~1e-7 relative in
        # float32), the wrong one misses by the output's own size: 100x apart is no accident
        if error[hwc_rule(chw)] * 100 < error["linear_torch_to_flax"]:
            mapping.params[f"{call.name}.weight"] = (entry[0], hwc_rule(chw))
            switched.append(call.name)
    return switched


def _flattened_shape(earlier: list, features: int) -> tuple[int, int, int] | None:
    """(C, H, W) of the latest 4-D activation (a leaf's output or input) holding ``features``
    values per example, or None."""
    for call in reversed(earlier):
        for tensor in (call.output, call.input):
            shape = tuple(getattr(tensor, "shape", ()))
            if len(shape) == 4 and shape[1] * shape[2] * shape[3] == features:
                return shape[1:]
    return None
