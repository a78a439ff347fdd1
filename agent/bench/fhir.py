"""``medagent bench fhir``: how medagent assembles a patient's context, against a naive baseline.

On a generated patient with ten years of dense history (``tools/make_large_patient.py``, about
5,000 Observations), served over HTTP by the real FHIR engine the server tests use
(``tests/support/servers.py``), it measures, interleaved and as medians:

- context assembly time: medagent's path (``discover`` + ``fetch_history`` over the graph's
  history types + ``build_context`` with the question and the default token budget) vs a
  sequential per-type baseline modelled on Google's EHR Navigator agent: a Patient read, then a
  dozen searches one at a time, each followed to its last page, then every resource dumped as JSON
  as the "context";
- the floor: one search that reads every Observation of the patient and nothing else. Any client
  whose context covers the whole history pays at least this, so sequential / floor bounds the
  speedup any such client could show against this server;
- HTTP requests each made (counted from the source's request events);
- context size in tokens: MedGemma's own tokenizer when its files are in the local cache, else a
  stated proxy (word pieces), and the ratio dump / ours;
- fact recall over the three fixture patients: the share of the gold facts of
  :data:`agent.bench.fhir_questions.QUESTIONS` that the context built for each question cites,
  at the default budget and at a tight one (to show that the selection is what keeps them).

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import importlib.util
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

from agent.bench.fhir_questions import QUESTIONS, resolve_fact
from agent.config import DEFAULT_FIXTURES, PROJECT_ROOT, Settings, get_settings
from agent.domain.events import ListObserver
from agent.graph.state import HISTORY_TYPES
from agent.history.context import CHARS_PER_TOKEN, build_context
from agent.sources.capabilities import discover
from agent.sources.fhir_http import HttpFhirSource
from agent.sources.history_fetch import fetch_history

#: The sequential baseline's searches, in order, after the Patient read: one per record type as
#: Google's EHR Navigator agent issues them (Observation split into vitals and labs).
SEQUENTIAL_SEARCHES: tuple[tuple[str, dict[str, str]], ...] = (
    ("Condition", {}),
    ("Observation", {"category": "vital-signs"}),
    ("Observation", {"category": "laboratory"}),
    ("MedicationRequest", {}),
    ("AllergyIntolerance", {}),
    ("Encounter", {}),
    ("DiagnosticReport", {}),
    ("DocumentReference", {}),
    ("Procedure", {}),
    ("Immunization", {}),
    ("ImagingStudy", {}),
)
#: The baseline follows every ``next`` link: it reads everything, however many pages.
SEQUENTIAL_MAX_PAGES = 10_000
LARGE_PATIENT_QUESTION = "How have her kidney function, NT-proBNP and HbA1c changed, and what is she taking?"
TIGHT_BUDGET = 600
#: Fixture dates run to October 2026; a fixed "now" keeps the relative ages stable.
FIXTURE_AS_OF = datetime(2026, 11, 1, tzinfo=UTC)
_WORD_PIECE = re.compile(r"\w+|[^\w\s]")

Echo = Callable[[str], None]


def _tool_module(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` by path (``tools`` is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, PROJECT_ROOT / "tools" / f"{name}.py")
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load tools/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _servers() -> ModuleType:
    """Return ``tests.support.servers``, which starts the test FHIR engine.

    The console script's ``sys.path`` holds the installed package only, so the checkout's root is
    added when the test helpers are not importable as they are.
    """
    if str(PROJECT_ROOT) not in sys.path and importlib.util.find_spec("tests") is None:
        sys.path.append(str(PROJECT_ROOT))
    return importlib.import_module("tests.support.servers")


# -- token counting ---------------------------------------------------------------------------------


def token_counter(settings: Settings) -> tuple[str, Callable[[str], int]]:
    """Return a counter's name and the counter: MedGemma's tokenizer when cached, else word pieces.

    The tiny test tokenizer is never used: its vocabulary says nothing about real prompt sizes.
    """
    try:
        from transformers import AutoTokenizer

        from agent.inference.loading import resolve_model_path

        path = resolve_model_path(settings.models.medgemma)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception:  # any failure (no weights, no transformers, a broken cache) means the proxy
        return "proxy: word pieces (runs of letters/digits, each punctuation mark)", _word_pieces

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return f"{settings.models.medgemma} tokenizer", count


def _word_pieces(text: str) -> int:
    return sum(1 for _ in _WORD_PIECE.finditer(text))


# -- the two ways to assemble a context -------------------------------------------------------------


@dataclasses.dataclass
class Assembly:
    """One context assembly: the text, the requests it took, the resources it read, its duration."""

    text: str
    requests: int
    resources: int
    seconds: float
    sources: int = 0


async def assemble_medagent(
    base_url: str, patient_id: str, question: str, settings: Settings, as_of: datetime
) -> Assembly:
    """Assemble the context as the graph's ``fetch_history`` node does, and time it."""
    observer = ListObserver()
    started = time.perf_counter()
    async with HttpFhirSource.from_settings(settings.fhir.model_copy(update={"base_url": base_url}), observer) as fhir:
        patient = await fhir.read("Patient", patient_id)
        capabilities = await discover(fhir)
        fetched = await fetch_history(
            fhir, patient_id, types=HISTORY_TYPES, capabilities=capabilities, concurrency=settings.fhir.concurrency
        )
    context = build_context(
        patient,
        fetched.resources,
        as_of=as_of,
        missing=fetched.missing,
        question=question,
        token_budget=settings.models.context_token_budget,
    )
    elapsed = time.perf_counter() - started
    return Assembly(context.text, len(observer.fhir), len(fetched.resources) + 1, elapsed, len(context.sources))


