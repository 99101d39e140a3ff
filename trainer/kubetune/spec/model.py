"""The TuningJob spec model: one place that parses and checks what a user wrote.

The local runner, the worker and the operator all go through ``parse_job`` /
``parse_job_file``, so a spec means one thing everywhere. Checks run in two passes: pydantic
checks shapes and types, then ``_semantic_problems`` checks what spans fields; each problem
names its field path. ``kubetune_operator.crd`` generates the CRD from these classes.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from kubetune.spec.api import API_VERSION, KIND
from kubetune.spec.knobs import (
    KNOBS,
    LOSS_METRICS,
    MINIMIZED_METRICS,
    MODELS,
    REPORTED_METRICS,
)
from kubetune.spec.presets import PRESET_KEY, PRESETS, expand
from kubetune.spec.source import YamlDocument, YamlError, load_yaml
from kubetune.spec.template import template_problems

SAMPLERS = ("random", "grid", "tpe", "cmaes", "gp", "qmc", "nsgaii")
# The samplers that search several objectives (spec.objective.metrics); CMA-ES does not.
MULTI_OBJECTIVE_SAMPLERS = ("tpe", "nsgaii", "gp", "random", "qmc", "grid")
MAX_OBJECTIVES = 4
PRUNERS = ("median", "percentile", "hyperband", "asha", "none")
# Which sampler or pruner uses which option (any other rejects it); the CRD's rules too.
SAMPLER_OPTIONS: dict[str, tuple[str, ...]] = {
    "n_startup_trials": ("tpe", "gp", "cmaes"),
    "multivariate": ("tpe",),
    "constant_liar": ("tpe",),
    "qmc_type": ("qmc",),
    "population_size": ("nsgaii",),
}
PRUNER_OPTIONS: dict[str, tuple[str, ...]] = {
    "n_startup_trials": ("median", "percentile"),
    "n_warmup_steps": ("median", "percentile"),
    "percentile": ("percentile",),
    "min_resource": ("hyperband", "asha"),
    "max_resource": ("hyperband",),
    "reduction_factor": ("hyperband", "asha"),
}
DATASETS = ("digits", "synthetic", "file")
PARAM_TYPES = ("float", "int", "categorical")
# The types a builtin knob of each kind may be searched with (a float knob on an int range too).
KNOB_SEARCH_TYPES: dict[str, tuple[str, ...]] = {
    "float": ("float", "int", "categorical"), "int": ("int", "categorical"),
    "choice": ("categorical",), "bool": ("categorical",)}
MAX_STAGES = 10
MAX_ENQUEUE = 100  # spec.warmStart.enqueue
# Hard ceilings of any job (the CRD's too); an admin may set lower ones in the operator.
MAX_PARALLELISM = 10_000
MAX_TRIALS_PER_WORKER = 16
MAX_TRIALS = 10_000_000
# What a running job may change: the CRD refuses edits of any other field, and the operator
# compares the rest with the copy stored in the study (paths under ``spec``).
EDITABLE_FIELDS = (("budget", "maxTrials"), ("budget", "parallelism"), ("cleanup",))
DATASET_CLASSES = {"digits": 10}  # classes of the bundled datasets (synthetic: its ``classes``)
# A job's name (a DNS-1123 label: study and pod names derive from it).
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
NAME_MAX = 63
_NAME_RE = re.compile(NAME_PATTERN)
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


class SpecError(ValueError):
    """Raised with every problem of a spec at once."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec: the field path, the message and, from a file, the line."""

    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f" (line {self.line})" if self.line else ""
        return f"{self.path}: {self.message}{where}"


def parse_duration(value: str | int | float) -> float:
    """Seconds in a duration such as ``90``, ``"45s"``, ``"30m"``, ``"2h"`` or ``"1h30m"``."""
    if isinstance(value, bool):
        raise ValueError(f"cannot parse {value!r} as a duration")
    if isinstance(value, (int, float)):
        if value <= 0 or not math.isfinite(value):
            raise ValueError(f"must be a positive duration, got {value!r}")
        return float(value)
    text = value.strip().replace(" ", "")
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    pos, total = 0, 0.0
    for match in _DURATION_RE.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * units[match.group(2)]
        pos = match.end()
    if not text or pos != len(text):
        raise ValueError(
            f"cannot parse {value!r} as a duration (use e.g. 90s, 30m, 2h, 1h30m, 1d)")
    if total <= 0:
        raise ValueError(f"must be a positive duration, got {value!r}")
    return total


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, alias_generator=to_camel, populate_by_name=True,
        frozen=True,
    )


def _at(field_name: str, message: str) -> ValueError:
    """A model-level error pinned to one of the model's fields (see ``_problems_from``)."""
    return ValueError(f"@{field_name}@{message}")


# ---------------------------------------------------------------- search space
Number = Union[StrictInt, StrictFloat]


class FloatParam(_Model):
    type: Literal["float"]
    low: Number
    high: Number
    log: StrictBool = False
    step: Number | None = None
    points: StrictInt | None = Field(
        default=None, description="number of grid points (grid sampler only)")

    @model_validator(mode="after")
    def _check(self) -> FloatParam:
        for name in ("low", "high"):
            if not math.isfinite(getattr(self, name)):
                raise _at(name, "must be a finite number")
        if self.log and self.low <= 0:
            raise _at("low", "must be > 0 when log is true")
        if self.low >= self.high:
            raise _at("low", f"must be < high ({self.high}), got {self.low}")
        if self.step is not None:
            if self.log:
                raise _at("step", "cannot be combined with log: true")
            if self.step <= 0:
                raise _at("step", "must be > 0")
            if not _fits(self.high - self.low, self.step):
                raise _at("step", f"high - low ({self.high - self.low:g}) is not a multiple "
                                  f"of step ({self.step:g})")
        if self.points is not None and self.points < 2:
            raise _at("points", "must be >= 2")
        return self


class IntParam(_Model):
    type: Literal["int"]
    low: StrictInt
    high: StrictInt
    log: StrictBool = False
    step: StrictInt = 1

    @model_validator(mode="after")
    def _check(self) -> IntParam:
        if self.log and self.low <= 0:
            raise _at("low", "must be > 0 when log is true")
        if self.low >= self.high:
            raise _at("low", f"must be < high ({self.high}), got {self.low}")
        if self.step < 1:
            raise _at("step", "must be >= 1")
        if self.log and self.step != 1:
            raise _at("step", "must be 1 when log is true")
        if (self.high - self.low) % self.step:
            raise _at("step", f"high - low ({self.high - self.low}) is not a multiple of "
                              f"step ({self.step})")
        return self


Choice = Union[StrictBool, StrictInt, StrictFloat, StrictStr]


