"""Re-create bluelm_quant/texts/*.txt from the Debian Reference packages.

The bundled calibration and held-out texts are the prose paragraphs of the Debian
Reference (Osamu Aoki et al., GPL-2+), English original and Simplified Chinese
translation, as shipped by Debian bookworm in `debian-reference-en` and
`debian-reference-zh-cn` version 2.100. Only `<p>` text outside tables and `<pre>`
blocks is kept, so command listings and tables do not dominate the token stream.

Calibration and held-out texts come from different chapters (HELDOUT_CHAPTERS), and
any paragraph that also occurs in the calibration text (repeated notes, cross
references) is dropped from the held-out text, so the two never overlap.

Usage (Debian or Ubuntu with the bookworm archive; run as a user that may call apt-get):

    python tools/build_texts.py                    # apt-get download into a temp dir
    python tools/build_texts.py --deb-dir DIR      # use .deb files already in DIR
    python tools/build_texts.py --check            # rebuild in memory, compare to bundled

It prints the sha256 of every file; bluelm_quant/texts/SOURCES.md lists the expected ones.
"""
from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

VERSION = "2.100"
PACKAGES = {"en": "debian-reference-en", "zh": "debian-reference-zh-cn"}
HTML_SUFFIX = {"en": ".en.html", "zh": ".zh-cn.html"}
HTML_DIR = "usr/share/debian-reference"
# Chapter 9 "System tips" and 10 "Data management": ~60 KB of prose per language.
HELDOUT_CHAPTERS = ("ch09", "ch10")
CALIB_CHAPTERS = ("pr01", "ch01", "ch02", "ch03", "ch04", "ch05", "ch06", "ch07",
                  "ch08", "ch11", "ch12")
OUT_DIR = Path(__file__).resolve().parent.parent / "bluelm_quant" / "texts"
# GPL-2 section 1: the texts travel with a copy of the license (Debian's base-files copy).
GPL2 = Path("/usr/share/common-licenses/GPL-2")
GPL2_NAME = "LICENSE-GPL-2.txt"

_SKIP_TAGS = {"table", "pre", "script", "style"}
# Captions and cross references carry no prose: "Table 3.1. List of ...", "表 3.1. ...",
# "Section 3.1.1, “...”", "第 3.1.1 节 “...”".
_CAPTION = re.compile(r"^(Table|表|Figure|图|Example|例) ?\d+(\.\d+)*\.? |^Section \d|^第 ?[\d.]+ ?节")
_CJK = re.compile(r"[\u3400-\u9fff]")


class _ParagraphParser(HTMLParser):
    """Collects the text of each top-level <p> that is not inside a table or <pre>."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.skip_depth = 0
        self.p_depth = 0
        self.buf: list[str] = []
        self.paragraphs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP_TAGS:
            self.skip_depth += 1
        elif tag == "p":
            if self.p_depth == 0:
                self.buf = []
            self.p_depth += 1

    def handle_endtag(self, tag):
        if tag in _SKIP_TAGS:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag == "p" and self.p_depth:
            self.p_depth -= 1
            if self.p_depth == 0 and self.skip_depth == 0:
                text = re.sub(r"\s+", " ", "".join(self.buf)).strip()
                if text:
                    self.paragraphs.append(text)

    def handle_data(self, data):
        if self.p_depth and not self.skip_depth:
            self.buf.append(data)


def _is_prose(text: str, lang: str) -> bool:
    if _CAPTION.match(text) or text in ("Table of Contents", "目录"):
        return False
    if lang == "en":
        return len(re.findall(r"[A-Za-z]+", text)) >= 6
    # Untranslated strings fall back to English in the zh-cn build: require real Chinese.
    cjk = len(_CJK.findall(text))
    return cjk >= 10 and cjk >= 0.3 * len(text.replace(" ", ""))


def paragraphs(html_dir: Path, lang: str, chapters) -> list[str]:
    out = []
    for chapter in chapters:
        path = html_dir / f"{chapter}{HTML_SUFFIX[lang]}"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: is this {PACKAGES[lang]} {VERSION}?")
        parser = _ParagraphParser()
        parser.feed(path.read_text(encoding="utf-8"))
        out.extend(p for p in parser.paragraphs if _is_prose(p, lang))
    return out


def _dedupe(paras, seen: set) -> list[str]:
    out = []
    for p in paras:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def build(html_dir: Path) -> dict[str, str]:
    """Returns {file name: text} for the four bundled files."""
    files = {}
    for lang in ("en", "zh"):
        seen: set = set()
        calib = _dedupe(paragraphs(html_dir, lang, CALIB_CHAPTERS), seen)
        heldout = _dedupe(paragraphs(html_dir, lang, HELDOUT_CHAPTERS), seen)
        files[f"calib_{lang}.txt"] = "\n\n".join(calib) + "\n"
        files[f"heldout_{lang}.txt"] = "\n\n".join(heldout) + "\n"
    if not GPL2.is_file():
        raise FileNotFoundError(f"{GPL2} is missing (Debian package base-files)")
    files[GPL2_NAME] = GPL2.read_text(encoding="utf-8")
    return files


def _extract_debs(deb_dir: Path, dest: Path) -> Path:
    for lang, pkg in PACKAGES.items():
        debs = sorted(deb_dir.glob(f"{pkg}_{VERSION}_*.deb"))
        if not debs:
            raise FileNotFoundError(
                f"no {pkg}_{VERSION}_*.deb in {deb_dir}; run "
                f"`apt-get download {pkg}={VERSION}` there (after `apt-get update`)"
            )
        subprocess.run(["dpkg", "-x", str(debs[0]), str(dest)], check=True)
    return dest / HTML_DIR


def _download(dest: Path) -> None:
    for pkg in PACKAGES.values():
        try:
            subprocess.run(["apt-get", "download", f"{pkg}={VERSION}"], cwd=dest, check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise SystemExit(
                f"apt-get download {pkg}={VERSION} failed ({e}). Run `apt-get update` first, "
                f"or download the .deb by hand and pass --deb-dir"
            ) from e


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deb-dir", type=Path, help="directory holding the two .deb files")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--check", action="store_true",
                    help="do not write; exit 1 if the bundled files differ from a rebuild")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        deb_dir = args.deb_dir
        if deb_dir is None:
            deb_dir = tmp / "debs"
            deb_dir.mkdir()
            _download(deb_dir)
        files = build(_extract_debs(deb_dir, tmp / "root"))
    status = 0
    for name, text in files.items():
        data = text.encode("utf-8")
        path = args.out / name
        if args.check:
            same = path.is_file() and path.read_bytes() == data
            status |= not same
            print(f"{name}: {'same' if same else 'DIFFERS'}")
        else:
            path.write_bytes(data)
        print(f"{name}: {len(data)} bytes sha256 {hashlib.sha256(data).hexdigest()}")
    return status


if __name__ == "__main__":
    sys.exit(main())
