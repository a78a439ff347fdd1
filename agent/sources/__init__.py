"""Data sources: FHIR (HTTP server or bundle folder) and DICOM (DICOMweb or file folder)."""