class CategoricalParam(_Model):
    type: Literal["categorical"]
    choices: list[Choice]

    @field_validator("choices")
    @classmethod
    def _check_choices(cls, choices: list[Any]) -> list[Any]:
        if not choices:
            raise ValueError("must list at least one choice")
        # true and 1 are different choices; 1 and 1.0 are the same number (Optuna stores
        # both as the same index, and JSON on the cluster does not tell them apart)
        seen: set[tuple[bool, Any]] = set()
        for choice in choices:
            key = (isinstance(choice, bool), choice)
            if key in seen:
                raise ValueError(f"duplicate choice {choice!r}")
            seen.add(key)
            if isinstance(choice, float) and not math.isfinite(choice):
                raise ValueError(f"choice {choice!r} is not a finite number")
        return choices


def _fits(span: float, step: float) -> bool:
    ratio = span / step
    return abs(ratio - round(ratio)) < 1e-9 * max(1.0, abs(ratio))


def _tagged_union(tag_field: str, models: dict[str, type[BaseModel]]) -> Any:
    """A union whose member is chosen by the value of ``tag_field`` (``type``, ``name``)."""

    def tag(value: Any) -> Any:
        return value.get(tag_field) if isinstance(value, dict) else getattr(value, tag_field, None)

    members = tuple(Annotated[model, Tag(name)] for name, model in models.items())
    return Annotated[Union[members], Discriminator(tag)]


PARAM_MODELS: dict[str, type[BaseModel]] = {
    "float": FloatParam, "int": IntParam, "categorical": CategoricalParam}
SearchParam = _tagged_union("type", PARAM_MODELS)

# ---------------------------------------------------------------- objective, budget, sampler
class ObjectiveMetric(_Model):
    """One objective of several: a metric and its direction."""

    metric: StrictStr = Field(min_length=1, description="a metric the trainer reports")
    direction: Literal["maximize", "minimize"] | None = Field(
        default=None, description="maximize or minimize (default: minimize for losses and "
                                  "n_params, else maximize)")

    @property
    def resolved_direction(self) -> str:
        return self.direction or default_direction(self.metric)


def default_direction(metric: str) -> str:
    """Losses and model size are minimized, anything else maximized."""
    return "minimize" if metric.endswith("loss") or metric in MINIMIZED_METRICS else "maximize"


class Objective(_Model):
    """One metric (``metric``, ``direction``) or several (``metrics``, ``primary``)."""

    metric: StrictStr | None = Field(
        default=None, description="the metric to optimize (one objective)")
    direction: Literal["maximize", "minimize"] | None = None
    metrics: list[ObjectiveMetric] | None = Field(
        default=None, min_length=2, max_length=MAX_OBJECTIVES,
        description="several objectives, each a metric and a direction: the search looks for "
                    "their Pareto front")
    primary: StrictStr | None = Field(
        default=None, min_length=1,
        description="with metrics: the objective that ranks trials for best, the leaderboard, "
                    "the goal and the ensemble (default: the first of metrics)")
    goal: Number | None = Field(
        default=None, description="stop starting trials once a trial reaches this value (of "
                                  "the primary objective, with metrics)")

    @model_validator(mode="after")
    def _check(self) -> Objective:
        if self.metrics is None:
            if self.metric is None:
                raise _at("metric", "required field is missing: the metric to optimize (or "
                                    "metrics, a list of several objectives)")
            if self.primary is not None:
                raise _at("primary", "only used with metrics (several objectives)")
        elif self.metric is not None:
            raise _at("metric", "cannot be combined with metrics: give one objective as "
                                "metric (and direction), or several as metrics")
        elif self.direction is not None:
            raise _at("direction", "with metrics, each entry has its own direction")
        return self

    @property
    def is_multi(self) -> bool:
        """Several objectives: the study has one direction per metric."""
        return self.metrics is not None

    @property
    def names(self) -> tuple[str, ...]:
        """The objective metrics, in the order of the study's values."""
        if self.metrics is None:
            return (self.metric or "",)
        return tuple(m.metric for m in self.metrics)

    @property
    def directions(self) -> list[str]:
        if self.metrics is None:
            return [self.direction or default_direction(self.metric or "")]
        return [m.resolved_direction for m in self.metrics]

    @property
    def primary_metric(self) -> str:
        """The metric that ranks trials (the only one, or ``primary``)."""
        if self.metrics is None:
            return self.metric or ""
        return self.primary or self.metrics[0].metric

    @property
    def primary_index(self) -> int:
        """Where the primary objective is among the study's values."""
        names = self.names
        return names.index(self.primary_metric) if self.primary_metric in names else 0

    @property
    def resolved_direction(self) -> str:
        """The primary objective's direction: the one given, or the natural one for the
        metric (losses and n_params are minimized)."""
        return self.directions[self.primary_index]


class Budget(_Model):
    max_trials: StrictInt = Field(default=100, ge=1, le=MAX_TRIALS)
    parallelism: StrictInt = Field(default=1, ge=1, le=MAX_PARALLELISM)
    trials_per_worker: StrictInt = Field(
        default=1, ge=1, le=MAX_TRIALS_PER_WORKER,
        description="trials one worker runs at once, each in its own process, sharing the "
                    "worker's GPUs and dividing its CPU threads")
    max_failed_trials: StrictInt = Field(default=10, ge=0)
    max_retries: StrictInt = Field(
        default=3, ge=0, description="times a trial whose worker died is retried")
    timeout: Union[StrictStr, StrictInt, StrictFloat, None] = None

    @field_validator("timeout")
    @classmethod
    def _check_timeout(cls, value: Any) -> Any:
        if value is not None:
            parse_duration(value)
        return value

    @property
    def timeout_seconds(self) -> float | None:
        return None if self.timeout is None else parse_duration(self.timeout)


class Sampler(_Model):
    type: StrictStr = Field(default="tpe", description=f"the Optuna sampler: "
                                                        f"{' | '.join(SAMPLERS)}")
    seed: StrictInt | None = Field(
        default=None, description="seed of the sampler (each worker adds its slot number)")
    n_startup_trials: StrictInt | None = Field(
        default=None, ge=0, description="random trials before the model-based search starts "
                                        "(tpe, gp, cmaes)")
    multivariate: StrictBool | None = Field(
        default=None, description="model the parameters jointly (tpe)")
    constant_liar: StrictBool | None = Field(
        default=None, description="treat running trials as bad ones, so that parallel "
                                  "workers spread out (tpe)")
    qmc_type: Literal["sobol", "halton"] | None = Field(
        default=None, description="the low-discrepancy sequence (qmc): sobol or halton")
    population_size: StrictInt | None = Field(
        default=None, ge=2, description="trials of a generation (nsgaii; Optuna's default 50)")

    @model_validator(mode="after")
    def _check(self) -> Sampler:
        if self.type not in SAMPLERS:
            raise _at("type", _unknown("sampler", self.type, SAMPLERS))
        for name, users in SAMPLER_OPTIONS.items():
            if getattr(self, name) is not None and self.type not in users:
                raise _at(name, f"not used by the {self.type} sampler")
        return self


