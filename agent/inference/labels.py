"""Versioned zero-shot label sets for MedSigLIP's image findings.

The image-findings stage scores each label of a set on every image; the set's ``name@version``
goes into the trace next to the scores, so an auditor knows exactly which prompts produced them.
Changing a prompt changes the scores: bump the version (or add a new constant) rather than edit
a published one.

Prompts follow MedSigLIP's published zero-shot examples: short, lower-case descriptions of the
image ("a chest x-ray showing ..."). SigLIP scores each prompt independently with a sigmoid, so
the labels are not mutually exclusive and their scores do not sum to one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ZeroShotLabel:
    """One finding and the text prompt MedSigLIP compares images against."""

    label: str
    prompt: str


@dataclass(frozen=True)
class LabelSet:
    """A named, versioned list of labels, in the order scores are reported."""

    name: str
    version: str
    labels: tuple[ZeroShotLabel, ...]

    def __post_init__(self) -> None:
        names = [item.label for item in self.labels]
        if len(set(names)) != len(names):
            raise ValueError(f"label set {self.name}: duplicate labels in {names}")

    @property
    def key(self) -> str:
        """Return ``name@version``, the form recorded in the trace."""
        return f"{self.name}@{self.version}"

    @property
    def names(self) -> list[str]:
        """Return the label names, in order."""
        return [item.label for item in self.labels]

    @property
    def prompts(self) -> list[str]:
        """Return the prompts, in label order."""
        return [item.prompt for item in self.labels]

    def prompt_map(self) -> dict[str, str]:
        """Return a mapping from label name to its prompt."""
        return {item.label: item.prompt for item in self.labels}


#: Chest X-ray findings for a first look at a CXR study. Six labels keep the text side cheap
#: (one cached embedding each) while covering the findings a summary most often needs.
CXR_LABELS_V1 = LabelSet(
    name="cxr",
    version="1",
    labels=(
        ZeroShotLabel("no acute finding", "a normal chest x-ray with no acute findings"),
        ZeroShotLabel("lung opacity", "a chest x-ray showing lung opacity"),
        ZeroShotLabel("pleural effusion", "a chest x-ray showing pleural effusion"),
        ZeroShotLabel("cardiomegaly", "a chest x-ray showing cardiomegaly"),
        ZeroShotLabel("pneumothorax", "a chest x-ray showing pneumothorax"),
        ZeroShotLabel("atelectasis", "a chest x-ray showing atelectasis"),
    ),
)


#: Which label set scores images of each DICOM modality; a modality without one gets no zero-shot
#: findings (dermatology, pathology and fundus sets come with their own modalities later).
LABEL_SETS_BY_MODALITY: dict[str, LabelSet] = {"CR": CXR_LABELS_V1, "DX": CXR_LABELS_V1}
