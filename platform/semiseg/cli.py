"""The `semiseg` command: thin calls into the library."""

from __future__ import annotations

import argparse
import os
import sys
import time

from semiseg.errors import SemisegError

EXAMPLES = """examples:
  semiseg check experiments/sam_refined.yaml method.params.rounds=2
  semiseg sweep experiments/quickstart.yaml
  semiseg sweep experiments/quickstart.yaml train.epochs=2 sweep.seeds=[0,1]
  semiseg train experiments/quickstart.yaml data.label_fraction=0.25
  semiseg pseudolabel experiments/sam_refined.yaml --checkpoint ray_results/.../checkpoint.pt
  semiseg datasets --prepare experiments/results_mni.yaml
  semiseg report semiseg
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="semiseg", description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", "train one config as one tracked Ray Train run (a one-trial sweep)"),
                            ("sweep", "run the config's sweep grid as Ray Tune trials")):
        s = sub.add_parser(name, help=help_text, description=help_text)
        s.add_argument("config", help="experiment YAML, e.g. experiments/quickstart.yaml")
        s.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=5")
        s.add_argument("--verbose", action="store_true", help="also show Ray's notices and warnings "
                       "and Tune's configuration box (hidden by default; live trial lines always show)")
        if name == "sweep":
            s.add_argument("--name", default="", help="name of the sweep's parent MLflow run")
            s.add_argument("--force", action="store_true",
                           help="rerun trials that already FINISHED with the same config hash")
    c = sub.add_parser("check", help="validate a config fully (no Ray, no MLflow) and print it with its hash",
                       description="Load the config with its overrides and check everything a train or "
                       "sweep checks before any trial: types, ranges and names, every method's params "
                       "and stages, every combination of the sweep grid, and data.root on disk. Prints "
                       "the resolved config as YAML and its config hash (the run identity), or the "
                       "error naming the key (exit code 2).")
    c.add_argument("config", help="experiment YAML, e.g. experiments/quickstart.yaml")
    c.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. method.params.rounds=2")
    pl = sub.add_parser("pseudolabel", help="SAM-refined pseudo-labels for the unlabeled split (Ray Data)",
                        description="Coarse U-Net masks -> box and point prompts -> SAM (Keuth et al. "
                        "2024) over the config's unlabeled split, as a Ray Data pipeline. Writes "
                        "masks/, rows/ and manifest.parquet; a rerun skips images already done.")
    pl.add_argument("config", help="experiment YAML (its data, model, train.seed and sam sections)")
    pl.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. sam.num_actors=4")
    pl.add_argument("--checkpoint", default="",
                    help="coarse model: checkpoint.pt, its folder, or an MLflow run id (default: sam.coarse_checkpoint)")
    pl.add_argument("--output", default="", help="output folder (default: sam.output)")
    sub.add_parser("methods", help="list the registered methods")
    d = sub.add_parser("datasets", help="list the registered datasets, or --prepare a config's cache",
                       description="List the registered datasets. With --prepare CONFIG, build that "
                       "config's dataset into the node's prepared-data cache (data.cache_dir, "
                       "semiseg.data.cache) so every trial of a sweep maps it instead of reading "
                       "the files again.")
    d.add_argument("--prepare", metavar="CONFIG", default="", help="experiment YAML whose data to prepare")
    d.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.image_size=128")
    r = sub.add_parser("report", help="test Dice table and an HTML dashboard of an experiment",
                       description="Print the test Dice table (method x label fraction, mean ± std "
                       "over seeds) and write an HTML dashboard (label-efficiency curves, per-class "
                       "Dice/HD95, best configs, pseudo-label quality) that is also logged to the "
                       "sweep's parent run under artifacts/dashboard.")
    r.add_argument("experiment", nargs="?", default="semiseg", help="MLflow experiment name")
    r.add_argument("--uri", default="", help="tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    r.add_argument("--parent", default=None,
                   help="only the trials of this sweep run id, and log the dashboard to it "
                        "(default: all trials; logged to the latest sweep run)")
    r.add_argument("--out", default="", help="dashboard folder (default: ./reports/EXPERIMENT)")
    return p


def _first_line(obj: object) -> str:
    return (obj.__doc__ or "").strip().splitlines()[0] if obj.__doc__ else ""


def cmd_list(kind: str) -> None:
    if kind == "methods":
        from semiseg.methods import METHODS as registry
    else:
        from semiseg.data import DATASETS as registry
    for name in registry.names():
        print(f"{name:20s} {_first_line(registry.get(name))}")


def cmd_prepare(args: argparse.Namespace) -> None:
    """Fill the prepared-data cache for the config's data section (what every trial loads)."""
    from semiseg.config import load_config
    from semiseg.preflight import check_paths

    cfg = load_config(args.prepare, args.overrides)
    check_paths(cfg)
    if not cfg.data.cache:
        raise SemisegError("data.cache=false: nothing to prepare (set data.cache=true)")
    from semiseg.data import load_dataset
    from semiseg.data.cache import describe

    start = time.time()
    data = load_dataset(cfg.data)
    folder, size = describe(cfg.data)
    print(f"{cfg.data.name}: {len(data.images)} images {tuple(data.images.shape[1:])}, "
          f"{size / 2**20:.1f} MiB in {folder} ({time.time() - start:.1f} s)")