# ---------------------------------------------------------------- pruning
class Divergence(_Model):
    """Prune a trial whose loss grows far beyond its best."""

    enabled: StrictBool = Field(default=True, description="prune diverging trials")
    factor: Number = Field(default=10.0, gt=1.0,
                           description="a trial diverges once its loss exceeds its best loss "
                                       "times this")


class Pruner(_Model):
    """The Optuna pruner that stops trials worse than others at the same epoch."""

    type: StrictStr = Field(default="median", description=f"the Optuna pruner: "
                                                          f"{' | '.join(PRUNERS)}")
    n_startup_trials: StrictInt | None = Field(
        default=None, ge=0, description="trials that finish before any is pruned (median, "
                                        "percentile)")
    n_warmup_steps: StrictInt | None = Field(
        default=None, ge=0, description="epochs of a trial before it can be pruned (median, "
                                        "percentile)")
    percentile: Number | None = Field(
        default=None, gt=0, lt=100, description="prune below this percentile of the other "
                                                "trials (percentile; e.g. 25)")
    min_resource: StrictInt | None = Field(
        default=None, ge=1, description="epochs of the first rung (hyperband, asha)")
    max_resource: StrictInt | None = Field(
        default=None, ge=1, description="epochs of the last rung, at most the epochs a trial "
                                        "trains (hyperband)")
    reduction_factor: StrictInt | None = Field(
        default=None, ge=2, description="the fraction kept at each rung is 1/this "
                                        "(hyperband, asha)")

    @model_validator(mode="after")
    def _check(self) -> Pruner:
        if self.type not in PRUNERS:
            raise _at("type", _unknown("pruner", self.type, PRUNERS))
        for name, users in PRUNER_OPTIONS.items():
            if getattr(self, name) is not None and self.type not in users:
                raise _at(name, f"not used by the {self.type} pruner")
        if self.type == "percentile" and self.percentile is None:
            raise _at("percentile", "required by the percentile pruner (e.g. 25)")
        if (self.min_resource and self.max_resource
                and self.min_resource >= self.max_resource):
            raise _at("min_resource", "must be < maxResource")
        return self


class Pruning(_Model):
    nan: StrictBool = Field(default=True, description="prune a trial that reports NaN or Inf")
    divergence: Divergence = Divergence()
    pruner: Pruner = Pruner()


# ---------------------------------------------------------------- trainer
class DigitsData(_Model):
    name: Literal["digits"]


class SyntheticData(_Model):
    name: Literal["synthetic"]
    samples: StrictInt = Field(default=2000, ge=20, description="rows to generate (synthetic)")
    features: StrictInt = Field(default=20, ge=1, description="feature columns (synthetic)")
    informative: StrictInt = Field(default=10, ge=1,
                                   description="features that carry the label (synthetic)")
    classes: StrictInt = Field(default=2, ge=2, description="label classes (synthetic)")
    class_weights: list[Annotated[Number, Field(description="one class's share of the rows")]
                        ] | None = Field(
        default=None, description="the share of each class, one weight per class (synthetic; "
                                  "default: balanced)")
    class_sep: Number = Field(default=1.0, gt=0, description="how far apart the classes lie: "
                                                             "larger is easier (synthetic)")
    seed: StrictInt = Field(default=0, description="seed of the generator (synthetic)")

    @model_validator(mode="after")
    def _check(self) -> SyntheticData:
        if self.class_weights is not None:
            if len(self.class_weights) != self.classes:
                raise _at("class_weights", f"needs one weight per class ({self.classes}), got "
                                           f"{len(self.class_weights)}")
            if any(w <= 0 for w in self.class_weights):
                raise _at("class_weights", "weights must be > 0")
        # make_classification puts 2 clusters per class on the corners of a hypercube.
        if self.classes * 2 > 2 ** min(self.informative, self.features):
            raise _at("classes", "too many classes for the informative features: needs "
                                 "classes * 2 <= 2 ** informative")
        return self


class FileData(_Model):
    name: Literal["file"]
    path: StrictStr = Field(min_length=1, description="a .csv or .npz file the workers can read "
                                                      "(file)")
    label_column: StrictStr = Field(default="label",
                                    description="the CSV column with the labels (file)")

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not value.endswith((".csv", ".npz")):
            raise ValueError(f"must end in .csv or .npz, got {value!r}")
        return value


DATASET_MODELS: dict[str, type[BaseModel]] = {
    "digits": DigitsData, "synthetic": SyntheticData, "file": FileData}
DatasetSpec = _tagged_union("name", DATASET_MODELS)


class Split(_Model):
    """How the data is split into training, validation and test rows (stratified)."""

    validation: Number = Field(default=0.2, gt=0, lt=1,
                               description="fraction of the rows the objective is measured on")
    test: Number = Field(default=0.2, gt=0, lt=1,
                         description="fraction of the rows held out for the final scores")
    seed: StrictInt = Field(default=0, description="seed of the split")

    @model_validator(mode="after")
    def _check(self) -> Split:
        if self.validation + self.test >= 0.9:
            raise _at("test", "validation + test must leave at least 10% for training")
        return self


class Builtin(_Model):
    model: StrictStr = Field(default="mlp", description="the model to train: "
                                                        f"{' | '.join(MODELS)}")
    dataset: DatasetSpec
    split: Split = Split()
    epochs: StrictInt = Field(default=20, ge=1, description="epochs a trial trains (unless "
                                                            "searched or fixed in params)")
    params: dict[str, Any] = Field(default_factory=dict)
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="where trials train: auto (a GPU when there is one), cpu "
                                    "or cuda")
    seed: StrictInt = Field(default=0, description="seed of the model's initialisation")
    balance: Literal["none", "oversample", "weighted"] = Field(
        default="none", description="class imbalance: none; oversample (class-balanced "
                                    "batches); weighted (inverse-frequency class weights in "
                                    "the training loss)")

    @model_validator(mode="after")
    def _check(self) -> Builtin:
        if self.model not in MODELS:
            raise _at("model", _unknown("model", self.model, MODELS))
        return self


TRAINER_KINDS = ("builtin", "entrypoint", "command")
CODE_FIELDS = ("params", "metrics", "epochs", "stop_grace_period", "image")
DEFAULT_STOP_GRACE_PERIOD = 10
# package.module:function; no backslashes, so that the CRD's CEL rule can use it as written
ENTRYPOINT_PATTERN = ("^[A-Za-z_][A-Za-z0-9_]*([.][A-Za-z_][A-Za-z0-9_]*)*"
                      ":[A-Za-z_][A-Za-z0-9_]*([.][A-Za-z_][A-Za-z0-9_]*)*$")
_ENTRYPOINT_RE = re.compile(ENTRYPOINT_PATTERN)
PARAM_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PARAM_NAME_MAX = 63
MetricName = Annotated[StrictStr, Field(min_length=1)]


