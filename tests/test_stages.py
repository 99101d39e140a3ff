"""Coarse-to-fine stages: narrowing on known trials, cheap fidelities, the per-stage view of the
study, and a two-stage job run end to end with ``kubetune run``."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
from optuna.distributions import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState, create_trial

from kubetune.builtin.data import load_data
from kubetune.search.narrowing import default_top, describe, narrow
from kubetune.search.stages import (
    current_stage,
    stage_for_new_trial,
    stage_space,
    stage_view,
    status_view,
)
from kubetune.spec.model import parse_job
from kubetune.study.schema import SPACES_ATTR, create_or_load_study, history_of

from conftest import fast_job, kubetune, write_job

LR = FloatDistribution(1e-4, 1e-1, log=True)
DROPOUT = FloatDistribution(0.0, 0.5)
STEPPED = FloatDistribution(0.0, 0.5, step=0.05)
HIDDEN = IntDistribution(16, 1024, log=True)
BATCH = IntDistribution(16, 256, step=16)
LAYERS = IntDistribution(1, 3)
OPTIMIZER = CategoricalDistribution(["adam", "adamw", "sgd"])
SPACE = {"lr": LR, "dropout": DROPOUT, "stepped": STEPPED, "hidden": HIDDEN, "batch": BATCH,
         "layers": LAYERS, "optimizer": OPTIMIZER}
TOP = [{"lr": 1e-3, "dropout": 0.1, "stepped": 0.1, "hidden": 64, "batch": 64, "layers": 2,
        "optimizer": "sgd"},
       {"lr": 1e-2, "dropout": 0.3, "stepped": 0.2, "hidden": 128, "batch": 96, "layers": 2,
        "optimizer": "adam"}]


# ------------------------------------------------------------------------------ narrowing
def test_narrowing_on_known_trials_gives_exact_ranges():
    assert narrow(SPACE, SPACE, TOP) == {
        # log: 1e-3..1e-2 is one decade, widened by max(1/4, 3/10 of the 3-decade range):
        # 10^-3.3..10^-1.7, bounds rounded outwards to 4 significant digits
        "lr": FloatDistribution(0.0005011, 0.01996, log=True),
        # linear: 0.1..0.3 widened by max(0.05, 0.05)
        "dropout": FloatDistribution(0.05, 0.35),
        # the same, out to the next grid points of step 0.05
        "stepped": FloatDistribution(0.05, 0.25, step=0.05),
        # log int: 64..128 widened by max(ln 2 / 4, ln 64 / 10) in log space: 42.2..194.0
        "hidden": IntDistribution(42, 194, log=True),
        # int with step 16: 64..96 widened by max(8, 24): 40..120, at the nearest grid points
        "batch": IntDistribution(48, 128, step=16),
        # both top trials used 2 layers, but 2 trials are no evidence for one value: the
        # neighbours on the grid stay (see test_a_noisy_ranking_keeps_a_region_not_a_point)
        "layers": IntDistribution(1, 3),
        # the choices the top trials used, in the original order
        "optimizer": CategoricalDistribution(["adam", "sgd"]),
    }


def test_narrowing_never_leaves_the_original_range():
    top = [{"lr": 1e-4, "dropout": 0.5, "hidden": 1024, "layers": 1}]
    space = {k: SPACE[k] for k in ("lr", "dropout", "hidden", "layers")}
    assert narrow(space, space, top) == {
        "lr": FloatDistribution(1e-4, 0.0001996, log=True),  # 10^-4 .. 10^-3.7
        "dropout": FloatDistribution(0.45, 0.5),
        "hidden": IntDistribution(676, 1024, log=True),
        "layers": IntDistribution(1, 2),  # one value from one trial: its neighbour stays
    }


def test_a_second_narrowing_may_widen_again_within_the_original_range():
    """A stage's range is narrowed from its own range but clipped only by the job's: a best
    value at the edge of the stage's range can pull the next range past that edge."""
    stage = {"dropout": FloatDistribution(0.2, 0.3)}
    assert narrow(stage, {"dropout": DROPOUT}, [{"dropout": 0.2}, {"dropout": 0.3}]) == {
        "dropout": FloatDistribution(0.175, 0.325)}


def test_without_top_trials_the_space_is_kept():
    assert narrow(SPACE, SPACE, []) == SPACE


