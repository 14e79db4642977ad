"""The ``worldmodel`` command line: thin parsing around each stage's ``run`` function.

Stage modules are imported only when their command runs, so ``--help`` stays fast. User mistakes
(:class:`~worldmodel.errors.UserError`, Gymnasium's env errors) print one line, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from worldmodel.errors import UserError

log = logging.getLogger("worldmodel")

Handler = Callable[[argparse.Namespace], int]


def _stage(module: str, issue: int) -> ModuleType:
    """Import a stage module, or say in one line that its issue has not landed yet."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise UserError(f"this command is not implemented yet (issue #{issue}: {module})") from e


def _config(args: argparse.Namespace, *, builds_env: bool = False) -> Any:
    """The resolved config; with ``builds_env``, also fail fast on an unknown env id."""
    from agents.modes import check_modes
    from worldmodel.config import resolve_config

    cfg = resolve_config(args.config, args.set or [])
    check_modes(cfg)
    if builds_env and cfg.env.backend == "gymnasium":
        from envs import check_env_id

        check_env_id(cfg.env.id)
    return cfg


def _out(args: argparse.Namespace, cfg: Any, stage: str) -> Path:
    from worldmodel.utils import default_run_dir

    return Path(args.out) if args.out else default_run_dir(cfg, stage)


def _dataset(location: str) -> Any:
    """A dataset location: a local path, or a URL (``s3://...``) kept as text for zarr/fsspec."""
    return location if "://" in location else Path(location)


def _resume_out(args: argparse.Namespace, what: str) -> None:
    """``--resume`` continues a named run: without ``--out`` it would start a new folder."""
    if args.resume and not args.out:
        raise UserError(f"--resume needs --out RUN, the {what} run folder to continue")


def _done(path: Path, what: str) -> int:
    log.info("%s: %s", what, path)
    print(path)
    return 0


def _cmd_collect(args: argparse.Namespace) -> int:
    cfg = _config(args, builds_env=True)
    make_policy = None
    if cfg.collect.policy.startswith("agent:"):
        make_policy = _stage("agents.policy", 6).make_policy
    out = _dataset(args.out) if args.out else _out(args, cfg, "collect")
    out = _stage("worldmodel.collect", 4).run(cfg, out, make_policy=make_policy)
    return _done(out, "dataset")


def _cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "export":
        return _done(Path(_stage("worldmodel.minari_io", 16).export_minari(
            _dataset(args.data), args.id)), "Minari dataset")
    if args.data_command == "import":
        return _done(_stage("worldmodel.minari_io", 16).import_minari(args.minari_id,
                                                                       Path(args.out)), "dataset")
    dataset = _stage("worldmodel.dataset", 4)
    if args.data_command == "info":
        return int(dataset.print_info(_dataset(args.data)))
    return int(dataset.print_verify(_dataset(args.data)))


def _cmd_train_vae(args: argparse.Namespace) -> int:
    _resume_out(args, "VAE")
    cfg = _config(args)
    out = _stage("worldmodel.train_vae", 5).run(
        cfg, _dataset(args.data), _out(args, cfg, "vae"), resume=args.resume
    )
    return _done(out, "VAE run")


def _cmd_train_memory(args: argparse.Namespace) -> int:
    _resume_out(args, "memory")
    cfg = _config(args)
    out = _stage("worldmodel.train_memory", 15).run(
        cfg, [_dataset(d) for d in args.data], Path(args.vae), _out(args, cfg, "memory"),
        resume=args.resume,
    )
    return _done(out, "memory run")


def _cmd_iterate(args: argparse.Namespace) -> int:
    if not args.out:
        raise UserError("iterate needs --out OUT, the folder to write (and to resume) its rounds")
    cfg = _config(args, builds_env=True)
    out = _stage("agents.iterate", 15).run(
        cfg, _dataset(args.data), Path(args.vae), Path(args.memory), Path(args.agent),
        Path(args.out), rounds=args.rounds,
    )
    return _done(out, "iterate run")


def _cmd_train_agent(args: argparse.Namespace) -> int:
    _resume_out(args, "agent")
    cfg = _config(args, builds_env=True)
    vae = Path(args.vae) if args.vae else None
    memory = Path(args.memory) if args.memory else None
    out = _stage("agents.train", 6).run(
        cfg, _out(args, cfg, f"agent-{cfg.agent.obs_mode}"), vae=vae, memory=memory,
        resume=args.resume, data=Path(args.data) if args.data else None,
    )
    return _done(out, "agent run")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from worldmodel.config import MAX_SEED

    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed must be between 0 and {MAX_SEED}, got {args.seed}")
    out = _stage("agents.evaluate", 6).run(
        Path(args.run),
        episodes=args.episodes,
        video=args.video,
        deterministic=args.deterministic,
        seed=args.seed,
    )
    return _done(out, "evaluation")


def _cmd_visualize(args: argparse.Namespace) -> int:
    vae_run = Path(args.vae_run)
    out = Path(args.out) if args.out else vae_run / "visualize"
    memory = Path(args.memory) if args.memory else None
    result = _stage("worldmodel.visualize", 8).run(vae_run, _dataset(args.data), out,
                                                   method=args.method, memory=memory)
    return _done(result, "visualizations")


def _cmd_explore(args: argparse.Namespace) -> int:
    data = _dataset(args.data) if args.data else None
    memory = Path(args.memory) if args.memory else None
    _stage("worldmodel.explore", 8).serve(Path(args.vae_run), data, host=args.host, port=args.port,
                                          memory=memory)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    cfg = _config(args)
    out = Path(args.out) if args.out else Path("runs") / "compare"
    result = _stage("agents.compare", 7).run([Path(r) for r in args.runs], out, cfg.compare)
    return _done(result / "report.md", "report")


def _cmd_archive(args: argparse.Namespace) -> int:
    from worldmodel.archive import archive

    done = archive(Path(args.src), Path(args.out))
    log.info("archive: %d finished run(s), %d file(s) -> %s", len(done.runs), len(done.files),
             args.out)
    for folder in done.unfinished:
        log.info("archive: %s is not finished: skipped (re-run once it is)", folder)
    print(args.out)
    return 0


def _cmd_sweep_temperature(args: argparse.Namespace) -> int:
    cfg = _config(args, builds_env=True)
    out = _stage("agents.sweep", 17).run(cfg, Path(args.vae), Path(args.memory), args.taus,
                                         _out(args, cfg, "sweep-temperature"), seeds=args.seeds)
    return _done(out / "report.md", "report")


def _cmd_pipeline(args: argparse.Namespace) -> int:
    cfg = _config(args, builds_env=True)
    out = _stage("worldmodel.pipeline", 7).run(cfg, _out(args, cfg, "pipeline"))
    return _done(out, "pipeline report")


def _cmd_configs(args: argparse.Namespace) -> int:
    from worldmodel.config import config_description, find_config, packaged_configs

    if args.action == "show" and not args.name:
        raise UserError("configs show needs a NAME; `worldmodel configs` lists them")
    if args.name:  # `configs show NAME`: the file, to start a custom config from
        print(find_config(args.name).read_text(encoding="utf-8"), end="")
        return 0
    for name, path in packaged_configs().items():
        print(f"{name:12s} {config_description(path)}")
    return 0


def _add_config_args(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("--config", "-c", metavar="FILE",
                   help="YAML config file, or the name of a packaged one (`worldmodel configs`); "
                   "default: built-in defaults.")
    p.add_argument(
        "--set",
        "-s",
        action="append",
        metavar="KEY=VALUE",
        help="Override a config key, e.g. --set vae.latent_dim=64 (repeatable).",
    )
    p.add_argument("--out", "-o", metavar="DIR", help=out_help)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per stage."""
    parser = argparse.ArgumentParser(
        prog="worldmodel",
        description="Train RL agents on VAE-compressed observations of Gymnasium games.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    parser.add_argument("-q", "--quiet", action="store_true", help="Warnings only, no bars.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("collect", help="Collect rollouts into a dataset.")
    _add_config_args(p, "Dataset folder (re-run the same command to resume).")
    p.set_defaults(func=_cmd_collect)

    p = sub.add_parser("train-vae", help="Train a ConvVAE on a dataset.")
    _add_config_args(p, "Run folder.")
    p.add_argument("--data", "-d", required=True, metavar="DATA", help="Dataset folder.")
    p.add_argument("--resume", action="store_true", help="Continue from RUN/last.pt.")
    p.set_defaults(func=_cmd_train_vae)

    p = sub.add_parser("train-memory", help="Train the memory model M (MDN-RNN) on VAE latents.")
    _add_config_args(p, "Run folder.")
    p.add_argument("--data", "-d", required=True, action="append", metavar="DATA",
                   help="Dataset folder (repeat -d to train on several).")
    p.add_argument("--vae", required=True, metavar="VAE_RUN", help="VAE run that encodes it.")
    p.add_argument("--resume", action="store_true", help="Continue from RUN/last.pt.")
    p.set_defaults(func=_cmd_train_memory)

    p = sub.add_parser("train-agent", help="Train an SB3 agent on pixels or latents.")
    _add_config_args(p, "Run folder.")
    p.add_argument("--vae", metavar="VAE_RUN", help="VAE run folder (latent modes).")
    p.add_argument("--memory", metavar="MEMORY_RUN",
                   help="Memory run folder (latent-memory modes; trained on --vae).")
    p.add_argument("--data", "-d", metavar="DATA",
                   help="Dataset of the feature statistics (agent.standardize; default: the one "
                   "the --memory or --vae run recorded).")
    p.add_argument("--resume", action="store_true", help="Continue from the last checkpoint.")
    p.set_defaults(func=_cmd_train_agent)

    p = sub.add_parser("iterate", help="World Models' iterative training: collect with the "
                       "agent, retrain M on all data, train in the dream; repeat.")
    _add_config_args(p, "Iterate folder (re-run the same command to resume).")
    p.add_argument("--data", "-d", required=True, metavar="DATA", help="The initial dataset.")
    p.add_argument("--vae", required=True, metavar="VAE_RUN", help="VAE run that encodes it.")
    p.add_argument("--memory", required=True, metavar="MEMORY_RUN", help="M trained on DATA.")
    p.add_argument("--agent", required=True, metavar="AGENT_RUN",
                   help="The agent trained in M's dream: it collects round 1's episodes.")
    p.add_argument("--rounds", type=int, metavar="N", help="Rounds (default iterate.rounds).")
    p.set_defaults(func=_cmd_iterate)

    p = sub.add_parser("evaluate", help="Evaluate an agent run; optional video.")
    p.add_argument("run", metavar="RUN", help="Agent run folder.")
    p.add_argument("--episodes", "-n", type=int, default=10)
    p.add_argument("--video", action="store_true", help="Write an MP4 of the agent playing.")
    greedy = p.add_mutually_exclusive_group()
    greedy.add_argument("--deterministic", dest="deterministic", action="store_true",
                        default=None, help="Greedy actions (default: the run's "
                        "agent.eval_deterministic, as in its periodic evaluations).")
    greedy.add_argument("--stochastic", dest="deterministic", action="store_false",
                        help="Sample actions from the policy.")
    p.add_argument("--seed", type=int, default=None, help="Eval seed (default: run seed + 1000).")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("visualize", help="Pictures of what a VAE keeps and loses.")
    p.add_argument("vae_run", metavar="VAE_RUN")
    p.add_argument("--data", "-d", required=True, metavar="DATA", help="Dataset folder.")
    p.add_argument("--out", "-o", metavar="DIR", help="Output folder (default VAE_RUN/visualize).")
    p.add_argument("--method", choices=["pca", "tsne", "umap"], default="pca",
                   help="2-D projection of the latents (umap needs umap-learn).")
    p.add_argument("--memory", metavar="MEMORY_RUN",
                   help="A train-memory run on this VAE: adds the dream (real vs M open loop "
                        "video, strip, k-step latent error).")
    p.set_defaults(func=_cmd_visualize)

    p = sub.add_parser("explore", help="Interactive latent-space explorer in the browser.")
    p.add_argument("vae_run", metavar="VAE_RUN")
    p.add_argument("--data", "-d", metavar="DATA", help="Dataset to browse.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", "-p", type=int, default=8765)
    p.add_argument("--memory", metavar="MEMORY_RUN",
                   help="A train-memory run on this VAE: the page's dream tab plays inside M.")
    p.set_defaults(func=_cmd_explore)

    p = sub.add_parser("compare", help="Compare agent runs with confidence intervals.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="Agent run folders.")
    _add_config_args(p, "Report folder.")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("archive", help="Copy the small files of finished runs (configs, "
                       "evaluations, summaries, hashes) for a repository.")
    p.add_argument("src", metavar="SRC", help="A run folder or a pipeline folder.")
    p.add_argument("--out", "-o", required=True, metavar="DIR",
                   help="Where the copies go (paths relative to SRC are kept).")
    p.set_defaults(func=_cmd_archive)

    p = sub.add_parser("sweep-temperature",
                       help="Dream agents per temperature tau: dream vs real return.")
    _add_config_args(p, "Sweep folder (OUT/tau-T/seed-S runs, OUT/report; re-run to resume).")
    p.add_argument("--vae", required=True, metavar="VAE_RUN", help="VAE run M was trained on.")
    p.add_argument("--memory", required=True, metavar="MEMORY_RUN", help="Memory run M.")
    p.add_argument("--taus", required=True, nargs="+", type=float, metavar="TAU",
                   help="Dream temperatures (> 0).")
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                   help="Seeds per temperature (default: pipeline.seeds).")
    p.set_defaults(func=_cmd_sweep_temperature)

    p = sub.add_parser("pipeline", help="collect -> train-vae -> train-agent -> compare.")
    _add_config_args(p, "Pipeline folder (re-run to resume; unchanged stages are skipped).")
    p.set_defaults(func=_cmd_pipeline)

    p = sub.add_parser("configs", help="List the packaged configs; `configs show NAME` prints one.")
    p.add_argument("action", nargs="?", choices=["show"], help="Print a config.")
    p.add_argument("name", nargs="?", metavar="NAME", help="A packaged config's name.")
    p.set_defaults(func=_cmd_configs)

    p = sub.add_parser("data", help="Inspect, verify, export or import a dataset.")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    for name, text in (("info", "Episodes, frames, size, returns."), ("verify", "Check all.")):
        q = data_sub.add_parser(name, help=text)
        q.add_argument("data", metavar="DATA")
    q = data_sub.add_parser("export", help="Write a dataset as a Minari dataset.")
    q.add_argument("data", metavar="DATA")
    q.add_argument("--format", choices=["minari"], default="minari", help="Only minari.")
    q.add_argument("--id", required=True, metavar="NAMESPACE/ENV/NAME-v0",
                   help="Minari dataset id (written under $MINARI_DATASETS_PATH, ~/.minari).")
    q = data_sub.add_parser("import", help="Write a local Minari dataset as a dataset.")
    q.add_argument("minari_id", metavar="MINARI_ID")
    q.add_argument("--out", "-o", required=True, metavar="DATA", help="New dataset folder.")
    p.set_defaults(func=_cmd_data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``worldmodel`` console script and ``python -m worldmodel``."""
    from gymnasium.error import Error as GymError

    from worldmodel.utils import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(-1 if args.quiet else 1 if args.verbose else 0)
    try:
        return int(args.func(args))
    except UserError as e:
        print(f"worldmodel {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except GymError as e:
        print(f"worldmodel {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"worldmodel {args.command}: interrupted; re-run to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
