"""Export one run's trace as FHIR R4: AuditEvents for every data access, Provenance for the answer.

This sits at the end of the flow, after :func:`agent.audit.reader.load_run`: an auditor, a
hospital audit repository (IHE ATNA / BALP) or a FHIR server receives one ``collection``
Bundle holding

* one AuditEvent per ``fhir_request`` record, following IHE Basic Audit Log Patterns (BALP);
* one AuditEvent per ``dicom_retrieval`` record, following the DICOM audit messages of PS3.15
  Annex A.5.3 (BALP covers RESTful FHIR only);
* one Device per model load (which weights) and one for medagent itself (which software);
* for a run that answered, a DocumentReference holding the answer and a Provenance saying who
  and what produced it from which sources.

Every resource validates with ``fhir.resources.R4B`` (the tests check it). Identifiers of the
bundle's own resources are UUIDv5 of the run id, so exporting a run twice gives the same bundle.
"""

from __future__ import annotations

import base64
import hashlib
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from agent.audit import recorder as kinds
from agent.audit.export_json import readable_content
from agent.audit.reader import RunTrace, TraceEvent

# -- code systems -------------------------------------------------------------------------------
AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL_INTERACTION = "http://hl7.org/fhir/restful-interaction"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
SECURITY_SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
PROVENANCE_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
DICOM_UID_SYSTEM = "urn:dicom:uid"
URI_SYSTEM = "urn:ietf:rfc:3986"

#: Canonical URL prefix of the IHE BALP profiles (https://profiles.ihe.net/ITI/BALP/).
BALP_PROFILE = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit."

# BALP (input/fsh/PatientRead.fsh, PatientQuery.fsh of IHE/ITI.BasicAudit) names the agents
# with the DICOM role codes: on a Read the client is the "Destination" and the server the
# "Source" of the data; on a Query the client is the "Source" of the query parameters.
_SOURCE_ROLE = ("110153", "Source Role ID")
_DESTINATION_ROLE = ("110152", "Destination Role ID")

# DICOM PS3.15 A.5.3.10 "Query" (110112, action E) for a QIDO-RS search or folder scan, and
# A.5.3.6 "DICOM Instances Accessed" (110103, action R) for reading an instance. 110103 rather
# than 110104 "Instances Transferred" because medagent uses the pixels (decodes them and shows
# them to a model), which is what 110103 describes, and because a read from a folder of files
# involves no transfer between two application entities; one code keeps both backends alike.
_DICOM_QUERY = ("110112", "Query")
_DICOM_ACCESSED = ("110103", "DICOM Instances Accessed")
_STUDY_UID_TYPE = ("110180", "Study Instance UID")

# A v3-ActReason code (TREAT, ETREAT, HOPERAT, ...) is all capitals; anything else a caller put
# in purpose_of_use is kept as text rather than passed off as a code of that system.
_ACT_REASON_CODE = re.compile(r"[A-Z]{2,20}")

# "Type/id" or "Type/id/_history/vid", the relative reference forms of a FHIR read / vread.
_READ_PATH = re.compile(
    r"^/?(?P<type>[A-Z][A-Za-z]{1,63})/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/(?P<vid>[A-Za-z0-9\-.]{1,64}))?$"
)
_SEARCH_TYPE_PATH = re.compile(r"^/?(?P<type>[A-Z][A-Za-z]{1,63})(?:\?|$)")

# All UUIDs of one export are derived from the run id inside this namespace.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:medagent:fhir-export")


def export_fhir(trace: RunTrace, *, base_url: str | None = None) -> dict[str, Any]:
    """Return the run as a FHIR R4 ``collection`` Bundle of AuditEvents, Devices and Provenance.

    Args:
        trace: the run, as read by :func:`agent.audit.reader.load_run`. Without content (a
            metadata-only read, or encrypted content without its key) the bundle is complete
            except for the answer text, which the DocumentReference then says is absent.
        base_url: the FHIR server base the run read from. When given, references to that
            server's resources (patient, sources, returned resources) are absolute so they
            resolve outside this bundle, and the server agent carries it as network address.

    Returns:
        The Bundle as JSON-ready data.
    """
    return _Exporter(trace, base_url).bundle()


