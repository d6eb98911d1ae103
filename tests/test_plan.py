import pytest

from softmerge.errors import PlanError
from softmerge.plan import MergePlan, build_layout

SHAPES = {
    "features.0.weight": (8, 1, 5),
    "features.0.bias": (8,),
    "features.2.weight": (8, 8, 3),
    "features.2.bias": (8,),
    "head.weight": (10, 16),
    "head.bias": (10,),
}


@pytest.mark.parametrize(
    ("granularity", "units"), [("model", 1), ("module", 3), ("tensor", 6), ("channel", 8 + 8 + 10)]
)
def test_unit_counts(granularity: str, units: int) -> None:
    layout = build_layout(MergePlan(granularity=granularity), SHAPES)
    assert len(layout.units) == units
    assert layout.merged_names == list(SHAPES)
    assert layout.rest == ()


def test_channel_units_are_shared_by_weight_and_bias_of_a_module() -> None:
    layout = build_layout(MergePlan(granularity="channel"), SHAPES)
    slots = {s.name: s for s in layout.slots}
    assert slots["head.weight"].start == slots["head.bias"].start
    assert slots["head.weight"].count == 10 and slots["head.weight"].per_channel
    assert layout.units[slots["head.bias"].start + 3] == "head[3]"


def test_include_exclude_select_parts_and_leave_the_rest() -> None:
    plan = MergePlan(include=["features.*"], exclude=["*.bias"])
    layout = build_layout(plan, SHAPES)
    assert layout.merged_names == ["features.0.weight", "features.2.weight"]
    assert set(layout.rest) == {"features.0.bias", "features.2.bias", "head.weight", "head.bias"}


def test_a_pattern_that_matches_nothing_is_an_error_naming_it() -> None:
    with pytest.raises(PlanError, match=r"plan.exclude pattern 'encoder\.\*' matches no parameter"):
        build_layout(MergePlan(exclude=["encoder.*"]), SHAPES)
    with pytest.raises(PlanError, match="selects no parameter"):
        build_layout(MergePlan(include=["head.*"], exclude=["head.*"]), SHAPES)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"granularity": "foo"}, "granularity must be one of"),
        ({"combine": "sum"}, "combine must be one of"),
        ({"combine": "delta"}, "needs a base"),
        ({"include": "head.*"}, "include must be a list, got 'head.*'"),
    ],
)
def test_bad_plans_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        MergePlan(**kwargs)
