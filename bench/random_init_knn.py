"""kNN of a randomly initialised encoder, built exactly as ``moco pretrain CONFIG OVERRIDES`` builds it
(same seed, same data split, no step taken): the baseline a run's kNN is read against
(docs/benchmarks.md, ViT-Tiny).

    python bench/random_init_knn.py fmnist_v3 model.arch=vit_tiny model.patch_size=7 --split val \
        --out /tmp/random_init

``--split val`` scores the validation hold-out against the monitor's bank (what the kNN monitor
prints); ``--split test`` the test split against the whole training split, with the PCA-whitened
diagnostic, as a run's final kNN does.
"""

from __future__ import annotations

import argparse

from moco.cli import resolve_config_path
from moco.config import load_config
from moco.monitor import knn_eval
from moco.train import set_up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML file or shipped config")
    parser.add_argument("overrides", nargs="*", help="section.key=value, as for moco pretrain")
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--out", default="runs/random_init", help="run directory set-up writes its config into")
    args = parser.parse_args()
    config = load_config(resolve_config_path(args.config), [*args.overrides, f"train.output_dir={args.out}"])
    run = set_up(config, resume=None, overwrite=True)
    data = run.data
    bank, queries = (data.monitor_bank, data.val) if args.split == "val" else (data.full_train, data.test)
    scores = knn_eval(run.method.encoder, bank, queries, data, config, run.device, run.memory_format,
                      whitened=args.split == "test")
    whitened = f", PCA-whitened backbone {scores.whitened:.2f}" if scores.whitened is not None else ""
    print(f"random init, {args.split} kNN (k={config.train.knn_k}, T={config.train.knn_t}): "
          f"backbone {scores.backbone:.2f}, encoder output {scores.encoder:.2f}{whitened}")


if __name__ == "__main__":
    main()
