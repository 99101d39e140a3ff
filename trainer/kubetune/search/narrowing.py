"""Coarse-to-fine stages: how one stage's best trials narrow the next stage's search space.

Pure functions of a search space (name -> Optuna distribution) and trial parameters, no storage:
``kubetune.search.stages`` decides when to narrow and stores the result. The rule (``narrow``)
and a worked example are in docs/tuning.md (How a stage narrows the next one): change the two
together. A narrowed range never leaves the original one, and a stepped range keeps its grid.

A stage's ranking is noisy (few trials, often at a cheap fidelity), so narrowing keeps the good
region, not a point: a categorical or integer knob is narrowed to one value only on
overwhelming evidence (``single_value_allowed``); otherwise the best value outside the top
trials' joins them.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

from optuna.distributions import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
    json_to_distribution,
)

SPREAD_MARGIN = 0.25   # widen the top trials' span by this part of itself on each side...
RANGE_MARGIN = 0.10    # ...and by at least this part of the stage's range
SIGNIFICANT_DIGITS = 4  # bounds of float ranges without a step, rounded outwards
MIN_TRIALS_FOR_ONE_VALUE = 20  # never narrow a knob to one value from fewer ranked trials...
NOISE_BAND = 2                 # ...nor unless the best NOISE_BAND x top trials all used it


def default_top(complete: int) -> int:
    """How many best trials narrow the next stage: max(3, 20% of the complete trials)."""
    return max(3, math.ceil(0.2 * complete))


def narrow(space: dict[str, Any], original: dict[str, Any],
           top_params: list[dict[str, Any]],
           ranked: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The next stage's space from this stage's ``space`` and its top trials' params.

    Spaces map parameter names to Optuna distributions. ``original`` is the job's space (stage
    0): no range ever leaves it. ``ranked``: the params of every complete trial of the stage,
    best first (``top_params`` are its first ones; default ``top_params`` alone); it tells how
    strong the evidence is. With no top trial the space is kept as it is.
    """
    if not top_params:
        return dict(space)
    ranked = list(top_params) if ranked is None else ranked
    out: dict[str, Any] = {}
    for name, dist in space.items():
        values = [p[name] for p in top_params if name in p]
        if not values or dist.single():
            out[name] = dist
            continue
        alone = (isinstance(dist, (CategoricalDistribution, IntDistribution))
                 and len({_key(v) for v in values}) == 1
                 and not single_value_allowed(name, values[0], ranked, len(top_params)))
        if alone:
            values = values + _runner_up(name, values[0], ranked)
        if isinstance(dist, CategoricalDistribution):
            used = {_key(v) for v in values}
            kept = [c for c in dist.choices if _key(c) in used]
            if len(kept) < 2 and alone:
                kept = list(dist.choices)  # no other choice was tried: nothing speaks against it
            out[name] = CategoricalDistribution(kept or list(dist.choices))
        else:
            out[name] = _narrow_range(dist, original.get(name, dist), values)
            if alone and out[name].single():
                out[name] = _one_step_around(out[name].low, original.get(name, dist))
    return out


def single_value_allowed(name: str, value: Any, ranked: list[dict[str, Any]], top: int) -> bool:
    """Whether the evidence for fixing ``name`` to ``value`` is overwhelming: at least
    ``MIN_TRIALS_FOR_ONE_VALUE`` ranked trials, and the best ``NOISE_BAND x top`` of them all
    used ``value``. A cheap stage's ranking is noisy: a value that merely won its top few
    trials is one value of the good region, not the region."""
    if len(ranked) < MIN_TRIALS_FOR_ONE_VALUE:
        return False
    band = [p[name] for p in ranked[:NOISE_BAND * top] if name in p]
    return all(_key(v) == _key(value) for v in band)


def _runner_up(name: str, value: Any, ranked: list[dict[str, Any]]) -> list[Any]:
    """The value of the best ranked trial that used another value than ``value`` (or none)."""
    for params in ranked:
        if name in params and _key(params[name]) != _key(value):
            return [params[name]]
    return []


def _one_step_around(value: int, original: IntDistribution) -> IntDistribution:
    """An int range narrowed to one value, widened to its neighbours on the job's grid."""
    step = original.step
    low, high = max(value - step, original.low), min(value + step, original.high)
    return IntDistribution(int(low), int(high), log=original.log, step=step)


def _key(value: Any) -> tuple[bool, Any]:
    """True and 1 are equal in Python; as choices they are not."""
    return (isinstance(value, bool), value)


def _narrow_range(dist: FloatDistribution | IntDistribution,
                  original: FloatDistribution | IntDistribution,
                  values: list[float]) -> FloatDistribution | IntDistribution:
    to_u = math.log if dist.log else float
    from_u = math.exp if dist.log else float
    lo, hi = min(to_u(v) for v in values), max(to_u(v) for v in values)
    width = to_u(dist.high) - to_u(dist.low)
    margin = max(SPREAD_MARGIN * (hi - lo), RANGE_MARGIN * width)
    low = max(from_u(lo - margin), original.low)
    high = min(from_u(hi + margin), original.high)
    if isinstance(dist, IntDistribution):
        step = original.step
        low = max(_on_grid(low, original.low, step), original.low)
        high = min(_on_grid(high, original.low, step), original.high)
        return IntDistribution(int(low), int(high), log=dist.log, step=step)
    if original.step is not None:
        step = original.step
        low = max(_float_grid(low, original.low, step, math.floor), original.low)
        high = min(_float_grid(high, original.low, step, math.ceil), original.high)
        return FloatDistribution(low, high, step=step)
    low = max(_round(low, math.floor), original.low)
    high = min(_round(high, math.ceil), original.high)
    return FloatDistribution(low, high, log=dist.log)


def _on_grid(value: float, origin: int, step: int) -> int:
    """The grid point (origin + k * step) nearest ``value``: a margin under half a step adds no
    step. Nearest still keeps the top trials inside: each of them is a grid point."""
    return origin + math.floor((value - origin) / step + 0.5) * step


def _float_grid(value: float, origin: float, step: float, rounding: Any) -> float:
    k = rounding((value - origin) / step + (1e-9 if rounding is math.floor else -1e-9))
    return float(Decimal(repr(origin)) + k * Decimal(repr(step)))


def _round(value: float, rounding: Any) -> float:
    """``value`` rounded (down or up) to ``SIGNIFICANT_DIGITS`` significant digits."""
    if value == 0:
        return 0.0
    exponent = math.floor(math.log10(abs(value))) - SIGNIFICANT_DIGITS + 1
    return float(Decimal(rounding(value / 10.0 ** exponent)).scaleb(exponent))


def describe(space: dict[str, Any]) -> dict[str, str]:
    """Each parameter in a few characters, for the status: ``0.001..1 log``, ``adam | sgd``."""
    out = {}
    for name, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            out[name] = " | ".join(str(c) for c in dist.choices)
        elif dist.single():
            out[name] = f"{dist.low:g}"
        else:
            text = f"{dist.low:g}..{dist.high:g}"
            text += " int" if isinstance(dist, IntDistribution) else ""
            text += " log" if dist.log else ""
            text += f" step {dist.step:g}" if dist.step not in (None, 1) else ""
            out[name] = text
    return out


def space_to_json(space: dict[str, Any]) -> dict[str, str]:
    return {name: distribution_to_json(dist) for name, dist in space.items()}


def space_from_json(data: dict[str, str]) -> dict[str, Any]:
    return {name: json_to_distribution(text) for name, text in data.items()}