def test_categorical_choices_keep_their_types():
    space = {"batch_norm": CategoricalDistribution([True, False]),
             "hidden": CategoricalDistribution([1, 32, 64])}
    top = [{"batch_norm": True, "hidden": 1}, {"batch_norm": True, "hidden": 64}]
    ranked = top * 10  # 20 trials, every one with batch_norm True: overwhelming
    assert narrow(space, space, top, ranked) == {"batch_norm": CategoricalDistribution([True]),
                                         "hidden": CategoricalDistribution([1, 64])}


def _noisy_coarse_ranking(seed: int, trials: int) -> list[dict]:
    """A cheap stage's ranking: the score barely depends on the knobs and the noise of a
    low-fidelity run dominates, so its top few trials share values by chance."""
    rng = np.random.default_rng(seed)
    trials_params = [{"layers": int(rng.integers(1, 4)),
                      "optimizer": str(rng.choice(["adam", "adamw", "sgd"])),
                      "batch_size": int(2 ** rng.uniform(5, 9)),
                      "score": rng.normal(0.6, 0.05)} for _ in range(trials)]
    return sorted(trials_params, key=lambda p: -p["score"])


NOISY_SPACE = {"layers": LAYERS, "optimizer": OPTIMIZER,
               "batch_size": IntDistribution(32, 512, log=True)}


def test_a_noisy_ranking_keeps_a_region_not_a_point():
    """The issue-18 run: a coarse ranking of 12-36 cheap trials fixed layers, the optimizer
    and batch_size 32 from its top 3-8 trials. Whatever the top trials share by chance, no
    discrete knob is left with one value, and batch_size keeps more than a sliver of 32."""
    # a top where chance made every knob agree: all sgd, 2 layers, batch 32
    ranked = ([{"layers": 2, "optimizer": "sgd", "batch_size": 32}] * 5
              + [{"layers": 3, "optimizer": "adam", "batch_size": 181},
                 {"layers": 1, "optimizer": "adamw", "batch_size": 64}] * 5)
    space = narrow(NOISY_SPACE, NOISY_SPACE, ranked[:5], ranked)
    assert space["layers"] == IntDistribution(2, 3)  # 2 and the runner-up's 3
    assert space["optimizer"] == CategoricalDistribution(["adam", "sgd"])
    assert space["batch_size"].low == 32 and space["batch_size"].high >= 181
    # and over many random noisy rankings, at every stage size up to 36 trials
    for seed in range(50):
        for trials in (6, 12, 24, 36):
            ranked = _noisy_coarse_ranking(seed, trials)
            top = ranked[:default_top(trials)]
            space = narrow(NOISY_SPACE, NOISY_SPACE, top, ranked)
            assert not space["layers"].single() and not space["optimizer"].single()
            assert not space["batch_size"].single()


def test_strong_evidence_still_narrows_to_one_value():
    """20 or more trials whose best 2 x top all used one value fix it; weaker evidence keeps
    the runner-up too; and choices no top trial used are dropped as before."""
    best = {"layers": 2, "optimizer": "adam", "batch_size": 64}
    other = [{"layers": 1, "optimizer": "sgd", "batch_size": 400},
             {"layers": 3, "optimizer": "sgd", "batch_size": 300}]
    ranked = [best] * 10 + other * 5  # 20 trials, the best 10 agree
    space = narrow(NOISY_SPACE, NOISY_SPACE, ranked[:4], ranked)
    assert space["layers"] == IntDistribution(2, 2)
    assert space["optimizer"] == CategoricalDistribution(["adam"])
    assert space["batch_size"].high < 128
    # the same top, but the band of the best 8 holds another value: the region stays
    mixed = [best] * 7 + [other[0]] + [best] * 2 + other * 5
    space = narrow(NOISY_SPACE, NOISY_SPACE, mixed[:4], mixed)
    assert space["layers"] == IntDistribution(1, 2)
    assert space["optimizer"] == CategoricalDistribution(["adam", "sgd"])
    # fewer than 20 trials never fix a value, however unanimous
    space = narrow(NOISY_SPACE, NOISY_SPACE, ranked[:4], ranked[:19])
    assert not space["layers"].single() and not space["optimizer"].single()
    # two values among the top: the third, unused by them, is dropped at any size
    two = [{"optimizer": "adam"}, {"optimizer": "adamw"}, {"optimizer": "sgd"}]
    assert narrow({"optimizer": OPTIMIZER}, {"optimizer": OPTIMIZER}, two[:2], two) == {
        "optimizer": CategoricalDistribution(["adam", "adamw"])}