def cmd_check(args: argparse.Namespace) -> None:
    """What `train` and `sweep` check before any trial, without starting Ray or MLflow."""
    import yaml

    from semiseg.config import load_config
    from semiseg.methods import METHODS
    from semiseg.preflight import check_paths

    cfg = load_config(args.config, args.overrides)
    check_paths(cfg)
    stages = METHODS.get(cfg.method.name).stages(cfg)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    print(f"# stages of {cfg.method.name}: {' -> '.join(_stage_label(s) for s in stages)}")
    print(f"# config_hash: {cfg.config_hash()}")


def _stage_label(stage) -> str:
    from semiseg.methods import TrainStage

    if isinstance(stage, TrainStage):
        return f"{stage.name or 'train'} (train {stage.method})"
    return f"{stage.name} (pseudo-labels from {stage.model})"


def cmd_train(args: argparse.Namespace) -> None:
    """One config = a one-trial sweep, always trained (live progress comes from Tune)."""
    from semiseg.config import load_config

    cfg = load_config(args.config, args.overrides)  # first: a bad config fails in a second
    from semiseg.distributed.tune import run_sweep  # Ray, MLflow and torch: seconds to import
    from semiseg.report import finished_trials

    cfg.sweep.methods, cfg.sweep.params = [cfg.method.name], {}
    cfg.sweep.label_fractions, cfg.sweep.seeds = [cfg.data.label_fraction], [cfg.train.seed]
    cfg.sweep.full_supervision = False
    out = run_sweep(cfg, f"train-{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}", force=True,
                    verbose=args.verbose)
    trial = finished_trials(out.uri, cfg.tracking.experiment, out.parent_run_id)
    print(f"test dice_mean {trial['dice'].iloc[0]:.4f} ({cfg.method.name}, label fraction "
          f"{cfg.data.label_fraction:g}, seed {cfg.train.seed}); tracking: {out.uri}")


def cmd_sweep(args: argparse.Namespace) -> None:
    from semiseg.config import load_config

    cfg = load_config(args.config, args.overrides)  # first: a bad config fails in a second
    from semiseg import tracking
    from semiseg.distributed.tune import run_sweep
    from semiseg.report import dice_table, finished_trials, format_table

    name = args.name or f"{os.path.splitext(os.path.basename(args.config))[0]}-{time.strftime('%Y%m%d-%H%M%S')}"
    start = time.time()
    out = run_sweep(cfg, name, force=args.force, verbose=args.verbose)
    trials = finished_trials(out.uri, cfg.tracking.experiment, config_hashes=out.config_hashes)
    print(format_table(dice_table(trials)))
    print(f"sweep {name} (MLflow run {out.parent_run_id}) took {time.time() - start:.0f} s; "
          f"tracking: {out.uri}\nbrowse: mlflow ui --backend-store-uri {out.uri}, then open "
          f"{tracking.runs_page(out.uri, cfg.tracking.experiment)}")  # the runs table, not GenAI


def cmd_pseudolabel(args: argparse.Namespace) -> None:
    from semiseg.config import load_config
    from semiseg.preflight import check_paths

    cfg = load_config(args.config, args.overrides)
    check_paths(cfg)
    from semiseg.distributed.pseudolabel import run_pseudolabel  # after the checks: slow import

    out = run_pseudolabel(cfg, _coarse_checkpoint(args.checkpoint or cfg.sam.coarse_checkpoint, cfg), args.output)
    print(f"refined {out.refined} images ({out.skipped} already done) in {out.seconds:.0f} s; "
          f"manifest: {out.manifest}")


def _coarse_checkpoint(value: str, cfg) -> str:
    """A path as given; a 32-hex MLflow run id is resolved to the checkpoint that run logged."""
    import re

    if value and not os.path.exists(value) and re.fullmatch(r"[0-9a-f]{32}", value):
        from semiseg import tracking

        return str(tracking.download_checkpoint(tracking.resolve_uri(cfg.tracking.uri), value))
    return value


def cmd_report(args: argparse.Namespace) -> None:
    from pathlib import Path

    from semiseg import tracking
    from semiseg.dashboard import build_dashboard
    from semiseg.report import text_report

    uri = tracking.resolve_uri(args.uri)
    for line in tracking.end_stale_runs(uri, args.experiment, "semiseg report"):
        print(line)  # runs a killed sweep driver left RUNNING
    out = Path(args.out) if args.out else Path("reports") / args.experiment
    board = build_dashboard(uri, args.experiment, out, args.parent)
    print(text_report(board.trials, board.per_image))  # Dice table, then paired CIs and verdicts
    print(f"dashboard: {board.index.resolve()}")
    if board.logged_to:
        print(f"logged to MLflow run {board.logged_to} (artifacts/dashboard)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "datasets" and args.prepare:
            cmd_prepare(args)
        elif args.command in ("methods", "datasets"):
            if getattr(args, "overrides", None):
                raise SemisegError(f"overrides {args.overrides} given without --prepare CONFIG")
            cmd_list(args.command)
        else:
            {"check": cmd_check, "train": cmd_train, "sweep": cmd_sweep, "report": cmd_report,
             "pseudolabel": cmd_pseudolabel}[args.command](args)
    except SemisegError as exc:
        print(f"semiseg: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