async def assemble_sequential(base_url: str, patient_id: str) -> Assembly:
    """Assemble the baseline context: sequential per-type searches read to the end, dumped as JSON."""
    observer = ListObserver()
    started = time.perf_counter()
    async with HttpFhirSource(base_url, observer=observer, max_pages=SEQUENTIAL_MAX_PAGES, timeout_s=300) as fhir:
        resources = [await fhir.read("Patient", patient_id)]
        for resource_type, extra in SEQUENTIAL_SEARCHES:
            resources.extend(await fhir.search(resource_type, {"patient": patient_id, **extra}))
    text = "\n".join(json.dumps(resource) for resource in resources)
    elapsed = time.perf_counter() - started
    return Assembly(text, len(observer.fhir), len(resources), elapsed)


async def read_observations_once(base_url: str, patient_id: str) -> Assembly:
    """Read every Observation of the patient in one search and nothing else: the floor.

    Any client whose context covers the whole history must read every Observation once, so on
    this server no such client can assemble a context faster than this single search takes.
    """
    observer = ListObserver()
    started = time.perf_counter()
    async with HttpFhirSource(base_url, observer=observer, max_pages=SEQUENTIAL_MAX_PAGES, timeout_s=300) as fhir:
        resources = await fhir.search("Observation", {"patient": patient_id})
    return Assembly("", len(observer.fhir), len(resources), time.perf_counter() - started)


def compare_assembly(
    base_url: str, patient_id: str, settings: Settings, repeats: int, as_of: datetime
) -> dict[str, Any]:
    """Time both assemblies and the floor ``repeats`` times, interleaved after a warm-up; return medians."""
    runs: dict[str, list[Assembly]] = {"ours": [], "sequential": [], "floor": []}

    async def all_runs() -> None:
        # warm-up: the engine's caches, imports and the first connection cost hit neither side
        await assemble_medagent(base_url, patient_id, LARGE_PATIENT_QUESTION, settings, as_of)
        await assemble_sequential(base_url, patient_id)
        for _ in range(repeats):  # interleaved, so machine noise hits all alike
            runs["ours"].append(await assemble_medagent(base_url, patient_id, LARGE_PATIENT_QUESTION, settings, as_of))
            runs["sequential"].append(await assemble_sequential(base_url, patient_id))
            runs["floor"].append(await read_observations_once(base_url, patient_id))

    asyncio.run(all_runs())
    ours, sequential = runs["ours"][-1], runs["sequential"][-1]
    return {
        "ours_median_s": statistics.median(a.seconds for a in runs["ours"]),
        "sequential_median_s": statistics.median(a.seconds for a in runs["sequential"]),
        "floor_median_s": statistics.median(a.seconds for a in runs["floor"]),
        "ours": ours,
        "sequential": sequential,
    }


# -- fact recall ------------------------------------------------------------------------------------


def fixture_resources() -> dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Return each fixture patient's key -> (Patient, every other resource of its bundle)."""
    manifest = json.loads((DEFAULT_FIXTURES / "manifest.json").read_text(encoding="utf-8"))
    patients: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for entry in manifest["patients"]:
        bundle = json.loads((DEFAULT_FIXTURES / entry["bundle"]).read_text(encoding="utf-8"))
        resources = [e["resource"] for e in bundle.get("entry") or [] if isinstance(e.get("resource"), dict)]
        patient = next(r for r in resources if r.get("resourceType") == "Patient")
        patients[entry["key"]] = (patient, [r for r in resources if r is not patient])
    return patients


def fact_recall(token_budget: int) -> dict[str, Any]:
    """Return the share of gold facts the built contexts cite, over every question.

    Raises:
        LookupError: a gold fact names no resource in the fixtures (the set has rotted).
    """
    patients = fixture_resources()
    found = total = complete = 0
    for question in QUESTIONS:
        patient, resources = patients[question.patient]
        context = build_context(
            patient, resources, as_of=FIXTURE_AS_OF, question=question.text, token_budget=token_budget
        )
        cited = {ref.reference for ref in context.sources}
        hits = 0
        for fact in question.facts:
            key = resolve_fact(fact, [patient, *resources])
            if key is None:
                raise LookupError(f"gold fact {fact} of {question.text!r} names no fixture resource")
            hits += key in cited
        found += hits
        total += len(question.facts)
        complete += hits == len(question.facts)
    return {"recall": found / total, "facts": total, "questions_complete": complete}


