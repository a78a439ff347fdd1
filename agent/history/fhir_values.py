"""Small readers for FHIR R4 datatypes (CodeableConcept, Quantity, dates) on raw JSON.

The context builder works on raw JSON rather than validated models so that one odd field in a
hospital's data never drops a whole resource; these helpers return None for what is absent.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import html
import math
import re
from datetime import UTC, date, datetime
from html.parser import HTMLParser
from typing import TYPE_CHECKING, Any

from agent.errors import InvalidResourceError, SourceUnavailableError

if TYPE_CHECKING:
    from agent.sources.protocols import FhirSource


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
    if isinstance(value, float) and len(repr(value).partition(".")[2]) > 4:
        # Machine precision (6.253360065445302 %) says nothing a reader needs and costs tokens:
        # two decimals, or three significant digits below 1.
        digits = 2 if abs(value) >= 1 else max(2, 2 - math.floor(math.log10(abs(value))))
        return f"{value:.{digits}f}".rstrip("0").rstrip(".")
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
    """Return the readable text of an inline attachment (base64 ``data``), truncated.

    ``text/plain`` (and other ``text/*``) is decoded as is; ``text/html`` and XHTML are reduced to
    their visible text. Any other content type gives a marker such as
    ``"[not extracted: application/pdf, 123 KB]"``, so the reader knows a document exists that
    was not read. URL-only attachments return None here (see :func:`fetch_attachment_text`), as
    does data that is not valid base64.
    """
    if not isinstance(attachment, dict) or not attachment.get("data"):
        return None
    try:
        raw = base64.b64decode(attachment["data"], validate=True)
    except (binascii.Error, ValueError):
        return None
    return _extract(raw, str(attachment.get("contentType", "text/plain")), max_chars, attachment.get("size"))


async def fetch_attachment_text(
    fhir: FhirSource, attachment: Any, max_bytes: int, *, max_chars: int = 20_000
) -> str | None:
    """Return an attachment's text, fetching a ``url`` relative to the FHIR base when there is no inline data.

    Only ``Binary/<id>`` URLs (relative, or under the source's own base) are fetched, as a FHIR
    Binary resource (JSON with base64 ``data``) through the run's source, so the request is
    retried and traced like any other. Absolute URLs to other hosts are never fetched: that would
    send the run's credentials, or leak which patient is being read, to a server nobody
    configured. Every case that yields no text gives a marker saying why, never an error.

    Args:
        fhir: the run's FHIR source.
        attachment: a FHIR Attachment (raw JSON).
        max_bytes: largest attachment read (declared ``size`` checked before fetching, the
            decoded content after).
        max_chars: longest text returned.
    """
    if not isinstance(attachment, dict):
        return None
    content_type = str(attachment.get("contentType", "text/plain"))
    if attachment.get("data"):
        return attachment_text(attachment, max_chars)
    url = attachment.get("url")
    if not isinstance(url, str) or not url:
        return None
    size = attachment.get("size")
    if isinstance(size, int) and size > max_bytes:
        return f"[not fetched: {_media_type(content_type)}, {_size_text(size)}, over the {_size_text(max_bytes)} limit]"
    path = _binary_path(url, getattr(fhir, "base_url", None))
    if path is None:
        return f"[not fetched: {_media_type(content_type)} at another host]"
    try:
        binary = await fhir.get(path, {})
    except (SourceUnavailableError, InvalidResourceError) as exc:
        # The failed request is in the trace; the reader only needs to know the text is absent.
        return f"[not fetched: {_media_type(content_type)} ({path}) could not be read: {exc.code}]"
    # The Binary knows its own type better than the referring attachment does.
    if binary.get("resourceType") == "Binary" and isinstance(binary.get("contentType"), str):
        content_type = binary["contentType"]
    data = binary.get("data") if binary.get("resourceType") == "Binary" else None
    if not isinstance(data, str) or not data:
        return f"[not extracted: {_media_type(content_type)} ({path}) has no content]"
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return f"[not extracted: {_media_type(content_type)} ({path}) content is not base64]"
    if len(raw) > max_bytes:
        limit = _size_text(max_bytes)
        return f"[not extracted: {_media_type(content_type)}, {_size_text(len(raw))}, over the {limit} limit]"
    return _extract(raw, content_type, max_chars, None)


# A Binary read relative to the base; ids as FHIR defines them.
_BINARY_PATH = re.compile(r"^Binary/[A-Za-z0-9\-.]{1,64}$")
_HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})


def _binary_path(url: str, base_url: Any) -> str | None:
    """Return ``Binary/<id>`` for a URL on the source's own base, or None for anything else."""
    if isinstance(base_url, str) and base_url and url.startswith(base_url.rstrip("/") + "/"):
        url = url[len(base_url.rstrip("/")) + 1 :]
    return url if _BINARY_PATH.match(url) else None


def _media_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower() or "unknown type"


def _charset(content_type: str) -> str:
    for part in content_type.split(";")[1:]:
        name, _, value = part.partition("=")
        if name.strip().lower() == "charset" and value.strip():
            candidate = value.strip().strip('"')
            try:
                codecs.lookup(candidate)
            except LookupError:
                break
            return candidate
    return "utf-8"


def _size_text(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{math.ceil(size / 1024)} KB"
    return f"{size / (1024 * 1024):.1f} MB"


def _extract(raw: bytes, content_type: str, max_chars: int, declared_size: Any) -> str:
    """Return the text of decoded attachment bytes, or the "not extracted" marker."""
    media_type = _media_type(content_type)
    if media_type in _HTML_TYPES:
        text = html_to_text(raw.decode(_charset(content_type), errors="replace"))
    elif media_type.startswith("text/"):
        text = " ".join(raw.decode(_charset(content_type), errors="replace").split())
    else:
        size = declared_size if isinstance(declared_size, int) and declared_size >= 0 else len(raw)
        return f"[not extracted: {media_type}, {_size_text(size)}]"
    return text if len(text) <= max_chars else text[:max_chars] + "…"


class _TextOfHtml(HTMLParser):
    """Collect the visible text of an HTML document (not scripts, styles or the head's metadata)."""

    _HIDDEN = frozenset({"script", "style", "head", "template", "noscript"})
    # Block elements end a run of text, so "<p>a</p><p>b</p>" reads "a b", not "ab".
    _BLOCKS = frozenset(
        {"p", "div", "br", "li", "tr", "td", "th", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol", "title"}
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._HIDDEN:
            self._hidden_depth += 1
        elif tag in self._BLOCKS:
            self.parts.append(" ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._BLOCKS:
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN:
            self._hidden_depth = max(0, self._hidden_depth - 1)
        elif tag in self._BLOCKS:
            self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if not self._hidden_depth:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """Return the visible text of HTML: tags, scripts and styles removed, entities decoded, whitespace collapsed."""
    parser = _TextOfHtml()
    parser.feed(markup)
    parser.close()
    # convert_charrefs already decoded entities; a second unescape catches double-escaped ones
    # ("&amp;lt;") that some EHR exports produce.
    return " ".join(html.unescape("".join(parser.parts)).split())