class Trainer(_Model):
    """What trains one trial: exactly one of ``builtin``, ``entrypoint`` or ``command``."""

    builtin: Builtin | None = None
    entrypoint: StrictStr | None = Field(
        default=None, description="package.module:function taking the kubetune SDK trial")
    command: list[Annotated[StrictStr, Field(description="the program, then its arguments")]
                  ] | None = Field(
        default=None, min_length=1,
        description="a program run per trial: params in KUBETUNE_PARAM_* variables, metrics "
                    "as JSON lines on stdout")
    params: dict[str, Any] | None = Field(
        default=None, description="fixed params handed to the code with the sampled ones")
    metrics: list[MetricName] | None = Field(
        default=None, min_length=1, description="the metrics the code reports (required with "
                                                "entrypoint or command)")
    epochs: StrictInt | None = Field(
        default=None, ge=1, description="the most epochs a trial reports (the pruner's "
                                        "resource)")
    stop_grace_period: StrictInt | None = Field(
        default=None, ge=0, description="seconds between SIGTERM and SIGKILL when a command "
                                        f"trial is stopped (default {DEFAULT_STOP_GRACE_PERIOD})")
    image: StrictStr | None = Field(
        default=None, min_length=1, description="image with the code and kubetune for the "
                                                "worker pods (Kubernetes only)")
    template: dict[str, Any] | None = Field(
        default=None, description="pod template for worker pods (Kubernetes only)")

    @field_validator("entrypoint")
    @classmethod
    def _check_entrypoint(cls, value: str | None) -> str | None:
        if value is not None and not _ENTRYPOINT_RE.fullmatch(value):
            raise ValueError(f"must be 'package.module:function', got {value!r}")
        return value

    @field_validator("command")
    @classmethod
    def _check_command(cls, value: list[str] | None) -> list[str] | None:
        if value and not value[0]:
            raise ValueError("the program (the first item) must not be empty")
        return value

    @field_validator("metrics")
    @classmethod
    def _check_metrics(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if name == "epoch":
                raise ValueError("'epoch' is the step of a report, not a metric")
        if value is not None and len(set(value)) != len(value):
            raise ValueError("lists a metric twice")
        return value

    @property
    def kind(self) -> str:
        """``builtin``, ``entrypoint`` or ``command`` (the first set, for a checked spec)."""
        return next((k for k in TRAINER_KINDS if getattr(self, k) is not None), "builtin")

    @property
    def is_builtin(self) -> bool:
        return self.kind == "builtin"

    @property
    def stop_grace_seconds(self) -> int:
        return (DEFAULT_STOP_GRACE_PERIOD if self.stop_grace_period is None
                else self.stop_grace_period)

    @property
    def reported_metrics(self) -> tuple[str, ...]:
        return REPORTED_METRICS if self.is_builtin else tuple(self.metrics or ())


# ---------------------------------------------------------------- storage, artifacts, ensemble
class SecretRef(_Model):
    """The Secret, in the job's namespace, holding the postgresql:// URL of the study."""

    name: StrictStr = Field(min_length=1, description="the Secret's name")
    key: StrictStr = Field(default="url", description="the key holding the URL")


class Storage(_Model):
    secret_ref: SecretRef | None = Field(
        default=None, description="the Secret with the storage URL (default: the operator's)")
    heartbeat_interval: StrictInt = Field(
        default=10, ge=1, description="seconds between a running trial's heartbeats")
    grace_period: StrictInt = Field(
        default=60, ge=2, description="seconds without a heartbeat before a trial is failed "
                                      "and retried")

    @model_validator(mode="after")
    def _check(self) -> Storage:
        if self.grace_period < 2 * self.heartbeat_interval:
            raise _at("grace_period", "must be at least twice heartbeatInterval")
        return self


class Artifacts(_Model):
    path: StrictStr | None = Field(
        default=None, description="absolute path of the folder shared by the workers (a mounted "
                                  "volume on a cluster; in a job file run locally, a relative "
                                  "path is relative to the file's folder)")


class Ensemble(_Model):
    enabled: StrictBool = Field(
        default=True, description="combine the best models into an ensemble after the search")
    top_k: StrictInt = Field(
        default=20, ge=2, le=50,
        description="best complete trials whose models are candidates (members: trials or "
                    "snapshots)")
    method: Literal["greedy", "average"] = Field(
        default="greedy", description="greedy: ensemble selection with replacement on the "
                                      "validation split; average: equal weights")
    bags: StrictInt = Field(
        default=20, ge=1, le=100,
        description="greedy: selections on random halves of the candidates, averaged "
                    "(bagging: less overfitting of the validation split); 1: one selection "
                    "over all candidates")
    members: Literal["trials", "seeds", "snapshots"] = Field(
        default="trials", description="trials: the top trials' final models; seeds: the best "
                                      "configuration trained again with other seeds; "
                                      "snapshots: the top trials' models at several epochs")
    seeds: StrictInt = Field(
        default=5, ge=2, le=50,
        description="models of the best configuration, the best trial included (members: seeds)")


class Preflight(_Model):
    """Checks of the data and the model before the search spends its budget."""

    enabled: StrictBool = Field(
        default=True, description="before the search, check that the model can fit a tiny "
                                  "subset of the training data (the data checks always run)")
    samples: StrictInt = Field(
        default=16, ge=2, le=1000,
        description="training rows of the tiny subset (at least one per class)")
    steps: StrictInt = Field(
        default=200, ge=1, le=10000, description="full-batch optimizer steps on the subset")


class Cleanup(_Model):
    """What happens to the job's study when the TuningJob is deleted."""

    delete_study: StrictBool = Field(
        default=False, description="delete the Optuna study when the TuningJob is deleted "
                                   "(Kubernetes only; kept by default)")


# ---------------------------------------------------------------- stages
class StageData(_Model):
    fraction: Number | None = Field(
        default=None, gt=0, le=1,
        description="train on this stratified fraction of the training split")
    classes: StrictInt | None = Field(
        default=None, ge=2, description="train and validate on the first N classes (in label "
                                        "order)")

    @model_validator(mode="after")
    def _check(self) -> StageData:
        if self.fraction is None and self.classes is None:
            raise ValueError("give fraction, classes or both")
        return self


class Stage(_Model):
    """One stage of a coarse-to-fine search: its trials, and the fidelity they run at."""

    name: StrictStr | None = Field(
        default=None, min_length=1, max_length=63, description="default stage-1, stage-2...")
    trials: StrictInt = Field(ge=1, description="trials of this stage")
    top: StrictInt | None = Field(
        default=None, ge=1, description="best trials of this stage that narrow the next "
                                        "stage's ranges (default max(3, 20% of its complete "
                                        "trials))")
    epochs: StrictInt | None = Field(
        default=None, ge=1, description="fidelity: epochs of this stage's trials (not on the "
                                        "last stage)")
    data: StageData | None = Field(
        default=None, description="fidelity: a cheaper slice of the data (built-in trainer; "
                                  "not on the last stage)")

    @property
    def reduced(self) -> bool:
        """Whether this stage's trials run below full fidelity."""
        return self.epochs is not None or self.data is not None


class WarmStart(_Model):
    """Starting from what worked before: configurations tried first, and another job's
    finished trials."""

    enqueue: list[dict[str, Any]] | None = Field(
        default=None, min_length=1, max_length=MAX_ENQUEUE,
        description="parameter configurations tried before any sampled one, in this order "
                    "(each counts in the budget; a parameter left out is sampled)")
    from_job: StrictStr | None = Field(
        default=None, min_length=1, max_length=NAME_MAX,
        description="another finished job whose complete trials seed the sampler (locally "
                    "its run name, on Kubernetes a TuningJob in the same namespace); they use "
                    "no budget")


class JobSpec(_Model):
    objective: Objective
    search_space: dict[str, SearchParam]
    budget: Budget = Budget()
    sampler: Sampler = Sampler()
    pruning: Pruning = Pruning()
    trainer: Trainer
    storage: Storage = Storage()
    artifacts: Artifacts = Artifacts()
    ensemble: Ensemble = Ensemble()
    preflight: Preflight = Preflight()
    cleanup: Cleanup = Cleanup()
    stages: list[Stage] | None = Field(
        default=None, min_length=1, max_length=MAX_STAGES,
        description="coarse-to-fine search: each stage's trials narrow the next stage's ranges")
    warm_start: WarmStart | None = Field(
        default=None, description="configurations to try first, and another job's trials to "
                                  "start from")

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, data: Any) -> Any:
        """Expand a known ``searchSpace.preset``; default ``budget.maxTrials`` to the stages'
        trials. Shapes are left for the field checks to report."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        key = "search_space" if "search_space" in data else "searchSpace"
        space = data.get(key)
        if isinstance(space, dict) and isinstance(space.get(PRESET_KEY), str) \
                and space[PRESET_KEY] in PRESETS:
            data[key] = expand(space, fixed=set(_fixed_params(data)))
        stages = data.get("stages")
        budget = data.get("budget", {})
        if isinstance(stages, list) and stages and isinstance(budget, dict) \
                and "maxTrials" not in budget and "max_trials" not in budget:
            trials = [s.get("trials") if isinstance(s, dict) else None for s in stages]
            if all(type(t) is int and t >= 1 for t in trials):
                data["budget"] = {**budget, "maxTrials": sum(trials)}
        return data

    @field_validator("search_space", mode="before")
    @classmethod
    def _check_preset(cls, space: Any) -> Any:
        if isinstance(space, dict) and PRESET_KEY in space:  # left by _resolve: not known
            name = space[PRESET_KEY]
            if not isinstance(name, str):
                raise _at(PRESET_KEY, f"must be a preset name, got {_describe(name)}")
            raise _at(PRESET_KEY, _unknown("preset", name, PRESETS,
                                           what="see `kubetune presets`"))
        return space

    @field_validator("search_space")
    @classmethod
    def _check_space(cls, space: dict[str, Any]) -> dict[str, Any]:
        if not space:
            raise ValueError("must define at least one parameter to search")
        return space

    @property
    def stage_list(self) -> list[Stage]:
        """The stages, a job without ``stages`` being one stage of all its trials."""
        return list(self.stages) if self.stages else [Stage(trials=self.budget.max_trials)]

    def stage_name(self, index: int) -> str:
        return self.stage_list[index].name or f"stage-{index + 1}"

    @property
    def epochs(self) -> int | None:
        """Most epochs a trial can train (the resource hyperband and ASHA count); None for
        code that does not declare ``trainer.epochs``."""
        space = self.search_space.get("epochs")
        if isinstance(space, IntParam):
            return space.high
        if isinstance(space, CategoricalParam) and all(
                isinstance(c, (int, float)) and not isinstance(c, bool) for c in space.choices):
            return int(max(space.choices))
        builtin = self.trainer.builtin
        if builtin is None:
            return self.trainer.epochs
        return int(builtin.params.get("epochs", builtin.epochs))


def _fixed_params(data: dict[str, Any]) -> dict[str, Any]:
    """The fixed params of a raw spec (``trainer.builtin.params``, or ``trainer.params`` of
    code trainers), or nothing when they are not there yet."""
    trainer = data.get("trainer")
    if not isinstance(trainer, dict):
        return {}
    builtin = trainer.get("builtin")
    params = builtin.get("params") if isinstance(builtin, dict) else trainer.get("params")
    return params if isinstance(params, dict) else {}


class Metadata(BaseModel):
    """Only what kubetune reads; Kubernetes adds more (uid, resourceVersion...), kept aside."""

    model_config = ConfigDict(extra="allow", strict=True)
    name: StrictStr
    namespace: StrictStr | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if len(value) > NAME_MAX or not _NAME_RE.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a valid name: at most {NAME_MAX} lowercase letters, digits "
                "and '-', starting and ending with a letter or digit")
        return value


def study_name(namespace: str, name: str) -> str:
    """The Optuna study of TuningJob ``namespace/name``: '/' cannot appear in either, so no two
    jobs clash (``kubetune.study.schema`` re-exports it with the study's other names)."""
    return f"{namespace}/{name}"


class TuningJob(_Model):
    api_version: Literal[API_VERSION]
    kind: Literal[KIND]
    metadata: Metadata
    spec: JobSpec
    status: dict[str, Any] | None = None  # accepted so `kubectl get -o yaml` output re-applies

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or "default"

    @property
    def study_name(self) -> str:
        return study_name(self.namespace, self.name)

    def to_dict(self) -> dict[str, Any]:
        """The job as camelCase JSON-able data, the form stored with the study."""
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        data.pop("status", None)
        return data


# ---------------------------------------------------------------- entry points
def parse_job(data: Any, *, document: YamlDocument | None = None,
              base_dir: Path | None = None) -> TuningJob:
    """Validate a TuningJob given as parsed YAML/JSON; raise SpecError with every problem.

    ``base_dir`` resolves a relative ``dataset.path`` (the job file's folder for local runs).
    """
    if not isinstance(data, dict):
        raise SpecError([Problem("(root)", "must be a mapping with apiVersion, kind, metadata "
                                           "and spec", _line(document, ()))])
    try:
        job = TuningJob.model_validate(data)
    except ValidationError as err:
        raise SpecError(_problems_from(err, document)) from None
    problems = _semantic_problems(job.spec)
    artifacts = job.spec.artifacts.path
    if base_dir is None and artifacts is not None and not artifacts.startswith("/"):
        # In a job file a relative path is relative to the file's folder (_resolve_paths).
        problems.append(Problem("spec.artifacts.path", "must be an absolute path (the folder "
                                                       "the worker pods share, e.g. /artifacts)"))
    if problems:
        raise SpecError([Problem(p.path, p.message, _line(document, _split_path(p.path)))
                         for p in problems])
    if base_dir is not None:
        job = _resolve_paths(job, base_dir)
    return job


def parse_job_file(path: str | Path) -> TuningJob:
    """Read and validate a TuningJob YAML file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise SpecError([Problem(str(path), f"cannot read file: {err.strerror}")]) from None
    except UnicodeDecodeError:
        raise SpecError([Problem(str(path), "cannot read file: not UTF-8 text")]) from None
    try:
        document = load_yaml(text)
    except YamlError as err:
        raise SpecError([Problem(str(path), err.message, err.line)]) from None
    return parse_job(document.data, document=document, base_dir=path.resolve().parent)


def validate_spec(spec: Any) -> list[Problem]:
    """Problems of a bare ``spec`` mapping (what the operator sees), paths under ``spec.``."""
    job = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "x"}, "spec": spec}
    try:
        parse_job(job)
    except SpecError as err:
        return err.problems
    return []


def _resolve_paths(job: TuningJob, base_dir: Path) -> TuningJob:
    """Relative paths in a job file are relative to that file, as for a local run."""
    data = job.to_dict()
    builtin = job.spec.trainer.builtin
    dataset = builtin.dataset if builtin is not None else None
    if isinstance(dataset, FileData) and not Path(dataset.path).is_absolute():
        data["spec"]["trainer"]["builtin"]["dataset"]["path"] = str(base_dir / dataset.path)
    artifacts = job.spec.artifacts.path
    if artifacts and not artifacts.startswith("/"):
        data["spec"]["artifacts"]["path"] = str(base_dir / artifacts)
    return TuningJob.model_validate(data)


# ---------------------------------------------------------------- semantic checks
def _semantic_problems(spec: JobSpec) -> list[Problem]:
    problems = _trainer_problems(spec)
    trainer = spec.trainer
    problems += [Problem(path, message) for path, message in template_problems(trainer.template)]
    builtin = trainer.builtin
    problems += _objective_problems(spec)
    for name, value in (builtin.params if builtin is not None else {}).items():
        path = f"spec.trainer.builtin.params.{name}"
        if name not in KNOBS:
            problems.append(Problem(path, _unknown("parameter", name, KNOBS,
                                                   what="the builtin mlp trainer has")))
        elif name in spec.search_space:
            problems.append(Problem(path, "is also in spec.searchSpace: fix it or search it, "
                                          "not both"))
        elif (why := KNOBS[name].problem(value)) is not None:
            problems.append(Problem(path, why))
    for name, param in spec.search_space.items():
        if trainer.is_builtin:
            problems.extend(_space_problems(name, param))
        elif (why := _param_name_problem(name)) is not None:
            problems.append(Problem(f"spec.searchSpace.{name}", why))
    if spec.sampler.type == "grid":
        for name, param in spec.search_space.items():
            if isinstance(param, FloatParam) and param.step is None and param.points is None:
                problems.append(Problem(
                    f"spec.searchSpace.{name}",
                    "the grid sampler needs a finite set of values: give step or points"))
    if spec.sampler.type == "cmaes" and not any(
            isinstance(p, (FloatParam, IntParam)) for p in spec.search_space.values()):
        problems.append(Problem("spec.sampler.type",
                                "cmaes needs at least one float or int parameter"))
    pruner = spec.pruning.pruner
    epochs = spec.epochs
    if pruner.max_resource is not None and epochs is not None and pruner.max_resource > epochs:
        problems.append(Problem("spec.pruning.pruner.maxResource",
                                f"exceeds the epochs a trial trains ({epochs})"))
    if spec.stages:
        problems.extend(_stage_problems(spec))
    if spec.warm_start is not None:
        problems.extend(_warm_start_problems(spec))
    return problems


def _objective_problems(spec: JobSpec) -> list[Problem]:
    """Each objective metric is reported by the trainer; several objectives need a sampler
    that searches them, no Optuna pruner, and a primary the ensemble can score."""
    objective, trainer = spec.objective, spec.trainer
    problems = []
    if objective.metrics is None:
        entries = [("spec.objective", objective.metric or "", objective.direction)]
    else:
        entries = [(f"spec.objective.metrics[{i}]", m.metric, m.direction)
                   for i, m in enumerate(objective.metrics)]
    seen: set[str] = set()
    for where, metric, direction in entries:
        if trainer.is_builtin and metric not in REPORTED_METRICS:
            problems.append(Problem(f"{where}.metric", _unknown(
                "metric", metric, REPORTED_METRICS, what="the builtin trainer reports")))
        elif not trainer.is_builtin and trainer.metrics and metric not in trainer.metrics:
            problems.append(Problem(f"{where}.metric", _unknown(
                "metric", metric, trainer.metrics, what="spec.trainer.metrics")))
        elif direction == "maximize" and metric in LOSS_METRICS:
            problems.append(Problem(f"{where}.direction", f"{metric} is a loss: use minimize"))
        if metric in seen:
            problems.append(Problem(f"{where}.metric", f"{metric} is listed twice"))
        seen.add(metric)
    if objective.is_multi:
        names = objective.names
        if objective.primary is not None and objective.primary not in names:
            problems.append(Problem("spec.objective.primary", _unknown(
                "metric", objective.primary, names, what="spec.objective.metrics has")))
        if spec.sampler.type not in MULTI_OBJECTIVE_SAMPLERS:
            problems.append(Problem("spec.sampler.type", (
                f"the {spec.sampler.type} sampler does not search several objectives "
                f"(spec.objective.metrics): use {words(MULTI_OBJECTIVE_SAMPLERS)}")))
        pruner = spec.pruning.pruner
        why = ("Optuna's pruners do not support several objectives (spec.objective.metrics): "
               "leave spec.pruning.pruner out or set its type to none; the NaN and divergence "
               "guards still prune every trial")
        if pruner.type not in ("median", "none"):
            problems.append(Problem("spec.pruning.pruner.type", why))
        for name in PRUNER_OPTIONS:
            if getattr(pruner, name) is not None and pruner.type in ("median", "none"):
                problems.append(Problem(f"spec.pruning.pruner.{to_camel(name)}", why))
    primary = objective.primary_metric
    if trainer.is_builtin and spec.ensemble.enabled and primary in MINIMIZED_METRICS:
        where = "spec.objective.primary" if objective.is_multi else "spec.objective.metric"
        problems.append(Problem(where, (
            f"the ensemble step ranks and scores trials by the primary objective, and {primary} "
            "is no score of predictions: make an accuracy, F1 or loss metric the primary, or "
            "set spec.ensemble.enabled: false")))
    return problems


def words(names: Any, joiner: str = "or") -> str:
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {joiner} {names[-1]}"


def _warm_start_problems(spec: JobSpec) -> list[Problem]:
    """Each enqueued configuration fits the search space; they fit in the first stage."""
    problems = []
    enqueue = spec.warm_start.enqueue if spec.warm_start is not None else None
    first = spec.stage_list[0].trials
    if enqueue and len(enqueue) > first:
        where = "spec.stages[0].trials" if spec.stages else "spec.budget.maxTrials"
        problems.append(Problem("spec.warmStart.enqueue", (
            f"lists {len(enqueue)} configurations but {where} is {first}: each enqueued "
            "configuration is a trial of the budget")))
    for i, config in enumerate(enqueue or []):
        for name, value in config.items():
            path = f"spec.warmStart.enqueue[{i}].{name}"
            param = spec.search_space.get(name)
            if param is None:
                problems.append(Problem(path, _unknown("parameter", name, spec.search_space,
                                                       what="spec.searchSpace has")))
            elif (why := enqueued_value_problem(param, value)) is not None:
                problems.append(Problem(path, why))
    return problems


def enqueued_value_problem(param: Any, value: Any) -> str | None:
    """Why ``value`` is not a value of the search-space entry ``param`` (None if it is)."""
    if isinstance(param, CategoricalParam):
        same = [c for c in param.choices if c == value
                and isinstance(c, bool) == isinstance(value, bool)
                and isinstance(c, str) == isinstance(value, str)]
        if not same:
            return (f"{_describe(value)} is not one of the choices "
                    f"{', '.join(repr(c) for c in param.choices)}")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(param, IntParam) and not isinstance(value, int)):
        kind = "an integer" if isinstance(param, IntParam) else "a number"
        return f"must be {kind}, got {_describe(value)}"
    if not math.isfinite(value) or not param.low <= value <= param.high:
        return f"{value!r} is outside the range [{param.low}, {param.high}]"
    step = param.step
    if step is not None and not _fits(value - param.low, step):
        return f"{value!r} is not on the grid {param.low} + k * {step}"
    return None


def _stage_problems(spec: JobSpec) -> list[Problem]:
    stages = spec.stages or []
    problems = []
    total = sum(s.trials for s in stages)
    if spec.budget.max_trials != total:
        problems.append(Problem("spec.budget.maxTrials", (
            f"is {spec.budget.max_trials} but the stages add up to {total} trials: leave "
            "maxTrials out (it defaults to the sum) or make them agree")))
    if spec.sampler.type == "grid":
        problems.append(Problem("spec.stages", "the grid sampler tries a fixed grid: stages "
                                               "need a sampler that searches ranges"))
    last = len(stages) - 1
    for field in ("epochs", "data", "top"):
        if getattr(stages[last], field) is not None:
            why = ("narrows nothing on the last stage" if field == "top" else
                   "cannot be set on the last stage: it runs at full fidelity")
            problems.append(Problem(f"spec.stages[{last}].{field}", why))
    builtin = spec.trainer.builtin
    classes = None
    if builtin is not None:
        classes = DATASET_CLASSES.get(builtin.dataset.name,
                                      getattr(builtin.dataset, "classes", None))
    for i, stage in enumerate(stages):
        if stage.epochs is not None and "epochs" in spec.search_space:
            problems.append(Problem(f"spec.stages[{i}].epochs",
                                    "epochs is searched in spec.searchSpace: a stage cannot "
                                    "also set it"))
        if stage.data is not None and builtin is None:
            problems.append(Problem(f"spec.stages[{i}].data",
                                    "data fidelities need the builtin trainer (your own code "
                                    "loads its own data); use epochs"))
        wanted = stage.data.classes if stage.data else None
        if wanted is not None and classes is not None and wanted >= classes:
            problems.append(Problem(f"spec.stages[{i}].data.classes",
                                    f"must be fewer than the dataset's {classes} classes"))
    return problems


def _trainer_problems(spec: JobSpec) -> list[Problem]:
    """Exactly one kind of trainer, and the fields of the code trainers where they belong."""
    trainer = spec.trainer
    kinds = [k for k in TRAINER_KINDS if getattr(trainer, k) is not None]
    if not kinds:
        return [Problem("spec.trainer", "set one of builtin, entrypoint or command")]
    problems = [Problem(f"spec.trainer.{k}", f"cannot be combined with {kinds[0]}: set exactly "
                                             "one of builtin, entrypoint or command")
                for k in kinds[1:]]
    if problems:
        return problems
    if trainer.is_builtin:
        for name in CODE_FIELDS:
            if getattr(trainer, name) is not None:
                hint = (" (the builtin trainer's fixed params go in spec.trainer.builtin.params)"
                        if name == "params" else "")
                problems.append(Problem(f"spec.trainer.{to_camel(name)}",
                                        f"only used with entrypoint or command{hint}"))
        return problems
    if trainer.kind == "entrypoint" and trainer.stop_grace_period is not None:
        problems.append(Problem("spec.trainer.stopGracePeriod", "only used with command"))
    if trainer.metrics is None:
        problems.append(Problem("spec.trainer.metrics",
                                f"required with {trainer.kind}: the metrics your code reports, "
                                "e.g. [val_accuracy, train_loss]"))
    fixed = trainer.params or {}
    for name in fixed:
        path = f"spec.trainer.params.{name}"
        if (why := _param_name_problem(name)) is not None:
            problems.append(Problem(path, why))
        elif name in spec.search_space:
            problems.append(Problem(path, "is also in spec.searchSpace: fix it or search it, "
                                          "not both"))
    if trainer.kind == "command":
        seen: dict[str, str] = {}
        for where, name in [("spec.trainer.params", n) for n in fixed] + [
                ("spec.searchSpace", n) for n in spec.search_space]:
            other = seen.setdefault(name.upper(), name)
            if other != name:
                problems.append(Problem(f"{where}.{name}", f"has the same environment variable "
                                        f"KUBETUNE_PARAM_{name.upper()} as {other!r}"))
    if spec.ensemble.enabled and spec.ensemble.members != "trials":
        problems.append(Problem("spec.ensemble.members",
                                f"{spec.ensemble.members} needs the builtin trainer (kubetune "
                                "retrains or snapshots its models); use trials"))
    template_image = (trainer.template or {}).get("image")
    if trainer.image is not None and template_image is not None:
        problems.append(Problem("spec.trainer.image", "also set in spec.trainer.template.image: "
                                                      "set the image in one place"))
    return problems


def _param_name_problem(name: str) -> str | None:
    """Code trainers get params as environment variables: names must be usable there."""
    if len(name) > PARAM_NAME_MAX or not PARAM_NAME_RE.fullmatch(name):
        return (f"{name!r} is not a usable parameter name: at most {PARAM_NAME_MAX} letters, "
                "digits and '_', not starting with a digit")
    return None


def _space_problems(name: str, param: Any) -> list[Problem]:
    path = f"spec.searchSpace.{name}"
    knob = KNOBS.get(name)
    if knob is None:
        return [Problem(path, _unknown("parameter", name, KNOBS,
                                       what="the builtin mlp trainer has"))]
    if isinstance(param, CategoricalParam):
        return [Problem(f"{path}.choices[{i}]", why) for i, choice in enumerate(param.choices)
                if (why := knob.problem(choice)) is not None]
    if param.type not in KNOB_SEARCH_TYPES[knob.kind]:
        why = ("is an integer: use type int" if knob.kind == "int"
               else f"takes {knob.describe()}: use type categorical")
        return [Problem(f"{path}.type", f"{name} {why}")]
    problems = []
    for bound in ("low", "high"):
        if (why := knob.problem(getattr(param, bound))) is not None:
            problems.append(Problem(f"{path}.{bound}", why))
    return problems


# ---------------------------------------------------------------- error messages
def _unknown(kind: str, value: Any, known: Any, what: str = "known") -> str:
    known = list(known)
    close = difflib.get_close_matches(str(value), [str(k) for k in known], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {value!r} ({what}: {', '.join(map(str, known))}){hint}"


_UNION_TAGS = {
    ("spec", "searchSpace", "*"): ("type", PARAM_TYPES, "parameter type"),
    ("spec", "trainer", "builtin", "dataset"): ("name", DATASETS, "dataset"),
}


def _union_site(loc: tuple) -> tuple[int, tuple[str, tuple[str, ...], str]] | None:
    """If ``loc`` passes through a tagged union, where (index of the tag) and which union."""
    for pattern, info in _UNION_TAGS.items():
        if len(loc) > len(pattern) and all(
                p == "*" or p == part for p, part in zip(pattern, loc)):
            return len(pattern), info
    return None


_SCALAR_TAGS = {"bool": "a boolean", "int": "an integer", "float": "a number", "str": "a string"}


def _merge_scalar_unions(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One error per field for a value that fits no member of e.g. ``Union[StrictInt,
    StrictFloat]``: pydantic reports one per member, at ``low.int`` and ``low.float``."""
    merged: list[dict[str, Any]] = []
    groups: dict[tuple, list[str]] = {}
    for error in errors:
        loc = tuple(error["loc"])
        if (error["type"] in ("bool_type", "int_type", "float_type", "string_type")
                and len(loc) > 1 and loc[-1] in _SCALAR_TAGS):
            if loc[:-1] in groups:
                groups[loc[:-1]].append(loc[-1])
                continue
            groups[loc[:-1]] = [loc[-1]]
            error = {**error, "loc": loc[:-1], "tags": groups[loc[:-1]]}
        merged.append(error)
    for error in merged:
        if "tags" in error:
            tags = [t for t in error["tags"] if not (t == "int" and "float" in error["tags"])]
            words = [_SCALAR_TAGS[t] for t in tags]
            error["msg"] = "Input should be " + (
                words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1])
    return merged


