"""Hostile and random TuningJobs: the spec model never raises anything but SpecError, and every
rejection names a field path. (A real API server gets them in tests/test_crd_server.py, the
running operator in tests/test_operator_faults.py.)"""

from __future__ import annotations

import copy

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubetune.spec.model import SpecError, parse_job
from kubetune.spec.source import YamlError, load_yaml

from conftest import REPO_ROOT

BASE = yaml.safe_load((REPO_ROOT / "examples" / "digits-mlp.yaml").read_text())

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, prefix + (index,))


PATHS = [p for p in _paths(BASE) if p]


def _check(job) -> None:
    try:
        parse_job(job)
    except SpecError as err:
        assert err.problems
        for problem in err.problems:
            assert problem.path and problem.message, problem
            assert "Traceback" not in problem.message


def _with(base: dict, path: tuple, value: object) -> dict:
    """A copy of ``base`` with ``value`` at ``path``."""
    job = copy.deepcopy(base)
    node = job
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return job


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), value=values)
def test_any_value_anywhere_is_accepted_or_named(path, value):
    _check(_with(BASE, path, value))


CODE_BASE = copy.deepcopy(BASE)
CODE_BASE["spec"]["trainer"] = {"command": ["python3", "train.py"], "params": {"batch": 64},
                                "metrics": ["val_accuracy", "train_loss"], "epochs": 5,
                                "stopGracePeriod": 3, "image": "me:1"}
CODE_PATHS = [p for p in _paths(CODE_BASE) if p[:2] == ("spec", "trainer")] + [
    ("spec", "trainer", "entrypoint"), ("spec", "trainer", "builtin"),
    ("spec", "searchSpace", "my-param"), ("spec", "trainer", "params", "1x")]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(CODE_PATHS), value=values)
def test_any_value_in_a_code_trainer_is_accepted_or_named(path, value):
    _check(_with(CODE_BASE, path, value))


@settings(max_examples=150, deadline=None)
@given(value=values)
def test_any_document_is_accepted_or_named(value):
    _check(value)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=300))
def test_any_text_is_read_or_rejected_as_yaml(text):
    try:
        document = load_yaml(text)
    except YamlError as err:
        assert err.message
        return
    _check(document.data)


def test_equal_names_in_two_namespaces_never_share_a_study():
    def job(name, namespace):
        data = copy.deepcopy(BASE)
        data["metadata"] = {"name": name, "namespace": namespace}
        return parse_job(data)

    longest = "a" * 62 + "z"
    names = {job(n, ns).study_name for n in ("digits", longest) for ns in ("team-a", "team-b")}
    assert len(names) == 4
    assert job("a-b", "c").study_name != job("a", "b-c").study_name
