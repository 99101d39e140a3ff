"""The ``kubetune`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from kubetune.spec.model import SpecError, parse_job_file
from kubetune.spec.template import JOB_DIGEST_ENV
from kubetune.study.urls import STORAGE_ENV
from kubetune.version import __version__

EXIT_INVALID = 2


# Commands that own their arguments, in the module that implements them. The operator's lives
# on the operator side, so the trainer side never imports kopf or the Kubernetes client.
DELEGATED = {
    "operator": ("kubetune_operator.main:main", "run the Kubernetes operator"),
    "ensemble": ("kubetune.ensemble.commands:ensemble_main",
                 "internal: build the ensemble of a finished study (started by the runner or "
                 "the operator)"),
    "export": ("kubetune.ensemble.commands:export_main",
               "write a job's ensemble as a self-contained model folder"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        return _delegate(argv[0], argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_INVALID
    try:
        code = int(args.handler(args) or 0)
        sys.stdout.flush()  # here, not at exit, where a closed pipe is an unhandled error
        return code
    except BrokenPipeError:  # `kubetune results DIR | head`: the reader has gone
        return closed_pipe()


def closed_pipe() -> int:
    """Stop quietly when the reader of our output went away, as Unix tools do: no traceback,
    and no second error when Python flushes stdout at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune", description="Hyperparameter tuning with Optuna, locally or on "
                                     "Kubernetes, from one TuningJob file.")
    parser.add_argument("--version", action="version", version=f"kubetune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a TuningJob on this machine")
    run.add_argument("file", help="TuningJob YAML file")
    run.add_argument("--workers", type=_positive_int, metavar="N",
                     help="worker processes (default: spec.budget.parallelism)")
    run.add_argument("--storage", metavar="URL",
                     help="Optuna storage: postgresql://USER:PASS@HOST/DB, sqlite:///FILE.db, "
                          "or a journal file path (default: OUTPUT/study.journal)")
    run.add_argument("--output", metavar="DIR",
                     help="output folder (default: ./kubetune-runs/<name>)")
    run.add_argument("--artifacts", metavar="DIR",
                     help="artifact folder (default: spec.artifacts.path or OUTPUT/artifacts)")
    run.add_argument("--code", action="append", metavar="DIR", default=[],
                     help="a folder with the code of an entrypoint or command trainer, put on "
                          "the workers' import path after the job file's folder (repeatable)")
    run.add_argument("--metrics-port", type=_port, metavar="PORT",
                     help="serve Prometheus metrics on this port while the job runs")
    run.add_argument("--no-plots", action="store_true",
                     help="do not write learning curves and search plots to OUTPUT/plots")
    run.add_argument("--quiet", action="store_true", help="print nothing but errors")
    run.add_argument("--verbose", action="store_true", help="log what the runner does")
    run.set_defaults(handler=_run)

    validate = sub.add_parser("validate", help="check TuningJob files (exit 2 if any is "
                                               "invalid)")
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.set_defaults(handler=_validate_files)

    presets = sub.add_parser("presets", help="list the searchSpace presets and their ranges")
    presets.set_defaults(handler=_presets)

    results = sub.add_parser("results", help="show the leaderboard of a local run or of a "
                                             "TuningJob on the cluster")
    results.add_argument("path", metavar="PATH|NAME",
                         help="a run's output folder or result.json, or a TuningJob's name")
    results.add_argument("-n", "--namespace", help="namespace of the TuningJob (cluster)")
    results.add_argument("--storage", metavar="URL",
                         help="read the study from this storage instead of the status")
    results.add_argument("--json", action="store_true", help="print the status as JSON")
    results.set_defaults(handler=_results)

    plot = sub.add_parser("plot", help="write learning curves and search plots of a job")
    plot.add_argument("target", metavar="DIR|NAME",
                      help="a local run's output folder, or a TuningJob's name with --storage")
    plot.add_argument("--storage", metavar="URL",
                      help=f"the study's storage (default: DIR/study.journal; also ${STORAGE_ENV})")
    plot.add_argument("-n", "--namespace", default="default", help="the TuningJob's namespace")
    plot.add_argument("--output", metavar="DIR", help="where the PNGs go (default: DIR/plots "
                                                      "or ./<name>-plots)")
    plot.set_defaults(handler=_plot)

    dashboard = sub.add_parser("dashboard", help="serve optuna-dashboard on a local run's or a "
                                                 "TuningJob's study (read-only by default)")
    dashboard.add_argument("target", nargs="?", metavar="DIR|NAME",
                           help="a local run's output folder or name, or a TuningJob's name "
                                "(default: the whole --storage)")
    dashboard.add_argument("-n", "--namespace",
                           help="namespace of the TuningJob (cluster; default: the "
                                "kubeconfig's)")
    dashboard.add_argument("--storage", metavar="URL",
                           help=f"the study's storage (default: DIR/study.journal, the "
                                f"cluster job's storage Secret, or ${STORAGE_ENV})")
    dashboard.add_argument("--db-address", metavar="HOST:PORT",
                           help="connect to the cluster job's database here instead of the "
                                "host in its Secret (e.g. through kubectl port-forward)")
    dashboard.add_argument("--host", default="127.0.0.1",
                           help="address to listen on (default: 127.0.0.1)")
    dashboard.add_argument("--port", type=_port_or_zero, default=8080,
                           help="port to listen on (default: 8080; 0: any free port)")
    dashboard.add_argument("--allow-edits", action="store_true",
                           help="let visitors change notes and trial states and delete or "
                                "rename studies (refused by default)")
    dashboard.add_argument("--with-history", action="store_true",
                           help="also send each trial's per-epoch history:N attributes "
                                "(hidden by default: they slow large studies down)")
    dashboard.set_defaults(handler=_dashboard)

    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)

    worker = sub.add_parser("worker", help="internal: run trials of a study (started by the "
                                           "runner or the operator)")
    worker.add_argument("--storage", metavar="URL", default=os.environ.get(STORAGE_ENV),
                        help=f"Optuna storage (default: ${STORAGE_ENV}; prefer the variable "
                             "for URLs with a password: a command line is visible to all)")
    worker.add_argument("--study", required=True, metavar="NAME")
    worker.add_argument("--worker-id", required=True, metavar="ID")
    worker.add_argument("--artifacts", required=True, metavar="DIR")
    worker.add_argument("--threads", type=_positive_int, metavar="N",
                        help="torch CPU threads (default: $KUBETUNE_THREADS, which the operator "
                             "sets from the pod's CPU limit or request; else torch's default)")
    worker.add_argument("--code", action="append", metavar="DIR", default=[],
                        help="a folder with the trainer's code, put on the import path; the "
                             "first is the working directory of command trials (default: the "
                             "working directory)")
    worker.set_defaults(handler=_worker)
    return parser


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (1-65535), got {value}")
    return value


