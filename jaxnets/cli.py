"""The ``jaxnets`` command: parses arguments and dispatches; the work lives in the modules.

Errors the user can cause print one line on stderr (a traceback only with ``--debug``); exit
code 2 for usage errors, 1 for runtime failures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from contextlib import AbstractContextManager
from pathlib import Path

from jaxnets.errors import ConfigError, JaxnetsError


class Parser(argparse.ArgumentParser):
    """argparse with jaxnets' error style: one line on stderr (no usage block), exit 2."""

    def error(self, message: str):
        command = self.prog.removeprefix("jaxnets").strip()  # "train", or "" at the top
        print(f"jaxnets: error: {f'{command}: ' if command else ''}{message} (see "
              f"`{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def _add_run_options(p: argparse.ArgumentParser, config_optional: bool = False) -> None:
    p.add_argument("config", nargs="?" if config_optional else None,
                   help="a name from configs/ (see `jaxnets list`) or a TOML file")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--train-limit", type=int, metavar="N",
                   help="use only the first N training examples")
    p.add_argument("--dataset", help="override data.dataset (mnist, fashion_mnist, ...)")
    p.add_argument("--data-dir", metavar="DIR", help="a directory holding the four IDX files")
    p.add_argument("--out", metavar="DIR", help="output directory (default runs/CONFIG/...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override any config key, e.g. --set optimizer.learning_rate=0.01")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="where to train (default cpu); on a GPU, TF32 is off in both "
                        "frameworks, as for parity and bench")
    p.add_argument("--devices", type=int, default=1, metavar="N",
                   help="data parallel on N devices: JAX's SPMD mesh (on a CPU, N host "
                        "devices), PyTorch DDP on N processes (default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="jaxnets",
        description="The classic small networks in JAX/Flax and PyTorch, provably the same.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--cpu-dispatch", choices=("sync", "async"), default=None,
                        help="how JAX runs a jitted call on the CPU: on the calling thread "
                             "(sync, the default: no thread hand-off per call) or on a client "
                             "thread (async, JAX's own default); see "
                             "jaxnets.numerics.set_cpu_dispatch")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("list", help="the experiments, one line each")
    train = sub.add_parser("train", help="train one config in one framework")
    _add_run_options(train, config_optional=True)
    train.add_argument("--framework", choices=("jax", "torch"),
                       help="default jax (on --resume: the checkpoint's)")
    train.add_argument("--save-every", type=int, default=0, metavar="N",
                       help="save a checkpoint every N epochs (always after the last)")
    train.add_argument("--resume", metavar="DIR",
                       help="continue the run in DIR (its latest checkpoint, or a checkpoint "
                            "directory) to the same weights an uninterrupted run reaches")
    train.add_argument("--coordinator", metavar="HOST:PORT",
                       help="JAX on several processes (one per host or GPU): process 0's "
                            "address (or JAXNETS_COORDINATOR); --devices is then the global "
                            "count, and only process 0 writes the run")
    train.add_argument("--num-processes", type=int, metavar="P",
                       help="how many processes (or JAXNETS_NUM_PROCESSES)")
    train.add_argument("--process-id", type=int, metavar="I",
                       help="this process, 0 to P-1 (or JAXNETS_PROCESS_ID)")
    compare = sub.add_parser("compare", help="train in JAX and PyTorch side by side (main job)")
    _add_run_options(compare)
    compare.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                         help="both frameworks' float type (default float32)")
    summary = sub.add_parser("summary", help="every layer's output shape and parameter count, "
                             "JAX and PyTorch side by side")
    summary.add_argument("config", help="a name from configs/ (see `jaxnets list`) or a TOML file")
    summary.add_argument("--json", action="store_true", help="print the summaries as JSON")
    parity = sub.add_parser("parity", help="check forward, gradients, steps and trajectories "
                            "agree between JAX and PyTorch")
    parity.add_argument("configs", nargs="*", metavar="CONFIG", help="default: every config")
    parity.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parity.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parity.add_argument("--steps", type=int, default=100, metavar="K",
                        help="length of the training trajectory compared (default 100)")
    parity.add_argument("--dataset", default="fashion_mnist",
                        help="image inputs for the image configs (default fashion_mnist)")
    parity.add_argument("--data-dir", metavar="DIR", help="a directory holding the IDX files")
    parity.add_argument("--out", metavar="DIR", help="output directory (default runs/parity)")
    bench = sub.add_parser("bench", help="training and inference throughput, JAX vs PyTorch")
    bench.add_argument("configs", nargs="*", metavar="CONFIG", help="default: every config")
    bench.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    bench.add_argument("--repeats", type=int, default=5, help="timed runs after a warm-up")
    bench.add_argument("--devices", type=int, default=1, metavar="N",
                       help="instead of the modes: training on 1 and on N devices per "
                            "framework (JAX mesh, PyTorch DDP), and the scaling efficiency")
    bench.add_argument("--steps", type=int, default=100, help="training steps per timed run")
    bench.add_argument("--modes", default="jit_step,scan,stream,eager,compile",
                       help="comma-separated subset of jit_step,scan,stream (JAX), "
                            "eager,compile (PyTorch)")
    bench.add_argument("--dataset", default="fashion_mnist",
                       help="data for the image configs (default fashion_mnist)")
    bench.add_argument("--out", metavar="DIR", help="output directory (default runs/bench)")
    reproduce = sub.add_parser("reproduce", help="run every experiment at full length in both "
                               "frameworks; one table against the sources' results")
    reproduce.add_argument("configs", nargs="*", metavar="CONFIG", help="default: every config")
    reproduce.add_argument("--dataset", help="image data for the image experiments (default: "
                           "each config's, Fashion-MNIST where MNIST is unavailable)")
    reproduce.add_argument("--data-dir", metavar="DIR", help="a directory holding the IDX files")
    reproduce.add_argument("--out", metavar="DIR", help="output directory (default "
                           "runs/reproduce)")
    reproduce.add_argument("--resume", action="store_true",
                           help="keep the experiments an interrupted run into --out finished "
                                "(same config) and run the rest")
    reproduce.add_argument("--quiet", action="store_true", help="no progress bar")
    download = sub.add_parser("download", help="fetch a dataset's IDX files into the data "
                              "cache, checked against pinned SHA-256 checksums")
    download.add_argument("dataset", choices=("mnist", "fashion_mnist"))
    download.add_argument("--dir", metavar="DIR", help="where to put them (default "
                          "$JAXNETS_DATA_DIR, else ~/.cache/jaxnets/DATASET)")
    predict = sub.add_parser("predict", help="label images with a trained model (either "
                             "framework)")
    predict.add_argument("run_dir", metavar="RUN_DIR",
                         help="the --out directory of `jaxnets train` or `compare`, or a "
                              "checkpoint")
    predict.add_argument("--images", required=True, metavar="FILE|DIR",
                         help="an IDX image file (.gz or not), a PNG, or a directory of PNGs "
                              "(28x28 grey)")
    predict.add_argument("--limit", type=int, default=0, metavar="N",
                         help="only the first N images")
    predict.add_argument("--framework", choices=("jax", "torch"),
                         help="which framework runs the model (default: the weights')")
    predict.add_argument("--weights", metavar="FILE",
                         help="weights to use instead of the run's (safetensors, or a .pt "
                              "state_dict read with weights_only=True)")
    predict.add_argument("--out", metavar="FILE",
                         help="CSV to write (default RUN_DIR/predictions.csv)")
    predict.add_argument("--show", type=int, default=20, metavar="N",
                         help="print the first N predictions (default 20)")
    convert = sub.add_parser("convert", help="convert weights between PyTorch and Flax names "
                             "and layouts (safetensors out)")
    convert.add_argument("--from", dest="source", choices=("torch", "jax"), required=True)
    convert.add_argument("--to", dest="target", choices=("torch", "jax"), required=True)
    convert.add_argument("input", help="safetensors file (or a .pt/.pth state_dict from torch)")
    convert.add_argument("output", help="safetensors file to write")
    _add_verify(sub)
    return parser


