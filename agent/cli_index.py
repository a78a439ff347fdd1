"""``medagent index ...``: build and query the similar-case index of MedSigLIP image embeddings.

``add`` indexes a DICOM folder, the studies of a DICOMweb server (all, or one patient's, one
study, one modality) or one FHIR ImagingStudy; ``search`` finds the studies closest to an image
(DICOM, PNG or JPEG) or a text; ``delete``, ``rebuild`` and ``info`` maintain it. The backend
(embedded folder or pgvector) comes from the ``imaging`` settings, overridable here. Errors map
to exit codes through the error hierarchy; ``--json`` prints exactly one JSON object.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from agent.cli_support import fail, settings_with, source_groups
from agent.config import Settings
from agent.errors import ConfigError, MedagentError

index_app = typer.Typer(help="Similar-case search over MedSigLIP image embeddings.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
TestModelsOpt = Annotated[bool, typer.Option("--test-models", help="Force the tiny random-weight models.")]
BackendOpt = Annotated[str | None, typer.Option("--backend", help="file or pgvector (default: settings).")]
IndexPathOpt = Annotated[Path | None, typer.Option("--index-path", help="Folder of the embedded index.")]
IndexUrlOpt = Annotated[str | None, typer.Option("--index-url", help="PostgreSQL URL (pgvector backend).")]
FhirOpt = Annotated[str | None, typer.Option("--fhir", help="FHIR R4 base URL.")]
FhirDirOpt = Annotated[Path | None, typer.Option("--fhir-dir", help="Folder of FHIR bundles.")]
DicomDirOpt = Annotated[Path | None, typer.Option("--dicom-dir", help="Folder of DICOM files (the image source).")]


def _settings(
    *,
    backend: str | None = None,
    index_path: Path | None = None,
    index_url: str | None = None,
    test_models: bool = False,
    fhir: str | None = None,
    fhir_dir: Path | None = None,
    dicomweb: str | None = None,
    dicom_dir: Path | None = None,
) -> Settings:
    """Build settings from env/.env, then apply the command line's flags on top."""
    imaging: dict[str, Any] = {}
    if backend:
        imaging["index_backend"] = backend
    if index_path:
        imaging["index_path"] = index_path
    if index_url:
        imaging["index_url"] = index_url
    groups = source_groups(fhir=fhir, fhir_dir=fhir_dir, dicomweb=dicomweb, dicom_dir=dicom_dir)
    groups["imaging"] = imaging
    if test_models:
        groups["models"] = {"use_test_models": True}
    return settings_with(groups)


def _fail(exc: MedagentError, *, as_json: bool) -> None:
    fail(exc, as_json=as_json)


@contextmanager
def _existing_index(
    backend: str | None, index_path: Path | None, index_url: str | None, *, as_json: bool
) -> Iterator[Any]:
    """Open the index the flags and settings name (it must exist), close it afterwards, report failures."""
    from agent.retrieval.factory import open_index

    try:
        settings = _settings(backend=backend, index_path=index_path, index_url=index_url)
        index = open_index(settings.imaging, create=False)
        try:
            yield index
        finally:
            index.close()
    except MedagentError as exc:
        fail(exc, as_json=as_json)


def _load_model(settings: Settings) -> Any:
    from transformers.utils import logging as hf_logging

    from agent.inference.factory import load_image_model

    hf_logging.disable_progress_bar()
    return load_image_model(settings.models)


