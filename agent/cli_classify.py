"""``medagent classify fit|predict``: a data-efficient classifier on MedSigLIP embeddings.

Where it sits: a typer sub-app that :mod:`agent.cli` registers as ``classify``. ``fit`` embeds a
few labelled images per class (:mod:`agent.inference.training_data`), cross-validates and trains
a linear probe (:mod:`agent.inference.classifier`) and saves it; ``predict`` applies a saved
probe to image or DICOM files. The agent uses the same file as a finding source when
``imaging.classifier_path`` is set.

MedSigLIP is loaded by :func:`agent.inference.factory.load_image_model` from the settings, as the
agent loads it, so the probe records the identity of the model that will later feed it. Errors
map to exit codes through the error hierarchy; with ``--json`` exactly one JSON object is printed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from agent.cli_support import fail
from agent.errors import MedagentError

if TYPE_CHECKING:
    from agent.config import Settings
    from agent.inference.medsiglip import MedSigLIP

classify_app = typer.Typer(
    help="Train (fit) and apply (predict) a linear-probe classifier on MedSigLIP image embeddings.",
    no_args_is_help=True,
)

# Same flags as agent.cli's; repeated because agent.cli imports this module at its top.
_JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
_TestModelsOpt = Annotated[bool, typer.Option("--test-models", help="Force the tiny random-weight models.")]

_TEST_MODEL_WARNING = (
    "TEST MODELS IN USE (--test-models): tiny random-weight MedSigLIP. Embeddings, cross-validation "
    "figures and predictions are meaningless; a probe trained on them only works with the same test model."
)


def _fail(exc: MedagentError, *, as_json: bool) -> None:
    fail(exc, as_json=as_json)


def _settings(test_models: bool) -> Settings:
    from agent.config import get_settings

    return get_settings(models={"use_test_models": True}) if test_models else get_settings()


def _load_model(settings: Settings) -> MedSigLIP:
    from transformers.utils import logging as hf_logging

    from agent.inference.factory import load_image_model

    hf_logging.disable_progress_bar()  # weight-loading bars would bury the report
    return load_image_model(settings.models)


@classify_app.command("fit")
def fit(
    data: Annotated[
        Path, typer.Option("--data", help="Folder with one subfolder per class, or a CSV with path,label columns.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Where to write the classifier (one JSON file).")],
    name: Annotated[
        str | None, typer.Option("--name", help="The classifier's label-set name (default: the data's name).")
    ] = None,
    version: Annotated[str, typer.Option("--version", help="The label-set version recorded with findings.")] = "1",
    folds: Annotated[
        int | None, typer.Option("--folds", help="Cross-validation folds (default: min(5, smallest class)).")
    ] = None,
    l2: Annotated[float, typer.Option("--l2", help="L2 penalty on the weights.", min=0.0)] = 1e-3,
    skip_unreadable: Annotated[
        bool, typer.Option("--skip-unreadable", help="Leave unreadable files out (listed) instead of failing.")
    ] = False,
    test_models: _TestModelsOpt = False,
    as_json: _JsonOpt = False,
) -> None:
    """Embed labelled images, cross-validate a linear probe, train it on all of them, and save it."""
    from agent.inference.classifier import LinearProbe
    from agent.inference.training_data import embed_examples, list_examples

    try:
        examples = list_examples(data)
        model = _load_model(_settings(test_models))
        embedded = embed_examples(model, examples, batch_size=model.batch_size, skip_unreadable=skip_unreadable)
        probe = LinearProbe.fit(
            embedded.embeddings,
            embedded.labels,
            identity=model.identity,
            name=name or data.stem,
            version=version,
            folds=folds,
            l2=l2,
        )
        probe.save(out)
    except MedagentError as exc:
        _fail(exc, as_json=as_json)
        return
    report = probe.cross_validation
    skipped = [{"path": str(item.path), "reason": item.reason} for item in embedded.skipped]
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "status": "ok",
                    "out": str(out),
                    "label_set": probe.label_set.key,
                    "classes": probe.classes,
                    "embedding_model": probe.embedding_model.model_dump(),
                    "test_model": model.identity.test_model,
                    "cross_validation": report.model_dump(),
                    "skipped": skipped,
                }
            )
        )
        return
    if model.identity.test_model:
        typer.echo(_TEST_MODEL_WARNING)
    typer.echo(f"Classifier {probe.label_set.key}: {len(probe.classes)} classes, {report.examples} images")
    typer.echo(f"Embedding model: {probe.embedding_model.model_id} ({probe.embedding_model.embedding_dim}-d)")
    typer.echo(f"Cross-validation ({report.folds}-fold, stratified, out-of-fold):")
    typer.echo(f"  accuracy           {report.accuracy:.3f}")
    typer.echo(f"  balanced accuracy  {report.balanced_accuracy:.3f}")
    width = max(len(label) for label in probe.classes)
    for label in probe.classes:
        typer.echo(f"  recall {label:<{width}}  {report.per_class_recall[label]:.3f}  (n={report.class_counts[label]})")
    for item in skipped:
        typer.echo(f"skipped {item['path']}: {item['reason']}", err=True)
    typer.echo(f"Saved to {out}")


@classify_app.command("predict")
def predict(
    files: Annotated[list[Path], typer.Argument(help="PNG/JPEG pictures or DICOM files to classify.")],
    model_file: Annotated[Path, typer.Option("--model", help="A classifier saved by `medagent classify fit`.")],
    test_models: _TestModelsOpt = False,
    as_json: _JsonOpt = False,
) -> None:
    """Classify images with a saved probe: every class's probability per file."""
    from agent.inference.classifier import LinearProbe
    from agent.inference.training_data import load_image

    try:
        probe = LinearProbe.load(model_file)
        model = _load_model(_settings(test_models))
        probe.check_embedding_model(model.identity, model.embedding_dim)
        predictions: list[dict[str, Any]] = []
        for start in range(0, len(files), model.batch_size):
            batch = files[start : start + model.batch_size]
            scores = probe.predict(model.embed_images([load_image(path) for path in batch]))
            predictions.extend(
                {"file": str(path), "scores": [score.model_dump(include={"label", "score"}) for score in row]}
                for path, row in zip(batch, scores, strict=True)
            )
    except MedagentError as exc:
        _fail(exc, as_json=as_json)
        return
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "status": "ok",
                    "label_set": probe.label_set.key,
                    "classes": probe.classes,
                    "test_model": model.identity.test_model,
                    "predictions": predictions,
                }
            )
        )
        return
    if model.identity.test_model:
        typer.echo(_TEST_MODEL_WARNING)
    typer.echo(f"Classifier {probe.label_set.key} (probabilities, 0..1):")
    for item in predictions:
        ranked = sorted(item["scores"], key=lambda s: -s["score"])
        typer.echo(f"  {item['file']}: " + ", ".join(f"{s['label']} {s['score']:.2f}" for s in ranked))
