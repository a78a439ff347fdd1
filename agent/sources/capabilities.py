"""What a FHIR server says it can do, read once from its CapabilityStatement (``GET metadata``).

Where it sits: before the graph's "fetch history" step,
:func:`agent.sources.history_fetch.fetch_history` asks :func:`discover` whether the server offers
``Patient/$everything`` (one paged stream instead of one search per type) and which ``_include``
values it declares. Servers answer ``metadata`` very differently (some return a minimal statement,
some none at all), so everything not declared is taken as unsupported: a conservative answer
only costs a few more requests, while a wrong "yes" would fail the fetch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from agent.errors import InvalidResourceError, SourceUnavailableError
from agent.sources.protocols import FhirSource

logger = logging.getLogger(__name__)

EVERYTHING_CANONICAL = "http://hl7.org/fhir/OperationDefinition/Patient-everything"

# Parameters the base specification defines for Patient/$everything, by FHIR major version.
# A server that declares the operation without an OperationDefinition we can read is assumed to
# take these; DSTU2 (1.0) defined start and end only.
_EVERYTHING_PARAMS_BY_VERSION = {
    "1": frozenset({"start", "end"}),
    "3": frozenset({"start", "end", "_since", "_type", "_count"}),
    "4": frozenset({"start", "end", "_since", "_type", "_count"}),
    "5": frozenset({"start", "end", "_since", "_type", "_count"}),
}


@dataclass(frozen=True)
class ServerCapabilities:
    """The parts of a CapabilityStatement the history fetch acts on.

    Attributes:
        fhir_version: ``fhirVersion`` as declared (e.g. ``"4.0.1"``), or None.
        declared: True when the answer was a CapabilityStatement at all.
        search_params: resource type -> names of its declared search parameters; empty when the
            server lists no resources (then nothing is known, which is not "nothing supported").
        includes: resource type -> its declared ``searchInclude`` values
            (e.g. ``"MedicationRequest:medication"``).
        everything: True when ``Patient/$everything`` is declared.
        everything_params: the parameters $everything is known to take (``_since``, ``_type``...).
        note: why the defaults were used, when they were.
    """

    fhir_version: str | None = None
    declared: bool = False
    search_params: dict[str, frozenset[str]] = field(default_factory=dict)
    includes: dict[str, frozenset[str]] = field(default_factory=dict)
    everything: bool = False
    everything_params: frozenset[str] = frozenset()
    note: str | None = None

    @property
    def resource_types(self) -> frozenset[str]:
        """Return the resource types the server declares."""
        return frozenset(self.search_params)

    def supports_include(self, resource_type: str, include: str) -> bool:
        """Return True when ``include`` (e.g. ``MedicationRequest:medication``) is declared for the type."""
        return include in self.includes.get(resource_type, frozenset())

    def supports_search_param(self, resource_type: str, name: str) -> bool | None:
        """Return whether a search parameter is declared for a type, or None when the type lists none."""
        params = self.search_params.get(resource_type)
        if not params:
            return None
        return name in params

    @property
    def everything_since(self) -> bool:
        """Return True when $everything takes ``_since``."""
        return self.everything and "_since" in self.everything_params

    @property
    def everything_type(self) -> bool:
        """Return True when $everything takes ``_type``."""
        return self.everything and "_type" in self.everything_params


def search_only() -> ServerCapabilities:
    """Return the conservative defaults: searches only, no $everything, no ``_include``."""
    return ServerCapabilities()


async def discover(fhir: FhirSource, *, read_operation_definitions: bool = True) -> ServerCapabilities:
    """Read the server's CapabilityStatement and return what the history fetch may rely on.

    A failed request or an answer that is not a CapabilityStatement gives the conservative
    defaults (with ``note`` saying why) rather than an error: the searches that follow report
    an unreachable server on their own, and every request is in the trace either way.

    Args:
        fhir: the source to ask (``GET metadata``).
        read_operation_definitions: when $everything is declared with a definition on this server
            (``OperationDefinition/<id>``), read it once to learn the parameters it takes;
            otherwise (or when that read fails) the base specification's parameters for the
            declared FHIR version are assumed.
    """
    try:
        statement = await fhir.get("metadata", {})
    except (SourceUnavailableError, InvalidResourceError) as exc:
        logger.info("FHIR capability discovery failed (%s); assuming search only", exc.code)
        return ServerCapabilities(note=f"metadata unavailable ({exc.code})")
    if statement.get("resourceType") != "CapabilityStatement":
        found = statement.get("resourceType")
        return ServerCapabilities(note=f"metadata returned {found!s}, not a CapabilityStatement")
    capabilities = parse_capability_statement(statement)
    if capabilities.everything and read_operation_definitions:
        definition = _everything_definition(statement)
        params = await _operation_parameters(fhir, definition) if definition else None
        if params is not None:
            capabilities = ServerCapabilities(
                fhir_version=capabilities.fhir_version,
                declared=True,
                search_params=capabilities.search_params,
                includes=capabilities.includes,
                everything=True,
                everything_params=params,
            )
    return capabilities


def parse_capability_statement(statement: dict[str, Any]) -> ServerCapabilities:
    """Return the capabilities a CapabilityStatement declares (no requests made).

    $everything counts as declared when the Patient resource (or the server's ``rest`` level)
    lists an operation named ``everything`` / ``patient-everything`` or defined by the
    ``Patient-everything`` canonical.
    """
    version = statement.get("fhirVersion") if isinstance(statement.get("fhirVersion"), str) else None
    search_params: dict[str, frozenset[str]] = {}
    includes: dict[str, frozenset[str]] = {}
    everything = False
    for rest in _dicts(statement.get("rest")):
        if rest.get("mode", "server") != "server":
            continue
        if any(_is_everything(op, level="system") for op in _dicts(rest.get("operation"))):
            everything = True
        for resource in _dicts(rest.get("resource")):
            rtype = resource.get("type")
            if not isinstance(rtype, str):
                continue
            names = {p["name"] for p in _dicts(resource.get("searchParam")) if isinstance(p.get("name"), str)}
            search_params[rtype] = search_params.get(rtype, frozenset()) | names
            declared = {i for i in resource.get("searchInclude") or [] if isinstance(i, str)}
            includes[rtype] = includes.get(rtype, frozenset()) | declared
            if rtype == "Patient" and any(_is_everything(op, level="type") for op in _dicts(resource.get("operation"))):
                everything = True
    default_params = _EVERYTHING_PARAMS_BY_VERSION.get((version or "4").split(".")[0], frozenset())
    return ServerCapabilities(
        fhir_version=version,
        declared=True,
        search_params=search_params,
        includes=includes,
        everything=everything,
        everything_params=default_params if everything else frozenset(),
    )


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _is_everything(operation: dict[str, Any], *, level: str) -> bool:
    name = str(operation.get("name", "")).lstrip("$").lower()
    definition = str(operation.get("definition", ""))
    if definition.rsplit("/", 1)[-1].split("|")[0].lower() == "patient-everything":
        return True
    # A bare "everything" is only unambiguous on the Patient resource (Encounter has one too).
    return name == "patient-everything" or (level == "type" and name == "everything")


def _everything_definition(statement: dict[str, Any]) -> str | None:
    for rest in _dicts(statement.get("rest")):
        operations = list(_dicts(rest.get("operation")))
        for resource in _dicts(rest.get("resource")):
            if resource.get("type") == "Patient":
                operations.extend(_dicts(resource.get("operation")))
        for operation in operations:
            definition = operation.get("definition")
            if isinstance(definition, str) and _is_everything(operation, level="type"):
                return definition
    return None


async def _operation_parameters(fhir: FhirSource, definition: str) -> frozenset[str] | None:
    """Return the input parameter names of an OperationDefinition held by this server, or None."""
    # Only a relative reference is read: a canonical URL names the definition, it is not an
    # address to fetch (and may point to another host).
    if definition.startswith(EVERYTHING_CANONICAL) or not definition.startswith("OperationDefinition/"):
        return None
    try:
        resource = await fhir.get(definition.split("|")[0], {})
    except (SourceUnavailableError, InvalidResourceError, ValueError):
        return None
    if resource.get("resourceType") != "OperationDefinition":
        return None
    names = {
        p["name"]
        for p in _dicts(resource.get("parameter"))
        if isinstance(p.get("name"), str) and p.get("use", "in") == "in"
    }
    return frozenset(names) if names else None
