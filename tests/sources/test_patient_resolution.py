"""Patient resolution: query parsing, and resolve/find against the live FHIR engine and a bundle folder.

Each module run adds its own look-alike patients (a family name unique to the run) so the
ambiguity cases never disturb, or depend on, what other tests load into the shared server.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agent.config import DEFAULT_FIXTURES
from agent.domain.events import NullObserver
from agent.errors import AmbiguousPatientError, ConfigError, PatientNotFoundError
from agent.sources.fhir_bundle_dir import BundleDirFhirSource
from agent.sources.fhir_http import HttpFhirSource
from agent.sources.patient_resolution import Candidate, PatientQuery, find_patients, resolve_patient
from agent.sources.protocols import FhirSource
from tests.support.servers import FhirServerHandle, load_fhir_bundles

MANIFEST = json.loads((DEFAULT_FIXTURES / "manifest.json").read_text())
CXR = next(p for p in MANIFEST["patients"] if p["key"] == "cxr")
CXR_MRN = f"{CXR['mrn_system']}|{CXR['mrn']}"
TWIN_BIRTHDATE = "1970-01-02"


@dataclass(frozen=True)
class LookAlikes:
    """Two patients sharing family name and birth date, and one whose family name extends theirs."""

    family: str
    twin_ids: tuple[str, str]
    near_id: str
    bundle: Path


def make_look_alikes(folder: Path) -> LookAlikes:
    """Write a transaction bundle of look-alike patients (family name unique to this call)."""
    # Letters only after the prefix: the family name must survive FHIR string search as typed.
    family = "Twin" + "".join(chr(ord("a") + int(c, 16)) for c in uuid.uuid4().hex[:12])
    twin_ids = (str(uuid.uuid4()), str(uuid.uuid4()))
    near_id = str(uuid.uuid4())
    people = [(twin_ids[0], "Ada", family), (twin_ids[1], "Bea", family), (near_id, "Ada", family + "son")]
    entries = [
        {
            "fullUrl": f"urn:uuid:{pid}",
            "resource": {
                "resourceType": "Patient",
                "id": pid,
                "identifier": [{"system": "http://test.example.org/twins", "value": f"T-{pid}"}],
                "name": [{"use": "official", "family": fam, "given": [given]}],
                "gender": "female",
                "birthDate": TWIN_BIRTHDATE,
            },
            "request": {"method": "PUT", "url": f"Patient/{pid}"},
        }
        for pid, given, fam in people
    ]
    folder.mkdir(parents=True, exist_ok=True)
    bundle = folder / f"{family}.json"
    bundle.write_text(json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries}))
    return LookAlikes(family=family, twin_ids=twin_ids, near_id=near_id, bundle=bundle)


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LookAlikes]:
    """Return a bundle folder holding fixtures/fhir plus this module's look-alikes."""
    root = tmp_path_factory.mktemp("fhir-bundles")
    shutil.copytree(DEFAULT_FIXTURES / "fhir", root / "fixtures")
    return root, make_look_alikes(root / "look-alikes")


@pytest.fixture(scope="module")
def server_look_alikes(fhir_server: FhirServerHandle, tmp_path_factory: pytest.TempPathFactory) -> LookAlikes:
    """Load this module's look-alikes into the live FHIR engine."""
    look_alikes = make_look_alikes(tmp_path_factory.mktemp("look-alikes"))
    load_fhir_bundles(fhir_server.base_url, [look_alikes.bundle])
    return look_alikes


@pytest.fixture(params=[pytest.param("http", marks=pytest.mark.servers), "bundle-dir"])
async def source(
    request: pytest.FixtureRequest, bundle_root: tuple[Path, LookAlikes]
) -> AsyncIterator[tuple[FhirSource, LookAlikes]]:
    """Yield each FhirSource implementation with the look-alikes it holds."""
    fhir: FhirSource
    if request.param == "http":
        server: FhirServerHandle = request.getfixturevalue("fhir_server")
        look_alikes: LookAlikes = request.getfixturevalue("server_look_alikes")
        fhir = HttpFhirSource(server.base_url, observer=NullObserver())
    else:
        root, look_alikes = bundle_root
        fhir = BundleDirFhirSource(root, observer=NullObserver())
    try:
        yield fhir, look_alikes
    finally:
        await fhir.aclose()


