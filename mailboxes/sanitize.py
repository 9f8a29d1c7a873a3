"""HTML bodies made harmless, and the rewrites applied when one is shown.

:func:`html_sanitize` runs at parse time (nh3, an allow-list sanitizer built on html5ever),
after :func:`html_depth_bound` has unwrapped nesting deep enough to cost html5ever minutes:
no scripts, styles blocks, forms, frames, media, objects, SVG, ``<link>``, meta refresh or
event handlers; ``style`` attributes keep only presentational properties (no ``url()``,
``image-set()``, ``@import``, ``expression()`` or CSS escapes); links only http/https/mailto.
Nothing in the stored HTML loads from elsewhere: a remote image (absolute, scheme-relative
``//host`` or written with backslashes) has its ``src`` moved to ``data-remote-src`` until a
viewer opts in (:func:`html_render`); ``cid:`` URLs (RFC 2392) stay in place until
:func:`html_render` points them at our attachment URLs; raster ``data:`` images stay.
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
_URL_SCHEMES = {"http", "https", "mailto", "cid", "data"}  # data: only for images (_attribute_filter)
_IMG_SRC = re.compile(r'(<img\b[^>]*?)\ssrc="([^"]*)"', re.IGNORECASE)
# Raster images only: an SVG document can itself reference remote resources.
_SAFE_DATA_IMAGE = re.compile(r"data:image/(?:png|gif|jpe?g|webp|bmp|x-icon)[;,]", re.IGNORECASE)
# CSS that can fetch (url(), image-set(), @import) or that hides a word behind an escape (u\72l).
_STYLE_FETCH = re.compile(
    r"\\|(?:url|image|image-set|cross-fade|element|src|expression)\s*\(|javascript:|@import|behavior|binding",
    re.IGNORECASE,
)
_URL_IGNORED = re.compile(r"[\t\n\r]")  # the URL parser drops these anywhere (WHATWG URL, basic URL parser)
_BLOCKED_SRC = re.compile(r'(<img\b[^>]*?)\sdata-remote-src="([^"]*)"', re.IGNORECASE)
_CID_SRC = re.compile(r'\s(src|href)="cid:([^"]*)"', re.IGNORECASE)


def _attribute_filter(element: str, attribute: str, value: str) -> str | None:
    scheme = _URL_IGNORED.sub("", value).strip().lower()
    if attribute == "href" and scheme.startswith(("cid:", "data:")):
        return None  # cid: and data: are for embedded images only
    if attribute == "src" and scheme.startswith("data:") and not _SAFE_DATA_IMAGE.match(scheme):
        return None
    if attribute == "style" and _STYLE_FETCH.search(value):
        return None
    return value


def _remote_url(value: str) -> str | None:
    """The absolute http(s) URL a browser would fetch for an image ``src``, if any.

    Browsers drop tabs and newlines, trim spaces, and read a backslash as a slash
    (WHATWG URL), so ``\\\\host/p.gif`` and `` //host/p.gif`` are remote just as
    ``https://host/p.gif`` is; a scheme-relative URL is shown as https.
    """
    url = _URL_IGNORED.sub("", value).strip().replace("\\", "/")
    if url.startswith("//"):
        return f"https:{url}"
    if re.match(r"https?:", url, re.IGNORECASE):
        return url
    return None


def _image_source(match: re.Match[str]) -> str:
    """An ``<img src>`` as stored: embedded images kept, remote ones blocked, the rest dropped."""
    value = html_lib.unescape(match.group(2))
    lowered = _URL_IGNORED.sub("", value).strip().lower()
    if lowered.startswith("cid:") or _SAFE_DATA_IMAGE.match(lowered):
        return match.group(0)
    remote = _remote_url(value)
    if remote is None:  # relative or unknown: nothing an e-mail can point at
        return match.group(1)
    return f'{match.group(1)} data-remote-src="{html_lib.escape(remote, quote=True)}"'


# Built once: nh3.clean() converts every allow-list into the sanitizer's own sets on each call,
# which cost more than cleaning a short message.
_CLEANER = nh3.Cleaner(
    tags=_TAGS,
    clean_content_tags={"script", "style", "title", "head", "textarea", "select", "svg", "math", "noscript"},
    attributes=_ATTRIBUTES,
    attribute_filter=_attribute_filter,
    url_schemes=_URL_SCHEMES,
    link_rel="noopener noreferrer nofollow",
    strip_comments=True,
    filter_style_properties=_STYLE_PROPERTIES,
)


def html_sanitize(raw_html: str) -> str:
    """Sanitize an HTML body for storage; remote images blocked (see the module docstring)."""
    cleaned = _CLEANER.clean(html_depth_bound(raw_html))
    return _IMG_SRC.sub(_image_source, cleaned)


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


# Markup tokens as the HTML tokenizer (WHATWG HTML section 13.2.5) reads them, bounded so that a
# token that would need more than a few thousand characters is read as text instead.
_TOKEN = re.compile(
    r"<(?:"
    r"(?P<comment>!--)"
    r"|(?P<bogus>[!?]|/(?![A-Za-z]))"
    r"|/(?P<end>[A-Za-z][^\t\n\f\r />]{0,60}+)(?>[^<>]{0,2000})>"
    r"|(?P<start>[A-Za-z][^\t\n\f\r />=<]{0,60}+)"
    r"(?>[\t\n\f\r /]++|[^\t\n\f\r />=<]{1,200}+(?>[\t\n\f\r ]*+=[\t\n\f\r ]*+"
    r"(?>\"[^\"<]{0,4000}+\"|'[^'<]{0,4000}+'|[^\t\n\f\r >\"'<][^\t\n\f\r ><]{0,4000}+))?+"
    r"|=[^\t\n\f\r />=<]{0,200}+){0,200}+>"
    r")"
)
# A tag never holds "<" here (the tokenizer allows it): so a failed match costs no more than
# the distance to the next "<", and the pass stays linear whatever the input.
# Elements whose content the tokenizer does not read as markup (section 13.2.5.2-5): dropped
# whole here, as the sanitizer drops them or their content anyway.
_RAW_TEXT = {"script", "style", "title", "textarea", "xmp", "iframe", "noembed", "noframes", "noscript"}
_VOID = {
    "area", "base", "basefont", "bgsound", "br", "col", "embed", "frame", "hr", "image", "img", "input",
    "keygen", "link", "meta", "param", "source", "track", "wbr",
}  # fmt: skip
# Section 13.2.4.2: the elements that bound "has an element in scope" (and button scope).
_SCOPE = {"applet", "caption", "html", "table", "td", "th", "marquee", "object", "template", "button"}
_TABLE_SCOPE = {"html", "table", "template"}
_SPECIAL = _VOID | _SCOPE | _RAW_TEXT | {
    "address", "article", "aside", "blockquote", "body", "center", "colgroup", "dd", "details", "dir", "div",
    "dl", "dt", "fieldset", "figcaption", "figure", "footer", "form", "frameset", "h1", "h2", "h3", "h4", "h5",
    "h6", "head", "header", "hgroup", "li", "listing", "main", "menu", "nav", "ol", "p", "plaintext", "pre",
    "section", "select", "summary", "tbody", "tfoot", "thead", "tr", "ul",
}  # fmt: skip
# Start tags that close an open <p> (section 13.2.6.4.7, "in body").
_CLOSES_P = {
    "address", "article", "aside", "blockquote", "center", "details", "dialog", "dir", "div", "dl", "fieldset",
    "figcaption", "figure", "footer", "header", "hgroup", "main", "menu", "nav", "ol", "p", "search", "section",
    "summary", "ul", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "listing", "form", "table", "hr", "dd", "dt",
    "li", "plaintext", "xmp",
}  # fmt: skip
# Start tags that end an open element of their own kind (section 13.2.6.4.7 and 13.2.6.4.13-15):
# name -> (the elements they end, the elements the look-up stops at).
_LIST_BARRIER = _SPECIAL - {"address", "div", "p"}
_IMPLIED_END: dict[str, tuple[set[str], set[str]]] = {
    "li": ({"li"}, _LIST_BARRIER),
    "dd": ({"dd", "dt"}, _LIST_BARRIER),
    "dt": ({"dd", "dt"}, _LIST_BARRIER),
    "tr": ({"tr"}, _TABLE_SCOPE),
    "td": ({"td", "th"}, _TABLE_SCOPE | {"tr"}),
    "th": ({"td", "th"}, _TABLE_SCOPE | {"tr"}),
    "option": ({"option"}, _SPECIAL),
}
_TABLE_PARTS = {"table", "caption", "tbody", "thead", "tfoot", "tr", "td", "th"}
MAX_HTML_DEPTH = 128
_P = {"p"}
_FEW_TAGS = 10_000
_LOOKUP = 32  # how far down the stack an implied or explicit close is looked for


def _open_index(stack: list[str], names: set[str], barrier: set[str]) -> int:
    """Where the nearest open element named in ``names`` sits, -1 when a barrier comes first.

    Looking no further than ``_LOOKUP`` elements down keeps every token cheap; an element
    not found stays open, which errs towards deeper, the safe side.
    """
    for position in range(len(stack) - 1, max(-1, len(stack) - 1 - _LOOKUP), -1):
        if stack[position] in names:
            return position
        if stack[position] in barrier:
            return -1
    return -1


def html_depth_bound(raw_html: str, max_depth: int = MAX_HTML_DEPTH) -> str:
    """The HTML with elements nested deeper than ``max_depth`` unwrapped (their text kept).

    html5ever, under nh3, looks up the stack of open elements on every block start tag
    (section 13.2.6.4.7, "close a p element"), so 100,000 nested ``<div>`` cost it minutes.
    This one linear pass tracks that stack the way the tree builder does, erring towards
    deeper: it closes elements only where the tree builder surely closes them. What it does
    not read as markup it escapes, so the tree builder sees exactly the tags counted here;
    comments and raw-text elements (script, style) go, as the sanitizer drops them anyway.
    A document with fewer tags than ``_FEW_TAGS`` costs html5ever little however it nests,
    and is left as it is.
    """
    if raw_html.count("<") <= _FEW_TAGS:
        return raw_html
    out: list[str] = []
    stack: list[str] = []
    open_count: dict[str, int] = {}
    dropped: dict[str, int] = {}
    lowered = raw_html.lower()
    position, length = 0, len(raw_html)

    def close_from(index: int) -> None:
        if index == len(stack) - 1:
            open_count[stack.pop()] -= 1
            return
        for name in stack[index:]:
            open_count[name] -= 1
        del stack[index:]

    def nearest(names: set[str], barrier: set[str]) -> int:
        if stack and stack[-1] in names:  # the common case: closing the current element
            return len(stack) - 1
        for name in names:
            if open_count.get(name):
                return _open_index(stack, names, barrier)
        return -1

    while position < length:
        match = _TOKEN.search(raw_html, position)
        if match is None:
            out.append(raw_html[position:].replace("<", "&lt;"))
            break
        # A "<" that begins no token is text: escaped, so the tree builder reads it as text too.
        out.append(raw_html[position : match.start()].replace("<", "&lt;"))
        position = match.end()
        kind = match.lastgroup or "start"
        if kind == "comment":
            close = raw_html.find("-->", match.start() + 4)
            position = length if close == -1 else close + 3
            continue
        if kind == "bogus":
            close = raw_html.find(">", match.end())
            position = length if close == -1 else close + 1
            continue
        name = lowered[match.start(kind) : match.end(kind)]
        if kind == "end":
            if dropped.get(name):
                dropped[name] -= 1
                continue
            # The scope an end tag looks in (section 13.2.4.2); a non-special element's end
            # tag also stops at any special element ("any other end tag").
            barrier = _TABLE_SCOPE if name in _TABLE_PARTS else _SCOPE if name in _SPECIAL else _SCOPE | _SPECIAL
            index = nearest({name}, barrier - {name})
            if index >= 0:
                close_from(index)
                out.append(match.group(0))
            continue
        if name in _RAW_TEXT or name == "plaintext":
            close = lowered.find(f"</{name}", position) if name != "plaintext" else -1
            close = raw_html.find(">", close) if close != -1 else -1
            position = length if close == -1 else close + 1
            continue
        if name in _VOID:
            out.append(match.group(0))
            continue
        if name in _CLOSES_P:
            index = nearest(_P, _SCOPE)
            if index >= 0:
                close_from(index)
        if name in _IMPLIED_END:
            names, barrier = _IMPLIED_END[name]
            index = nearest(names, barrier)
            if index >= 0:
                close_from(index)
        if len(stack) >= max_depth:
            dropped[name] = dropped.get(name, 0) + 1
            continue
        stack.append(name)
        open_count[name] = open_count.get(name, 0) + 1
        out.append(match.group(0))
    return "".join(out)


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


_FEED_CHUNK = 65_536


def _extract(raw_html: str, *, anchors: int | None = None) -> _TextExtractor:
    """Run the extractor over ``raw_html``; with ``anchors``, stop once that many links are read
    (fed in chunks, so a long document with many links costs no more than its start)."""
    extractor = _TextExtractor()
    try:
        if anchors is None:
            extractor.feed(raw_html)
        else:
            for start in range(0, len(raw_html), _FEED_CHUNK):
                extractor.feed(raw_html[start : start + _FEED_CHUNK])
                if len(extractor.anchors) >= anchors:
                    return extractor
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


def html_anchors(raw_html: str, *, limit: int | None = None) -> list[tuple[str, str]]:
    """(href, anchor text) of every link in an HTML body, in document order; with ``limit``,
    at least the first ``limit`` of them (reading stops soon after)."""
    return _extract(raw_html, anchors=limit).anchors


def cid_map(attachments: Mapping[str, str]) -> Callable[[str], str | None]:
    return lambda content_id: attachments.get(content_id)
