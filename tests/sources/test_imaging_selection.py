"""choose_instances: which images of a study the models see, and in what order."""

from __future__ import annotations

import pytest

from agent.domain.refs import InstanceRef
from agent.sources.imaging_selection import choose_instances, evenly_spaced, view_from_description


def _ref(
    series: str,
    number: int | None,
    view: str | None = None,
    modality: str | None = "DX",
    description: str | None = None,
) -> InstanceRef:
    return InstanceRef(
        study_uid="1.2",
        series_uid=f"1.2.{series}",
        sop_instance_uid=f"1.2.{series}.{number}",
        modality=modality,
        view_position=view,
        instance_number=number,
        series_description=description,
    )


def _ids(refs: list[InstanceRef]) -> list[str]:
    return [r.sop_instance_uid.removeprefix("1.2.") for r in refs]


def test_chest_xray_prefers_pa_then_ap_then_unknown_then_lateral() -> None:
    refs = [
        _ref("1", 1, "LL"),
        _ref("2", 1, "AP"),
        _ref("3", 1, None),
        _ref("4", 1, "PA"),
        _ref("5", 1, "LATERAL"),
    ]
    assert _ids(choose_instances(refs, "DX", 10)) == ["4.1", "2.1", "3.1", "1.1", "5.1"]


def test_limit_cuts_after_ranking() -> None:
    refs = [_ref("1", 1, "LL"), _ref("2", 1, "PA")]
    assert _ids(choose_instances(refs, "CR", 1)) == ["2.1"]
    assert choose_instances(refs, "CR", 0) == []
    assert choose_instances([], "DX", 4) == []


def test_equal_views_keep_series_then_instance_order() -> None:
    refs = [_ref("b", 2, "PA"), _ref("a", 3, "PA"), _ref("b", 1, "PA"), _ref("a", 1, "PA")]
    # Series order is first appearance ("b" then "a"); inside a series, by instance number.
    assert _ids(choose_instances(refs, "DX", 10)) == ["b.1", "b.2", "a.1", "a.3"]


def test_view_positions_are_case_and_space_insensitive() -> None:
    refs = [_ref("1", 1, "ll"), _ref("2", 1, " pa ")]
    assert _ids(choose_instances(refs, "DX", 1)) == ["2.1"]


def test_modality_none_is_inferred_from_the_instances() -> None:
    refs = [_ref("1", 1, "LL"), _ref("2", 1, "PA")]
    assert _ids(choose_instances(refs, None, 1)) == ["2.1"]


def test_ct_samples_the_largest_series_evenly() -> None:
    scout = [_ref("scout", 1, modality="CT")]
    axial = [_ref("ax", n, modality="CT") for n in range(10, 0, -1)]  # given out of order
    chosen = choose_instances(scout + axial, "CT", 3)
    # 10 slices, 3 picks: bins of 3.33, centres at 1.67, 5, 8.33 -> slices 2, 6, 9.
    assert [r.instance_number for r in chosen] == [2, 6, 9]
    assert {r.series_uid for r in chosen} == {"1.2.ax"}


def test_ct_with_fewer_slices_than_the_limit_returns_all_in_order() -> None:
    refs = [_ref("ax", n, modality="CT") for n in (3, 1, 4, 2)]
    assert [r.instance_number for r in choose_instances(refs, "CT", 4)] == [1, 2, 3, 4]


def test_other_modalities_keep_the_given_order() -> None:
    refs = [_ref("1", 2, modality="US"), _ref("1", 1, modality="US"), _ref("2", 1, modality="US")]
    assert _ids(choose_instances(refs, "US", 2)) == ["1.1", "1.2"]


def test_missing_instance_numbers_sort_last() -> None:
    refs = [_ref("1", None, "PA"), _ref("1", 5, "PA")]
    assert _ids(choose_instances(refs, "DX", 2)) == ["1.5", "1.None"]


def test_evenly_spaced() -> None:
    assert evenly_spaced(10, 3) == [1, 5, 8]
    assert evenly_spaced(10, 1) == [5]
    assert evenly_spaced(4, 2) == [1, 3]
    assert evenly_spaced(3, 5) == [0, 1, 2]
    assert evenly_spaced(0, 3) == []
    assert evenly_spaced(5, 0) == []


def test_series_description_decides_when_view_position_is_missing() -> None:
    refs = [
        _ref("lat", 1, description="CHEST LAT"),
        _ref("none", 1),
        _ref("ap", 1, description="Chest AP portable"),
        _ref("frontal", 1, description="chest frontal"),
        _ref("pa", 1, description="CHEST PA"),
    ]
    assert _ids(choose_instances(refs, "CR", 5)) == ["pa.1", "ap.1", "frontal.1", "none.1", "lat.1"]
    assert _ids(choose_instances(refs, "CR", 1)) == ["pa.1"]


def test_view_position_wins_over_the_series_description() -> None:
    refs = [_ref("1", 1, "LL", description="CHEST PA"), _ref("2", 1, "AP", description="CHEST LATERAL")]
    assert _ids(choose_instances(refs, "DX", 2)) == ["2.1", "1.1"]


def test_lateral_description_goes_after_an_unlabelled_image() -> None:
    # A typical CR export: no ViewPosition anywhere, the lateral series first.
    refs = [_ref("lat", 1, modality="CR", description="LATERAL"), _ref("x", 1, modality="CR")]
    assert _ids(choose_instances(refs, None, 1)) == ["x.1"]


@pytest.mark.parametrize(
    ("description", "view"),
    [
        ("CHEST PA", "PA"),
        ("chest pa", "PA"),
        ("XR CHEST POSTEROANTERIOR", "PA"),
        ("CHEST AP PORTABLE", "AP"),
        ("Chest_AP", "AP"),
        ("AP/PA CHEST", "FRONTAL"),
        ("FRONTAL PA", "PA"),
        ("Frontal", "FRONTAL"),
        ("CHEST LAT", "LATERAL"),
        ("Lateral", "LATERAL"),
        ("L LAT DECUB", "LATERAL"),
        ("PA AND LATERAL", None),
        ("PAEDIATRIC CHEST", None),
        ("LATE PHASE", None),
        ("", None),
        (None, None),
    ],
)
def test_view_from_description(description: str | None, view: str | None) -> None:
    assert view_from_description(description) == view
