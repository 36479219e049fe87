"""Turning attachment bytes into note text: content types, charsets, base64, HTML to plain text.

Pure functions over bytes and strings, used by `fetch` for DocumentReference and
DiagnosticReport attachments. Nothing here does IO or logs: the text is patient data.
What it must not do: guess a format it does not know. An unsupported content type or
undecodable data raises `UnsupportedContent` with a short, PHI-free reason that the caller
records as a skipped attachment.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import re
from html.parser import HTMLParser

from fhir_adapters.errors import ChartbriefError

PLAIN = "text/plain"
HTML = "text/html"
MARKDOWN = "text/markdown"
SUPPORTED_TYPES = frozenset({PLAIN, HTML, MARKDOWN, "text/x-markdown", "application/xhtml+xml"})

_BLOCK_TAGS = frozenset(
    {
        "address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt", "fieldset",
        "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header",
        "hr", "li", "main", "nav", "ol", "p", "pre", "section", "table", "tbody", "td", "tfoot",
        "th", "thead", "tr", "ul",
    }
)  # fmt: skip
# Text inside these is never shown to a reader, so it must not reach the model either.
_HIDDEN_TAGS = frozenset({"script", "style", "head", "title", "template", "noscript"})


class UnsupportedContent(ChartbriefError, ValueError):
    """An attachment chartbrief cannot read as text. `str()` is a short reason, never content."""


def parse_content_type(value: str | None) -> tuple[str, str | None]:
    """The media type (lower case) and charset parameter of a Content-Type value.

    >>> parse_content_type("text/plain; charset=UTF-8")
    ('text/plain', 'UTF-8')
    >>> parse_content_type('Text/HTML;charset="iso-8859-1"')
    ('text/html', 'iso-8859-1')
    >>> parse_content_type(None)
    ('', None)
    """
    if not value:
        return "", None
    media, *params = value.split(";")
    charset = None
    for param in params:
        name, _, raw = param.partition("=")
        if name.strip().lower() == "charset" and raw.strip():
            charset = raw.strip().strip('"').strip("'")
    return media.strip().lower(), charset


def decode_base64(data: str) -> bytes:
    """Strict base64, tolerating the line breaks some servers insert.

    >>> decode_base64("aGVs\\nbG8=")
    b'hello'
    """
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UnsupportedContent("attachment data is not valid base64") from exc


def ensure_supported(content_type: str | None) -> tuple[str, str]:
    """The media type and the Python codec to decode it with; raises when chartbrief cannot read it.

    >>> ensure_supported("text/markdown; charset=latin-1")
    ('text/markdown', 'iso8859-1')
    >>> ensure_supported("text/plain; charset=klingon")
    Traceback (most recent call last):
    ...
    fhir_adapters.text.UnsupportedContent: unknown charset klingon
    >>> ensure_supported("text/plain; charset=zlib")
    Traceback (most recent call last):
    ...
    fhir_adapters.text.UnsupportedContent: charset zlib is not a text encoding
    """
    media, charset = parse_content_type(content_type)
    if not media:
        raise UnsupportedContent("missing contentType")
    if media not in SUPPORTED_TYPES:
        raise UnsupportedContent(f"unsupported contentType {media}")
    try:
        info = codecs.lookup(charset or "utf-8")
    except (LookupError, ValueError) as exc:  # ValueError: a name with a NUL in it
        raise UnsupportedContent(f"unknown charset {charset}") from exc
    # Python also names bytes-to-bytes transforms codecs (zlib, base64, hex): bytes.decode raises
    # LookupError on them, and a note would be inflated or mangled rather than read.
    if not getattr(info, "_is_text_encoding", True):
        raise UnsupportedContent(f"charset {charset} is not a text encoding")
    codec = info.name
    # utf-8-sig drops a byte-order mark that would otherwise start the first line.
    return media, "utf-8-sig" if codec == "utf-8" else codec


def decode_text(content: bytes, content_type: str | None) -> str:
    """Readable text of an attachment: its charset honoured (UTF-8 when none), HTML stripped.

    >>> decode_text("caf\\u00e9".encode("latin-1"), "text/plain; charset=iso-8859-1")
    'café'
    >>> decode_text(b"<p>a</p><script>x()</script><p>b</p>", "text/html")
    'a\\nb'
    >>> decode_text(b"%PDF", "application/pdf")
    Traceback (most recent call last):
    ...
    fhir_adapters.text.UnsupportedContent: unsupported contentType application/pdf
    >>> decode_text(b"abc", "text/plain; charset=idna")
    Traceback (most recent call last):
    ...
    fhir_adapters.text.UnsupportedContent: charset idna cannot decode this attachment
    """
    media, encoding = ensure_supported(content_type)
    # A few undecodable bytes should not cost the whole note; they become U+FFFD. A codec meant for
    # something else (idna, punycode: host names) refuses the "replace" handler or the input itself.
    try:
        text = content.decode(encoding, errors="replace")
    except (UnicodeError, ValueError, TypeError) as exc:
        raise UnsupportedContent(f"charset {encoding} cannot decode this attachment") from exc
    if media in (HTML, "application/xhtml+xml"):
        text = html_to_text(text)
    return tidy_text(text)


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden_depth = 0
        self._pre_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:  # noqa: ARG002
        if tag in _HIDDEN_TAGS:
            self._hidden_depth += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")
            if tag == "pre":
                self._pre_depth += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:  # noqa: ARG002
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _HIDDEN_TAGS:
            self._hidden_depth = max(0, self._hidden_depth - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")
            if tag == "pre":
                self._pre_depth = max(0, self._pre_depth - 1)

    def handle_data(self, data: str) -> None:
        if self._hidden_depth:
            return
        # Outside <pre>, HTML collapses whitespace: source line breaks are not the reader's.
        self.parts.append(data if self._pre_depth else re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    """Visible text of an HTML document, one line per block element; script and style dropped.

    >>> html_to_text("<html><head><style>p{}</style></head><body><h1>Plan</h1><p>Start"
    ...              " <b>metformin</b> &amp;\\n  diet.</p><ul><li>A1c</li><li>BMP</li></ul></body></html>")
    'Plan\\nStart metformin & diet.\\nA1c\\nBMP'
    """
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    lines = (line.strip() for line in "".join(parser.parts).split("\n"))
    return "\n".join(line for line in lines if line)


def tidy_text(text: str) -> str:
    """Trim each line's trailing spaces and the text's ends; at most one blank line in a row.

    >>> tidy_text("  a  \\r\\n\\n\\n\\n b\\n")
    'a\\n\\n b'
    """
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    joined = "\n".join(lines).strip()
    return re.sub(r"\n{3,}", "\n\n", joined)


def whitespace_normalized(text: str) -> str:
    """Single spaces between words: two copies of one note differ only in whitespace.

    >>> whitespace_normalized(" a\\n\\n b\\tc ")
    'a b c'
    """
    return " ".join(text.split())


def text_sha256(text: str) -> str:
    """sha256 (hex) of the whitespace-normalized text, the de-duplication key of a note."""
    return hashlib.sha256(whitespace_normalized(text).encode("utf-8")).hexdigest()
