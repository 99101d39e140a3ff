"""``kubetune ensemble`` (the step the runner or operator starts) and ``kubetune export``."""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kubetune.spec.template import JOB_DIGEST_ENV
from kubetune.study.runs import find_run
from kubetune.study.urls import STORAGE_ENV

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2

log = logging.getLogger("kubetune.ensemble")


# ---------------------------------------------------------------- kubetune ensemble
def ensemble_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kubetune ensemble",
        description="Build the ensemble of a finished study and store its result in the study "
                    "(the runner and the operator start this after the search).")
    parser.add_argument("--study", required=True, metavar="NAME")
    parser.add_argument("--artifacts", required=True, metavar="DIR",
                        help="artifact folder the workers saved models and predictions in")
    parser.add_argument("--storage", metavar="URL", default=os.environ.get(STORAGE_ENV),
                        help=f"Optuna storage (default: ${STORAGE_ENV})")
    args = parser.parse_args(list(argv))
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.storage:
        print(f"error: give --storage or set {STORAGE_ENV}", file=sys.stderr)
        return EXIT_INVALID

    import optuna

    from kubetune.builtin.threads import env_threads
    from kubetune.ensemble.step import describe, run_ensemble_step
    from kubetune.study.storage import make_artifact_store, open_storage, silence_optuna

    silence_optuna()
    threads = env_threads()
    if threads:  # the pod's CPU, as for the workers (the operator sets KUBETUNE_THREADS)
        import torch

        torch.set_num_threads(threads)
        log.info("ensemble: %d torch threads", torch.get_num_threads())
    try:
        study = optuna.load_study(study_name=args.study, storage=open_storage(args.storage))
        record = run_ensemble_step(study, make_artifact_store(args.artifacts),
                                   digest=os.environ.get(JOB_DIGEST_ENV))
    except Exception as err:  # the job core retries the step and reports this output
        log.exception("ensemble step failed: %s: %s", type(err).__name__, err)
        return EXIT_FAILED
    log.info("%s", describe(record))
    return EXIT_OK


# ---------------------------------------------------------------- kubetune export
def export_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kubetune export",
        description="Write a job's ensemble as a self-contained model folder, loaded with "
                    "kubetune.load_ensemble(FOLDER).")
    parser.add_argument("source", metavar="RUN_DIR|NAME",
                        help="a local run's output folder or name (a run in ./kubetune-runs), "
                             "or a TuningJob's name (with --storage)")
    parser.add_argument("--output", "-o", required=True, metavar="DIR",
                        help="folder to write (new, empty, or an earlier export)")
    parser.add_argument("--storage", metavar="URL", default=None,
                        help=f"Optuna storage of the study (default for a run folder: its "
                             f"study.journal; for a name: ${STORAGE_ENV})")
    parser.add_argument("-n", "--namespace", default=None,
                        help="namespace of the TuningJob (default: default)")
    parser.add_argument("--artifacts", metavar="DIR", default=None,
                        help="artifact folder (default: the run's artifacts/ or the job's "
                             "spec.artifacts.path; the copy in the storage is used otherwise)")
    parser.add_argument("--trial", type=int, metavar="N", default=None,
                        help="export trial N's model instead of the ensemble (a complete trial "
                             "of the built-in trainer)")
    args = parser.parse_args(list(argv))

    from kubetune.ensemble.export import ExportError, write_model_folder
    from kubetune.ensemble.step import metric_name

    try:
        if args.trial is not None:
            bundle = _trial_bundle(args)
            folder = write_model_folder(bundle, Path(args.output))
            manifest = bundle["manifest"]
            print(f"wrote {folder}: trial {args.trial}, test "
                  f"{metric_name(manifest['metric'])} {manifest['testValue']:.4g} (validation "
                  f"{manifest['validationValue']:.4g})\n"
                  f"load it with: kubetune.load_ensemble({str(folder)!r})")
            return EXIT_OK
        bundle, record = _find_bundle(args)
        folder = write_model_folder(bundle, Path(args.output))
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID
    print(f"wrote {folder}: {record['method']} ensemble of {len(record['members'])} member(s), "
          f"test {metric_name(record['metric'])} {record['testValue']:.4g} (best single trial "
          f"{record['bestSingleTestValue']:.4g})\n"
          f"load it with: kubetune.load_ensemble({str(folder)!r})")
    return EXIT_OK


def _trial_bundle(args: argparse.Namespace) -> dict[str, Any]:
    """One complete trial's model, as a model folder of one member (weight 1), scored like
    the ensemble on its stored validation and test predictions."""
    import tempfile

    from kubetune.ensemble.export import ExportError
    from kubetune.ensemble.step import (
        ArtifactReader,
        EnsembleResult,
        Member,
        build_bundle,
        score,
        selection_metric,
    )
    from kubetune.study.schema import ARTIFACTS_ATTR, load_job
    from kubetune.study.storage import make_artifact_store

    study, run_dir = _open_study(args)
    job = load_job(study)
    found = [t for t in study.get_trials(deepcopy=False) if t.number == args.trial]
    if not found or found[0].state.name != "COMPLETE":
        state = found[0].state.name.lower() if found else "not in the study"
        raise ExportError(f"trial {args.trial} is {state}: only a complete trial has a model")
    trial = found[0]
    ids = trial.user_attrs.get(ARTIFACTS_ATTR) or {}
    if not job.spec.trainer.is_builtin or "model" not in ids:
        raise ExportError(f"trial {args.trial} has no model kubetune can export: it ran your own "
                          "training code, whose models are yours to keep")
    folders = [args.artifacts, run_dir / "artifacts" if run_dir else None,
               job.spec.artifacts.path]
    folder = next((f for f in filter(None, folders) if (Path(f) / ids["model"]).is_file()), None)
    if folder is None:
        tried = ", ".join(str(f) for f in filter(None, folders)) or "none"
        raise ExportError(f"trial {args.trial}'s model not found (artifact folders tried: "
                          f"{tried}); give --artifacts DIR")
    direction = job.spec.objective.resolved_direction
    metric = selection_metric(job.spec.objective.primary_metric)
    with tempfile.TemporaryDirectory(prefix="kubetune-export-") as tmp:
        reader = ArtifactReader(make_artifact_store(folder), Path(tmp))
        preds = reader.predictions(trial)
        if preds is None:
            raise ExportError(f"trial {args.trial}'s predictions cannot be read")
        model = reader.model(trial)
        params = dict(model.get("train_params") or trial.params)
        member = Member(trial.number, preds["val_proba"], preds["test_proba"],
                        load=lambda: (model["state_dict"], params))
        val = score(metric, preds["val_proba"], preds["y_val"])
        test = score(metric, preds["test_proba"], preds["y_test"])
        result = EnsembleResult("single", metric, direction, [member], [1.0], val, test, member,
                                val, test, 1)
        return build_bundle(result, job, model, source="trial")