def _add_verify(sub) -> None:
    verify = sub.add_parser("verify", help="prove that your own Flax port computes what your "
                            "PyTorch model computes, layer by layer")
    verify.add_argument("--torch", required=True, metavar="SPEC",
                        help="pkg.module:factory or path/file.py:factory returning an nn.Module")
    verify.add_argument("--flax", required=True, metavar="SPEC",
                        help="pkg.module:factory or path/file.py:factory returning an NNX module "
                             "(it may take rngs)")
    verify.add_argument("--input-shape", metavar="N,C,H,W",
                        help="input shape in PyTorch's layout (random inputs, seeded)")
    verify.add_argument("--inputs", metavar="FILE.npz",
                        help="inputs (and optionally targets) instead of random ones")
    verify.add_argument("--flax-layout", choices=("nhwc", "channels_last", "same"),
                        default="nhwc",
                        help="4-D inputs reach the Flax model as NHWC (default), every input "
                             "of rank >= 3 channels last (NCL -> NLC for Conv1d), or as given")
    verify.add_argument("--mapping", metavar="FILE", help="a mapping.toml (default: proposed)")
    verify.add_argument("--loss", choices=("cross_entropy", "mse", "sum"),
                        default="cross_entropy")
    verify.add_argument("--optimizer", choices=("sgd", "adam", "adamw"))
    verify.add_argument("--lr", type=float, default=1e-3)
    verify.add_argument("--momentum", type=float, default=0.0, help="sgd only")
    verify.add_argument("--weight-decay", type=float, default=0.0)
    verify.add_argument("--steps", type=int, default=0, metavar="K",
                        help="optimizer steps compared, free-running and resynced")
    verify.add_argument("--dtype", choices=("float32", "float64", "both"), default="float32")
    verify.add_argument("--seed", type=int, default=0)
    verify.add_argument("--out", metavar="DIR", help="output directory (default runs/verify)")