def _problems_from(err: ValidationError, document: YamlDocument | None) -> list[Problem]:
    problems: list[Problem] = []
    for error in _merge_scalar_unions(err.errors(include_url=False)):
        loc = tuple(error["loc"])
        message = error["msg"]
        kind = error["type"]
        site = _union_site(loc)
        if kind in ("union_tag_invalid", "union_tag_not_found") and site is None:
            site = _union_site(loc + ("",))
        if site is not None:
            index, (tag_field, tags, label) = site
            if kind == "union_tag_invalid":
                loc = loc + (tag_field,)
                message = _unknown(label, error["ctx"]["tag"], tags)
            elif kind == "union_tag_not_found" and not isinstance(error["input"], dict):
                message = f"must be a mapping with a {tag_field} field, got " \
                          f"{_describe(error['input'])}"
            elif kind == "union_tag_not_found":
                loc = loc + (tag_field,)
                message = f"required ({' | '.join(tags)})"
            elif index < len(loc) and loc[index] in tags:
                loc = loc[:index] + loc[index + 1:]
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
            if message.startswith("@"):
                field_name, _, message = message[1:].partition("@")
                loc = loc + (to_camel(field_name),)
        elif kind == "extra_forbidden":
            message = _unknown_field(tuple(error["loc"]))
        elif kind == "missing":
            message = "required field is missing"
        elif kind == "literal_error":
            message = f"must be {error['ctx']['expected']}, got {error['input']!r}"
        elif kind.endswith("_type") or kind in ("model_type", "dict_type", "list_type"):
            message = f"{_type_message(message)}, got {_describe(error['input'])}"
        else:
            message = _tidy(message)
        path = _join(loc)
        problems.append(Problem(path, message, _line(document, loc)))
    return _dedupe(problems)


