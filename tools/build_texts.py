"""Re-create bluelm_quant/texts/*.txt from Debian documentation packages.

The bundled calibration and held-out texts are the prose paragraphs of the Debian
Reference (Osamu Aoki et al., GPL-2+), English original and Simplified Chinese
translation, as shipped by Debian bookworm in `debian-reference-en` and
`debian-reference-zh-cn` version 2.100. Only `<p>` text outside tables and `<pre>`
blocks is kept, so command listings and tables do not dominate the token stream.

Calibration and held-out texts come from different chapters (HELDOUT_CHAPTERS), and
any paragraph that also occurs in the calibration text (repeated notes, cross
references) is dropped from the held-out text, so the two never overlap.

The out-of-domain evaluation texts (eval_<source>_<lang>.txt) and the extra calibration
texts (calib_<source>_<lang>.txt) come from other packages (documentation, and the story
text of a game's campaigns), listed with their extraction
rules in tools/text_sources.py. Every paragraph is written at most once over all files
(Debian Reference first, then text_sources.SOURCES in order), so no two files share a
paragraph. The hand-written calib_chat_*.jsonl files are not built here.

Usage (Debian or Ubuntu with the bookworm archive; run as a user that may call apt-get):

    python tools/build_texts.py                    # apt-get download into a temp dir
    python tools/build_texts.py --deb-dir DIR      # use .deb files already in DIR
                                                   # (apt-get download PKG=VERSION for each
                                                   # package that --list-packages prints)
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

import text_sources  # beside this script: `python tools/build_texts.py` puts tools/ on sys.path

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
# CC BY-SA 3.0 section 4(a): GNOME Help extracts travel with the license text, taken from
# the "License: CC-BY-SA-3.0" paragraph of gnome-user-docs' copyright file.
CC_BY_SA_NAME = "LICENSE-CC-BY-SA-3.0.txt"
CC_BY_SA_FROM = ("gnome-user-docs", "usr/share/doc/gnome-user-docs/copyright")
# The Debian FAQ's own notice must be preserved on all copies: its copyright file, verbatim.
FAQ_NOTICE_NAME = "LICENSE-debian-faq.txt"
FAQ_NOTICE_FROM = ("debian-faq", "usr/share/doc/debian-faq/copyright")

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


def build(roots: dict[str, Path]) -> dict[str, str]:
    """Returns {file name: text} for every built file; `roots`: package -> extracted root."""
    files = {}
    seen = {}
    for lang in ("en", "zh"):
        html_dir = roots[PACKAGES[lang]] / HTML_DIR
        seen[lang] = set()
        calib = _dedupe(paragraphs(html_dir, lang, CALIB_CHAPTERS), seen[lang])
        heldout = _dedupe(paragraphs(html_dir, lang, HELDOUT_CHAPTERS), seen[lang])
        files[f"calib_{lang}.txt"] = "\n\n".join(calib) + "\n"
        files[f"heldout_{lang}.txt"] = "\n\n".join(heldout) + "\n"
    if not GPL2.is_file():
        raise FileNotFoundError(f"{GPL2} is missing (Debian package base-files)")
    files[GPL2_NAME] = GPL2.read_text(encoding="utf-8")
    for source in text_sources.SOURCES:
        for lang, pkg_text in source.langs.items():
            pages = pkg_text.extract(roots, lang)
            files[source.file_name(lang)] = _within_budget(pages, seen[lang], source.budget)
    files[CC_BY_SA_NAME] = _copyright_license(roots[CC_BY_SA_FROM[0]] / CC_BY_SA_FROM[1], "CC-BY-SA-3.0")
    files[FAQ_NOTICE_NAME] = (roots[FAQ_NOTICE_FROM[0]] / FAQ_NOTICE_FROM[1]).read_text(encoding="utf-8")
    return files


def _within_budget(pages: list[list[str]], seen: set, budget: int) -> str:
    """Unseen paragraphs, page after page, while the file stays under `budget` bytes."""
    out, size = [], 0
    for page in pages:
        for p in page:
            if p in seen:
                continue
            size += len(p.encode("utf-8")) + 2
            if size > budget:
                return "\n\n".join(out) + "\n"
            seen.add(p)  # only what is written: later files may still use the rest
            out.append(p)
    return "\n\n".join(out) + "\n"


def _copyright_license(path: Path, name: str) -> str:
    """The text of the stand-alone `License: name` paragraph of a machine-readable
    debian/copyright file, unwrapped (one leading space removed, " ." = empty line)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        # The stand-alone paragraph is the one whose License line is followed by text.
        if line.strip() == f"License: {name}" and i + 1 < len(lines) and lines[i + 1].startswith(" "):
            body = []
            for text in lines[i + 1:]:
                if not text.startswith(" "):
                    break
                body.append("" if text.strip() == "." else text[1:])
            return "\n".join(body).rstrip() + "\n"
    raise ValueError(f"{path} has no stand-alone 'License: {name}' paragraph")


def _all_packages() -> list[tuple[str, str]]:
    return sorted({(pkg, VERSION) for pkg in PACKAGES.values()} | text_sources.packages())


def _extract_debs(deb_dir: Path, dest: Path) -> dict[str, Path]:
    roots = {}
    for pkg, version in _all_packages():
        # A Debian version may carry an epoch ("1:2.3"), which file names spell "1%3a2.3".
        debs = sorted(deb_dir.glob(f"{pkg}_{version.replace(':', '%3a')}_*.deb"))
        if not debs:
            raise FileNotFoundError(
                f"no {pkg}_{version}_*.deb in {deb_dir}; run "
                f"`apt-get download {pkg}={version}` there (after `apt-get update`)"
            )
        roots[pkg] = dest / pkg
        roots[pkg].mkdir(parents=True)
        subprocess.run(["dpkg", "-x", str(debs[0]), str(roots[pkg])], check=True)
    return roots


def _download(dest: Path) -> None:
    for pkg, version in _all_packages():
        try:
            subprocess.run(["apt-get", "download", f"{pkg}={version}"], cwd=dest, check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise SystemExit(
                f"apt-get download {pkg}={version} failed ({e}). Run `apt-get update` first, "
                f"or download the .deb by hand and pass --deb-dir"
            ) from e


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deb-dir", type=Path, help="directory holding the .deb files (see --list-packages)")
    ap.add_argument("--list-packages", action="store_true", help="print the PKG=VERSION list and exit")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--check", action="store_true",
                    help="do not write; exit 1 if the bundled files differ from a rebuild")
    args = ap.parse_args(argv)
    if args.list_packages:
        print(" ".join(f"{pkg}={version}" for pkg, version in _all_packages()))
        return 0
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
