"""The whole ask flow on the embedded sources, with a scripted reasoner and a fake scorer.

Real: bundle-folder FHIR, DICOM-folder imaging, pixel preparation, the graph, citation checking
and the SQL trace. Scripted: the models, so the answer can cite both real and made-up ids (the
tiny random-weight models cite nothing). The same flow with the real model classes, real
servers and PostgreSQL is in tests/e2e.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
import torch
from PIL import Image, ImageStat
from pydicom.encaps import encapsulate

from agent.audit.reader import load_run
from agent.config import DEFAULT_FIXTURES, Settings, get_settings
from agent.domain.imaging import LabelScore
from agent.errors import (
    AmbiguousPatientError,
    InternalError,
    ModelUnavailableError,
    PatientNotFoundError,
)
from agent.graph.state import HISTORY_TYPES
from agent.inference.factory import LoadedModels
from agent.inference.labels import LabelSet
from agent.inference.protocols import GenerationRequest, GenerationResult, ModelIdentity
from agent.runner import AgentRuntime, ModelCache, run_ask

MANIFEST = json.loads((DEFAULT_FIXTURES / "manifest.json").read_text())
PATIENTS = {p["key"]: p for p in MANIFEST["patients"]}


class FakeScorer:
    """Deterministic embeddings (from pixel statistics) and scores; records what it was asked."""

    identity = ModelIdentity(model_id="fake-siglip", backend="test")

    def __init__(self) -> None:
        self.calls: list[tuple[list[Image.Image], list[str]]] = []
        self.embedded: list[int] = []

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        self.embedded.append(len(images))
        rows = [[float(v) + 1.0 for v in ImageStat.Stat(image.convert("RGB")).mean] + [1.0] for image in images]
        return torch.nn.functional.normalize(torch.tensor(rows), dim=-1)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.ones(len(texts), 4), dim=-1)

    def score_embeddings(self, image_embeddings: torch.Tensor, label_set: LabelSet) -> list[list[LabelScore]]:
        self.calls.append(([], label_set.prompts))
        return [
            [LabelScore(label=label, score=0.1 * (i + 1)) for i, label in enumerate(label_set.names)]
            for _ in range(image_embeddings.shape[0])
        ]

    def zero_shot(self, images: list[Image.Image], labels: list[str]) -> list[list[LabelScore]]:
        raise AssertionError("the graph scores embeddings it computed once, never images again")


class ScriptedReasoner:
    """Answers by citing the first condition it finds in the prompt, plus a made-up observation."""

    identity = ModelIdentity(model_id="scripted-reasoner", backend="test")

    def __init__(self) -> None:
        self.requests: list[GenerationRequest] = []

    def generate(self, request: GenerationRequest) -> GenerationResult:
        self.requests.append(request)
        tokens = request.user_text.split()
        condition = next((token.strip("[]") for token in tokens if token.startswith("[Condition/")), None)
        if condition is None:  # the planning prompt: no record tags, and no JSON plan either
            return GenerationResult(text="I cannot plan.", prompt_tokens=50, output_tokens=4, latency_s=0.01)
        text = (
            f"<unused94>thinking<unused95>The patient has heart failure [{condition}]. "
            "BNP is rising [Observation/00000000-made-up]."
        )
        text = text.split("<unused95>")[-1]
        return GenerationResult(text=text, prompt_tokens=100, output_tokens=20, latency_s=0.01)


def _runtime(tmp_path: Path, scorer: Any, reasoner: Any, **settings: Any) -> AgentRuntime:
    base: Settings = get_settings(
        fhir={"bundle_dir": DEFAULT_FIXTURES / "fhir"},
        dicom={"dicom_dir": settings.pop("dicom_dir", DEFAULT_FIXTURES / "dicom")},
        db={"url": f"sqlite:///{tmp_path / 'trace.db'}"},
    )
    loader = settings.pop("loader", None) or (
        lambda _s: LoadedModels(scorer=scorer, reasoner=reasoner, used_test_models=False, banner=None)
    )
    return AgentRuntime(settings=base, models=ModelCache(loader=loader))


def bundles_with_twins(tmp_path: Path) -> Path:
    """Return a copy of the fixture bundles plus two patients (twin-1, twin-2) sharing one MRN."""
    bundles = tmp_path / "fhir"
    shutil.copytree(DEFAULT_FIXTURES / "fhir", bundles)
    twins = [
        {
            "resourceType": "Patient",
            "id": f"twin-{n}",
            "name": [{"family": "Twin", "given": [f"N{n}"]}],
            "birthDate": "1970-01-01",
            "identifier": [{"system": "urn:test:mrn", "value": "DUP-1"}],
        }
        for n in (1, 2)
    ]
    (bundles / "twins.json").write_text(
        json.dumps({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": t} for t in twins]})
    )
    return bundles


async def test_cxr_patient_answer_is_cited_and_every_step_traced(tmp_path: Path) -> None:
    scorer, reasoner = FakeScorer(), ScriptedReasoner()
    runtime = _runtime(tmp_path, scorer, reasoner)
    patient = PATIENTS["cxr"]
    result = await run_ask(runtime, patient_id=patient["patient_id"], question="Summarise the heart failure.")

    assert result.status == "ok"
    assert f"Patient/{patient['patient_id']}" in result.sources
    current = max(patient["studies"], key=lambda s: s["started"])
    assert f"ImagingStudy/{current['imaging_study_id']}" in result.sources
    # the made-up citation is reported and removed; the real one stays
    assert [(c.reference.split("/")[0], c.valid) for c in result.citations] == [
        ("Condition", True),
        ("Observation", False),
    ]
    assert "made-up" not in result.answer and result.citations[0].reference in result.answer
    assert "<unused94>" not in result.answer

    # the frontal view of the newest study went to both models
    pa = next(i for i in current["instances"] if i["view_position"] == "PA")
    assert result.findings[0]["image"]["sop_instance_uid"] == pa["sop_instance_uid"]  # type: ignore[index]
    sent = reasoner.requests[0]
    assert len(result.findings) == 2  # PA and lateral scored
    assert len(sent.images) == 1  # only the frontal view goes to MedGemma (reasoner_max_images=1)
    assert sent.images[0].size[0] == sent.images[0].size[1]  # padded to square
    assert "<patient_record>" in sent.user_text and "<image_findings" in sent.user_text

    trace = load_run(runtime.engine, result.run_id)
    nodes = [e.name for e in trace.events if e.kind == "node_finished"]
    assert nodes == [
        "load_models",
        "load_imaging_extras",
        "resolve_patient",
        "plan",
        "access_check",
        "fetch_history",
        "image_findings",
        "reason",
        "check_citations",
    ]
    steps = {(e.name, e.meta["phase"]): e for e in trace.events if e.name in ("fetch_records", "fetch_images")}
    started = {name: steps[(name, "started")].seq for name in ("fetch_records", "fetch_images")}
    ended = {name: steps[(name, "finished")].seq for name in ("fetch_records", "fetch_images")}
    # the record and image halves ran at once: both started before either finished
    assert max(started.values()) < min(ended.values())
    assert all(steps[(name, "finished")].status == "ok" for name in started)
    plan_note = next(e for e in trace.events if e.name == "plan_chosen")
    assert plan_note.meta["source"] == "deterministic"
    fhir_paths = [e.meta["path"] for e in trace.events if e.kind == "fhir_request"]
    assert fhir_paths[0] == f"Patient/{patient['patient_id']}"
    assert fhir_paths[1] == "metadata"  # capabilities decide $everything vs per-type searches
    assert len(fhir_paths) == 1 + 1 + len(HISTORY_TYPES)
    assert sorted(p.split("?")[0] for p in fhir_paths[2:]) == sorted(HISTORY_TYPES)  # each type once
    retrieved = [
        e.meta["sop_instance_uid"]
        for e in trace.events
        if e.kind == "dicom_retrieval" and e.meta["action"] == "retrieve"
    ]
    assert pa["sop_instance_uid"] in retrieved
    calls = [e for e in trace.events if e.kind == "model_call"]
    assert [c.name for c in calls] == ["medsiglip.embed_images", "medsiglip.zero_shot", "medgemma.generate"]
    assert scorer.embedded == [2]  # both images embedded once, in one batch
    assert calls[2].meta["model_id"] == "scripted-reasoner" and calls[2].meta["prompt_tokens"] == 100
    assert calls[2].content["output"].startswith("The patient has heart failure")
    fetch_end = next(e for e in trace.events if e.kind == "node_finished" and e.name == "fetch_history")
    outputs = fetch_end.meta["outputs"]
    assert outputs["imaging_study"] == f"ImagingStudy/{current['imaging_study_id']}"
    searched = [e for e in trace.events if e.kind == "fhir_request" and "?" in e.meta["path"]]
    assert outputs["resources"]["count"] == sum(len(e.meta["resource_ids"]) for e in searched)
    assert outputs["context_text"]["chars"] > 0  # the text itself is content, not metadata
    first, last = fetch_end.meta["records"]
    assert [e.kind for e in trace.events if first <= e.seq <= last].count("fhir_request") == 1 + len(HISTORY_TYPES)
    citations = next(e for e in trace.events if e.name == "citations")
    assert citations.meta["dangling"] == ["Observation/00000000-made-up"]
    assert trace.run.status == "ok"


async def test_patient_without_imaging_skips_the_image_steps(tmp_path: Path) -> None:
    scorer, reasoner = FakeScorer(), ScriptedReasoner()
    runtime = _runtime(tmp_path, scorer, reasoner)
    result = await run_ask(runtime, patient_id=PATIENTS["noimg"]["patient_id"], question="Diabetes control?")
    assert result.status == "ok" and result.findings == []
    assert scorer.calls == [] and reasoner.requests[0].images == []
    trace = load_run(runtime.engine, result.run_id)
    # the imaging half looked for a study, found none, and nothing was retrieved or scored
    assert not any(e.kind == "dicom_retrieval" for e in trace.events)
    assert "image_findings" not in [e.name for e in trace.events]


async def test_unknown_patient_fails_at_resolve_with_its_code(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, FakeScorer(), ScriptedReasoner())
    with pytest.raises(PatientNotFoundError) as caught:
        await run_ask(runtime, patient_id="no-such-patient", question="?")
    trace = load_run(runtime.engine, caught.value.details["run_id"])
    assert trace.run.status == "failed"
    assert trace.events[-1].meta["failing_step"] == "resolve_patient"
    assert trace.events[-1].meta["error"]["code"] == "patient_not_found"


async def test_missing_weights_fail_at_load_models(tmp_path: Path) -> None:
    def loader(_settings: Settings) -> LoadedModels:
        raise ModelUnavailableError("model google/medgemma-4b-it not found: set MEDAGENT_MODELS__MEDGEMMA")

    runtime = _runtime(tmp_path, None, None, loader=loader)
    with pytest.raises(ModelUnavailableError) as caught:
        await run_ask(runtime, patient_id=PATIENTS["cxr"]["patient_id"], question="?")
    trace = load_run(runtime.engine, caught.value.details["run_id"])
    assert trace.events[-1].meta["failing_step"] == "load_models"
    assert trace.events[-1].meta["error"]["code"] == "model_unavailable"
    assert not any(e.kind == "fhir_request" for e in trace.events)  # nothing read before models are ready


async def test_undecodable_study_degrades_naming_the_transfer_syntax(tmp_path: Path) -> None:
    dicom_dir = tmp_path / "dicom"
    shutil.copytree(DEFAULT_FIXTURES / "dicom", dicom_dir)
    current = max(PATIENTS["cxr"]["studies"], key=lambda s: s["started"])
    for instance in current["instances"]:
        path = dicom_dir / Path(instance["file"]).relative_to("dicom")
        ds = pydicom.dcmread(path)
        # claim JPEG 2000 (no decoder installed here), encapsulated as the syntax requires
        ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000
        ds.PixelData = encapsulate([ds.PixelData])
        ds.save_as(path, enforce_file_format=True)
    runtime = _runtime(tmp_path, FakeScorer(), ScriptedReasoner(), dicom_dir=dicom_dir)
    # Imaging never ends a run (tests/graph/test_imaging_degrade.py has every path): the answer
    # comes without images, and the warning names the study and the transfer syntax.
    result = await run_ask(runtime, patient_id=PATIENTS["cxr"]["patient_id"], question="?")
    assert result.status == "ok"
    [warning] = [w for w in result.warnings if w.startswith(f"ImagingStudy/{current['imaging_study_id']}: ")]
    assert "no image could be decoded (dicom_undecodable)" in warning
    assert re.search(r"1\.2\.840\.10008\.1\.2\.4\.91|JPEG 2000", warning)
    trace = load_run(runtime.engine, result.run_id)
    assert trace.run.status == "ok"
    skipped = [e for e in trace.events if e.name == "instance_skipped"]
    assert skipped and all(e.status == "failed" for e in skipped)


async def test_ct_study_is_sent_to_the_reasoner_without_chest_xray_labels(tmp_path: Path) -> None:
    scorer, reasoner = FakeScorer(), ScriptedReasoner()
    runtime = _runtime(tmp_path, scorer, reasoner)
    result = await run_ask(runtime, patient_id=PATIENTS["ct"]["patient_id"], question="Nodule follow-up?")
    assert result.status == "ok" and result.findings == []
    assert scorer.calls == []  # no CXR labels scored on CT slices
    sent = reasoner.requests[0]
    assert len(sent.images) == 1 and "<image_findings" not in sent.user_text
    assert "- CT, instance " in sent.user_text
    trace = load_run(runtime.engine, result.run_id)
    note = next(e for e in trace.events if e.name == "no_label_set")
    assert note.meta["modality"] == "CT"
    prepared = [e for e in trace.events if e.name == "pixel_preparation"]
    assert prepared and all("window" in " ".join(e.meta["steps"]) for e in prepared)


async def test_an_unexpected_error_is_recorded_and_logged_without_its_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class BrokenReasoner(ScriptedReasoner):
        def generate(self, request: GenerationRequest) -> GenerationResult:
            raise RuntimeError("note says: Jane Roe, HIV positive")

    runtime = _runtime(tmp_path, FakeScorer(), BrokenReasoner())
    with pytest.raises(InternalError) as caught:
        await run_ask(runtime, patient_id=PATIENTS["noimg"]["patient_id"], question="?")
    assert "Jane Roe" not in caplog.text and "RuntimeError" in caplog.text
    trace = load_run(runtime.engine, caught.value.details["run_id"])
    assert trace.events[-1].meta["failing_step"] == "reason"
    assert trace.events[-1].meta["error"]["code"] == "internal_error"
    assert "Jane Roe" not in trace.model_dump_json()


async def test_patient_by_identifier_and_ambiguity_never_guessed(tmp_path: Path) -> None:
    patient = PATIENTS["cxr"]
    runtime = _runtime(tmp_path, FakeScorer(), ScriptedReasoner())
    by_mrn = f"identifier={patient['mrn_system']}|{patient['mrn']}"
    result = await run_ask(runtime, patient_id=by_mrn, question="Status?")
    assert f"Patient/{patient['patient_id']}" in result.sources
    assert load_run(runtime.engine, result.run_id).run.patient_ref == f"Patient?{by_mrn}"

    # two patients sharing one MRN: the run fails and says so, and never picks one
    bundles = bundles_with_twins(tmp_path)
    ambiguous = _runtime(tmp_path / "other", FakeScorer(), ScriptedReasoner())
    ambiguous.settings.fhir.bundle_dir = bundles
    with pytest.raises(AmbiguousPatientError) as caught:
        await run_ask(ambiguous, patient_id="identifier=urn:test:mrn|DUP-1", question="?")
    assert "twin-1" in caught.value.message and "twin-2" in caught.value.message
    trace = load_run(ambiguous.engine, caught.value.details["run_id"])
    end = trace.events[-1]
    assert end.meta["error"]["code"] == "patient_ambiguous" and end.meta["failing_step"] == "resolve_patient"
    assert "Twin" not in json.dumps(end.meta)  # names stay out of metadata ...
    assert "Twin" in json.dumps(end.content)  # ... and are kept in the access-controlled content


async def test_a_note_given_by_url_is_fetched_and_read(tmp_path: Path) -> None:
    import base64

    patient = PATIENTS["noimg"]
    bundles = tmp_path / "fhir"
    shutil.copytree(DEFAULT_FIXTURES / "fhir", bundles)
    text = "Discharge summary: foot exam normal, continue metformin."
    binary = {
        "resourceType": "Binary",
        "id": "note-b1",
        "contentType": "text/plain",
        "data": base64.b64encode(text.encode()).decode(),
    }
    note = {
        "resourceType": "DocumentReference",
        "id": "note-url",
        "status": "current",
        "subject": {"reference": f"Patient/{patient['patient_id']}"},
        "date": "2026-11-20T10:00:00Z",
        "type": {"text": "Discharge summary"},
        "content": [{"attachment": {"contentType": "text/plain", "url": "Binary/note-b1"}}],
    }
    (bundles / "url-note.json").write_text(
        json.dumps(
            {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": binary}, {"resource": note}]}
        )
    )
    reasoner = ScriptedReasoner()
    runtime = _runtime(tmp_path / "run", FakeScorer(), reasoner)
    runtime.settings.fhir.bundle_dir = bundles
    result = await run_ask(runtime, patient_id=patient["patient_id"], question="What did the discharge note say?")
    assert "DocumentReference/note-url" in result.sources
    assert text in reasoner.requests[0].user_text
    trace = load_run(runtime.engine, result.run_id)
    assert "Binary/note-b1" in [e.meta["path"] for e in trace.events if e.kind == "fhir_request"]  # fetched, traced
