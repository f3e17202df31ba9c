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
OUT = Path(__file__).resolve().parents[1] / "src" / "twell" / "data" / "corpus.jsonl.gz"
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(s: str) -> int:
    """dictd index numbers are base64 digits, most significant first."""
    v = 0
    for ch in s:
        v = v * 64 + _B64.index(ch)
    return v


def fetch(debs: Path | None, work: Path) -> Path:
    """Extract the packages' files under ``work/root`` and return that root."""
    if debs is None:
        debs = work / "debs"
        debs.mkdir()
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=debs, check=True)
    root = work / "root"
    for pkg in PACKAGES:
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
    for line in (base / f"{name}.index").read_text(encoding="utf-8").splitlines():
        word, off, length = line.split("\t")
        if word.startswith("00database"):
            continue
        text = data[_b64(off) : _b64(off) + _b64(length)].decode("utf-8").strip()
        text = text.replace("{", "").replace("}", "")  # cross-reference markup
        lines = [ln.strip() for ln in text.splitlines()]
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
        if text:
            docs.append(text)
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--debs", type=Path, default=None, help="folder holding the .deb files (default: apt-get download)"
    )
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = fetch(args.debs, Path(tmp))
        parts = [
            ("kjv-bible", kjv_documents(root)),
            ("jargon-file-4.4.7", dict_documents(root, "jargon")),
            ("devils-dictionary", dict_documents(root, "devil")),
        ]
    buf = io.BytesIO()
    n_chars = 0
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as gz:
        for source, docs in parts:
            for text in docs:
                gz.write((json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n").encode())
                n_chars += len(text)
    os.makedirs(args.out.parent, exist_ok=True)
    args.out.write_bytes(buf.getvalue())
    for source, docs in parts:
        print(f"{source}: {len(docs)} documents, {sum(len(d) for d in docs) / 1e6:.2f} M characters")
    print(f"wrote {args.out} ({len(buf.getvalue()) / 1e6:.2f} MB gzip, {n_chars / 1e6:.2f} M characters)")


if __name__ == "__main__":
    main()
