"""One error hierarchy for the whole flow.

Every error carries a stable ``code`` (recorded in the trace and returned by the API), a message
that is safe to show a user (no PHI, no secrets) and the process exit code the CLI maps it to.
"""

from __future__ import annotations

from typing import Any, ClassVar


class MedagentError(Exception):
    """Base class: a failure the user can understand and act on."""

    code: ClassVar[str] = "medagent_error"
    exit_code: ClassVar[int] = 1
    http_status: ClassVar[int] = 500
    #: Whether the message can name a patient (names, birth dates, identifiers searched). Such a
    #: message is shown to the user who asked, and kept in the trace's content store, but is
    #: withheld from trace metadata, which auditors read without clinical access.
    message_has_phi: ClassVar[bool] = False

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        """Return the serialisable form used by the CLI's JSON, the API and the trace's content store."""
        return {"code": self.code, "message": self.message, "details": self.details}

    def metadata_dict(self) -> dict[str, Any]:
        """Return the form kept in trace metadata: the full error, or only its code when it may name a patient."""
        if self.message_has_phi:
            return {"code": self.code, "message": "(withheld from metadata: it may identify a patient)"}
        return self.to_dict()


class ConfigError(MedagentError):
    """Settings are missing, contradictory or unsafe."""

    code = "config_invalid"
    exit_code = 2
    http_status = 400


class PatientNotFoundError(MedagentError):
    """The patient does not exist on the configured FHIR source."""

    code = "patient_not_found"
    exit_code = 3
    http_status = 404
    message_has_phi = True


class SourceUnavailableError(MedagentError):
    """A FHIR or DICOMweb server could not be reached, timed out or answered with an error."""

    code = "source_unavailable"
    exit_code = 4
    http_status = 502


class StudyNotFoundError(SourceUnavailableError):
    """The imaging source answered, but does not hold the study asked for (or has no instances of it).

    A kind of :class:`SourceUnavailableError` (same code and exit code) so callers that treat
    every source failure alike keep doing so; the imaging step tells it apart to say "not found"
    rather than "unavailable".
    """


class InvalidResourceError(MedagentError):
    """A source returned data that is not what the protocol promises (bad JSON, not FHIR)."""

    code = "invalid_resource"
    exit_code = 4
    http_status = 502


class DicomDecodeError(MedagentError):
    """A DICOM instance could not be decoded into pixels (names the transfer syntax)."""

    code = "dicom_undecodable"
    exit_code = 5
    http_status = 422


class ModelUnavailableError(MedagentError):
    """Model weights are missing or cannot be loaded."""

    code = "model_unavailable"
    exit_code = 6
    http_status = 503


class ModelOutputError(MedagentError):
    """A model call failed or returned output that cannot be used."""

    code = "model_failed"
    exit_code = 6
    http_status = 502


class ModelTimeoutError(ModelOutputError):
    """A model call ran past ``models.call_timeout_s``."""

    code = "model_timeout"
    http_status = 504


class StepLimitError(MedagentError):
    """The run took more graph steps than ``agent.max_steps`` allows (a loop, or a limit set too low)."""

    code = "step_limit"
    exit_code = 1
    http_status = 500


class AuditError(MedagentError):
    """The trace could not be written or read; runs fail closed without their trace."""

    code = "audit_unavailable"
    exit_code = 7
    http_status = 503


class RunNotFoundError(MedagentError):
    """No trace exists for the requested run id."""

    code = "run_not_found"
    exit_code = 3
    http_status = 404


class InternalError(MedagentError):
    """An unexpected failure inside medagent (a bug); details are in the server log, not here."""

    code = "internal_error"
    exit_code = 70
    http_status = 500


class RunCancelledError(MedagentError):
    """The run was cancelled (Ctrl-C, client gone, or a limit reached)."""

    code = "cancelled"
    exit_code = 130
    http_status = 499


class AmbiguousPatientError(MedagentError):
    """Several patients match a search; the caller must choose one (``details["candidates"]``)."""

    code = "patient_ambiguous"
    exit_code = 3
    http_status = 409
    message_has_phi = True
