"""``moco`` command line: ``moco pretrain CONFIG [key=value ...] [--resume [PATH] | --overwrite]``,
``moco ablate``; the commands that use a checkpoint (lincls, knn, finetune, report, export) are
defined in :mod:`moco.cli_eval`."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from moco import __version__
from moco.cli_help import OUTPUT_ALIASES, print_configs, use_defaults_help
from moco.config import ConfigError, load_config
from moco.presets import CONFIG_DIR, resolve_config_path, shipped_configs  # noqa: F401  (CONFIG_DIR: for callers)


def _device_overrides(args: argparse.Namespace) -> list[str]:
    """``--device`` and ``--threads`` as the config options they stand for (the command line's spelling
    on every command; a ``train.device=...`` override says the same)."""
    chosen = {"train.device": args.device, "train.threads": args.threads}
    return [f"{key}={value}" for key, value in chosen.items() if value is not None]


def _pretrain(args: argparse.Namespace) -> int:
    config = load_config(resolve_config_path(args.config) if args.config else None,
                         [*args.overrides, *_device_overrides(args)])
    if args.print_config:  # the plan and its reasons, nothing trained
        from moco.resolve import describe_plan

        print(describe_plan(config), end="")
        return 0
    from moco.train import pretrain

    result = pretrain(config, resume=args.resume, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        print(f"run directory: {result.run_dir} ({result.seconds:.0f} s)")
    if result.checkpoint_error:  # training finished, but its final state is not on disk
        print(f"moco: error: the final checkpoint could not be written: {result.checkpoint_error}", file=sys.stderr)
        return 1
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from moco.ablate import list_presets, sweep

    if args.preset is None:
        print("\n".join(list_presets()))
        return 0
    from moco.progress import Progress

    sweep(args.ablation, args.preset, args.overrides, output=args.output, jobs=args.jobs, threads=args.threads,
          progress=Progress.for_command(args.no_progress, sys.stdout), overwrite=args.overwrite)
    return 0


def _add_ablate_parser(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("ablate", help="the paper's ablations as resumable sweeps (docs/ablations.md)",
                       description="Train one run per point into OUTPUT/<point>/ (finished points are skipped, "
                                   "unfinished ones resumed), then write results.json, results.md and PNG plots. "
                                   "Without PRESET: list the shipped presets.")
    a.add_argument("ablation", choices=("dictionary", "momentum", "shuffle-bn", "methods"),
                   help="dictionary: mechanisms against K; momentum: m; shuffle-bn: with and without; "
                        "methods: every method at equal epochs and equal time")
    a.add_argument("preset", nargs="?", help="YAML file or shipped preset name (e.g. fmnist_cpu)")
    a.add_argument("overrides", nargs="*", help="section.key=value for every point, or ablate.<sweep>.<key>=value")
    a.add_argument("--jobs", type=int, default=1, help="points trained at once, in separate processes (default 1)")
    a.add_argument("--threads", type=int, default=0, help="threads per point (default: cores / jobs)")
    a.add_argument("--output", *OUTPUT_ALIASES, default=None,
                   help="sweep folder (default runs/ablate/<preset>/<ablation>)")
    from moco.cli_eval import add_progress_options

    add_progress_options(a, "train finished points again, from scratch (default: keep them, resume the others)")
    a.set_defaults(func=_ablate)


def _bench(args: argparse.Namespace) -> int:
    from moco.bench import Setting, Timing, run_bench, write_json

    config = resolve_config_path(args.config) if args.config else None
    timing = Timing(args.warmup, args.steps, args.repeats)
    if min(args.steps, args.repeats, args.rounds) < 1 or args.warmup < 0:
        raise ConfigError("--steps, --repeats and --rounds must be >= 1 and --warmup >= 0")
    setting = Setting(str(config) if config else None, list(args.overrides), timing, args.compile)
    if args.host_reads:
        from moco.bench import host_reads

        print(f"wrote {write_json({'host_reads': host_reads(setting, args.steps)}, args.out)}")
        return 0
    from moco.progress import Progress

    progress = Progress.for_command(args.no_progress)
    summary = run_bench(setting, args.cases.split(","), args.queue_sizes, args.mode, report=progress.result,
                        rounds=args.rounds, progress=progress)
    print(f"wrote {write_json(summary, args.out)}")
    return 0


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    from moco.bench import BENCH_MODES, CASES, DEFAULT_CASES

    b = sub.add_parser("bench", help="img/s and peak memory of the encoder, the step, the data and the loop",
                       description="Time each case (median of --repeats blocks of --steps steps after --warmup; "
                                   "by default every case in one process, one block of each in turn) and print "
                                   "the ratios between cases. "
                                   f"Cases: {', '.join(CASES)} (lightly needs pip install -e '.[bench]'). "
                                   "Any config and overrides: backbone, image size, batch, device, precision.")
    b.add_argument("config", nargs="?", default="fmnist_v2", help="YAML file or shipped config (default fmnist_v2)")
    b.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.batch_size=256 train.device=cuda")
    b.add_argument("--cases", default=",".join(DEFAULT_CASES), help="comma-separated (default: all but lightly)")
    b.add_argument("--queue-sizes", type=int, nargs="+", default=[4096, 16384, 65536],
                   help="K of the MoCo step cases (default 4096 16384 65536)")
    b.add_argument("--steps", type=int, default=3, help="steps per timed block (default 3)")
    b.add_argument("--repeats", type=int, default=20, help="timed blocks; the median is reported (default 20)")
    b.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    b.add_argument("--mode", choices=BENCH_MODES, default="interleaved",
                   help="interleaved (default): every case built in this process, one block of each in turn, "
                        "--repeats rounds, each ratio taken within a round: ratios that hold on a host whose speed "
                        "drifts (a shared VM); peak memory is the process's over all cases. isolated: each case "
                        "in a process of its own, one after another (its own peak memory). same-process: one "
                        "after another in this process (quickest to start)")
    b.add_argument("--interleave", dest="mode", action="store_const", const="interleaved",
                   help="the same as --mode interleaved (the default)")
    b.add_argument("--same-process", dest="mode", action="store_const", const="same-process",
                   help="the same as --mode same-process")
    b.add_argument("--rounds", type=int, default=1,
                   help="isolated and same-process: run every case this many times, round-robin; ratios are "
                        "medians of each round's (default 1)")
    b.add_argument("--output", *OUTPUT_ALIASES, dest="out", default="runs/bench/bench.json",
                   help="the JSON (default runs/bench/bench.json)")
    b.add_argument("--compile", action="store_true",
                   help="torch.compile the encoders in the encoder, step and lightly cases (warm-up includes compiling)")
    b.add_argument("--host-reads", action="store_true",
                   help="instead of timing: count, for every method, the reads of a tensor's value back to the host "
                        "in --steps and 2 x --steps unlogged steps of the real loop (each would stall a GPU)")
    from moco.cli_eval import add_progress_options

    add_progress_options(b)
    b.set_defaults(func=_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moco", description="Self-supervised visual representation learning: "
                                     "pretrain, evaluate and export encoders.")
    parser.add_argument("--version", action="version", version=f"moco {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("pretrain", help="self-supervised pretraining, then kNN on the test split",
                       description="Pretrain the method a config names (model.method) and write the run into "
                                   "train.output_dir: config, metrics, checkpoints, curves, summary.")
    p.add_argument("config", nargs="?", help="YAML file or shipped config name (see `moco configs`)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.epochs=2")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", nargs="?", const="auto", default=None,
                       help="resume from a checkpoint (default: <output_dir>/checkpoint_last.pth)")
    again.add_argument("--overwrite", action="store_true",
                       help="train.output_dir holds a run: delete its metrics, summary, checkpoints and TensorBoard "
                            "events, then start afresh (without it, or --resume, such a directory is refused)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config and every value the run would decide (from the data or the "
                        "machine) with its reason, then exit without training")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: the config's train.device)")
    p.add_argument("--threads", type=int, help="CPU threads; 0 = all cores (default: the config's train.threads)")
    p.set_defaults(func=_pretrain)
    _add_ablate_parser(sub)
    _add_bench_parser(sub)
    c = sub.add_parser("configs", help="list the shipped configs, one line each",
                       description="The shipped presets: pass a name to moco pretrain (a YAML path works too).")
    c.set_defaults(func=lambda _: print_configs(shipped_configs()) or 0)
    from moco.cli_eval import add_commands  # lincls, knn, finetune, report, export
    from moco.transfer import add_commands as add_transfer_commands  # transfer detect, ...

    add_commands(sub)
    add_transfer_commands(sub)
    use_defaults_help(parser)
    return parser


def _format_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    """Our own warnings (skipped images, failed checkpoint writes) as one ``moco: warning:`` line."""
    if category.__module__.startswith("moco."):
        return f"moco: warning: {message}\n"
    return _default_format_warning(message, category, filename, lineno, line)


_default_format_warning = warnings.formatwarning


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """argparse, except that ``key=value`` overrides may also follow a flag
    (``moco pretrain fmnist_v2 --overwrite optim.epochs=2``): argparse stops filling a positional
    list at the first option, and would call what follows unrecognised."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    from moco.checkpoint import CheckpointError
    from moco.data.images import BadImageError
    from moco.evaluate.linear import BackboneChangedError
    from moco.progress import Interrupted
    from moco.reliability import TrainingInterrupted

    parser = build_parser()
    args = parse_args(parser, argv)
    warnings.formatwarning = _format_warning
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, BadImageError, CheckpointError) as err:
        print(f"moco: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # non-finite loss: the message names the step and last checkpoint
        print(f"moco: training stopped: {err}", file=sys.stderr)
        return 1
    except BackboneChangedError as err:  # a linear probe moved its frozen backbone (lincls, report): no result
        print(f"moco: error: {err}", file=sys.stderr)
        return 1
    except TrainingInterrupted as err:  # SIGINT/SIGTERM: a resumable checkpoint was saved first
        if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 wrote the checkpoint and reports
            print(f"moco: interrupted by {err}", file=sys.stderr)
        return err.exit_code
    except RuntimeError as err:
        from moco.distributed import DistributedFailure, ReplicasOutOfSync

        if not isinstance(err, (DistributedFailure, ReplicasOutOfSync)):
            raise
        print(f"moco: error: {err}", file=sys.stderr)  # a rank died, timed out, or drifted
        return 1
    except Interrupted as err:  # SIGTERM during an evaluation: its finished rows are kept (it said where)
        print(f"moco: interrupted by {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("moco: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = _default_format_warning


if __name__ == "__main__":
    sys.exit(main())
