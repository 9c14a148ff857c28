"""``moco`` command line: ``moco pretrain CONFIG [key=value ...] [--resume [PATH]]``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from moco.config import ConfigError, load_config

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def resolve_config_path(name: str) -> Path:
    """A config path, or the name of a shipped config (``fmnist_v2`` -> configs/fmnist_v2.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    available = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {name!r} is neither a file nor a shipped config ({available})")


def _pretrain(args: argparse.Namespace) -> int:
    from moco.train import pretrain

    config = load_config(resolve_config_path(args.config) if args.config else None, args.overrides)
    result = pretrain(config, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        print(f"run directory: {result.run_dir} ({result.seconds:.0f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moco", description="Momentum Contrast: pretrain and evaluate encoders.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="self-supervised pretraining, then kNN on the test split")
    p.add_argument("config", nargs="?", help="YAML file or shipped config name (see `moco configs`)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.epochs=2")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from a checkpoint (default: <output_dir>/checkpoint_last.pth)")
    p.set_defaults(func=_pretrain)
    c = sub.add_parser("configs", help="list the shipped configs")
    c.set_defaults(func=lambda _: print("\n".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))) or 0)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"moco: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # non-finite loss: the message names the step and last checkpoint
        print(f"moco: training stopped: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        from moco.distributed import DistributedFailure, ReplicasOutOfSync

        if not isinstance(err, (DistributedFailure, ReplicasOutOfSync)):
            raise
        print(f"moco: error: {err}", file=sys.stderr)  # a rank died, timed out, or drifted
        return 1
    except KeyboardInterrupt:
        print("moco: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