# -- the command ------------------------------------------------------------------------------------


def run_benchmark(*, observations: int = 5000, repeats: int = 5, echo: Echo = print) -> dict[str, Any]:
    """Run every measurement, print a line per figure and a closing JSON line, and return the figures.

    Args:
        observations: how many Observations the generated patient has.
        repeats: timed assemblies per side (after one warm-up each), interleaved.
        echo: where each line goes.
    """
    settings = get_settings()
    budget = settings.models.context_token_budget
    servers = _servers()
    generator = _tool_module("make_large_patient")
    bundle: dict[str, Any] = generator.make_large_patient(observations=observations)
    patient_id = next(e["resource"]["id"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    as_of = generator.HISTORY_END + timedelta(days=1)
    results: dict[str, Any] = {"observations": observations, "resources_generated": len(bundle["entry"])}
    with tempfile.TemporaryDirectory(prefix="medagent-bench-fhir-") as tmp:
        bundle_path = Path(tmp) / "large-patient.json"
        bundle_path.write_text(json.dumps(bundle), encoding="utf-8")
        handle = servers.start_fhir_server(Path(tmp) / "server")
        try:
            started = time.perf_counter()
            servers.load_fhir_bundles(handle.base_url, [bundle_path], timeout_s=300)
            echo(
                f"generated patient: {len(bundle['entry'])} resources ({observations} Observations, 10 years), "
                f"loaded into the test FHIR engine in {time.perf_counter() - started:.1f} s"
            )
            timing = compare_assembly(handle.base_url, patient_id, settings, repeats, as_of)
        finally:
            handle.stop()
    ours: Assembly = timing["ours"]
    sequential: Assembly = timing["sequential"]
    speedup = timing["sequential_median_s"] / timing["ours_median_s"]
    bound = timing["sequential_median_s"] / timing["floor_median_s"]
    results.update(
        {
            "ours_median_ms": round(timing["ours_median_s"] * 1000, 1),
            "sequential_median_ms": round(timing["sequential_median_s"] * 1000, 1),
            "speedup_vs_sequential": round(speedup, 2),
            "observation_read_median_ms": round(timing["floor_median_s"] * 1000, 1),
            "speedup_bound_reading_everything": round(bound, 2),
            "requests": ours.requests,
            "sequential_requests": sequential.requests,
            "resources_read": ours.resources,
            "sequential_resources_read": sequential.resources,
            "context_sources": ours.sources,
            "repeats": repeats,
        }
    )
    echo(
        f"context assembly, medians of {repeats} interleaved runs: medagent {results['ours_median_ms']:.0f} ms "
        f"(discover + fetch_history, concurrency {settings.fhir.concurrency}, + build_context, budget {budget}) vs "
        f"sequential baseline {results['sequential_median_ms']:.0f} ms (Patient read + {len(SEQUENTIAL_SEARCHES)} "
        f"per-type searches one at a time, every page, JSON dump): speedup {speedup:.2f}x"
    )
    echo(
        f"  floor: one search reading every Observation (nothing else): {results['observation_read_median_ms']:.0f}"
        f" ms on this server, so a client that reads the whole history cannot beat the baseline by more than "
        f"{bound:.2f}x here"
    )
    echo(
        f"  HTTP requests: medagent {ours.requests}, baseline {sequential.requests}; resources read: "
        f"medagent {ours.resources}, baseline {sequential.resources}; the context cites {ours.sources}"
    )

    counter_name, count = token_counter(settings)
    ours_tokens, dump_tokens = count(ours.text), count(sequential.text)
    results.update(
        {
            "token_counter": counter_name,
            "context_tokens": ours_tokens,
            "dump_tokens": dump_tokens,
            "context_chars": len(ours.text),
            "dump_chars": len(sequential.text),
            "token_reduction_vs_dump": round(dump_tokens / ours_tokens, 1),
        }
    )
    echo(
        f"context size ({counter_name}): medagent {ours_tokens} tokens ({len(ours.text)} chars, budget {budget} "
        f"at {CHARS_PER_TOKEN} chars/token) vs JSON dump {dump_tokens} tokens ({len(sequential.text)} chars): "
        f"{results['token_reduction_vs_dump']}x smaller"
    )

    default = fact_recall(budget)
    tight = fact_recall(TIGHT_BUDGET)
    results.update(
        {
            "fact_recall": round(default["recall"], 3),
            "fact_recall_tight": round(tight["recall"], 3),
            "tight_budget": TIGHT_BUDGET,
            "questions": len(QUESTIONS),
            "gold_facts": default["facts"],
            "questions_fully_answered": default["questions_complete"],
        }
    )
    echo(
        f"fact recall over {len(QUESTIONS)} questions ({default['facts']} gold facts, 3 fixture patients): "
        f"{default['recall']:.3f} at the default budget ({budget} tokens; {default['questions_complete']} "
        f"questions with every fact cited), {tight['recall']:.3f} at {TIGHT_BUDGET} tokens"
    )
    echo(json.dumps(results))
    return results