def _overrides(args: argparse.Namespace) -> list[str]:
    from jaxnets.config import data_overrides

    extra = []
    if args.epochs is not None:
        extra.append(f"train.epochs={args.epochs}")
    if args.train_limit is not None:
        extra.append(f"data.train_limit={args.train_limit}")
    return [*args.overrides, *extra, *data_overrides(args.dataset, args.data_dir)]


def _cmd_list(args: argparse.Namespace) -> int:
    from jaxnets.config import available_configs, load_config

    for name in available_configs():
        cfg = load_config(name)
        print(f"{name:<20} {cfg['data']['dataset']:<14} {cfg['description']}")
    return 0


def _require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise JaxnetsError("this command needs PyTorch, which is not installed: "
                           "pip install torch==2.13.0") from None


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``section.key: old -> new`` for every config value that differs."""
    changes = []
    for key, value in new.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            changes += _changed_keys(old.get(key, {}), value, f"{dotted}.")
        elif old.get(key) != value:
            changes.append(f"{dotted}: {old.get(key)!r} -> {value!r}")
    return changes


def _cmd_train(args: argparse.Namespace) -> int:
    from jaxnets import checkpoint
    from jaxnets.config import config_from_dict, load_config
    from jaxnets.data import load_dataset

    if args.save_every < 0:
        raise ConfigError(f"--save-every {args.save_every}: give 0 (only at the end) or more")
    resume = None
    if args.resume:
        if args.config:
            raise ConfigError(f"give a CONFIG or --resume, not both: the run in {args.resume} "
                              f"keeps its config (change keys with --set)")
        resume = checkpoint.load(args.resume)
        cfg = config_from_dict(resume.meta["config"], _overrides(args),
                               origin=str(resume.path / "meta.json"))
        framework = resume.meta["framework"]
        if args.framework and args.framework != framework:
            raise ConfigError(f"--framework {args.framework}: the checkpoint in {resume.path} "
                              f"was trained in {framework}")
        out = Path(args.out) if args.out else resume.path.parent.parent
        for change in _changed_keys(resume.meta["config"], cfg):
            print(f"note: config changed on resume, {change}", file=sys.stderr)
        members = [cfg]  # an ensemble member resumes on its own
    elif not args.config:
        raise ConfigError("give a CONFIG (see `jaxnets list`) or --resume DIR")
    else:
        cfg = load_config(args.config, _overrides(args))
        framework = args.framework or "jax"
        out = Path(args.out or f"runs/{cfg['name']}/{framework}")
        members = [{**cfg, "seed": cfg["seed"] + m} for m in range(cfg["train"]["ensemble"])]
    dataset = load_dataset(cfg["data"])
    with _setup_backends("float32", args.device, torch_side=framework == "torch"):
        _train_members(members, framework, dataset, out, args, resume)
    return 0


def _train_members(members: list[dict], framework: str, dataset, out: Path,
                   args: argparse.Namespace, resume) -> None:
    """Train each member (one, or an ensemble's differently seeded models, one by one)."""
    from jaxnets.figures import run_figures
    from jaxnets.runner import fit

    if framework == "torch":
        from torchref.numerics import torch_device
        from torchref.train import Trainer

        if args.devices != 1:
            raise ConfigError(f"--devices {args.devices} for torch: train with DDP through "
                              f"`torchrun --nproc-per-node {args.devices} -m torchref.ddp` "
                              f"(README, Data parallel), or compare with --devices")
        extra = {"device": torch_device(args.device)}
    else:
        from jaxnets.parallel import data_mesh
        from jaxnets.train import Trainer

        # JAX places the data on jax_numerics' device, or on a mesh's devices
        extra = {"mesh": data_mesh(args.devices, args.device)} if args.devices != 1 else {}
    import jax

    # several JAX processes: each takes every step of the run (training, evaluation, fetching
    # the weights and the figures' predictions are collective), process 0 into `out`, the
    # others silently into a scratch directory deleted at the end
    writer = framework == "torch" or jax.process_index() == 0
    with tempfile.TemporaryDirectory(prefix="jaxnets-process-") as scratch:
        for member_cfg in members:  # an ensemble trains differently seeded models, one by one
            member_out = out / f"seed{member_cfg['seed']}" if len(members) > 1 else out
            trainer = Trainer(member_cfg, dataset, **extra)

            def figures(where, rows, trainer=trainer, member_cfg=member_cfg):
                return run_figures(where, member_cfg, dataset, {framework: rows},
                                   {framework: [trainer.predict]})

            fit(trainer, member_cfg, member_out if writer else Path(scratch) / member_out.name,
                progress=not args.quiet and writer, echo=print if writer else _silent,
                save_every=args.save_every, resume=resume, figures=figures)


def _silent(line: str) -> None:
    """The echo of a process that does not report (not process 0 of several)."""


def _cmd_compare(args: argparse.Namespace) -> int:
    from jaxnets.config import load_config

    cfg = load_config(args.config, _overrides(args))
    _require_torch()
    from torchref.compare import compare

    compare(cfg, Path(args.out or f"runs/{cfg['name']}/compare"), progress=not args.quiet,
            device=args.device, devices=args.devices, dtype=args.dtype)
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:

    from jaxnets.config import load_config
    from jaxnets.summary import format_summary, jax_summary

    cfg = load_config(args.config)
    summaries = {"jax": jax_summary(cfg)}
    try:
        import torch  # noqa: F401
    except ImportError:
        note = "note: PyTorch is not installed; only the JAX side is shown"
    else:
        from torchref.summary import torch_summary

        summaries["torch"], note = torch_summary(cfg), ""
    if args.json:
        print(json.dumps(summaries))
    else:
        print(format_summary(summaries["jax"], summaries.get("torch")))
    if note:
        print(note, file=sys.stderr)
    return 0


def _setup_backends(dtype: str, device: str, torch_side: bool = True
                    ) -> AbstractContextManager:
    """The command's numerics for as long as it runs, restored after (``jaxnets.numerics``,
    and ``torchref.numerics`` where PyTorch runs too): float64 mode, matmul precision, the
    device, and on a GPU TF32 off in both frameworks, so float32 is true float32. A missing
    GPU is one line on entry."""
    if not torch_side:
        from jaxnets.numerics import jax_numerics

        return jax_numerics(dtype, device)
    _require_torch()
    from torchref.numerics import numerics

    return numerics(dtype, device)


def _configs_on_images(names: list[str], dataset: str, data_dir: str | None = None
                       ) -> list[dict]:
    """The named configs (default: all), the image ones switched to ``dataset``: parity and
    bench need realistic inputs, not a particular dataset."""
    from jaxnets.config import available_configs, data_overrides, load_config
    from jaxnets.data import IMAGE_DATASETS

    cfgs = []
    for name in names or list(available_configs()):
        cfg = load_config(name)
        if cfg["data"]["dataset"] in IMAGE_DATASETS:
            cfg = load_config(name, data_overrides(dataset, data_dir))
        cfgs.append(cfg)
    return cfgs


def _cmd_parity(args: argparse.Namespace) -> int:

    _require_torch()
    if args.steps < 1:
        raise ConfigError(f"--steps {args.steps}: give at least 1 step")
    cfgs = _configs_on_images(args.configs, args.dataset, args.data_dir)
    from torchref.parity import run_parity

    with _setup_backends(args.dtype, args.device):  # run_parity sets the same for callers
        report = run_parity(cfgs, Path(args.out or "runs/parity"), args.dtype, args.device,
                            args.steps)
    return 0 if report["passed"] else 1


def _cmd_verify(args: argparse.Namespace) -> int:
    _require_torch()
    _setup_backends("float32" if args.dtype == "float32" else "float64", "cpu")
    from torchref.verify.front import run

    return run(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    _require_torch()
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown = set(modes) - {"jit_step", "scan", "stream", "eager", "compile"}
    if unknown or args.repeats < 1 or args.steps < 1:
        raise ConfigError(f"--modes {args.modes!r}, --repeats {args.repeats}, --steps "
                          f"{args.steps}: modes are jit_step, scan, stream, eager, compile; "
                          f"repeats and steps at least 1")
    with _setup_backends("float32", args.device):
        return _bench(args, modes)


def _bench(args: argparse.Namespace, modes: tuple[str, ...]) -> int:
    from bench import measure, report, timing
    from bench.hosts import Hosts
    from jaxnets.data import load_dataset

    if args.devices != 1:
        return _bench_devices(args)
    from jaxnets.numerics import read_cpu_dispatch

    threads = {**timing.set_threads(), "jax_cpu_dispatch": read_cpu_dispatch()}
    print(f"threads: torch {threads['torch_threads']}, XLA:CPU {threads['jax_cpu_threads']}; "
          f"JAX CPU dispatch {threads['jax_cpu_dispatch']}")
    rows = []
    # a worker process per framework (bench.hosts), JAX's with this process's CPU dispatch
    with Hosts(args.device, dispatch=threads["jax_cpu_dispatch"]) as hosts:
        peak = measure.matmul_peak(args.repeats, args.device, hosts)
        print(f"matmul peak: {peak['matmul_peak_gflops']:.1f} GFLOP/s (jax "
              f"{peak['jax_gflops']:.1f} at {peak['jax_matmul_size']}^3, torch "
              f"{peak['torch_gflops']:.1f} at {peak['torch_matmul_size']}^3)"
              + (f"; unstable: {'; '.join(peak['matmul_peak_unstable'])}"
                 if peak["matmul_peak_unstable"] else ""))
        for cfg in _configs_on_images(args.configs, args.dataset):
            rows += measure.bench_config(cfg, load_dataset(cfg["data"]), args.repeats,
                                         args.steps, args.device, modes, hosts=hosts)
    out = Path(args.out or "runs/bench")
    report.write(out, report.machine_info(args.device, peak, threads), rows,
                 " ".join(["jaxnets", *sys.argv[1:]]))
    print(f"results: {out / 'results.md'}, {out / 'results.json'}, {out / 'throughput.png'}")
    return 0


def _bench_devices(args: argparse.Namespace) -> int:
    from bench.parallel import bench_data_parallel, parallel_markdown
    from jaxnets.data import load_dataset
    from jaxnets.report import write_json

    out = Path(args.out or "runs/bench")
    rows = []
    for cfg in _configs_on_images(args.configs, args.dataset):
        rows += bench_data_parallel(cfg, load_dataset(cfg["data"]), args.devices, args.repeats,
                                    args.steps, out, args.device)
        for row in rows[-4:]:
            print(f"  {row['config']:<18} {row['framework']:<5} {row['devices']} device(s) "
                  f"{row['samples_per_s']:>10,.0f}/s  efficiency {row['scaling_efficiency']:.2f}")
    command = " ".join(["jaxnets", *sys.argv[1:]])
    write_json(out / "parallel.json", {"command": command, "rows": rows})
    (out / "parallel.md").write_text(parallel_markdown(rows, command, args.device),
                                     encoding="utf-8")
    print(f"results: {out / 'parallel.md'}, {out / 'parallel.json'}")
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    _require_torch()
    from torchref.reproduce import reproduce

    with _setup_backends("float32", "cpu"):
        reproduce(args.configs, Path(args.out or "runs/reproduce"), args.dataset,
                  args.data_dir, progress=not args.quiet, resume=args.resume)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from jaxnets.predict import predict

    if args.limit < 0 or args.show < 0:
        raise ConfigError(f"--limit {args.limit}, --show {args.show}: give 0 or more (--limit "
                          f"0: all images)")
    result = predict(args.run_dir, args.images, args.limit, args.framework, args.weights,
                     args.out)
    rows = result["rows"]
    for row in rows[:args.show]:
        truth = "" if row["true"] is None else f"  (true {row['true']})"
        print(f"{row['image']:<32} {row['predicted']}  {row['class']:<12} "
              f"{row['confidence']:.3f}{truth}")
    if len(rows) > args.show:
        print(f"... {len(rows) - args.show} more")
    accuracy = result["accuracy"]
    if result["note"]:
        print(f"note: {result['note']}", file=sys.stderr)
    print(f"{len(rows)} images labelled by the {result['framework']} model"
          + ("" if accuracy is None else f"; accuracy {100 * accuracy:.2f} % against the "
             f"labels beside the images") + f"; predictions: {result['csv']}")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from jaxnets.download import download

    download(args.dataset, args.dir)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from jaxnets.convert import convert_file

    arrays = convert_file(args.source, args.target, args.input, args.output)
    print(f"{args.input} ({args.source}) -> {args.output} ({args.target}): {len(arrays)} "
          f"tensors, {sum(a.size for a in arrays.values()):,} values")
    return 0


COMMANDS = {"list": _cmd_list, "train": _cmd_train, "compare": _cmd_compare,
            "summary": _cmd_summary, "convert": _cmd_convert, "parity": _cmd_parity,
            "bench": _cmd_bench, "reproduce": _cmd_reproduce, "predict": _cmd_predict,
            "download": _cmd_download, "verify": _cmd_verify}


def _joins_processes(args: argparse.Namespace) -> bool:
    """``train`` as one of several JAX processes (options or ``JAXNETS_COORDINATOR``)."""
    from jaxnets.parallel import joins_processes

    if not joins_processes(args.coordinator, args.num_processes, args.process_id):
        return False
    if args.framework == "torch":
        raise ConfigError("--coordinator/JAXNETS_COORDINATOR start JAX processes; PyTorch "
                          "trains on several processes through `torchrun -m torchref.ddp`")
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "devices", 1) < 1:
            raise ConfigError(f"--devices {args.devices}: give 1 or more")
        if args.command == "train" and _joins_processes(args):  # before JAX starts
            from jaxnets.parallel import join_processes

            join_processes(args.devices, args.device, args.coordinator, args.num_processes,
                           args.process_id)
        elif getattr(args, "devices", 1) != 1:
            from jaxnets.parallel import request_host_devices

            if args.device == "cpu":  # before JAX starts: N host devices for the mesh
                request_host_devices(args.devices)
        if args.command not in ("list", "download"):  # before JAX starts, like the above
            from jaxnets.numerics import CPU_DISPATCH, set_cpu_dispatch

            # an explicit --cpu-dispatch must take effect; the default is kept where a caller
            # in this process started JAX already (the CLI run in-process)
            set_cpu_dispatch(args.cpu_dispatch or CPU_DISPATCH,
                             strict=args.cpu_dispatch is not None)
        return COMMANDS[args.command](args)
    except JaxnetsError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"jaxnets: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("jaxnets: interrupted (finished checkpoints are kept; continue a training run "
              "with `jaxnets train --resume DIR`)", file=sys.stderr)
        return 130
    except OSError as exc:  # e.g. an output directory that cannot be written
        if args.debug:
            traceback.print_exc()
        where = f" {exc.filename}" if exc.filename else ""
        print(f"jaxnets: error:{where} {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
