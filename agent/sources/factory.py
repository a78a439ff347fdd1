"""Pick the FHIR and DICOM sources a run uses, from settings.

Where it sits: the run context (CLI, API, tools) calls these once per run with the run's observer
and hands the results to the graph, which only sees the :mod:`agent.sources.protocols`
interfaces. A configured server URL wins; otherwise the embedded folder default is used.
"""

from __future__ import annotations

from agent.config import DicomSettings, FhirSettings
from agent.domain.events import AccessObserver
from agent.sources.protocols import DicomSource, FhirSource


def make_fhir_source(settings: FhirSettings, observer: AccessObserver) -> FhirSource:
    """Return an HTTP FHIR source when ``base_url`` is set, else a bundle-folder source.

    Args:
        settings: the ``fhir`` settings group.
        observer: receives every FHIR interaction of the run.
    """
    if settings.base_url:
        from agent.sources.fhir_http import HttpFhirSource

        return HttpFhirSource.from_settings(settings, observer)
    from agent.sources.fhir_bundle_dir import BundleDirFhirSource

    return BundleDirFhirSource(settings.effective_bundle_dir(), observer=observer)


def make_dicom_source(settings: DicomSettings, observer: AccessObserver) -> DicomSource:
    """Return a DICOMweb source when ``dicomweb_url`` is set, else a DICOM-folder source.

    Args:
        settings: the ``dicom`` settings group.
        observer: receives every DICOM search and retrieval of the run.
    """
    if settings.dicomweb_url:
        from agent.sources.dicomweb import DicomWebSource

        return DicomWebSource.from_settings(settings, observer)
    # Imported here: the folder source lives in its own module and pulls in file scanning code
    # that HTTP-only deployments never need.
    from agent.sources.dicom_dir import DicomDirSource

    return DicomDirSource(settings.effective_dicom_dir(), observer=observer)
