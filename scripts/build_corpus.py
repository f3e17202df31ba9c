#!/usr/bin/env python3
"""Rebuild ``src/twell/data/corpus.jsonl.gz``, the embedded public-domain training corpus.

Sources (all public domain, all from Debian's main archive, so the build needs only ``apt-get``):

* ``bible-kjv-text`` + ``bible-kjv``: the King James Version of the Bible (1611), decoded with the
  package's own ``bible`` program; one document per chapter (1,189 documents, ~4.0 MB).
* ``dict-jargon``: the Jargon File 4.4.7 ("in the public domain, to be freely used, shared, and
  modified"); one document per entry (~2,300 documents, ~1.3 MB).
* ``dict-devil``: Ambrose Bierce, "The Devil's Dictionary" (1911, copyright expired); one document per
  entry (~1,000 documents, ~0.35 MB).

Each line of the output is ``{"text": ..., "source": ...}``. The gzip header carries no timestamp, so
two builds from the same packages are byte-identical.

Usage (as root, or with the .deb files already in ``--debs``)::

    python scripts/build_corpus.py                      # apt-get download into a temp dir
    python scripts/build_corpus.py --debs /path/to/debs # use .deb files already downloaded

``--large OUT.jsonl.gz`` also writes a bigger local training set for reproduction runs (not
committed, not public domain): the embedded corpus plus the Linux 6.1 kernel documentation
(reStructuredText sources, GPL-2.0), the Python 3.11 documentation sources (PSF license) and
GCIDE (the GNU Collaborative International Dictionary of English, GPL-3.0+), ~92 M characters,
~25 MB gzip, about 25 M tokens with the embedded tokenizer. Use it as ``twell train --dataset OUT``.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import io
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

PACKAGES = ("bible-kjv-text", "bible-kjv", "dict-jargon", "dict-devil")
LARGE_PACKAGES = ("linux-doc-6.1", "python3.11-doc", "dict-gcide")
OUT = Path(__file__).resolve().parents[1] / "src" / "twell" / "data" / "corpus.jsonl.gz"
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(s: str) -> int:
    """dictd index numbers are base64 digits, most significant first."""
    v = 0
    for ch in s:
        v = v * 64 + _B64.index(ch)
    return v


def fetch(debs: Path | None, work: Path, packages=PACKAGES) -> Path:
    """Extract the packages' files under ``work/root`` and return that root."""
    if debs is None:
        debs = work / "debs"
        debs.mkdir(exist_ok=True)
        subprocess.run(["apt-get", "download", *packages], cwd=debs, check=True)
    root = work / "root"
    for pkg in packages:
        found = sorted(glob.glob(str(debs / f"{pkg}_*.deb")))
        if not found:
            raise SystemExit(f"--debs: no {pkg}_*.deb in {debs}")
        subprocess.run(["dpkg", "-x", found[-1], str(root)], check=True)
    return root


def kjv_documents(root: Path) -> list[str]:
    """One document per chapter: the heading ("Genesis 1") then the verses, verse numbers dropped."""
    exe = root / "usr" / "bin" / "bible"
    out = subprocess.run(
        [str(exe), "-p", str(root / "usr" / "lib"), "gen1:1-rev22:21"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    docs: list[str] = []
    heading, verses = None, []
    for line in out.splitlines():
        m = re.match(r"^  ?\s*(\d+) (.*)$", line)
        if m and heading is not None:
            verses.append(m.group(2).strip())
        elif re.match(r"^[1-3A-Z][A-Za-z ]* \d+$", line.strip()) and not line.startswith(" "):
            if heading is not None:
                docs.append(heading + "\n\n" + "\n".join(verses))
            heading, verses = line.strip(), []
        elif line.strip() and verses:
            verses[-1] += " " + line.strip()  # a verse wrapped over several lines
    if heading is not None:
        docs.append(heading + "\n\n" + "\n".join(verses))
    return docs


def dict_documents(root: Path, name: str) -> list[str]:
    """Entries of a dictd database (``name.index`` + ``name.dict.dz``), metadata entries skipped."""
    base = root / "usr" / "share" / "dictd"
    with gzip.open(base / f"{name}.dict.dz", "rb") as f:
        data = f.read()
    docs = []
    seen = set()
    for line in (base / f"{name}.index").read_text(encoding="utf-8", errors="replace").splitlines():
        word, off, length = line.split("\t")[:3]
        if word.startswith("00database") or (off, length) in seen:
            continue
        seen.add((off, length))  # several headwords may point at one entry
        text = data[_b64(off) : _b64(off) + _b64(length)].decode("utf-8", errors="replace").strip()
        text = text.replace("{", "").replace("}", "")  # cross-reference markup
        lines = [ln.strip() for ln in text.splitlines()]
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
        if text:
            docs.append(text)
    return docs


def rst_documents(root: Path) -> list[str]:
    """One document per reStructuredText source of the kernel and Python documentation."""
    docs = []
    for pattern in (
        "usr/share/doc/linux-doc-*/html/_sources/**/*.rst.txt",
        "usr/share/doc/python3*/html/**/*.rst.txt",
    ):
        for path in sorted(root.glob(pattern)):
            text = path.read_text(encoding="utf-8", errors="replace")
            text = re.sub(r"^\.\. SPDX-License-Identifier:.*\n", "", text).strip()
            if len(text) > 200:
                docs.append(text)
    return docs


def gcide_documents(root: Path) -> list[str]:
    """GCIDE entries, the ``[1913 Webster]``-style provenance lines dropped."""
    docs = dict_documents(root, "gcide")
    tag = re.compile(r"^\[[^\]]*\]$", re.M)
    return [re.sub(r"\n{3,}", "\n\n", tag.sub("", d)).strip() for d in docs]


def write_jsonl_gz(parts: list[tuple[str, list[str]]], out: Path) -> None:
    buf = io.BytesIO()
    n_chars = 0
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as gz:
        for source, docs in parts:
            for text in docs:
                gz.write((json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n").encode())
                n_chars += len(text)
    os.makedirs(out.parent, exist_ok=True)
    out.write_bytes(buf.getvalue())
    for source, docs in parts:
        print(f"{source}: {len(docs)} documents, {sum(len(d) for d in docs) / 1e6:.2f} M characters")
    print(f"wrote {out} ({len(buf.getvalue()) / 1e6:.2f} MB gzip, {n_chars / 1e6:.2f} M characters)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--debs", type=Path, default=None, help="folder holding the .deb files (default: apt-get download)"
    )
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument(
        "--large", type=Path, default=None, help="also write the bigger (non-PD) local training set here"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = fetch(args.debs, Path(tmp))
        parts = [
            ("kjv-bible", kjv_documents(root)),
            ("jargon-file-4.4.7", dict_documents(root, "jargon")),
            ("devils-dictionary", dict_documents(root, "devil")),
        ]
        write_jsonl_gz(parts, args.out)
        if args.large is not None:
            root = fetch(args.debs, Path(tmp), LARGE_PACKAGES)
            big = [
                ("linux-and-python-docs", rst_documents(root)),
                ("gcide", gcide_documents(root)),
            ]
            write_jsonl_gz(parts + big, args.large)


if __name__ == "__main__":
    main()