@pytest.mark.parametrize("complete, top", [(0, 3), (10, 3), (15, 3), (16, 4), (30, 6)])
def test_default_top_is_the_larger_of_3_and_a_fifth(complete, top):
    assert default_top(complete) == top


def test_describe_is_short():
    assert describe(narrow(SPACE, SPACE, TOP)) == {
        "lr": "0.0005011..0.01996 log", "dropout": "0.05..0.35",
        "stepped": "0.05..0.25 step 0.05", "hidden": "42..194 int log",
        "batch": "48..128 int step 16", "layers": "1..3 int", "optimizer": "adam | sgd"}


# ------------------------------------------------------------------------------ fidelities
def _job(**stages_spec):
    job = fast_job(stages=[{"trials": 2, **stages_spec}, {"trials": 2}])
    job["spec"]["budget"].pop("maxTrials")
    return parse_job(job)


def test_a_data_fraction_subsamples_the_training_split_only_and_stratified():
    job = _job(data={"fraction": 0.25})
    full, cheap = load_data(job), load_data(job, stage=0)
    assert load_data(job, stage=1) is full  # the last stage: full fidelity
    assert load_data(job, stage=0) is cheap  # cached: one subsample per process
    for split in ("val", "test"):
        assert np.array_equal(getattr(cheap, f"X_{split}"), getattr(full, f"X_{split}"))
    _, full_counts = np.unique(full.y_train, return_counts=True)
    _, cheap_counts = np.unique(cheap.y_train, return_counts=True)
    assert list(cheap_counts) == [round(n * 0.25) for n in full_counts]
    rows = {r.tobytes() for r in full.X_train}
    assert all(r.tobytes() in rows for r in cheap.X_train)


def test_data_classes_keeps_the_first_classes_in_every_split():
    job = _job(data={"classes": 2})
    full, cheap = load_data(job), load_data(job, stage=0)
    assert cheap.classes == full.classes[:2] and cheap.n_classes == 2
    for split in ("train", "val", "test"):
        y_full, y_cheap = getattr(full, f"y_{split}"), getattr(cheap, f"y_{split}")
        assert set(y_cheap) == {0, 1} and len(y_cheap) == int(np.sum(y_full < 2))


def test_a_reduced_dataset_knows_its_share_of_the_training_rows():
    full = load_data(_job(epochs=1))
    job = _job(data={"fraction": 0.5})
    half = load_data(job, stage=0)
    assert full.share == 1.0
    assert half.share == pytest.approx(len(half.y_train) / len(full.y_train), abs=1e-9)
    assert 0.45 < half.share < 0.55 and load_data(job, stage=1).share == 1.0


def test_compute_counts_every_epoch_and_weights_reduced_data():
    from kubetune.job.status import compute

    def trial(state, epochs, **attrs):
        return create_trial(state=state, value=0.5 if state == TrialState.COMPLETE else None,
                            user_attrs={"epochs": epochs, **attrs})

    full = [trial(TrialState.COMPLETE, 20), trial(TrialState.PRUNED, 5),
            trial(TrialState.FAIL, 3), trial(TrialState.RUNNING, 7)]
    assert compute(full) == {"epochsTrained": 35}  # full data: no dataEpochs
    coarse = [trial(TrialState.COMPLETE, 5, data_share=0.25),
              trial(TrialState.PRUNED, 2, data_share=0.25)]
    assert compute(full + coarse) == {"epochsTrained": 42, "dataEpochs": 36.8}
    assert compute([]) == {"epochsTrained": 0}
    # a retry that resumed from its failed attempt's checkpoint at epoch 4 trained 16 more;
    # a trial copied from another job (warmStart.fromJob) trained nothing here
    resumed = trial(TrialState.COMPLETE, 20, resumed_from=4)
    copied = trial(TrialState.COMPLETE, 20, **{"kubetune:copied_from": "other"})
    assert compute(full + [resumed, copied]) == {"epochsTrained": 51}


