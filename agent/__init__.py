"""medagent: an auditable clinical agent over FHIR R4 history and DICOM imaging.

Nothing heavy happens at import: models, clients and database engines are built by factories
when a run needs them.
"""

__version__ = "0.1.0"
