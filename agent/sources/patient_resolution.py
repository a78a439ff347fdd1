"""Turn what a user says about a patient into exactly one FHIR Patient, or a clear refusal.

Where it sits: first step of the flow ("resolve patient"), before any history is fetched. The CLI
(``medagent ask --patient``, ``medagent patient find``), the API and the graph build a
:class:`PatientQuery` (a logical id, an identifier such as an MRN, or family name + birth date),
and :func:`resolve_patient` asks the run's :class:`~agent.sources.protocols.FhirSource` for it.
Zero matches raise :class:`~agent.errors.PatientNotFoundError`; several raise
:class:`~agent.errors.AmbiguousPatientError` listing every candidate, because answering about
the wrong patient is the one mistake this step must never make.

Names and birth dates are PHI. They appear in the errors shown to the user who asked (who needs
them to choose), never in logs: this module deliberately does no logging.
"""

from __future__ import annotations

import re
from datetime import date
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import AmbiguousPatientError, ConfigError, PatientNotFoundError
from agent.sources.protocols import FhirSource

# The FHIR R4 ``id`` datatype; anything else cannot name a Patient and would only reach the
# server as a malformed path.
_LOGICAL_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# These characters carry meaning in FHIR search values (OR lists, escapes, composites); letting
# them through would silently widen the search, so they are refused rather than escaped (the
# bundle-folder source does not unescape).
_SEARCH_SYNTAX = frozenset(",\\$")
_MAX_VALUE_CHARS = 200
_IDENTIFIER_PREFIX = "identifier="


def _check_search_value(value: str, what: str) -> str:
    """Return ``value`` stripped, or raise ValueError when it cannot be sent as a search value."""
    value = value.strip()
    if not value:
        raise ValueError(f"{what} is empty")
    if len(value) > _MAX_VALUE_CHARS:
        raise ValueError(f"{what} is longer than {_MAX_VALUE_CHARS} characters")
    if any(ch in _SEARCH_SYNTAX or not ch.isprintable() for ch in value):
        raise ValueError(f"{what} contains a character FHIR search would misread (',', '\\', '$' or a control)")
    return value


class InvalidPatientQueryError(ConfigError):
    """The user's way of naming a patient cannot be searched (it is input, not configuration)."""

    code = "invalid_patient_query"
    http_status = 422
    #: the validators quote what was typed: an MRN, a name, a birth date
    message_has_phi = True


def _config_error(exc: ValidationError) -> InvalidPatientQueryError:
    """Return the error whose message is the validators' own words, without pydantic's framing."""
    reasons = [str(e["msg"]).removeprefix("Value error, ") for e in exc.errors()]
    return InvalidPatientQueryError("invalid patient query: " + "; ".join(reasons))


