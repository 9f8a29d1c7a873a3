"""HTML bodies made harmless, and the rewrites applied when one is shown.

:func:`html_sanitize` runs at parse time (nh3, an allow-list sanitizer built on html5ever):
no scripts, styles blocks, forms, frames, SVG, meta refresh or event handlers; ``style``
attributes keep only presentational properties (no ``url()``, no ``expression()``); links
only http/https/mailto. Remote images are not loaded: their ``src`` moves to
``data-remote-src`` until a viewer opts in (:func:`html_render`), and ``cid:`` URLs
(RFC 2392) stay in place until :func:`html_render` points them at our attachment URLs.
"""

from __future__ import annotations

import html as html_lib
import logging
import re
from collections.abc import Callable, Mapping
from html.parser import HTMLParser

import nh3

logger = logging.getLogger(__name__)

_TAGS = {
    "a", "abbr", "b", "blockquote", "br", "caption", "center", "code", "col", "colgroup", "dd", "del", "div",
    "dl", "dt", "em", "font", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "img", "ins", "li", "ol", "p",
    "pre", "q", "s", "small", "span", "strike", "strong", "sub", "sup", "table", "tbody", "td", "tfoot", "th",
    "thead", "tr", "u", "ul",
}  # fmt: skip
_COMMON = {"align", "valign", "width", "height", "dir", "title", "style", "bgcolor", "border", "colspan", "rowspan"}
_ATTRIBUTES = {
    "*": _COMMON,
    "a": {"href", "name"},
    "img": {"src", "alt"},
    "font": {"color", "face", "size"},
    "table": {"cellpadding", "cellspacing"},
}
# Presentational CSS only; nothing that takes a URL (background-image, content, behavior).
_STYLE_PROPERTIES = {
    "color", "background-color", "font", "font-family", "font-size", "font-style", "font-weight", "line-height",
    "text-align", "text-decoration", "text-transform", "letter-spacing", "white-space", "vertical-align",
    "margin", "margin-top", "margin-right", "margin-bottom", "margin-left", "padding", "padding-top",
    "padding-right", "padding-bottom", "padding-left", "border", "border-top", "border-right", "border-bottom",
    "border-left", "border-color", "border-style", "border-width", "border-collapse", "border-radius", "width",
    "height", "max-width", "min-width", "display",
}  # fmt: skip
_URL_SCHEMES = {"http", "https", "mailto", "cid"}
_REMOTE_SRC = re.compile(r'(<img\b[^>]*?)\ssrc="(https?://[^"]*)"', re.IGNORECASE)
_BLOCKED_SRC = re.compile(r'(<img\b[^>]*?)\sdata-remote-src="([^"]*)"', re.IGNORECASE)
_CID_SRC = re.compile(r'\s(src|href)="cid:([^"]*)"', re.IGNORECASE)


def _attribute_filter(element: str, attribute: str, value: str) -> str | None:
    if attribute == "href" and value.lower().startswith("cid:"):
        return None  # cid: is for embedded images only
    if attribute == "style" and re.search(r"url\s*\(|expression\s*\(|javascript:|@import", value, re.IGNORECASE):
        return None
    return value


def html_sanitize(raw_html: str) -> str:
    """Sanitize an HTML body for storage; remote images blocked (see the module docstring)."""
    cleaned = nh3.clean(
        raw_html,
        tags=_TAGS,
        clean_content_tags={"script", "style", "title", "head", "textarea", "select", "svg", "math", "noscript"},
        attributes=_ATTRIBUTES,
        attribute_filter=_attribute_filter,
        url_schemes=_URL_SCHEMES,
        link_rel="noopener noreferrer nofollow",
        strip_comments=True,
        filter_style_properties=_STYLE_PROPERTIES,
    )
    return _REMOTE_SRC.sub(r'\1 data-remote-src="\2"', cleaned)


def html_render(stored_html: str, *, cid_url: Callable[[str], str | None], remote_images: bool = False) -> str:
    """The stored HTML as shown: ``cid:`` pointed at our URLs, remote images on request.

    ``cid_url`` maps a Content-ID to a (signed, short-lived) URL; an unknown one loses its src.
    """

    def _cid(match: re.Match[str]) -> str:
        url = cid_url(html_lib.unescape(match.group(2)).strip().strip("<>"))
        return f' {match.group(1)}="{html_lib.escape(url, quote=True)}"' if url else ""

    rendered = _CID_SRC.sub(_cid, stored_html)
    if remote_images:
        rendered = _BLOCKED_SRC.sub(r'\1 src="\2"', rendered)
    return rendered


class _TextExtractor(HTMLParser):
    _BLOCK = {"p", "div", "br", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "blockquote", "hr"}
    _SKIP = {"script", "style", "head", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.anchors: list[tuple[str, str]] = []
        self._skip = 0
        self._href: str | None = None
        self._anchor_text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skip += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")
        if tag == "a":
            self._href = dict(attrs).get("href") or None
            self._anchor_text = []

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self._skip:
            self._skip -= 1
        elif tag in self._BLOCK:
            self.parts.append("\n")
        if tag == "a" and self._href is not None:
            self.anchors.append((self._href, " ".join("".join(self._anchor_text).split())))
            self._href = None

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        self.parts.append(data)
        if self._href is not None:
            self._anchor_text.append(data)


def _extract(raw_html: str) -> _TextExtractor:
    extractor = _TextExtractor()
    try:
        extractor.feed(raw_html)
        extractor.close()
    except Exception as exc:  # html.parser is lenient; anything it still rejects yields what it read
        extractor.parts.append("")
        logger.debug("HTML text extraction stopped early: %s", type(exc).__name__)
    return extractor


def html_to_text(raw_html: str) -> str:
    """A plain-text rendering of an HTML body, for messages that have no text part."""
    text = "".join(_extract(raw_html).parts)
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def html_anchors(raw_html: str) -> list[tuple[str, str]]:
    """(href, anchor text) of every link in an HTML body, in document order."""
    return _extract(raw_html).anchors


def cid_map(attachments: Mapping[str, str]) -> Callable[[str], str | None]:
    return lambda content_id: attachments.get(content_id)