def _unknown_field(loc: tuple) -> str:
    name = str(loc[-1])
    siblings = _known_fields(loc[:-1])
    close = difflib.get_close_matches(name, siblings, n=1)
    return "unknown field" + (f"; did you mean {close[0]!r}?" if close else "")


def _known_fields(parent: tuple) -> list[str]:
    """camelCase field names accepted at ``parent`` (for did-you-mean hints)."""
    tag_models = {**PARAM_MODELS, **DATASET_MODELS}
    model: Any = TuningJob
    skip_key = in_list = False
    for part in parent:
        if skip_key:
            skip_key = False
            continue
        if in_list and isinstance(part, int):  # an item of a list of models
            in_list = False
            continue
        if model is None and part in tag_models:
            model = tag_models[part]
            continue
        if model is None or isinstance(part, int):
            return []
        info = {to_camel(n): f for n, f in model.model_fields.items()}.get(part)
        if info is None:
            return []
        annotation = info.annotation
        listed = [a for a in (annotation, *getattr(annotation, "__args__", ()))
                  if get_origin(a) is list]
        if listed:
            in_list, model = True, _first_model(listed[0])
        elif get_origin(annotation) is dict:
            skip_key, model = True, None
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            model = _first_model(annotation)
    return [to_camel(n) for n in model.model_fields] if model is not None else []