class PatientQuery(BaseModel):
    """How to find one patient: exactly one of a logical id, an identifier, or a name search.

    A name search needs ``family`` and ``birthdate`` (YYYY-MM-DD); ``given`` narrows it. Build
    instances through :meth:`parse`, :meth:`by_id`, :meth:`by_identifier` or :meth:`by_name`,
    which raise :class:`~agent.errors.ConfigError`; the plain constructor raises pydantic's
    ``ValidationError``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str | None = Field(None, description="Patient logical id.")
    identifier: str | None = Field(None, description='"SYSTEM|VALUE", or a bare VALUE (any system).')
    family: str | None = Field(None, description="Family name (FHIR string search).")
    given: str | None = Field(None, description="Given name(s), optional with family.")
    birthdate: str | None = Field(None, description="Birth date, YYYY-MM-DD.")

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str | None) -> str | None:
        if value is not None and not _LOGICAL_ID.match(value):
            raise ValueError(f"{value!r} is not a FHIR logical id (1-64 of A-Z, a-z, 0-9, '-', '.')")
        return value

    @field_validator("identifier")
    @classmethod
    def _valid_identifier(cls, value: str | None) -> str | None:
        if value is None:
            return None
        system, bar, ident = value.strip().partition("|")
        if not bar:
            return _check_search_value(system, "identifier")
        system = _check_search_value(system, "identifier system")
        ident = _check_search_value(ident, "identifier value")
        if "|" in ident:
            raise ValueError("identifier has more than one '|' (expected SYSTEM|VALUE)")
        return f"{system}|{ident}"

    @field_validator("family", "given")
    @classmethod
    def _valid_name(cls, value: str | None) -> str | None:
        return None if value is None else _check_search_value(value, "name")

    @field_validator("birthdate")
    @classmethod
    def _valid_birthdate(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        try:
            # fromisoformat alone would also take "19590311"; FHIR search wants the dashed form.
            if not _DATE.match(value):
                raise ValueError
            date.fromisoformat(value)
        except ValueError:
            raise ValueError(f"birth date {value!r} is not a date in the form YYYY-MM-DD") from None
        return value

    @model_validator(mode="after")
    def _exactly_one_mode(self) -> Self:
        by_name = any(v is not None for v in (self.family, self.given, self.birthdate))
        modes = [self.id is not None, self.identifier is not None, by_name]
        if sum(modes) != 1:
            raise ValueError("give exactly one of: a patient id, an identifier, or family name + birth date")
        if by_name and (self.family is None or self.birthdate is None):
            raise ValueError("a name search needs at least the family name and the birth date")
        return self

    # -- constructors that speak the error hierarchy ---------------------------------------------

    @classmethod
    def _build(cls, **fields: Any) -> PatientQuery:
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise _config_error(exc) from None

    @classmethod
    def by_id(cls, patient_id: str) -> PatientQuery:
        """Return a query for one logical id.

        Raises:
            ConfigError: not a FHIR logical id.
        """
        return cls._build(id=patient_id.strip())

    @classmethod
    def by_identifier(cls, identifier: str) -> PatientQuery:
        """Return a query for an identifier, ``SYSTEM|VALUE`` or a bare ``VALUE``.

        Raises:
            ConfigError: empty, or holds FHIR search syntax.
        """
        return cls._build(identifier=identifier)

    @classmethod
    def by_name(cls, name: str, birthdate: str) -> PatientQuery:
        """Return a name search from ``"Given Family"`` (or ``"Family, Given"``) and a birth date.

        Without a comma the last word is the family name and the words before it are given
        names; multi-word family names need the comma form (``"van der Berg, Anna"``).

        Raises:
            ConfigError: the name is empty or the birth date is not YYYY-MM-DD.
        """
        family, comma, given = name.partition(",")
        if not comma:
            *given_words, family = name.split() or [""]
            given = " ".join(given_words)
        return cls._build(family=family, given=given.strip() or None, birthdate=birthdate)

    @classmethod
    def parse(cls, text: str) -> PatientQuery:
        """Parse the ``ask --patient`` forms: a logical id, or ``identifier=SYSTEM|VALUE``.

        ``identifier=VALUE`` (no system) is accepted too and matches that value in any system;
        several matches then raise :class:`~agent.errors.AmbiguousPatientError` at resolution.

        Raises:
            ConfigError: anything else, saying which forms are accepted.
        """
        text = text.strip()
        if text.startswith(_IDENTIFIER_PREFIX):
            return cls.by_identifier(text.removeprefix(_IDENTIFIER_PREFIX))
        if _LOGICAL_ID.match(text):
            return cls(id=text)
        raise ConfigError(
            f"--patient {text!r} is neither a patient id (1-64 of A-Z, a-z, 0-9, '-', '.') "
            "nor identifier=SYSTEM|VALUE (e.g. identifier=http://hospital.example.org/mrn|MRN-100001)"
        )

    # -- what it sends and how it reads --------------------------------------------------------

    def search_params(self) -> dict[str, str]:
        """Return the Patient search parameters for an identifier or name query (empty for an id)."""
        if self.identifier is not None:
            return {"identifier": self.identifier}
        params = {"family": self.family, "given": self.given, "birthdate": self.birthdate}
        return {k: v for k, v in params.items() if v is not None}

    def describe(self) -> str:
        """Return what was searched, in words, for error messages."""
        if self.id is not None:
            return f"id {self.id}"
        if self.identifier is not None:
            return f"identifier {self.identifier}"
        given = f", given name {self.given!r}" if self.given else ""
        return f"family name {self.family!r}{given}, birth date {self.birthdate}"


class Candidate(BaseModel):
    """One patient that matched a query, with just enough to tell candidates apart."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str | None = Field(None, description='Display name, "Given Family".')
    birth_date: str | None = None
    gender: str | None = None
    identifiers: list[str] = Field(default_factory=list, description='"SYSTEM|VALUE", or VALUE without a system.')

    @classmethod
    def from_resource(cls, patient: dict[str, Any]) -> Candidate:
        """Return the candidate view of a FHIR Patient resource."""
        identifiers: list[str] = []
        for ident in patient.get("identifier") or []:
            if not isinstance(ident, dict) or not isinstance(ident.get("value"), str):
                continue
            system = ident.get("system")
            identifiers.append(f"{system}|{ident['value']}" if isinstance(system, str) and system else ident["value"])
        birth_date = patient.get("birthDate")
        gender = patient.get("gender")
        return cls(
            id=str(patient.get("id")),
            name=display_name(patient),
            birth_date=birth_date if isinstance(birth_date, str) else None,
            gender=gender if isinstance(gender, str) else None,
            identifiers=identifiers,
        )

    def summary(self) -> str:
        """Return ``"id (Name, born YYYY-MM-DD)"`` for lists in messages."""
        return f"{self.id} ({self.name or 'no name'}, born {self.birth_date or 'unknown'})"