def _open_study(args: argparse.Namespace) -> tuple[Any, Path | None]:
    """The study that ``args.source`` names (a run folder or a TuningJob), and the run folder."""
    import optuna

    from kubetune.ensemble.export import ExportError
    from kubetune.study.storage import open_storage, silence_optuna
    from kubetune.study.urls import redact

    silence_optuna()
    source = Path(args.source)
    run_dir = source if source.is_dir() else None
    if run_dir is None and not args.storage and not args.namespace:
        run_dir = find_run(args.source)  # a run of `kubetune run` without --output
    if run_dir is not None:
        url = args.storage or str(run_dir / "study.journal")
        if not args.storage and not Path(url).is_file():
            raise ExportError(f"{run_dir} holds no study.journal: not a kubetune run folder "
                              "(or give --storage)")
    else:
        url = args.storage or os.environ.get(STORAGE_ENV)
        if not url:
            raise ExportError(f"{args.source!r} is no folder here; for a TuningJob on a cluster "
                              f"give --storage URL (or set {STORAGE_ENV})")
    storage = open_storage(url)
    name = _study_name(storage, args, run_dir)
    try:
        return optuna.load_study(study_name=name, storage=storage), run_dir
    except KeyError:
        raise ExportError(f"no study {name!r} in {redact(url)}") from None


def _find_bundle(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    from kubetune.ensemble.export import ExportError
    from kubetune.study.optuna_internals import study_system_attrs
    from kubetune.study.schema import ENSEMBLE_ATTR, MODEL_ATTR, load_job

    study, run_dir = _open_study(args)
    name = study.study_name
    record = study.user_attrs.get(ENSEMBLE_ATTR)
    if not record:
        raise ExportError(f"study {name!r} has no ensemble yet: the job still runs, the "
                          "ensemble is disabled, or its step failed (see the job's "
                          "EnsembleReady condition)")
    if "reason" in record:
        raise ExportError(f"study {name!r} has no ensemble ({record['reason']}): "
                          f"{record['message']}")
    artifact = record.get("artifact")
    if not artifact:
        raise ExportError(f"study {name!r} has an ensemble but no model to export: its members "
                          "are trials of your own training code (spec.trainer.entrypoint or "
                          "command), whose models kubetune does not keep; its record lists "
                          "the members and their weights")
    folders = [args.artifacts, run_dir / "artifacts" if run_dir else None,
               load_job(study).spec.artifacts.path]
    for folder in filter(None, folders):
        path = Path(folder) / artifact
        if path.is_file():
            return _read(path.read_bytes(), str(path)), record
    copy = study_system_attrs(study).get(MODEL_ATTR)
    if copy and copy.get("artifact") == artifact:
        return _read(base64.b64decode(copy["data"]), "the copy in the study storage"), record
    tried = ", ".join(str(f) for f in filter(None, folders)) or "none"
    raise ExportError(f"ensemble artifact {artifact} not found (artifact folders tried: "
                      f"{tried}) and too large for the copy in the storage; mount or copy the "
                      "job's artifact folder here and give --artifacts DIR")


def _study_name(storage: Any, args: argparse.Namespace, run_dir: Path | None) -> str:
    """The study of a TuningJob name, or the one study of a local run's storage."""
    import optuna

    from kubetune.ensemble.export import ExportError
    from kubetune.study.schema import study_name

    if run_dir is None:
        return study_name(args.namespace or 'default', args.source)
    names = optuna.get_all_study_names(storage)
    job_name = _result_name(run_dir)
    if args.namespace and job_name:
        wanted = [study_name(args.namespace, job_name)]
    elif job_name:
        wanted = [n for n in names if n.rpartition("/")[2] == job_name]
    else:
        wanted = names
    if len(wanted) == 1 and (wanted[0] in names):
        return wanted[0]
    raise ExportError(f"cannot tell which study of {run_dir} to export (studies: "
                      f"{', '.join(names) or 'none'}); give --namespace")


def _result_name(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "result.json").read_text()).get("name")
    except (OSError, ValueError):
        return None


def _read(data: bytes, where: str) -> dict[str, Any]:
    import io

    import torch

    from kubetune.ensemble.export import BUNDLE_FORMAT, ExportError

    try:
        bundle = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ExportError(f"cannot read the ensemble from {where}: {err}") from None
    if bundle.get("manifest", {}).get("format") != BUNDLE_FORMAT:
        raise ExportError(f"the ensemble in {where} has an unknown format")
    return bundle
