"""Images ready for a model, and what the models said about them."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image
from pydantic import BaseModel

from agent.domain.refs import InstanceRef


@dataclass
class PreparedImage:
    """A DICOM instance turned into a square 8-bit RGB picture, with how it was made.

    ``steps`` lists what pixel preparation did (``"rescale slope=1 intercept=-1024"``,
    ``"window c=40 w=400"``, ``"invert MONOCHROME1"``, ``"pad to 512x512"``) and ``defaults``
    every default applied because a tag was missing, so the trace can show both.
    """

    ref: InstanceRef
    image: Image.Image
    steps: list[str] = field(default_factory=list)
    defaults: list[str] = field(default_factory=list)


class LabelScore(BaseModel):
    """A score for one label on one image, from zero-shot prompts or a trained classifier.

    ``score`` is always the one to show: for zero-shot labels the sigmoid of the positive
    prompt's logit, for a classifier the class probability. The two optional fields exist only
    for zero-shot labels scored with a positive/negative prompt pair: SigLIP's sigmoid scores are
    poorly calibrated across prompts, and comparing a finding's prompt with its own negation is
    the more robust yes/no reading, so both are kept for the trace.
    """

    label: str
    score: float
    #: sigmoid of the negative prompt's logit ("... with no <finding>").
    negative_score: float | None = None
    #: softmax over the (positive, negative) logits, for the positive prompt.
    pair_probability: float | None = None


class Finding(BaseModel):
    """The scores of one image from one finding source (zero-shot labels or a trained classifier)."""

    image: InstanceRef
    model_id: str
    scores: list[LabelScore]
    source: str = "zero-shot"
    label_set: str | None = None
