"""Label sets: published versions stay put, every domain has a set, keys resolve or fail clearly."""

from __future__ import annotations

import pytest

from agent.errors import ConfigError
from agent.inference.labels import (
    CXR_LABELS_V1,
    CXR_LABELS_V2,
    LABEL_SETS,
    LABEL_SETS_BY_MODALITY,
    LabelSet,
    ZeroShotLabel,
    label_set_by_key,
)

#: The 13 findings of the MedSigLIP model card's zero-shot CXR evaluation (CheXpert's labels
#: without "no finding").
MODEL_CARD_CXR_FINDINGS = {
    "atelectasis",
    "cardiomegaly",
    "consolidation",
    "edema",
    "enlarged cardiomediastinum",
    "fracture",
    "lung lesion",
    "lung opacity",
    "pleural effusion",
    "pleural other",
    "pneumonia",
    "pneumothorax",
    "support devices",
}


def test_cxr_v1_is_unchanged() -> None:
    # Published sets are never edited: traces name them by key and must still match.
    assert CXR_LABELS_V1.key == "cxr@1"
    assert CXR_LABELS_V1.names == [
        "no acute finding",
        "lung opacity",
        "pleural effusion",
        "cardiomegaly",
        "pneumothorax",
        "atelectasis",
    ]
    assert CXR_LABELS_V1.prompt_map()["pneumothorax"] == "a chest x-ray showing pneumothorax"
    assert all(item.negative_prompt is None for item in CXR_LABELS_V1.labels)
    assert not CXR_LABELS_V1.has_negatives


def test_cxr_v2_has_the_model_card_findings_with_negations() -> None:
    assert CXR_LABELS_V2.key == "cxr@2"
    assert set(CXR_LABELS_V2.names) == MODEL_CARD_CXR_FINDINGS
    assert len(CXR_LABELS_V2.names) == 13
    assert CXR_LABELS_V2.has_negatives
    for item in CXR_LABELS_V2.labels:
        assert item.label in item.prompt
        assert item.negative_prompt is not None and item.negative_prompt != item.prompt
        assert "chest x-ray" in item.prompt and "chest x-ray" in item.negative_prompt


@pytest.mark.parametrize(
    ("modality", "name", "domain_word"),
    [
        ("CR", "cxr", "chest x-ray"),
        ("DX", "cxr", "chest x-ray"),
        ("XC", "derm", "skin"),
        ("DMS", "derm", "skin"),
        ("SM", "pathology", "histopathology"),
        ("OP", "fundus", "fundus"),
    ],
)
def test_each_modality_gets_its_domain_set(modality: str, name: str, domain_word: str) -> None:
    label_set = LABEL_SETS_BY_MODALITY[modality]
    assert label_set.name == name
    assert label_set.has_negatives
    assert all(domain_word in prompt for prompt in label_set.prompts)
    # The modality map only points at published sets.
    assert LABEL_SETS[label_set.key] is label_set


def test_modalities_without_a_domain_set_get_none() -> None:
    for modality in ("CT", "MR", "US", "PT"):
        assert modality not in LABEL_SETS_BY_MODALITY


def test_registry_keys_are_name_at_version_and_unique() -> None:
    assert {"cxr@1", "cxr@2", "derm@1", "pathology@1", "fundus@1"} <= set(LABEL_SETS)
    for key, label_set in LABEL_SETS.items():
        assert key == f"{label_set.name}@{label_set.version}"
        assert len(set(label_set.prompts)) == len(label_set.prompts)


def test_label_set_by_key_resolves_and_names_known_keys_on_failure() -> None:
    assert label_set_by_key("cxr@1") is CXR_LABELS_V1
    assert label_set_by_key("cxr@2") is CXR_LABELS_V2
    with pytest.raises(ConfigError) as caught:
        label_set_by_key("cxr@9")
    assert "cxr@9" in caught.value.message
    assert "cxr@2" in caught.value.message


def test_label_set_rejects_duplicates() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        LabelSet("x", "1", (ZeroShotLabel("a", "p", "n"), ZeroShotLabel("a", "q", "m")))