class _Exporter:
    """Builds the bundle of one run; holds what every resource repeats (run, user, software)."""

    def __init__(self, trace: RunTrace, base_url: str | None) -> None:
        self.trace = trace
        self.run = trace.run
        self.base_url = base_url.rstrip("/") if base_url else None
        started = _first(trace, kinds.RUN_STARTED)
        process = started.meta.get("process") if started is not None else None
        # The host the run executed on, as the recorder noted it; the client's network address.
        self.host: str | None = process.get("host") if isinstance(process, dict) else None
        self.software_urn = self.urn("device/medagent")
        self.model_devices: list[tuple[str, TraceEvent]] = [
            (self.urn(f"device/model/{event.seq}"), event) for event in trace.events if event.kind == kinds.MODEL_LOAD
        ]

    # -- bundle ------------------------------------------------------------------------------
    def bundle(self) -> dict[str, Any]:
        """Return the whole bundle: devices, audit events in trace order, then the answer's provenance."""
        resources: list[tuple[str, dict[str, Any]]] = [(self.software_urn, self.software_device())]
        resources += [(urn, self.model_device(urn, event)) for urn, event in self.model_devices]
        for event in self.trace.events:
            if event.kind == kinds.FHIR_REQUEST:
                resources.append(self.with_urn(self.fhir_audit_event(event), f"audit/{event.seq}"))
            elif event.kind == kinds.DICOM_RETRIEVAL:
                resources.append(self.with_urn(self.dicom_audit_event(event), f"audit/{event.seq}"))
        resources += self.answer_provenance()
        return {
            "resourceType": "Bundle",
            "id": _uuid_of(self.urn("bundle")),
            "identifier": {"system": URI_SYSTEM, "value": self.urn("bundle")},
            "type": "collection",
            "entry": [{"fullUrl": urn, "resource": resource} for urn, resource in resources],
        }

    def urn(self, key: str) -> str:
        """Return the stable ``urn:uuid:`` of one resource of this run's export."""
        return f"urn:uuid:{uuid.uuid5(_NAMESPACE, f'{self.run.run_id}/{key}')}"

    def with_urn(self, resource: dict[str, Any], key: str) -> tuple[str, dict[str, Any]]:
        """Return the resource with its id (first, after resourceType) and its fullUrl."""
        urn = self.urn(key)
        return urn, {"resourceType": resource["resourceType"], "id": _uuid_of(urn), **resource}

    def server_reference(self, reference: str) -> str:
        """Return a reference to a resource on the FHIR source: absolute when the base is known."""
        return f"{self.base_url}/{reference}" if self.base_url else reference

    # -- devices ----------------------------------------------------------------------------
    def software_device(self) -> dict[str, Any]:
        """Return the Device of medagent itself: the audit source and the answer's assembler."""
        return {
            "resourceType": "Device",
            "id": _uuid_of(self.software_urn),
            "deviceName": [{"name": "medagent", "type": "user-friendly-name"}],
            "version": [{"value": self.trace.software_version}],
            "type": {"text": "software application (clinical decision support)"},
            "property": [
                {
                    # Runs with the same fingerprint ran with the same (secret-masked) settings.
                    "type": {"text": "settings-fingerprint"},
                    "valueCode": [{"text": self.trace.settings_fingerprint}],
                }
            ],
        }

    def model_device(self, urn: str, event: TraceEvent) -> dict[str, Any]:
        """Return the Device of one loaded model: id, weights revision, backend, device and dtype."""
        meta = event.meta
        device: dict[str, Any] = {
            "resourceType": "Device",
            "id": _uuid_of(urn),
            "deviceName": [{"name": str(meta.get("model_id") or "unknown"), "type": "model-name"}],
            "type": {"text": str(meta.get("backend") or "unknown")},
            "property": [
                {"type": {"text": "role"}, "valueCode": [{"text": event.name}]},
                *[
                    {"type": {"text": key}, "valueCode": [{"text": str(meta[key])}]}
                    for key in ("device", "dtype")
                    if meta.get(key)
                ],
            ],
        }
        if meta.get("revision"):
            device["version"] = [{"value": str(meta["revision"])}]
        if meta.get("test_model"):
            device["note"] = [{"text": "tiny random-weight test model: its output carries no clinical meaning"}]
        return device

    # -- agents, source and entities every AuditEvent shares -----------------------------------
    def user_who(self) -> dict[str, Any]:
        """Return the requesting user as a Reference (identifier and display), or ``unknown``."""
        user_id = getattr(self.run, "user_id", None)
        if not user_id:
            return {"display": "unknown"}
        return {"identifier": {"value": user_id}, "display": user_id}

    def purpose_of_use(self) -> list[dict[str, Any]]:
        """Return the run's purpose of use as CodeableConcepts (v3-ActReason when it is a code)."""
        purpose = getattr(self.run, "purpose_of_use", None)
        if not purpose:
            return []
        if _ACT_REASON_CODE.fullmatch(purpose):
            return [{"coding": [{"system": ACT_REASON, "code": purpose}], "text": purpose}]
        return [{"text": purpose}]

    def user_agent(self) -> dict[str, Any]:
        """Return the BALP user agent: the information recipient, who asked for the run."""
        agent: dict[str, Any] = {
            "type": _concept(PARTICIPATION_TYPE, "IRCP", "information recipient"),
            "who": self.user_who(),
            "requestor": True,
        }
        role = getattr(self.run, "user_role", None)
        if role:
            agent["role"] = [{"text": role}]
        if purpose := self.purpose_of_use():
            agent["purposeOfUse"] = purpose
        return agent

    def software_agent(self, role: tuple[str, str]) -> dict[str, Any]:
        """Return medagent as the client agent, in the DICOM role the interaction gives it."""
        agent: dict[str, Any] = {
            "type": _concept(DCM, *role),
            "who": {"reference": self.software_urn, "display": f"medagent {self.trace.software_version}"},
            "requestor": False,
        }
        if self.host:
            agent["network"] = {"address": self.host, "type": "1"}  # 1 = machine name
        return agent

    def server_agent(self, role: tuple[str, str], display: str, *, address: str | None = None) -> dict[str, Any]:
        """Return the data source as the server agent (with its network address when known)."""
        agent: dict[str, Any] = {
            "type": _concept(DCM, *role),
            "who": {"display": address or display},
            "requestor": False,
        }
        if address:
            agent["network"] = {"address": address, "type": "5"}  # 5 = URI
        return agent

    def source(self) -> dict[str, Any]:
        """Return the audit source: medagent recorded every event itself."""
        source: dict[str, Any] = {
            "observer": {"reference": self.software_urn, "display": f"medagent {self.trace.software_version}"},
            "type": [{"system": SECURITY_SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        }
        if self.host:
            source["site"] = self.host
        return source

    def patient_entity(self) -> list[dict[str, Any]]:
        """Return the BALP patient entity (type 1 Person, role 1 Patient), when the run has a patient."""
        if not self.run.patient_ref:
            return []
        return [
            {
                "what": {"reference": self.server_reference(self.run.patient_ref)},
                "type": _coding(ENTITY_TYPE, "1", "Person"),
                "role": _coding(OBJECT_ROLE, "1", "Patient"),
            }
        ]

    def run_entity(self, event: TraceEvent) -> dict[str, Any]:
        """Return the entity tying the AuditEvent to its trace record (run id, seq, record hash).

        The type is "Other" (4) so that BALP's slices, which match entities by type (Person,
        System Object), do not mistake it for the patient, the data or the query.
        """
        details = [{"type": "seq", "valueString": str(event.seq)}]
        record_hash = getattr(event, "hash", None)
        if record_hash:
            details.append({"type": "record-hash", "valueString": str(record_hash)})
        return {
            "what": {"identifier": _run_identifier(self.run.run_id)},
            "type": _coding(ENTITY_TYPE, "4", "Other"),
            "role": _coding(OBJECT_ROLE, "20", "Job"),
            "name": f"medagent run {self.run.run_id}",
            "detail": details,
        }

    def audit_event(
        self,
        event: TraceEvent,
        *,
        type_: dict[str, Any],
        action: str,
        outcome: str,
        agents: list[dict[str, Any]],
        entities: list[dict[str, Any]],
        subtype: list[dict[str, Any]] | None = None,
        profile: str | None = None,
    ) -> dict[str, Any]:
        """Return an AuditEvent with the fields every data access shares."""
        resource: dict[str, Any] = {"resourceType": "AuditEvent"}
        if profile:
            resource["meta"] = {"profile": [profile]}
        resource["type"] = type_
        if subtype:
            resource["subtype"] = subtype
        resource["action"] = action
        resource["period"] = _period(event)
        resource["recorded"] = _instant(event.at)
        resource["outcome"] = outcome
        if event.meta.get("error"):
            resource["outcomeDesc"] = str(event.meta["error"])
        if purpose := self.purpose_of_use():
            resource["purposeOfEvent"] = purpose
        resource["agent"] = agents
        resource["source"] = self.source()
        resource["entity"] = [*entities, self.run_entity(event)]
        return resource

    # -- FHIR accesses (BALP) ----------------------------------------------------------------
    def fhir_audit_event(self, event: TraceEvent) -> dict[str, Any]:
        """Return the BALP AuditEvent of one FHIR interaction (read, vread or search)."""
        meta = event.meta
        method = str(meta.get("method") or "GET")
        path = str(meta.get("path") or "")
        read = _READ_PATH.match(path)
        outcome = _outcome(meta.get("status"), meta.get("error"))
        returned = [str(ref) for ref in meta.get("resource_ids") or []]
        if path.split("?")[0] == "metadata":
            # The server's CapabilityStatement: an access to the server, not to the patient's data.
            return self.audit_event(
                event,
                type_=_coding(AUDIT_EVENT_TYPE, "rest", "Restful Operation"),
                subtype=[_coding(RESTFUL_INTERACTION, "capabilities", "capabilities")],
                action="R",
                outcome=outcome,
                agents=[
                    self.software_agent(_DESTINATION_ROLE),
                    self.server_agent(_SOURCE_ROLE, f"FHIR source ({meta.get('backend')})", address=self.base_url),
                    self.user_agent(),
                ],
                entities=[],
                profile=None,
            )
        entities = self.patient_entity()
        if read is not None:
            interaction = "vread" if read.group("vid") else "read"
            target = path.lstrip("/")
            entities.append(
                {
                    "what": {"reference": self.server_reference(target)},
                    "type": _coding(ENTITY_TYPE, "2", "System Object"),
                    "role": _coding(OBJECT_ROLE, "4", "Domain Resource"),
                }
            )
            returned = [ref for ref in returned if ref != target.split("/_history/")[0]]
            agents = [
                self.software_agent(_DESTINATION_ROLE),
                self.server_agent(_SOURCE_ROLE, f"FHIR source ({meta.get('backend')})", address=self.base_url),
            ]
            action, kind = "R", "Read"
        else:
            interaction = "search-type" if _SEARCH_TYPE_PATH.match(path) else "search"
            request = f"{method} {self.server_reference(path.lstrip('/'))}"
            entities.append(
                {
                    "type": _coding(ENTITY_TYPE, "2", "System Object"),
                    "role": _coding(OBJECT_ROLE, "24", "Query"),
                    "description": request,
                    # BALP keeps the raw request base64-encoded, exactly as it was sent.
                    "query": base64.b64encode(request.encode()).decode("ascii"),
                }
            )
            agents = [
                self.software_agent(_SOURCE_ROLE),
                self.server_agent(_DESTINATION_ROLE, f"FHIR source ({meta.get('backend')})", address=self.base_url),
            ]
            action, kind = "E", "Query"
        # Each resource the answer carried, so an auditor can tell exactly what was disclosed.
        # BALP does not ask for them; its entity slicing is open, and typing them by resource
        # type (not "System Object") keeps them out of the data / query slices.
        entities += [_returned_entity(ref, self.server_reference(ref)) for ref in returned]
        # BALP's profiles describe successful interactions (outcome fixed to 0); a failed one is
        # still reported in the same shape, without claiming the profile.
        profile = None
        if outcome == "0":
            profile = BALP_PROFILE + ("Patient" if self.run.patient_ref else "") + kind
        return self.audit_event(
            event,
            type_=_coding(AUDIT_EVENT_TYPE, "rest", "Restful Operation"),
            subtype=[_coding(RESTFUL_INTERACTION, interaction, interaction)],
            action=action,
            outcome=outcome,
            agents=[*agents, self.user_agent()],
            entities=entities,
            profile=profile,
        )

    # -- DICOM accesses (PS3.15 A.5.3) -------------------------------------------------------
    def dicom_audit_event(self, event: TraceEvent) -> dict[str, Any]:
        """Return the AuditEvent of one DICOM search (Query) or retrieval (Instances Accessed)."""
        meta = event.meta
        backend = str(meta.get("backend") or "dicom")
        outcome = _outcome(meta.get("status"), meta.get("error"))
        entities = self.patient_entity()
        if meta.get("action") == "search":
            # A study search (QIDO-RS /studies) has no study UID; an instance search names its study.
            query = f"StudyInstanceUID={meta['study_uid']}" if meta.get("study_uid") else "study search"
            entities.append(
                {
                    "type": _coding(ENTITY_TYPE, "2", "System Object"),
                    "role": _coding(OBJECT_ROLE, "24", "Query"),
                    "description": f"search ({backend}): {query}",
                    "query": base64.b64encode(query.encode()).decode("ascii"),
                }
            )
            return self.audit_event(
                event,
                type_=_coding(DCM, *_DICOM_QUERY),
                action="E",
                outcome=outcome,
                agents=[
                    self.software_agent(_SOURCE_ROLE),
                    self.server_agent(_DESTINATION_ROLE, f"DICOM source ({backend})"),
                    self.user_agent(),
                ],
                entities=entities,
            )
        if meta.get("study_uid"):
            # A.5.3.6: the study is the participant object (type 2, role 3 "Report", ID type 110180).
            study = _dicom_entity(str(meta["study_uid"]), "Study", role=("3", "Report"))
            study["what"]["identifier"]["type"] = _concept(DCM, *_STUDY_UID_TYPE)
            entities.append(study)
        # A.5.3.6 names studies only; the series and instance are added because an auditor of
        # this service needs to know which image a model actually saw.
        if meta.get("series_uid"):
            entities.append(_dicom_entity(str(meta["series_uid"]), "Series", role=("4", "Domain Resource")))
        if meta.get("sop_instance_uid"):
            instance = _dicom_entity(str(meta["sop_instance_uid"]), "SOP Instance", role=("4", "Domain Resource"))
            details = [
                {"type": key, "valueString": str(meta[key])}
                for key in ("transfer_syntax", "bytes")
                if meta.get(key) is not None
            ]
            if details:
                instance["detail"] = details
            entities.append(instance)
        return self.audit_event(
            event,
            type_=_coding(DCM, *_DICOM_ACCESSED),
            action="R",
            outcome=outcome,
            agents=[
                self.software_agent(_DESTINATION_ROLE),
                self.server_agent(_SOURCE_ROLE, f"DICOM source ({backend})"),
                self.user_agent(),
            ],
            entities=entities,
        )

    # -- the answer --------------------------------------------------------------------------
    def answer_provenance(self) -> list[tuple[str, dict[str, Any]]]:
        """Return the answer's DocumentReference and its Provenance, or nothing when there is no answer.

        Only a run that finished ok and checked its citations has an answer shown to a user.
        """
        citations = _last_note(self.trace, "citations")
        finished = _last(self.trace, kinds.RUN_FINISHED)
        if self.run.status != "ok" or citations is None or finished is None:
            return []
        started = _first(self.trace, kinds.RUN_STARTED)
        context = _last_note(self.trace, "context")
        doc_urn = self.urn("answer")
        reasoner = [urn for urn, event in self.model_devices if event.name == "reasoner"]

        content = readable_content(citations)
        answer = content.get("answer") if content is not None else None
        attachment: dict[str, Any] = {"contentType": "text/plain", "title": "answer"}
        description = f"Answer of medagent run {self.run.run_id}: decision support, not a diagnosis."
        if isinstance(answer, str):
            data = answer.encode()
            attachment["data"] = base64.b64encode(data).decode("ascii")
            attachment["size"] = len(data)
            attachment["hash"] = base64.b64encode(hashlib.sha1(data).digest()).decode("ascii")  # R4: SHA-1
        else:
            description += (
                " The answer text is not included: the trace was read without its content, or the"
                " content is encrypted and no key was given."
            )
        document: dict[str, Any] = {
            "resourceType": "DocumentReference",
            "id": _uuid_of(doc_urn),
            "status": "current",
            "type": {"text": "clinical decision-support answer"},
            "date": _instant(finished.at),
            "description": description,
            "content": [{"attachment": attachment}],
        }
        if self.run.patient_ref:
            document["subject"] = {"reference": self.server_reference(self.run.patient_ref)}
        if reasoner:
            document["author"] = [{"reference": reasoner[0]}]

        provenance: dict[str, Any] = {
            "resourceType": "Provenance",
            "target": [{"reference": doc_urn}],
            "occurredPeriod": {
                "start": _instant(started.at if started is not None else self.run.created_at),
                "end": _instant(finished.at),
            },
            "recorded": _instant(finished.at),
            "activity": _concept(DATA_OPERATION, "CREATE", "create"),
            "agent": self.provenance_agents(),
        }
        if purpose := self.purpose_of_use():
            provenance["reason"] = purpose
        sources = self.source_references(context)
        if sources:
            provenance["entity"] = [{"role": "source", "what": {"reference": ref}} for ref in sources]
        return [(doc_urn, document), self.with_urn(provenance, "provenance")]

    def provenance_agents(self) -> list[dict[str, Any]]:
        """Return the answer's agents: the models (reasoner as author), medagent, the requesting user."""
        agents = []
        for urn, event in self.model_devices:
            # The reasoner wrote the answer; the other models (the image scorer) contributed to it.
            code = "author" if event.name == "reasoner" else "performer"
            agents.append(
                {
                    "type": _concept(PROVENANCE_PARTICIPANT, code, code.capitalize()),
                    "role": [{"text": event.name}],
                    "who": {"reference": urn, "display": str(event.meta.get("model_id") or "unknown")},
                }
            )
        agents.append(
            {
                "type": _concept(PROVENANCE_PARTICIPANT, "assembler", "Assembler"),
                "who": {"reference": self.software_urn, "display": f"medagent {self.trace.software_version}"},
            }
        )
        agents.append({"type": _concept(PROVENANCE_PARTICIPANT, "enterer", "Enterer"), "who": self.user_who()})
        return agents

    def source_references(self, context: TraceEvent | None) -> list[str]:
        """Return the context's sources as references, version-specific when the version is known.

        A source is ``Type/id`` as the context note records it; ``Type/id/_history/v`` is kept as
        is, and a ``versions`` mapping in the note's meta (``Type/id`` -> version) adds one.
        """
        if context is None:
            return []
        versions = context.meta.get("versions")
        versions = versions if isinstance(versions, dict) else {}
        references = []
        for source in context.meta.get("sources") or []:
            reference = str(source)
            version = versions.get(reference)
            if version and "/_history/" not in reference:
                reference = f"{reference}/_history/{version}"
            references.append(self.server_reference(reference))
        return references


# -- small builders ---------------------------------------------------------------------------
def _coding(system: str, code: str, display: str) -> dict[str, Any]:
    return {"system": system, "code": code, "display": display}


def _concept(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [_coding(system, code, display)]}


def _returned_entity(relative: str, reference: str) -> dict[str, Any]:
    resource_type = relative.split("/")[0]
    return {
        "what": {"reference": reference},
        "type": _coding(RESOURCE_TYPES, resource_type, resource_type),
        "role": _coding(OBJECT_ROLE, "4", "Domain Resource"),
    }


def _dicom_entity(uid: str, name: str, *, role: tuple[str, str]) -> dict[str, Any]:
    return {
        "what": {"identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}},
        "type": _coding(ENTITY_TYPE, "2", "System Object"),
        "role": _coding(OBJECT_ROLE, *role),
        "name": name,
    }


def _run_identifier(run_id: str) -> dict[str, Any]:
    try:
        return {"system": URI_SYSTEM, "value": f"urn:uuid:{uuid.UUID(run_id)}"}
    except ValueError:
        return {"value": run_id}


def _outcome(status: Any, error: Any) -> str:
    """Return the audit-event-outcome code: 0 success, 4 minor failure, 8 serious failure.

    A 4xx is the request refused or not found (minor: the system worked); any other non-2xx,
    or no answer at all, is a serious failure. File reads have no status: their error decides.
    """
    if isinstance(status, int):
        if 200 <= status < 300:
            return "0"
        return "4" if 400 <= status < 500 else "8"
    return "8" if error else "0"


def _instant(value: datetime) -> str:
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat()


def _period(event: TraceEvent) -> dict[str, str]:
    # An access event is written when the access ends; its duration says when it began.
    start = event.at - timedelta(milliseconds=event.duration_ms or 0.0)
    return {"start": _instant(start), "end": _instant(event.at)}


def _uuid_of(urn: str) -> str:
    return urn.removeprefix("urn:uuid:")


def _first(trace: RunTrace, kind: str) -> TraceEvent | None:
    return next((event for event in trace.events if event.kind == kind), None)


def _last(trace: RunTrace, kind: str) -> TraceEvent | None:
    return next((event for event in reversed(trace.events) if event.kind == kind), None)


def _last_note(trace: RunTrace, name: str) -> TraceEvent | None:
    return next((e for e in reversed(trace.events) if e.kind == kinds.NOTE and e.name == name), None)
