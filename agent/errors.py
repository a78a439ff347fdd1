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

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        """Return the safe, serialisable form used by the trace, the CLI's JSON and the API."""
        return {"code": self.code, "message": self.message, "details": self.details}


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


class SourceUnavailableError(MedagentError):
    """A FHIR or DICOMweb server could not be reached, timed out or answered with an error."""

    code = "source_unavailable"
    exit_code = 4
    http_status = 502


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