def _port_or_zero(text: str) -> int:
    return 0 if text.strip() == "0" else _port(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _load(path: str):
    try:
        return parse_job_file(path)
    except SpecError as err:
        for problem in err.problems:
            print(problem, file=sys.stderr)
        return None


def _validate(args: argparse.Namespace) -> int:
    job = _load(args.file)
    if job is None:
        return EXIT_INVALID
    # What a cluster with the chart's default policy refuses (a hostPath volume, another
    # service account...): the author learns it before applying the job.
    from kubetune.spec.policy import Policy, problems

    refused = problems(job, Policy())
    for path, message in refused:
        print(f"{path}: {message}", file=sys.stderr)
    if refused:
        return EXIT_INVALID
    print("valid")
    return 0


def _validate_files(args: argparse.Namespace) -> int:
    """One file: its verdict as ``_validate`` prints it. Several: a verdict line per file
    (``FILE: valid`` / ``FILE: invalid``) and each problem prefixed with its file."""
    if len(args.files) == 1:
        return _validate(argparse.Namespace(file=args.files[0]))
    import contextlib
    import io

    worst = 0
    for path in args.files:
        problems = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(problems):
            code = _validate(argparse.Namespace(file=path))
        for line in problems.getvalue().splitlines():
            print(f"{path}: {line}", file=sys.stderr)
        print(f"{path}: {'valid' if code == 0 else 'invalid'}")
        worst = max(worst, code)
    return worst


def _presets(args: argparse.Namespace) -> int:
    from kubetune.spec.presets import listing

    print(listing())
    return 0


def _run(args: argparse.Namespace) -> int:
    job = _load(args.file)  # before importing torch and Optuna: a bad file fails fast
    if job is None:
        return EXIT_INVALID
    from pathlib import Path

    from kubetune.local.runner import RunError, RunOptions, configure_logging, run_job
    from kubetune.study.schema import StudyMismatch

    configure_logging(args.verbose)
    options = RunOptions(workers=args.workers, storage=args.storage, output=args.output,
                         artifacts=args.artifacts, quiet=args.quiet,
                         metrics_port=args.metrics_port, plots=not args.no_plots,
                         code=[str(Path(args.file).resolve().parent), *args.code])
    try:
        return run_job(job, options)
    except (RunError, StudyMismatch) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID


def _results(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from kubetune.local.progress import print_summary
    from kubetune.study.runs import find_run

    path = Path(args.path)
    if not path.exists() and "/" not in args.path and not args.path.endswith(".json"):
        local = None if args.storage or args.namespace else find_run(args.path)
        if local is None:
            return _cluster_results(args)
        path = local
    if path.is_dir():
        path = path / "result.json"
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        print(f"error: cannot read {path}: {err}", file=sys.stderr)
        return EXIT_INVALID
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print_summary(status)
    return 0


def _cluster_results(args: argparse.Namespace) -> int:
    """A TuningJob's results from the cluster (or its study, with ``--storage``)."""
    from kubetune_operator.results import main as cluster_results

    if not args.storage:
        from kubetune.study.runs import default_output
        from kubetune_operator.client import load_credentials

        try:
            load_credentials()
        except LookupError as err:
            print(f"error: {args.path} is neither a local run (no {default_output(args.path)}) "
                  f"nor a TuningJob on a cluster kubetune can reach ({err})\n"
                  "  a local run: give its output folder (kubetune results DIR)\n"
                  "  a cluster job: set KUBECONFIG, or read its study with --storage URL",
                  file=sys.stderr)
            return EXIT_INVALID
    return cluster_results(args)


def _dashboard(args: argparse.Namespace) -> int:
    from kubetune.local.dashboard import main as dashboard

    def cluster_target(name: str, namespace: str | None, db_address: str | None):
        from kubetune_operator.results import dashboard_target

        return dashboard_target(name, namespace, db_address)

    return dashboard(args, cluster_target)


def _plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    import optuna

    from kubetune.local.plots import write_plots
    from kubetune.study.runs import default_output, find_run
    from kubetune.study.schema import load_job
    from kubetune.study.schema import study_name as study_of
    from kubetune.study.storage import open_storage, silence_optuna

    silence_optuna()
    folder = Path(args.target)
    if not folder.is_dir() and not args.storage and "/" not in args.target:
        folder = find_run(args.target) or folder  # the name of a run in ./kubetune-runs
    if folder.is_dir() and not args.storage:
        storage_url, output = str(folder / "study.journal"), args.output or folder / "plots"
        if not Path(storage_url).exists():
            print(f"error: {folder} holds no study.journal; give --storage", file=sys.stderr)
            return EXIT_INVALID
        names = optuna.get_all_study_names(open_storage(storage_url))
        study_name = names[0] if len(names) == 1 else None
    else:
        storage_url = args.storage or os.environ.get(STORAGE_ENV)
        study_name = study_of(args.namespace, args.target)
        output = args.output or Path(f"{args.target}-plots")
        if not storage_url:
            print(f"error: {args.target} is neither a run's output folder nor the name of a "
                  f"local run (no {default_output(args.target)})\n"
                  "  a local run: give its output folder (kubetune plot DIR)\n"
                  f"  a cluster job: give its study's storage with --storage URL (or "
                  f"${STORAGE_ENV})", file=sys.stderr)
            return EXIT_INVALID
    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage_url))
    except (KeyError, ValueError) as err:
        print(f"error: no study {study_name!r} in that storage: {err}", file=sys.stderr)
        return EXIT_INVALID
    objective = load_job(study).spec.objective
    paths = write_plots(study, Path(output), metric=objective.metric,
                        direction=objective.resolved_direction)
    for path in paths:
        print(path)
    return 0 if paths else 1


def _delegate(name: str, argv: list[str]) -> int:
    import importlib

    target, _ = DELEGATED[name]
    module, _, function = target.partition(":")
    return int(getattr(importlib.import_module(module), function)(argv) or 0)


def _worker(args: argparse.Namespace) -> int:
    import logging

    from kubetune.builtin.threads import env_threads
    from kubetune.worker.loop import WorkerOptions, run_worker

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.storage:
        print(f"error: give --storage or set {STORAGE_ENV}", file=sys.stderr)
        return EXIT_INVALID
    return run_worker(WorkerOptions(storage=args.storage, study=args.study,
                                    worker_id=args.worker_id, artifacts=args.artifacts,
                                    threads=args.threads or env_threads(), code=args.code,
                                    job_digest=os.environ.get(JOB_DIGEST_ENV)))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
