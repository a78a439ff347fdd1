"""Versioned zero-shot label sets for MedSigLIP's image findings, one or more per imaging domain.

The image-findings stage scores each label of a set on every image; the set's ``name@version``
goes into the trace next to the scores, so an auditor knows exactly which prompts produced them.
Changing a prompt changes the scores: a published set is never edited, a new version is added
(``cxr@1`` stays as it was when ``cxr@2`` arrived) and :data:`LABEL_SETS` keeps every version, so
an old trace can still be matched to its prompts.

Prompts follow MedSigLIP's published zero-shot examples: short, lower-case descriptions of the
image ("a chest x-ray showing ..."). SigLIP scores each prompt independently with a sigmoid, so
the labels are not mutually exclusive and their scores do not sum to one. Sets from version 2 on
give each label a negative prompt as well; comparing a finding with its own negation cancels
much of the prompt-to-prompt calibration difference the raw sigmoid scores carry.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.errors import ConfigError


@dataclass(frozen=True)
class ZeroShotLabel:
    """One finding, the prompt MedSigLIP compares images against, and optionally its negation."""

    label: str
    prompt: str
    negative_prompt: str | None = None


@dataclass(frozen=True)
class LabelSet:
    """A named, versioned list of labels for one imaging domain, in the order scores are reported."""

    name: str
    version: str
    labels: tuple[ZeroShotLabel, ...]
    domain: str = ""

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

    @property
    def has_negatives(self) -> bool:
        """Return whether every label has a negative prompt (so pair probabilities can be computed)."""
        return bool(self.labels) and all(item.negative_prompt for item in self.labels)

    def prompt_map(self) -> dict[str, str]:
        """Return a mapping from label name to its prompt."""
        return {item.label: item.prompt for item in self.labels}


def _pairs(subject: str, findings: tuple[str, ...], *, normal: str | None = None) -> tuple[ZeroShotLabel, ...]:
    """Build ``a SUBJECT showing F`` / ``a SUBJECT with no F`` pairs, one per finding."""
    return tuple(
        ZeroShotLabel(finding, f"a {subject} showing {finding}", normal or f"a {subject} with no {finding}")
        for finding in findings
    )


#: Chest X-ray findings for a first look at a CXR study. Six labels keep the text side cheap
#: (one cached embedding each) while covering the findings a summary most often needs.
CXR_LABELS_V1 = LabelSet(
    name="cxr",
    version="1",
    domain="chest x-ray",
    labels=(
        ZeroShotLabel("no acute finding", "a normal chest x-ray with no acute findings"),
        ZeroShotLabel("lung opacity", "a chest x-ray showing lung opacity"),
        ZeroShotLabel("pleural effusion", "a chest x-ray showing pleural effusion"),
        ZeroShotLabel("cardiomegaly", "a chest x-ray showing cardiomegaly"),
        ZeroShotLabel("pneumothorax", "a chest x-ray showing pneumothorax"),
        ZeroShotLabel("atelectasis", "a chest x-ray showing atelectasis"),
    ),
)

#: The 13 CheXpert findings the MedSigLIP model card reports zero-shot CXR AUCs for (average
#: 0.844), each with its negation. CheXpert's fourteenth label, "no finding", is not a finding
#: and is left out, as in the model card.
CXR_LABELS_V2 = LabelSet(
    name="cxr",
    version="2",
    domain="chest x-ray",
    labels=_pairs(
        "chest x-ray",
        (
            "enlarged cardiomediastinum",
            "cardiomegaly",
            "lung opacity",
            "lung lesion",
            "consolidation",
            "edema",
            "pneumonia",
            "atelectasis",
            "pneumothorax",
            "pleural effusion",
            "pleural other",
            "fracture",
            "support devices",
        ),
    ),
)

#: Skin lesions and rashes seen in clinical (external-camera) and dermoscopic photographs; the
#: negative is a photograph of healthy skin, since "no melanoma" alone also describes a nevus.
DERM_LABELS_V1 = LabelSet(
    name="derm",
    version="1",
    domain="dermatology",
    labels=_pairs(
        "skin photograph",
        (
            "melanoma",
            "melanocytic nevus",
            "basal cell carcinoma",
            "squamous cell carcinoma",
            "actinic keratosis",
            "seborrheic keratosis",
            "eczema",
            "psoriasis",
        ),
        normal="a skin photograph of healthy skin",
    ),
)

#: Tissue-level findings on H&E slide-microscopy patches.
PATHOLOGY_LABELS_V1 = LabelSet(
    name="pathology",
    version="1",
    domain="histopathology",
    labels=(
        ZeroShotLabel(
            "tumor",
            "a histopathology image showing tumor tissue",
            "a histopathology image of normal tissue",
        ),
        ZeroShotLabel(
            "lymph node metastasis",
            "a histopathology image of a lymph node with metastatic carcinoma",
            "a histopathology image of a normal lymph node",
        ),
        ZeroShotLabel(
            "necrosis",
            "a histopathology image showing necrosis",
            "a histopathology image with no necrosis",
        ),
        ZeroShotLabel(
            "inflammation",
            "a histopathology image showing inflammation",
            "a histopathology image with no inflammation",
        ),
    ),
)

#: Retinal findings on colour fundus photographs; the negative is a healthy retina, the usual
#: comparison in diabetic-retinopathy screening.
FUNDUS_LABELS_V1 = LabelSet(
    name="fundus",
    version="1",
    domain="fundus",
    labels=_pairs(
        "fundus photograph",
        (
            "diabetic retinopathy",
            "diabetic macular edema",
            "glaucomatous optic disc",
            "age-related macular degeneration",
        ),
        normal="a fundus photograph of a healthy retina",
    ),
)

#: Every published set, by ``name@version``: traces name sets this way, so none is ever removed.
LABEL_SETS: dict[str, LabelSet] = {
    label_set.key: label_set
    for label_set in (CXR_LABELS_V1, CXR_LABELS_V2, DERM_LABELS_V1, PATHOLOGY_LABELS_V1, FUNDUS_LABELS_V1)
}

#: Which label set scores images of each DICOM modality (PS3.3 C.7.3.1.1.1): CR/DX chest X-ray,
#: XC external-camera photography and DMS dermoscopy, SM slide microscopy, OP ophthalmic
#: photography. A modality without one gets no zero-shot findings: chest X-ray labels on a CT
#: slice would produce confident nonsense.
LABEL_SETS_BY_MODALITY: dict[str, LabelSet] = {
    "CR": CXR_LABELS_V2,
    "DX": CXR_LABELS_V2,
    "XC": DERM_LABELS_V1,
    "DMS": DERM_LABELS_V1,
    "SM": PATHOLOGY_LABELS_V1,
    "OP": FUNDUS_LABELS_V1,
}


def label_set_by_key(key: str) -> LabelSet:
    """Return the published label set ``name@version`` (e.g. ``cxr@2``).

    Raises:
        ConfigError: for a key no published set has; the message lists the known keys.
    """
    try:
        return LABEL_SETS[key]
    except KeyError:
        raise ConfigError(
            f"unknown label set {key!r}; known: {', '.join(sorted(LABEL_SETS))}",
            details={"label_set": key, "known": sorted(LABEL_SETS)},
        ) from None
