"""How long parsing deeply nested HTML takes, against an ordinary HTML message in the same run.

    .venv/bin/python bench/parse_nested_html.py [--times 100000] [--rounds 3]

The test suite checks that the work handed to the HTML tree builder is bounded
(mailboxes/tests/test_parse.py, test_it_bounds_the_work_of_deeply_nested_html); the seconds
it takes live here, since a wall-clock limit in a test fails on a loaded machine. Each shape
is ``--times`` repetitions in a text/html body, parsed by ``message_bytes_parse`` (MIME walk,
the depth bound, nh3, text extraction, codes and links), no database. The reference is a
10 KiB newsletter-like HTML message. Prints the best and the median of ``--rounds`` per shape,
and this process's CPU seconds (user+sys) for the best round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    "nested-div": ("<div>", "x", "</div>"),
    "unclosed-blockquote": ("<blockquote>", "x", ""),
    "comment-hidden-ends": ("<div><!--</div>-->", "x", ""),
    "ignored-ends": ("<span><div></span>", "x", ""),
}


def message(body: str) -> bytes:
    return (
        "From: a@sender.example\r\nTo: inbox@acme.example.test\r\nSubject: deep\r\n"
        "Content-Type: text/html; charset=utf-8\r\n\r\n" + body
    ).encode()


def reference_body() -> str:
    row = '<tr><td><a href="https://shop.example/item/{0}">Item {0}</a></td><td><p>Only <b>{0}</b> left</p></td></tr>'
    rows = []
    while sum(map(len, rows)) < 10 * 1024:
        rows.append(row.format(len(rows)))
    return "<html><body><table>" + "".join(rows) + "</table><p>Your code is 482913.</p></body></html>"


def measure(raw: bytes, rounds: int) -> tuple[float, float, float]:
    from mailboxes.parse import message_bytes_parse

    walls, cpus = [], []
    for _ in range(rounds):
        cpu, wall = time.process_time(), time.perf_counter()
        message_bytes_parse(raw)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    best = min(range(rounds), key=walls.__getitem__)
    return walls[best], statistics.median(walls), cpus[best]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--times", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mailplatform.settings")
    import django

    django.setup()
    print(f"load average {os.getloadavg()[0]:.1f}; {options.times} repetitions, best of {options.rounds}")
    cases = {"reference (10 KiB HTML)": message(reference_body())}
    for name, (opening, middle, closing) in SHAPES.items():
        cases[name] = message(opening * options.times + middle + closing * options.times)
    for name, raw in cases.items():
        best, median, cpu = measure(raw, options.rounds)
        print(f"{name:26} {len(raw) / 1024:9.0f} KiB  best {best * 1000:8.1f} ms  median {median * 1000:8.1f} ms"
              f"  cpu {cpu * 1000:8.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
