"""No remote reference survives into the API's ``html``: every way HTML can make a reader fetch.

Each payload goes through the real path (stored, parsed, indexed, read back from
``/api/v1/messages/{id}/``). A remote image is kept only as ``data-remote-src`` (blocked until
the reader asks, as the web view's "Load images" does); everything else that could load
from ``evil.example`` is gone. Embedded images (``cid:`` and raster ``data:``) keep working.
"""

from __future__ import annotations

import re

import pytest

from mailboxes.tests.helpers import message_deliver

PAYLOADS = {
    "protocol-relative img": '<img src="//evil.example/p.gif">',
    "backslash img": '<img src="\\\\evil.example/p.gif">',
    "slash-backslash img": '<img src="/\\evil.example/p.gif">',
    "spaced img": '<img src="  https://evil.example/p.gif ">',
    "tab in scheme": '<img src="ht&#9;tps://evil.example/p.gif">',
    "upper-case scheme": '<img src="HTTPS://evil.example/p.gif">',
    "entity-encoded img": '<img src="https:&#x2f;&#x2f;evil.example/p.gif">',
    "srcset": '<img srcset="https://evil.example/a.png 1x, //evil.example/b.png 2x">',
    "lowsrc dynsrc": '<img lowsrc="https://evil.example/l.gif" dynsrc="https://evil.example/d.avi">',
    "style url": '<div style="background-image: url(https://evil.example/bg.png)">x</div>',
    "style protocol-relative url": "<div style=\"background:url('//evil.example/bg.png')\">x</div>",
    "style escaped url": '<div style="background: u\\72l(https://evil.example/bg.png)">x</div>',
    "style image-set": "<div style=\"background-image: image-set('https://evil.example/a.png' 1x)\">x</div>",
    "style border-image": '<div style="border-image: url(https://evil.example/b.png) 30">x</div>',
    "style element url": "<style>body { background: url(https://evil.example/s.png) }</style><p>x</p>",
    "style import": '<style>@import "https://evil.example/i.css";</style><p>x</p>',
    "style import url": "<style>@import url(//evil.example/i.css);</style><p>x</p>",
    "body background": '<body background="https://evil.example/b.png"><p>x</p></body>',
    "table background": '<table background="//evil.example/t.png"><tr><td background="https://evil.example/c.png">x</td></tr></table>',
    "video poster and src": '<video poster="https://evil.example/p.png" src="https://evil.example/v.mp4"></video>',
    "audio src": '<audio src="//evil.example/a.mp3"></audio>',
    "source src and srcset": (
        '<picture><source srcset="https://evil.example/s.webp"><source src="//evil.example/s.mp4"></picture>'
    ),
    "link stylesheet": '<link rel="stylesheet" href="https://evil.example/l.css"><p>x</p>',
    "link prefetch": '<link rel="prefetch" href="//evil.example/pf">',
    "input image": '<input type="image" src="https://evil.example/i.png">',
    "svg image xlink": '<svg><image xlink:href="https://evil.example/x.png"/></svg>',
    "svg image href": '<svg><image href="//evil.example/x.png"/></svg>',
    "svg use": '<svg><use href="https://evil.example/sprite.svg#a"/></svg>',
    "object data": '<object data="https://evil.example/o.swf"></object>',
    "embed src": '<embed src="//evil.example/e.swf">',
    "iframe": '<iframe src="https://evil.example/f.html"></iframe>',
    "frame": '<frameset><frame src="https://evil.example/f.html"></frameset>',
    "meta refresh": '<meta http-equiv="refresh" content="0;url=https://evil.example/r">',
    "base href": '<base href="https://evil.example/"><img src="p.gif">',
    "bgsound": '<bgsound src="https://evil.example/s.wav">',
    "svg data image": "<img src=\"data:image/svg+xml,<svg xmlns='http://www.w3.org/2000/svg'><image href='https://evil.example/x'/></svg>\">",
    "data html in img": '<img src="data:text/html,<img src=https://evil.example/x>">',
    "background attribute on td": '<td background="https://evil.example/td.png">x</td>',
    "noscript img": '<noscript><img src="//evil.example/n.gif"></noscript>',
}
_BLOCKED = re.compile(r'\sdata-remote-src="[^"]*"')


def _api_html(world, html: str) -> str:
    raw = (
        "From: Sender <sender@sender.example>\r\nTo: inbox@acme.example.test\r\nSubject: remote content\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        f"<html><body><p>before</p>{html}<p>after</p></body></html>\r\n"
    ).encode()
    message = message_deliver(world.mailbox, raw)
    response = world.client(world.owner_key).get(f"/api/v1/messages/{message.pk}/")
    assert response.status_code == 200, response.content
    return str(response.json()["html"])


@pytest.mark.parametrize("payload", list(PAYLOADS.values()), ids=list(PAYLOADS))
def test_it_leaves_no_remote_reference_in_the_api_html(world, payload):
    html = _api_html(world, payload)
    assert "evil.example" not in _BLOCKED.sub("", html), html
    assert "before" in html and "after" in html


def test_it_blocks_protocol_relative_images_until_asked(world):
    html = _api_html(world, '<img src="//evil.example/p.gif" alt="pixel">')
    assert 'data-remote-src="https://evil.example/p.gif"' in html
    assert " src=" not in html
    raw = "From: s@sender.example\r\nSubject: x\r\nContent-Type: text/html\r\n\r\n<img src='//evil.example/p.gif'>"
    message = message_deliver(world.mailbox, raw.encode())
    opted_in = world.client(world.owner_key).get(f"/api/v1/messages/{message.pk}/?remote_images=1").json()["html"]
    assert 'src="https://evil.example/p.gif"' in opted_in


def test_it_keeps_embedded_cid_and_raster_data_images(world):
    pixel = (
        "data:image/png;base64,"
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    )
    html = _api_html(world, f'<img src="{pixel}" alt="dot"><a href="https://ok.example/">ok</a>')
    assert f'src="{pixel}"' in html
    assert 'href="https://ok.example/"' in html