def test_a_resumed_attempt_records_the_epoch_it_resumed_from():
    import optuna

    from kubetune.spec.model import parse_job
    from kubetune.study.schema import epochs_trained
    from kubetune.worker.contract import EpochReporter

    study = optuna.create_study(direction="maximize")
    for first in (1, 5):  # from scratch; from a checkpoint at epoch 4
        trial = study.ask()
        reporter = EpochReporter(trial, parse_job(fast_job()).spec)
        for epoch in range(first, 11):
            reporter.report(epoch, {"val_accuracy": 0.5, "train_loss": 1.0})
        reporter.flush()
        assert epochs_trained(trial.user_attrs) == 11 - first


def test_a_stage_epochs_fidelity_overrides_the_epochs():
    from kubetune.search.stages import trial_params

    job = _job(epochs=1)
    coarse = create_trial(state=TrialState.COMPLETE, value=0.5, user_attrs={"stage": 0})
    fine = create_trial(state=TrialState.COMPLETE, value=0.5, user_attrs={"stage": 1})
    assert trial_params(job, coarse)["epochs"] == 1
    assert trial_params(job, fine)["epochs"] == 3


# ------------------------------------------------------------------------------ in the study
def _trial(stage: int, state=TrialState.COMPLETE, value=0.5, **params) -> optuna.trial.FrozenTrial:
    dists = {"lr": FloatDistribution(1e-3, 1e-1, log=True),
             "hidden": CategoricalDistribution([16, 32])}
    params = {"lr": 0.01, "hidden": 16, **params}
    return create_trial(state=state, value=value if state == TrialState.COMPLETE else None,
                        params=params, distributions=dists,
                        user_attrs={"stage": stage,
                                    "fidelity": "reduced" if stage == 0 else "full"})


def test_a_stage_starts_only_when_the_previous_one_has_finished():
    job = _job(epochs=1)
    spec = job.spec
    running = [_trial(0), _trial(0, TrialState.RUNNING)]
    assert stage_for_new_trial(spec, running[:1]) == 0
    assert stage_for_new_trial(spec, running) is None  # stage 0 is full but still running
    assert current_stage(spec, running) == 0
    done = [_trial(0), _trial(0, TrialState.PRUNED)]
    assert stage_for_new_trial(spec, done) == 1 and current_stage(spec, done) == 1
    assert stage_for_new_trial(spec, done + [_trial(1), _trial(1)]) is None
    # a running job on a cluster adopts a raised maxTrials but not its stages: the last stage
    # takes the extra trials
    raised = spec.model_copy(update={"budget": spec.budget.model_copy(update={"max_trials": 5})})
    assert stage_for_new_trial(raised, done + [_trial(1), _trial(1)]) == 1


def _study(job):
    return create_or_load_study(optuna.storages.InMemoryStorage(), job)


def test_the_narrowed_space_is_computed_once_and_stored_in_the_study():
    job = _job(epochs=1, top=1)
    study = _study(job)
    for trial in (_trial(0, value=0.9, lr=0.002), _trial(0, value=0.1, lr=0.05, hidden=32)):
        study.add_trial(trial)
    trials = study.get_trials()
    space = stage_space(job.spec, study, 1, trials)
    # the best trial's, and the runner-up's: 2 trials are no evidence for one value
    assert space["hidden"] == CategoricalDistribution([16, 32])
    assert space["lr"].low <= 0.002 <= space["lr"].high < 0.05
    stored = study.user_attrs[SPACES_ATTR]
    assert stored["1"]["top"] == [0]
    study.add_trial(_trial(0, value=1.0, lr=0.09))  # too late: stage 1 has its space
    assert stage_space(job.spec, study, 1, study.get_trials()) == space
    stage, stages = status_view(job.spec, study.get_trials(), stored)
    assert stage == "stage-2"
    assert stages[1]["ranges"]["hidden"] == "16 | 32" and stages[0]["fidelity"] == "reduced"