def _first_model(annotation: Any) -> Any:
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _type_message(message: str) -> str:
    message = re.sub(r" or instance of \w+", "", message)
    message = message.replace("Input should be", "must be").replace(
        "a valid integer", "an integer")
    return message.replace("a valid dictionary", "a mapping").replace(
        "a valid list", "a list").replace("a valid ", "a ")


def _tidy(message: str) -> str:
    if message.startswith("List should have at least 1 item"):
        return "must not be empty"
    if match := re.match(r"List should have at (least|most) (\d+) items? after validation",
                         message):
        return f"must list at {match.group(1)} {match.group(2)} item" + \
            ("s" if match.group(2) != "1" else "")
    for old, new in (("Input should be greater than or equal to", "must be >="),
                     ("Input should be greater than", "must be >"),
                     ("Input should be less than or equal to", "must be <="),
                     ("Input should be less than", "must be <"),
                     ("Input should be", "must be"),
                     ("String should have at least 1 character", "must not be empty")):
        if message.startswith(old):
            return new + message[len(old):]
    return message


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}" if not isinstance(value, (dict, list)) else \
        type(value).__name__.replace("dict", "a mapping").replace("list", "a list")


def _join(loc: tuple) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path or "(root)"


def _split_path(path: str) -> tuple[str | int, ...]:
    parts: list[str | int] = []
    for token in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        parts.append(int(token[1:-1]) if token.startswith("[") else token)
    return tuple(parts)


def _line(document: YamlDocument | None, loc: tuple) -> int | None:
    return document.line_of(loc) if document is not None else None


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen: set[tuple[str, str]] = set()
    unique = []
    for problem in problems:
        if (problem.path, problem.message) not in seen:
            seen.add((problem.path, problem.message))
            unique.append(problem)
    return unique