# -- PatientQuery ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (CXR["patient_id"], {"id": CXR["patient_id"]}),
        ("  abc.1-2  ", {"id": "abc.1-2"}),
        ("x" * 64, {"id": "x" * 64}),
        (f"identifier={CXR_MRN}", {"identifier": CXR_MRN}),
        ("identifier= sys | MRN-1 ", {"identifier": "sys|MRN-1"}),
        ("identifier=MRN-100001", {"identifier": "MRN-100001"}),
    ],
)
def test_parse_accepts(text: str, expected: dict[str, str]) -> None:
    assert PatientQuery.parse(text).model_dump(exclude_none=True) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "two words",
        "Patient/abc",
        "x" * 65,
        "abc?x=1",
        "name=Quill",
        "identifier=",
        "identifier=|MRN-1",
        "identifier=sys|",
        "identifier=a|b|c",
        "identifier=sys|a,b",
        "identifier=sys|a\\b",
        "identifier=sys|a\nb",
    ],
)
def test_parse_refuses_with_config_error(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        PatientQuery.parse(text)
    assert info.value.exit_code == 2
    assert "patient" in info.value.message or "identifier" in info.value.message


def test_parse_names_the_accepted_forms() -> None:
    with pytest.raises(ConfigError, match=r"neither a patient id .* nor identifier=SYSTEM\|VALUE"):
        PatientQuery.parse("Arthur Quill")


@pytest.mark.parametrize(
    ("name", "family", "given"),
    [
        ("Arthur Quill", "Quill", "Arthur"),
        ("  Quill ", "Quill", None),
        ("Anna Maria Berg", "Berg", "Anna Maria"),
        ("van der Berg, Anna", "van der Berg", "Anna"),
    ],
)
def test_by_name_splits_given_and_family(name: str, family: str, given: str | None) -> None:
    query = PatientQuery.by_name(name, "1959-03-11")
    assert (query.family, query.given, query.birthdate) == (family, given, "1959-03-11")
    expected = {"family": family, "birthdate": "1959-03-11"} | ({"given": given} if given else {})
    assert query.search_params() == expected


@pytest.mark.parametrize("birthdate", ["1959-3-11", "19590311", "1959-02-30", "11/03/1959", ""])
def test_by_name_refuses_bad_birthdates(birthdate: str) -> None:
    with pytest.raises(ConfigError, match="YYYY-MM-DD"):
        PatientQuery.by_name("Arthur Quill", birthdate)


def test_by_name_refuses_an_empty_name() -> None:
    with pytest.raises(ConfigError, match="name is empty"):
        PatientQuery.by_name("  ", "1959-03-11")


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"id": "a", "identifier": "b"},
        {"id": "a", "family": "Quill", "birthdate": "1959-03-11"},
        {"family": "Quill"},
        {"given": "Arthur", "birthdate": "1959-03-11"},
        {"birthdate": "1959-03-11"},
    ],
)
def test_query_needs_exactly_one_complete_mode(fields: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        PatientQuery(**fields)


def test_describe_says_what_was_searched() -> None:
    assert PatientQuery.by_id("abc").describe() == "id abc"
    assert PatientQuery.by_identifier(CXR_MRN).describe() == f"identifier {CXR_MRN}"
    described = PatientQuery.by_name("Arthur Quill", "1959-03-11").describe()
    assert described == "family name 'Quill', given name 'Arthur', birth date 1959-03-11"


# -- Candidate -------------------------------------------------------------------------------------


def test_candidate_prefers_official_then_usual_name() -> None:
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "id": "p1",
        "name": [
            {"use": "nickname", "given": ["Art"], "family": "Q"},
            {"use": "usual", "given": ["Arty"], "family": "Quill"},
            {"use": "official", "given": ["Arthur", "J"], "family": "Quill"},
        ],
        "identifier": [{"system": "s", "value": "1"}, {"value": "2"}, {"system": "s"}],
        "gender": "male",
        "birthDate": "1959-03-11",
    }
    candidate = Candidate.from_resource(patient)
    assert candidate == Candidate(
        id="p1", name="Arthur J Quill", birth_date="1959-03-11", gender="male", identifiers=["s|1", "2"]
    )
    patient["name"] = patient["name"][:2]
    assert Candidate.from_resource(patient).name == "Arty Quill"
    patient["name"] = patient["name"][:1]
    assert Candidate.from_resource(patient).name == "Art Q"


def test_candidate_falls_back_to_text_and_tolerates_missing_fields() -> None:
    assert Candidate.from_resource({"id": "p2", "name": [{"text": "A. Quill"}]}).name == "A. Quill"
    bare = Candidate.from_resource({"id": "p3"})
    assert bare == Candidate(id="p3")
    assert bare.summary() == "p3 (no name, born unknown)"


# -- resolve_patient / find_patients on both sources -----------------------------------------------


def _assert_is_cxr(patient: dict[str, Any]) -> None:
    assert patient["resourceType"] == "Patient"
    assert patient["id"] == CXR["patient_id"]
    assert patient["birthDate"] == CXR["birth_date"]


async def test_resolve_by_identifier(source: tuple[FhirSource, LookAlikes]) -> None:
    fhir, _ = source
    _assert_is_cxr(await resolve_patient(fhir, PatientQuery.parse(f"identifier={CXR_MRN}")))