@index_app.command()
def add(
    from_dir: Annotated[Path | None, typer.Option("--dir", help="Index every study in this DICOM folder.")] = None,
    dicomweb: Annotated[
        str | None, typer.Option("--dicomweb", help="Index studies of this DICOMweb root (filters below).")
    ] = None,
    patient: Annotated[str | None, typer.Option("--patient", help="With --dicomweb: DICOM PatientID.")] = None,
    study: Annotated[str | None, typer.Option("--study", help="With --dicomweb: one StudyInstanceUID.")] = None,
    modality: Annotated[str | None, typer.Option("--modality", help="With --dicomweb: e.g. DX, CT.")] = None,
    imaging_study: Annotated[
        str | None, typer.Option("--imaging-study", help="Index one FHIR ImagingStudy (by id).")
    ] = None,
    label: Annotated[str | None, typer.Option("--label", help="Caption stored with every image (no names).")] = None,
    fhir: FhirOpt = None,
    fhir_dir: FhirDirOpt = None,
    dicom_dir: DicomDirOpt = None,
    backend: BackendOpt = None,
    index_path: IndexPathOpt = None,
    index_url: IndexUrlOpt = None,
    test_models: TestModelsOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Embed images with MedSigLIP and add them to the index (re-adding an image replaces it)."""
    try:
        chosen = [
            name
            for name, value in (("--dir", from_dir), ("--dicomweb", dicomweb), ("--imaging-study", imaging_study))
            if value
        ]
        if len(chosen) != 1:
            raise ConfigError("give exactly one of --dir, --dicomweb or --imaging-study")
        if (patient or study or modality) and not dicomweb:
            raise ConfigError("--patient, --study and --modality filter --dicomweb")
        settings = _settings(
            backend=backend,
            index_path=index_path,
            index_url=index_url,
            test_models=test_models,
            fhir=fhir,
            fhir_dir=fhir_dir,
            dicomweb=dicomweb,
            dicom_dir=dicom_dir,
        )
        report = asyncio.run(_add(settings, from_dir, dicomweb, patient, study, modality, imaging_study, label))
    except MedagentError as exc:
        _fail(exc, as_json=as_json)
        return
    if as_json:
        typer.echo(json.dumps({"status": "ok", **report.to_dict()}))
        return
    typer.echo(f"added {report.added} image(s) from {len(report.studies)} study(ies)")
    for item in report.skipped:
        where = item.get("sop_instance_uid") or item.get("file") or item.get("study_uid")
        typer.echo(f"skipped {where}: [{item['code']}] {item['message']}", err=True)


async def _add(
    settings: Settings,
    from_dir: Path | None,
    dicomweb: str | None,
    patient: str | None,
    study: str | None,
    modality: str | None,
    imaging_study: str | None,
    label: str | None,
) -> Any:
    from agent.domain.events import NullObserver
    from agent.retrieval import ingest
    from agent.retrieval.factory import open_index
    from agent.sources.factory import make_dicom_source, make_fhir_source

    embedder = _load_model(settings)
    index = open_index(settings.imaging, create=True)
    observer = NullObserver()
    per_study = settings.dicom.max_instances
    try:
        if from_dir is not None:
            return await asyncio.to_thread(
                ingest.ingest_folder, from_dir, embedder, index, per_study=per_study, label=label
            )
        if dicomweb is not None:
            source = make_dicom_source(settings.dicom, observer)
            try:
                return await ingest.ingest_dicom_source(
                    source,
                    embedder,
                    index,
                    dicomweb_url=dicomweb,
                    patient_id=patient,
                    study_uid=study,
                    modality=modality,
                    per_study=per_study,
                    label=label,
                )
            finally:
                await source.aclose()
        assert imaging_study is not None
        fhir_source = make_fhir_source(settings.fhir, observer)
        try:
            return await ingest.ingest_imaging_study(
                fhir_source, imaging_study, settings.dicom, observer, embedder, index, label=label
            )
        finally:
            await fhir_source.aclose()
    finally:
        index.close()


@index_app.command()
def search(
    image: Annotated[Path | None, typer.Option("--image", help="Query image: DICOM, PNG or JPEG.")] = None,
    text: Annotated[str | None, typer.Option("--text", help="Query text, e.g. 'pleural effusion'.")] = None,
    k: Annotated[int, typer.Option("--k", min=1, max=100, help="Studies to return.")] = 5,
    exclude_study: Annotated[str | None, typer.Option("--exclude-study", help="Leave out this study.")] = None,
    backend: BackendOpt = None,
    index_path: IndexPathOpt = None,
    index_url: IndexUrlOpt = None,
    test_models: TestModelsOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Print the top-k most similar studies, with scores and identifiers to open them."""
    from agent.retrieval.entries import IndexedModel
    from agent.retrieval.factory import open_index

    try:
        if (image is None) == (text is None):
            raise ConfigError("give exactly one of --image or --text")
        settings = _settings(backend=backend, index_path=index_path, index_url=index_url, test_models=test_models)
        index = open_index(settings.imaging, create=False)
        try:
            embedder = _load_model(settings)
            if image is not None:
                vector = embedder.embed_images([_query_image(image)])
            else:
                vector = embedder.embed_texts([text or ""])
            import numpy as np

            query = np.asarray(vector, dtype=np.float32)[0]
            model = IndexedModel.of(embedder.identity, int(query.shape[0]))
            hits = index.search(query, k, exclude_study_uid=exclude_study, model=model)
        finally:
            index.close()
    except MedagentError as exc:
        _fail(exc, as_json=as_json)
        return
    if as_json:
        typer.echo(json.dumps({"status": "ok", "hits": [hit.model_dump() for hit in hits]}))
        return
    if not hits:
        typer.echo("no similar studies (the index is empty)")
    for rank, hit in enumerate(hits, start=1):
        refs = " ".join(r for r in (hit.imaging_study_ref, hit.patient_ref) if r)
        typer.echo(f"{rank}. {hit.score:.3f}  study {hit.study_uid}  {hit.modality or ''}  {refs}".rstrip())
        typer.echo(f"     best image {hit.sop_instance_uid} (series {hit.series_uid})")
        if hit.instance_url:
            typer.echo(f"     {hit.instance_url}")


def _query_image(path: Path) -> Any:
    """Return the query picture, prepared like an indexed one when DICOM, padded square otherwise."""
    import pydicom
    from PIL import Image, UnidentifiedImageError
    from pydicom.errors import InvalidDicomError

    from agent.domain.refs import InstanceRef
    from agent.sources.pixels import pad_to_square, prepare_instance

    if not path.is_file():
        raise ConfigError(f"query image {path} does not exist")
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        try:
            with Image.open(path) as opened:
                rgb = opened.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise ConfigError(f"query image {path.name} is neither DICOM nor an image PIL can read") from exc
        import numpy as np

        return Image.fromarray(pad_to_square(np.asarray(rgb)))
    return prepare_instance(ds, InstanceRef.of_dataset(ds, missing_uid="")).image


@index_app.command()
def delete(
    study: Annotated[str, typer.Option("--study", help="StudyInstanceUID whose images are removed.")],
    backend: BackendOpt = None,
    index_path: IndexPathOpt = None,
    index_url: IndexUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove a study's images from the index (space is reclaimed by rebuild)."""
    with _existing_index(backend, index_path, index_url, as_json=as_json) as index:
        removed = index.delete(study_uid=study)
    typer.echo(json.dumps({"status": "ok", "removed": removed}) if as_json else f"removed {removed} image(s)")


@index_app.command()
def rebuild(
    backend: BackendOpt = None,
    index_path: IndexPathOpt = None,
    index_url: IndexUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Reclaim deleted space and rebuild the search structure."""
    with _existing_index(backend, index_path, index_url, as_json=as_json) as index:
        info = index.rebuild()
    typer.echo(info.model_dump_json() if as_json else f"rebuilt: {info.count} image(s), {info.studies} study(ies)")


@index_app.command()
def info(
    backend: BackendOpt = None,
    index_path: IndexPathOpt = None,
    index_url: IndexUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the index's model, dimension and counts."""
    with _existing_index(backend, index_path, index_url, as_json=as_json) as index:
        described = index.info()
    if as_json:
        typer.echo(described.model_dump_json())
        return
    for key, value in described.model_dump().items():
        typer.echo(f"{key}: {value}")