def _primary_name(patient: dict[str, Any]) -> dict[str, Any] | None:
    """Return the official name, else the usual one, else the first one."""
    names = [n for n in patient.get("name") or [] if isinstance(n, dict)]
    for use in ("official", "usual"):
        for name in names:
            if name.get("use") == use:
                return name
    return names[0] if names else None


def display_name(patient: dict[str, Any]) -> str | None:
    """Return a Patient's display name, ``"Given Family"`` (its ``text`` when parts are missing)."""
    name = _primary_name(patient)
    if name is None:
        return None
    given = [g for g in name.get("given") or [] if isinstance(g, str)]
    family = name.get("family") if isinstance(name.get("family"), str) else None
    parts = [*given, family] if family else given
    if parts:
        return " ".join(parts)
    text = name.get("text")
    return text if isinstance(text, str) and text else None


def _name_matches_exactly(patient: dict[str, Any], query: PatientQuery) -> bool:
    """Return whether some HumanName has exactly the queried family name and given names.

    FHIR string search matches prefixes ("Quill" finds "Quillon"); resolving to a patient whose
    name merely starts with what was typed would be a silent guess, so resolution re-checks.
    """
    family = (query.family or "").casefold()
    wanted_given = [g.casefold() for g in (query.given or "").split()]
    for name in patient.get("name") or []:
        if not isinstance(name, dict) or str(name.get("family") or "").casefold() != family:
            continue
        given = {str(g).casefold() for g in name.get("given") or []}
        if all(g in given for g in wanted_given):
            return True
    return False


async def _matching_patients(fhir: FhirSource, query: PatientQuery) -> list[dict[str, Any]]:
    """Return the Patient resources the source matches for a query (read for an id)."""
    if query.id is not None:
        try:
            return [await fhir.read("Patient", query.id)]
        except PatientNotFoundError:
            return []
    return await fhir.search("Patient", query.search_params())


async def find_patients(fhir: FhirSource, query: PatientQuery) -> list[Candidate]:
    """Return every patient the source matches, as candidates (possibly none).

    Name searches use FHIR string matching (case-insensitive prefix), so this may list near
    matches; that is what a person browsing for a patient wants. :func:`resolve_patient` is stricter.

    Raises:
        SourceUnavailableError: the source could not be reached or refused the search.
        InvalidResourceError: the source returned something that is not FHIR.
    """
    return [Candidate.from_resource(p) for p in await _matching_patients(fhir, query)]


async def resolve_patient(fhir: FhirSource, query: PatientQuery) -> dict[str, Any]:
    """Return the one Patient resource a query names.

    Name searches keep only exact (case-insensitive) family and given name matches; identifiers
    and ids are matched exactly by the source.

    Raises:
        PatientNotFoundError: no patient matches; the message says what was searched.
        AmbiguousPatientError: more than one matches; the message lists each candidate (id, name,
            birth date) and ``details["candidates"]`` holds them, so the user can choose by id.
        SourceUnavailableError: the source could not be reached or refused the search.
        InvalidResourceError: the source returned something that is not FHIR.
    """
    patients = await _matching_patients(fhir, query)
    near_misses = 0
    if query.family is not None:
        exact = [p for p in patients if _name_matches_exactly(p, query)]
        near_misses = len(patients) - len(exact)
        patients = exact
    if not patients:
        hint = (
            f" ({near_misses} patient(s) have a name that only starts with it: see `medagent patient find`)"
            if near_misses
            else ""
        )
        raise PatientNotFoundError(
            f"no patient found with {query.describe()}{hint}", details={"query": query.model_dump(exclude_none=True)}
        )
    if len(patients) > 1:
        candidates = [Candidate.from_resource(p) for p in patients]
        listing = "; ".join(c.summary() for c in candidates)
        raise AmbiguousPatientError(
            f"{len(candidates)} patients match {query.describe()}: {listing}. Ask again with the patient id.",
            details={
                "query": query.model_dump(exclude_none=True),
                "candidates": [c.model_dump(mode="json") for c in candidates],
            },
        )
    return patients[0]