async def test_resolve_by_bare_identifier_value(source: tuple[FhirSource, LookAlikes]) -> None:
    fhir, _ = source
    _assert_is_cxr(await resolve_patient(fhir, PatientQuery.by_identifier(CXR["mrn"])))


async def test_resolve_by_name_and_birthdate(source: tuple[FhirSource, LookAlikes]) -> None:
    fhir, _ = source
    _assert_is_cxr(await resolve_patient(fhir, PatientQuery.by_name(CXR["name"], CXR["birth_date"])))
    # FHIR string search ignores case; so does the exact-name re-check.
    _assert_is_cxr(await resolve_patient(fhir, PatientQuery.by_name(CXR["name"].upper(), CXR["birth_date"])))


async def test_resolve_by_id(source: tuple[FhirSource, LookAlikes]) -> None:
    fhir, _ = source
    _assert_is_cxr(await resolve_patient(fhir, PatientQuery.parse(CXR["patient_id"])))


@pytest.mark.parametrize(
    "query",
    [
        PatientQuery.by_id(str(uuid.UUID(int=7))),
        PatientQuery.by_identifier(f"{CXR['mrn_system']}|MRN-NOPE"),
        PatientQuery.by_identifier(f"http://other.example.org/mrn|{CXR['mrn']}"),
        PatientQuery.by_name(CXR["name"], "1959-03-12"),
        PatientQuery.by_name("Zed Quill", CXR["birth_date"]),
    ],
    ids=["id", "identifier", "other-system", "birthdate", "given"],
)
async def test_resolve_none_says_what_was_searched(source: tuple[FhirSource, LookAlikes], query: PatientQuery) -> None:
    fhir, _ = source
    with pytest.raises(PatientNotFoundError) as info:
        await resolve_patient(fhir, query)
    assert info.value.message.startswith(f"no patient found with {query.describe()}")
    assert info.value.details["query"] == query.model_dump(exclude_none=True)


async def test_resolve_ambiguous_lists_every_candidate(source: tuple[FhirSource, LookAlikes]) -> None:
    fhir, look_alikes = source
    query = PatientQuery(family=look_alikes.family, birthdate=TWIN_BIRTHDATE)
    with pytest.raises(AmbiguousPatientError) as info:
        await resolve_patient(fhir, query)
    error = info.value
    assert (error.code, error.exit_code, error.http_status) == ("patient_ambiguous", 3, 409)
    for twin_id, given in zip(look_alikes.twin_ids, ("Ada", "Bea"), strict=True):
        assert f"{twin_id} ({given} {look_alikes.family}, born {TWIN_BIRTHDATE})" in error.message
    # The near miss (family name merely starting with the searched one) is not a candidate.
    assert look_alikes.near_id not in error.message
    candidates = error.details["candidates"]
    assert sorted(c["id"] for c in candidates) == sorted(look_alikes.twin_ids)
    assert {c["birth_date"] for c in candidates} == {TWIN_BIRTHDATE}
    json.dumps(error.to_dict())  # the API and the trace serialise it


async def test_resolve_narrows_by_given_name(source: tuple[FhirSource, LookAlikes]) -> None:
    fhir, look_alikes = source
    patient = await resolve_patient(fhir, PatientQuery.by_name(f"Bea {look_alikes.family}", TWIN_BIRTHDATE))
    assert patient["id"] == look_alikes.twin_ids[1]


async def test_resolve_ignores_prefix_only_matches_and_says_so(source: tuple[FhirSource, LookAlikes]) -> None:
    fhir, look_alikes = source
    query = PatientQuery(family=look_alikes.family[:-2], birthdate=TWIN_BIRTHDATE)
    with pytest.raises(PatientNotFoundError, match=r"3 patient\(s\) have a name that only starts with it"):
        await resolve_patient(fhir, query)


async def test_find_patients_returns_candidates(source: tuple[FhirSource, LookAlikes]) -> None:
    fhir, look_alikes = source
    [found] = await find_patients(fhir, PatientQuery.by_identifier(CXR_MRN))
    assert found == Candidate(
        id=CXR["patient_id"],
        name=CXR["name"],
        birth_date=CXR["birth_date"],
        gender=CXR["gender"],
        identifiers=[CXR_MRN],
    )
    # A browsing search keeps FHIR's prefix matching: the near miss is listed too.
    by_name = await find_patients(fhir, PatientQuery(family=look_alikes.family, birthdate=TWIN_BIRTHDATE))
    assert sorted(c.id for c in by_name) == sorted([*look_alikes.twin_ids, look_alikes.near_id])
    assert await find_patients(fhir, PatientQuery.by_id(str(uuid.UUID(int=7)))) == []
