"""Small readers for FHIR R4 datatypes (CodeableConcept, Quantity, dates) on raw JSON.

The context builder works on raw JSON rather than validated models so that one odd field in a
hospital's data never drops a whole resource; these helpers return None for what is absent.
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, date, datetime
from typing import Any


def concept_text(concept: Any) -> str | None:
    """Return a CodeableConcept's best human label: text, else the first coding's display or code."""
    if not isinstance(concept, dict):
        return None
    if concept.get("text"):
        return str(concept["text"])
    for coding in concept.get("coding") or []:
        if isinstance(coding, dict) and (coding.get("display") or coding.get("code")):
            return str(coding.get("display") or coding.get("code"))
    return None


def concept_key(concept: Any) -> str | None:
    """Return ``system|code`` of the first coding (groups observations of the same test)."""
    if not isinstance(concept, dict):
        return None
    for coding in concept.get("coding") or []:
        if isinstance(coding, dict) and coding.get("code"):
            return f"{coding.get('system', '')}|{coding['code']}"
    return concept_text(concept)


def first_concept_text(concepts: Any) -> str | None:
    """Return the label of the first CodeableConcept in a list."""
    if isinstance(concepts, list):
        for concept in concepts:
            text = concept_text(concept)
            if text:
                return text
    return None


def parse_when(value: Any) -> datetime | None:
    """Parse a FHIR date or dateTime (year, year-month, date, or full instant) as aware UTC."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip()
    try:
        if len(text) == 4:
            return datetime(int(text), 1, 1, tzinfo=UTC)
        if len(text) == 7:
            return datetime(int(text[:4]), int(text[5:7]), 1, tzinfo=UTC)
        if len(text) == 10:
            parsed_date = date.fromisoformat(text)
            return datetime(parsed_date.year, parsed_date.month, parsed_date.day, tzinfo=UTC)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except ValueError:
        return None


def relative(when: datetime, as_of: datetime) -> str:
    """Return a short relative phrase: 'today', '3 days ago', '5 months ago', '2 years ago', 'in 4 days'."""
    days = (as_of.date() - when.date()).days
    if days == 0:
        return "today"
    future = days < 0
    days = abs(days)
    if days < 60:
        amount, unit = days, "day"
    elif days < 730:
        amount, unit = round(days / 30.44), "month"
    else:
        # Whole years completed, as people say ages: 7.6 years is "7 years ago".
        amount, unit = int(days / 365.25), "year"
    phrase = f"{amount} {unit}{'s' if amount != 1 else ''}"
    return f"in {phrase}" if future else f"{phrase} ago"


def dated(when: datetime | None, as_of: datetime) -> str:
    """Return 'YYYY-MM-DD (N units ago)' or 'undated'."""
    if when is None:
        return "undated"
    return f"{when.date().isoformat()} ({relative(when, as_of)})"


def quantity_text(quantity: Any) -> str | None:
    """Return '12.5 mg/dL' from a Quantity."""
    if not isinstance(quantity, dict) or quantity.get("value") is None:
        return None
    unit = quantity.get("unit") or quantity.get("code") or ""
    comparator = quantity.get("comparator", "")
    return f"{comparator}{_number(quantity['value'])} {unit}".strip()


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def range_text(ranges: Any) -> str | None:
    """Return 'ref 4.0-11.0' (or '<125', '>60') from an Observation.referenceRange list."""
    if not isinstance(ranges, list) or not ranges or not isinstance(ranges[0], dict):
        return None
    low = (ranges[0].get("low") or {}).get("value")
    high = (ranges[0].get("high") or {}).get("value")
    if low is not None and high is not None:
        return f"ref {_number(low)}-{_number(high)}"
    if high is not None:
        return f"ref <{_number(high)}"
    if low is not None:
        return f"ref >{_number(low)}"
    return ranges[0].get("text")


def attachment_text(attachment: Any, max_chars: int) -> str | None:
    """Return the text of an inline text/plain attachment (base64 ``data``), truncated.

    Other content types and URL-only attachments return None here; later issues add more.
    """
    if not isinstance(attachment, dict) or not attachment.get("data"):
        return None
    content_type = str(attachment.get("contentType", "text/plain")).split(";")[0].strip()
    if content_type != "text/plain":
        return None
    try:
        text = base64.b64decode(attachment["data"], validate=True).decode("utf-8", errors="replace")
    except (binascii.Error, ValueError):
        return None
    text = " ".join(text.split())
    return text if len(text) <= max_chars else text[:max_chars] + "…"