def test_each_stage_samples_and_prunes_among_its_own_trials():
    job = _job(epochs=1)
    study = _study(job)
    for value in (0.9, 0.95, 0.92):  # stage 0 searched hidden in [16, 32]
        study.add_trial(create_trial(
            state=TrialState.COMPLETE, value=value, intermediate_values={1: value},
            params={"hidden": 16}, distributions={"hidden": CategoricalDistribution([16, 32])},
            user_attrs={"stage": 0}))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=1)
    space = {"hidden": CategoricalDistribution([32]),
             "lr": FloatDistribution(1e-3, 1e-1, log=True)}
    original = {"hidden": CategoricalDistribution([16, 32]), "lr": space["lr"]}
    view, asked = stage_view(study, 1, space, original, optuna.samplers.RandomSampler(seed=0),
                             pruner)
    assert asked["hidden"] == CategoricalDistribution([16, 32])  # Optuna's: one per study
    trial = view.ask(fixed_distributions=asked)
    assert trial.user_attrs["stage"] == 1 and trial.params["hidden"] == 32
    trial.report(0.1, 1)
    assert not trial.should_prune()  # far below stage 0, but stage 1 has no peer yet
    assert len(view.get_trials()) == 1 and len(study.get_trials()) == 4


# ------------------------------------------------------------------------------ end to end
def test_two_stage_job_ends_with_a_full_fidelity_best_and_ensemble(tmp_path, postgres_url):
    """The coarse stage scores on 2 of 3 classes (easier), so its trials would top the
    leaderboard if reduced-fidelity trials competed. On PostgreSQL, as on a cluster."""
    job = fast_job("staged", budget={"parallelism": 2}, ensemble={"topK": 3, "method": "average"},
                   stages=[{"name": "coarse", "trials": 4, "top": 2, "epochs": 2,
                            "data": {"fraction": 0.5, "classes": 2}},
                           {"name": "fine", "trials": 3}])
    job["spec"]["budget"].pop("maxTrials")
    job["spec"]["searchSpace"]["optimizer"] = {"type": "categorical",
                                              "choices": ["adam", "adamw", "sgd"]}
    out = tmp_path / "out"
    proc = kubetune("run", write_job(tmp_path / "job.yaml", job), "--output", out, "--no-plots",
                    "--storage", postgres_url)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    from kubetune.study.storage import open_storage

    study = optuna.load_study(study_name="default/staged", storage=open_storage(postgres_url))
    trials = study.get_trials()
    coarse = [t for t in trials if t.user_attrs["stage"] == 0]
    fine = [t for t in trials if t.user_attrs["stage"] == 1]
    assert len(coarse) == 4 and len(fine) == 3
    assert {t.user_attrs["fidelity"] for t in coarse} == {"reduced"}
    assert {t.user_attrs["fidelity"] for t in fine} == {"full"}
    assert all(len(history_of(t.user_attrs)) == 2 for t in coarse
               if t.state == TrialState.COMPLETE)
    assert all(len(history_of(t.user_attrs)) == 3 for t in fine if t.state == TrialState.COMPLETE)
    assert min(t.datetime_start for t in fine) >= max(t.datetime_complete for t in coarse)
    space = json.loads(json.dumps(study.user_attrs[SPACES_ATTR]["1"]))
    lr = json.loads(space["space"]["lr"])["attributes"]
    assert all(lr["low"] <= t.params["lr"] <= lr["high"] for t in fine)

    result = json.loads((out / "result.json").read_text())
    full = {t.number for t in fine}
    assert result["phase"] == "Succeeded"
    assert result["best"]["trial"] in full
    assert {e["trial"] for e in result["leaderboard"]} <= full
    best_coarse = max(t.value for t in coarse if t.state == TrialState.COMPLETE)
    assert best_coarse > result["best"]["value"], "the test needs coarse trials that score higher"
    members = {m["trial"] for m in result["ensemble"]["members"]}
    assert members and members <= full
    assert result["stage"] == "fine"
    assert [s["name"] for s in result["stages"]] == ["coarse", "fine"]
    assert result["stages"][1]["ranges"]["lr"].endswith("log")
    assert "stage coarse: 4/4 trials, reduced fidelity" in proc.stdout
    # compute: the coarse stage's epochs count for the part of the rows they trained on
    epochs = sum(t.user_attrs.get("epochs", 0) for t in trials)
    assert result["compute"]["epochsTrained"] == epochs
    assert all(0 < t.user_attrs["data_share"] < 0.5 for t in coarse)  # half of 2 of 3 classes
    assert "data_share" not in {k for t in fine for k in t.user_attrs}
    weighted = sum(t.user_attrs.get("epochs", 0) * t.user_attrs.get("data_share", 1.0)
                   for t in trials)
    assert result["compute"]["dataEpochs"] == round(weighted, 1) < epochs
