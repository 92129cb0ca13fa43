"""The verdict and its evidence: ``report.json`` (every row), ``report.md`` (a compact table),
``mapping.toml`` (the mapping used, editable) and ``errors.png`` (error per layer, propagated
and shadow)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jaxnets.report import write_json
from torchref.verify import checks
from torchref.verify.checks import Row


@dataclass
class Report:
    rows: list[Row]
    mapping: Any  # torchref.verify.mapping.Mapping
    torch_order: list[str]
    dtype: str
    passed: bool = False
    first_divergent_layer: str | None = None
    verdict: str = ""
    divergent_row: Row | None = None  # the failed row the verdict rests on
    files: dict[str, str] = field(default_factory=dict)

    def failed(self) -> list[Row]:
        return [r for r in self.rows if not r.passed]

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed, "first_divergent_layer": self.first_divergent_layer,
            "verdict": self.verdict, "dtype": self.dtype,
            "noise_model": {"reference": "PyTorch float64",
                            "float32": f"err(flax32, ref64) <= {checks.NOISE_MARGIN:g} * "
                                       f"err(torch32, ref64) + {checks.FLOOR_ULPS} * eps32 * "
                                       f"max|ref|",
                            "margin": checks.NOISE_MARGIN, "floor_ulps": checks.FLOOR_ULPS,
                            "training_floor_ulps": checks.TRAINING_FLOOR_ULPS,
                            "float64_tolerances": checks.TIGHT},
            "mapping": {"layers": self.mapping.layers,
                        "params": {t: {"flax": f, "rule": r}
                                   for t, (f, r) in self.mapping.params.items()},
                        "problems": self.mapping.problems},
            "torch_execution_order": self.torch_order,
            "rows": [{k: v for k, v in asdict(r).items()} | {"margin": r.margin}
                     for r in self.rows],
        }

    def write(self, out: str | Path) -> None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "report.json", self.as_dict())
        (out / "report.md").write_text(markdown(self), encoding="utf-8")
        (out / "mapping.toml").write_text(self.mapping.to_toml(), encoding="utf-8")
        self.files = {"json": str(out / "report.json"), "md": str(out / "report.md"),
                      "mapping": str(out / "mapping.toml")}
        figure = error_figure(self)
        if figure is not None:
            figure.savefig(out / "errors.png", dpi=100)
            self.files["figure"] = str(out / "errors.png")


def _describe(row: Row) -> str:
    own = (f", PyTorch's own float32 error {row.torch_error:.3g}" if row.dtype == "float32"
           else "")
    return (f"{row.check} ({row.mode}, {row.dtype}) max-abs error {row.error:.3g} against "
            f"PyTorch float64, bound {row.bound:.3g}{own}, {row.margin:.3g}x the bound")


def first_divergence(report: Report) -> tuple[str | None, str, Row | None]:
    """The first layer, in execution order, judged "bug": a layer whose own (shadow or
    alone) check fails, or, where a layer's propagated *input* already differs while the
    layer before it still matched, the code between those two layers. Returns the location,
    the verdict and the failed row it rests on."""
    if report.mapping.problems:
        return (None, "not equivalent: the weights could not be mapped: "
                + "; ".join(report.mapping.problems), None)
    for dtype in ("float32", "float64"):
        rows = [r for r in report.rows if r.dtype == dtype]
        bad = [r for r in rows if not r.passed]
        if not bad:
            continue
        previous = None
        for t_name, _ in report.mapping.layers:
            layer_rows = [r for r in bad if r.layer == t_name or
                          r.layer.rpartition(".")[0] == t_name]
            entering = [r for r in layer_rows if r.check == "input"]
            if entering:
                where = f"between {previous} and {t_name}" if previous else \
                    f"before {t_name} (between the input and the first layer)"
                between = [n for n in report.torch_order if n not in dict(report.mapping.layers)]
                between = _between(report.torch_order, previous, t_name, between)
                return where, (f"not equivalent: the divergence enters in code that is no mapped "
                               f"layer, {where}" + (f" (torch modules there: "
                                                    f"{', '.join(between)})" if between else "")
                               + f": {t_name} {_describe(entering[0])}"), entering[0]
            own = [r for r in layer_rows if r.mode.startswith(("shadow", "alone"))]
            if own:
                return t_name, f"not equivalent: first divergent layer {t_name}: " + \
                    _describe(own[0]), own[0]
            called = [r for r in layer_rows if r.check == "forward"
                      and r.mode.startswith("propagated")]
            if called:  # its input matches and alone it agrees: the call differs (a flag)
                return t_name, (f"not equivalent: first divergent layer {t_name}, as called in "
                                f"the model (its input matches and, run alone, it agrees: check "
                                f"what it is called with, e.g. a train/eval flag): "
                                + _describe(called[0])), called[0]
            previous = t_name
        loss = [r for r in bad if r.layer == "loss"]
        if loss and not any(r.layer == "output" for r in bad):
            # every layer's output matched, so the loss function itself differs (summed for
            # averaged, label smoothing): the wrong gradients below it are inherited from it
            return ("loss", f"not equivalent: the loss function: loss {_describe(loss[0])}",
                    loss[0])
        backward = _backward_entry(report, bad)
        if backward is not None:
            return backward
        first = bad[0]
        where = "after the last mapped layer" if first.layer in ("output", "loss") \
            else first.layer
        return where, f"not equivalent: {where}: {first.layer} {_describe(first)}", first
    worst = max(report.rows, key=lambda r: r.margin, default=None)
    what = {"float32": "within float32 precision noise of PyTorch (float64 reference)",
            "float64": "within the float64 tolerances",
            "both": "within float32 precision noise of PyTorch (float64 reference) and within "
                    "the float64 tolerances"}[report.dtype]
    return None, (f"equivalent: {len(report.rows)} checks, every one {what}"
                  + (f"; closest: {worst.layer} {worst.check} ({worst.mode}, {worst.dtype}) at "
                     f"{worst.margin:.2g}x its bound" if worst else "")), None


def _backward_entry(report: Report, bad: list[Row]) -> tuple[str, str, Row] | None:
    """Where a backward divergence enters when every forward row and every layer alone
    agrees: after the last layer (in execution order) whose incoming gradient differs, the
    gradient reaching the next layer's output still matched, so the code between the two (a
    functional pool, a reshape) differentiates differently: the backward "between" rule."""
    layers = [t for t, _ in report.mapping.layers]
    failing = [t for t in layers if any(r.layer == t and r.check == "backward" and
                                        r.mode.startswith("propagated") for r in bad)]
    if not failing:
        return None
    last = failing[-1]
    row = next(r for r in bad if r.layer == last and r.check == "backward")
    after = layers[layers.index(last) + 1] if last != layers[-1] else None
    where = f"between {last} and {after}" if after else f"between {last} and the loss"
    return where, (f"not equivalent: the backward divergence enters in code that is no mapped "
                   f"layer, {where} (the gradient reaching "
                   + (f"{after}'s output still matches" if after else "the output matches")
                   + f", the one reaching {last}'s output does not): {last} {_describe(row)}"),\
        row


def _between(order: list[str], previous: str | None, layer: str, unmapped: list[str]
             ) -> list[str]:
    start = order.index(previous) + 1 if previous in order else 0
    stop = order.index(layer) if layer in order else len(order)
    return [n for n in order[start:stop] if n in unmapped]


def markdown(report: Report) -> str:
    lines = [f"# jaxnets verify ({report.dtype})", "", f"**{report.verdict}**", "",
             f"Reference: PyTorch in float64. Float32 verdict: precision noise when "
             f"err(flax32) <= {checks.NOISE_MARGIN:g} x err(torch32) + {checks.FLOOR_ULPS} "
             f"float32 ulps of max|ref|; bug otherwise.", "",
             "| layer | check | mode | dtype | max abs | mean abs | median abs | max rel | "
             "cosine | torch own | bound | verdict |", "|---|---|---|---|---:|---:|---:|---:|"
             "---:|---:|---:|---|"]
    for r in report.rows:
        s = r.stats
        lines.append(f"| {r.layer} | {r.check} | {r.mode} | {r.dtype} | {s['max_abs']:.3g} | "
                     f"{s['mean_abs']:.3g} | {s['median_abs']:.3g} | {s['max_rel']:.3g} | "
                     f"{s['cosine']:.6f} | {r.torch_error:.3g} | {r.bound:.3g} | "
                     f"{r.verdict if r.passed else '**' + r.verdict + '**'} |")
    if report.mapping.problems:
        lines += ["", "## Not mapped", ""] + [f"- {p}" for p in report.mapping.problems]
    return "\n".join(lines) + "\n"


def error_figure(report: Report):
    """Forward max-abs error per mapped layer, propagated and shadow, with PyTorch's own
    float32 error and the bound: one panel per dtype (rows) and mode (columns: eval, train)."""
    from matplotlib.figure import Figure

    layers = [t for t, _ in report.mapping.layers]
    dtypes = [d for d in ("float32", "float64") if any(r.dtype == d for r in report.rows)]
    modes = [m for m in ("eval", "train") if any(r.mode == f"propagated {m}"
                                                 for r in report.rows)]
    if not layers or not dtypes or not modes:
        return None
    figure = Figure(figsize=(max(6, len(layers) * 0.7) * len(modes), 3.2 * len(dtypes)),
                    layout="tight")
    for i, dtype in enumerate(dtypes):
        for j, mode in enumerate(modes):
            axes = figure.add_subplot(len(dtypes), len(modes), i * len(modes) + j + 1)
            _error_panel(axes, report, layers, dtype, mode)
    return figure


def _error_panel(axes, report: Report, layers: list[str], dtype: str, mode: str) -> None:
    """One dtype and mode: Flax's error propagated and shadow, the bound, torch's own."""
    def values(picked, what):
        return [max(what(picked[n]), 1e-18) if n in picked else float("nan") for n in layers]

    for how, style in (("propagated", "o-"), ("shadow", "s--")):
        picked = {r.layer: r for r in report.rows
                  if r.dtype == dtype and r.check == "forward" and r.mode == f"{how} {mode}"}
        axes.semilogy(range(len(layers)), values(picked, lambda r: r.error), style,
                      label=f"flax, {how}")
        if how == "propagated":
            axes.semilogy(range(len(layers)), values(picked, lambda r: r.bound), ":",
                          color="grey", label="bound")
            if dtype == "float32":
                axes.semilogy(range(len(layers)), values(picked, lambda r: r.torch_error),
                              "x", color="black", label="torch float32")
    axes.set_xticks(range(len(layers)), layers, rotation=30, fontsize=7)
    axes.set_ylabel(f"max-abs error ({dtype})")
    axes.set_title(f"{mode} mode", fontsize=9)
    axes.legend(fontsize=7)
