"""Choose which instances of a study go to the image models.

Sits between ``DicomSource.list_instances`` and ``retrieve``: every image sent on costs seconds
of model time (about 1 s per image for MedSigLIP and 9 s through MedGemma's vision tower on a
CPU), so a study is cut down to ``limit`` images, the most informative first. Pure: no I/O.

- Projection radiography (CR, DX, or view positions present): frontal before lateral. PA is
  preferred, then AP, then frontal of unstated direction, then images with no known view
  (usually frontal), then lateral and other views (LL, RL, LATERAL, ...). The view is the
  instance's ViewPosition; when that is missing (common in CR and in exports), the series
  description's words decide ("CHEST PA" is PA, "CHEST LAT" lateral; "PA AND LATERAL" says
  nothing about one image, so it stays unknown).
- Cross-sectional modalities (CT, MR, PT, ...): the largest series, sampled evenly through the
  slices, so a few images cover the volume instead of its top.
- Anything else: the order given (series, then instance number), first ``limit``.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Final

from agent.domain.refs import InstanceRef

PROJECTION_MODALITIES: Final = frozenset({"CR", "DX", "RG", "MG"})
CROSS_SECTIONAL_MODALITIES: Final = frozenset({"CT", "MR", "PT", "NM"})
#: Rank of a view position: lower goes first.
VIEW_RANK: Final = {"PA": 0, "AP": 1}
FRONTAL_RANK: Final = 2
UNKNOWN_VIEW_RANK: Final = 3
OTHER_VIEW_RANK: Final = 4

#: Series-description words (upper case, split on anything but letters and digits) naming a view.
DESCRIPTION_VIEWS: Final = {
    "PA": "PA",
    "POSTEROANTERIOR": "PA",
    "AP": "AP",
    "ANTEROPOSTERIOR": "AP",
    "FRONTAL": "FRONTAL",
    "LAT": "LATERAL",
    "LATERAL": "LATERAL",
    "LL": "LATERAL",
    "RL": "LATERAL",
}


def view_from_description(description: str | None) -> str | None:
    """Return the view a series description names: "PA", "AP", "FRONTAL", "LATERAL", or None.

    Words are matched whole and case-insensitively ("LAT" but not "LATE", "PA" but not
    "PAEDIATRIC"). A description naming a lateral and a frontal view, or both PA and AP, names
    no single view and gives None; "AP/PA" (both frontal) gives "FRONTAL", "FRONTAL PA" gives "PA".
    """
    words = re.split(r"[^A-Z0-9]+", (description or "").upper())
    views = {DESCRIPTION_VIEWS[w] for w in words if w in DESCRIPTION_VIEWS}
    if not views:
        return None
    if "LATERAL" in views:
        return "LATERAL" if views == {"LATERAL"} else None
    specific = views - {"FRONTAL"}  # "FRONTAL PA" is PA
    return specific.pop() if len(specific) == 1 else "FRONTAL"


def _view_rank(ref: InstanceRef) -> int:
    view = (ref.view_position or "").strip().upper()
    if view:
        return VIEW_RANK.get(view, OTHER_VIEW_RANK)
    described = view_from_description(ref.series_description)
    if described is None:
        return UNKNOWN_VIEW_RANK
    if described == "FRONTAL":
        return FRONTAL_RANK
    return VIEW_RANK.get(described, OTHER_VIEW_RANK)


def _series_order(refs: list[InstanceRef]) -> dict[str, int]:
    """Return each series' position of first appearance (the source's series order)."""
    order: dict[str, int] = {}
    for ref in refs:
        order.setdefault(ref.series_uid, len(order))
    return order


def _instance_key(ref: InstanceRef) -> int:
    return ref.instance_number if ref.instance_number is not None else 2**31


def _effective_modality(refs: list[InstanceRef], modality: str | None) -> str | None:
    if modality:
        return modality.strip().upper()
    counts = Counter((ref.modality or "").upper() for ref in refs if ref.modality)
    return counts.most_common(1)[0][0] if counts else None


def evenly_spaced(count: int, limit: int) -> list[int]:
    """Return ``limit`` indices spread evenly over ``range(count)``, centred in their bins.

    With an odd ``limit`` the middle index ``count // 2`` is among them.

    Args:
        count: how many items there are.
        limit: how many to pick.

    Returns:
        Sorted distinct indices; all of them when ``limit >= count``.
    """
    if limit <= 0 or count <= 0:
        return []
    if limit >= count:
        return list(range(count))
    if limit == 1:
        return [count // 2]
    step = count / limit
    picked = {int(step * i + step / 2) for i in range(limit)}
    return sorted(picked)


def choose_instances(refs: list[InstanceRef], modality: str | None, limit: int) -> list[InstanceRef]:
    """Return at most ``limit`` instances of one study, the ones the models should see first.

    Args:
        refs: the study's instances, in the source's order (series, then instance number).
        modality: the study's modality (from the ImagingStudy); when None, the most common
            modality among ``refs`` is used.
        limit: the most images to return (``DicomSettings.max_instances``).

    Returns:
        The chosen instances; the order is stable for equal ranks: series order of ``refs``,
        then instance number.
    """
    if limit <= 0 or not refs:
        return []
    series = _series_order(refs)
    kind = _effective_modality(refs, modality)
    in_order = sorted(refs, key=lambda r: (series[r.series_uid], _instance_key(r)))
    has_views = any(ref.view_position for ref in refs)

    if kind in PROJECTION_MODALITIES or (kind not in CROSS_SECTIONAL_MODALITIES and has_views):
        # sorted() is stable, so equal ranks keep series-then-instance order.
        return sorted(in_order, key=_view_rank)[:limit]

    if kind in CROSS_SECTIONAL_MODALITIES:
        sizes = Counter(ref.series_uid for ref in refs)
        # Largest series; ties go to the earlier series.
        best = min(sizes, key=lambda uid: (-sizes[uid], series[uid]))
        slices = [ref for ref in in_order if ref.series_uid == best]
        return [slices[i] for i in evenly_spaced(len(slices), limit)]

    return in_order[:limit]
