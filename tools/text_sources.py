"""Paragraph extraction for the bundled texts beyond the Debian Reference.

Each source is one or more Debian packages (pinned versions) per language; `extract()`
returns the cleaned prose paragraphs of its pages. tools/build_texts.py decides the
budget and the de-duplication, and writes the files. Three formats:

- HTML (DocBook/Publican output): the text of each `<p>` and `<div class="para">`,
  outside tables, `<pre>` blocks, navigation and tables of contents. A code listing
  inside a paragraph splits it (the text around it is kept, the listing is not).
- Mallard `.page` XML (GNOME help): the text of each `<p>` outside `<info>`, code
  blocks and media. A paragraph holding an empty `<link xref>` (its words come from the
  linked page's title at render time) or an inline icon is dropped rather than kept
  with a hole in it.
- gettext message catalogues (`.mo`, a game's story text): the English original
  (msgid) and its Simplified Chinese translation (msgstr) of each message, cut into
  paragraphs at blank lines. A paragraph pair is kept when the English has >= 30 words
  (narration, letters, speeches: not one-line dialogue) and neither side holds markup
  or a variable the game fills in (`$name`, `<i>`, `{MACRO}`, `[tag]`, `@`, `&`). Both
  languages read the same (zh_CN) catalogues, so the English file holds the originals
  of the passages the Chinese file translates, in the same order.

Cleaning (`clean_paragraphs`): whitespace collapsed, captions and cross references
dropped, English paragraphs need >= 6 words, Chinese ones >= 10 CJK characters and
>= 30% CJK (partial translations leave English strings in the zh pages), and every
paragraph must be >= 60% letters (CJK included) among its non-space characters, which
drops option tables, command fragments and lines of symbols.
"""
from __future__ import annotations

import hashlib
import re
import struct
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

_SKIP_HTML = {"table", "pre", "script", "style"}
# Publican/DocBook wrappers whose text is not prose: navigation, TOCs, index terms.
_SKIP_HTML_CLASSES = {"toc", "navheader", "navfooter", "indexterm", "docnav", "list-of-tables",
                      "list-of-examples", "list-of-figures", "programlisting", "screen", "footnotes",
                      "title"}
_CAPTION = re.compile(r"^(Table|表|Figure|图|Example|例) ?\d+(\.\d+)*\.? |^Section \d|^第 ?[\d.]+ ?节")
_CJK = re.compile(r"[\u3400-\u9fff]")
_WORDISH = re.compile(r"[A-Za-z\u00c0-\u024f\u3400-\u9fff]")


class HtmlParagraphs(HTMLParser):
    """Text of each top-level <p> or <div class="para"> outside skipped elements."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.skip: list[str] = []   # tag names of the open skipped elements
        self.container: str | None = None  # tag of the open paragraph
        self.depth = 0              # nesting of that tag inside the paragraph
        self.buf: list[str] = []
        self.paragraphs: list[str] = []

    def _flush(self):
        text = re.sub(r"\s+", " ", "".join(self.buf)).strip()
        if text:
            self.paragraphs.append(text)
        self.buf = []

    def handle_starttag(self, tag, attrs):
        classes = set((dict(attrs).get("class") or "").split())
        if self.skip:
            if tag == self.skip[-1][0]:
                self.skip.append((tag, False))
            return
        if tag in _SKIP_HTML or classes & _SKIP_HTML_CLASSES:
            if self.container:
                self._flush()  # a listing inside a paragraph ends the text before it
            self.skip.append((tag, True))
            return
        if self.container:
            if tag == self.container:
                self.depth += 1
        elif tag == "p" or (tag == "div" and "para" in classes):
            self.container, self.depth, self.buf = tag, 1, []

    def handle_endtag(self, tag):
        if self.skip:
            if tag == self.skip[-1][0]:
                self.skip.pop()
            return
        if self.container and tag == self.container:
            self.depth -= 1
            if self.depth == 0:
                self._flush()
                self.container = None

    def handle_data(self, data):
        if self.container and not self.skip:
            self.buf.append(data)


def html_paragraphs(path: Path) -> list[str]:
    parser = HtmlParagraphs()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser.paragraphs


_MAL = "{http://projectmallard.org/1.0/}"
# Block elements whose text is not prose; inside a <p>, <code> is inline and kept.
_SKIP_MALLARD = {f"{_MAL}{t}" for t in ("info", "code", "screen", "media", "title", "desc", "synopsis")}
_HOLES = {f"{_MAL}media"}  # an inline icon: "Click the [icon] button" reads badly without it


class _Hole(Exception):
    """The paragraph has text that only the renderer fills in."""


def _mallard_text(el) -> str:
    if el.tag in _HOLES or (el.tag == f"{_MAL}link" and not "".join(el.itertext()).strip()):
        raise _Hole
    if el.tag == f"{_MAL}keyseq":  # Ctrl+Alt+T is written <keyseq><key>Ctrl</key>...
        inner = "+".join("".join(k.itertext()).strip() for k in el)
    else:
        inner = (el.text or "") + "".join(_mallard_text(c) for c in el)
    return inner + (el.tail or "")


def mallard_paragraphs(path: Path) -> list[str]:
    out: list[str] = []

    def walk(el):
        if el.tag in _SKIP_MALLARD:
            return
        if el.tag == f"{_MAL}p":
            try:
                text = (el.text or "") + "".join(_mallard_text(c) for c in el)
            except _Hole:
                return
            text = re.sub(r"\s+", " ", text).strip()
            if text:
                out.append(text)
            return
        for child in el:
            walk(child)

    walk(ET.parse(path).getroot())
    return out


def is_prose(text: str, lang: str) -> bool:
    if _CAPTION.match(text) or text in ("Table of Contents", "目录"):
        return False
    visible = text.replace(" ", "")
    if len(_WORDISH.findall(visible)) < 0.6 * len(visible):
        return False
    if lang == "en":
        return len(re.findall(r"[A-Za-z]+", text)) >= 6 and len(_CJK.findall(text)) == 0
    cjk = len(_CJK.findall(text))
    return cjk >= 10 and cjk >= 0.3 * len(visible)


def clean_paragraphs(paragraphs, lang: str) -> list[str]:
    return [p for p in paragraphs if is_prose(p, lang)]


@dataclass(frozen=True)
class PackageText:
    """One language of one source: the package, the pages inside it, their format."""

    package: str
    version: str
    pages: str      # glob relative to the extracted package root
    fmt: str        # "html" or "mallard"

    def requires(self) -> list[tuple[str, str]]:
        return [(self.package, self.version)]

    def page_paths(self, root: Path) -> list[Path]:
        # Pages in the order of a hash of their names: a fixed order (reproducible)
        # that spreads the first windows of a file over many pages, not one chapter.
        paths = sorted(root.glob(self.pages), key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())
        if not paths:
            raise FileNotFoundError(f"no {self.pages} in {root}: is this {self.package} {self.version}?")
        return paths

    def extract(self, roots: dict[str, Path], lang: str) -> list[list[str]]:
        """Cleaned paragraphs, one list per page, pages in `page_paths` order;
        `roots`: package name -> extracted package root."""
        read = html_paragraphs if self.fmt == "html" else mallard_paragraphs
        return [clean_paragraphs(read(path), lang) for path in self.page_paths(roots[self.package])]


_MO_MAGIC = 0x950412DE


def mo_messages(path: Path) -> list[tuple[str, str]]:
    """(msgid, msgstr) of each singular message of a compiled gettext catalogue, header
    and plural forms left out, a message context (msgctxt) dropped. UTF-8 only."""
    data = path.read_bytes()
    for order in "<>":  # the writer's byte order: the magic number reads right in one
        if len(data) >= 20 and struct.unpack_from(order + "I", data)[0] == _MO_MAGIC:
            break
    else:
        raise ValueError(f"{path} is not a gettext .mo catalogue (bad magic number)")
    _, count, ids_at, strs_at = struct.unpack_from(order + "4I", data, 4)

    def string(table: int, i: int) -> bytes:
        length, offset = struct.unpack_from(order + "2I", data, table + 8 * i)
        return data[offset:offset + length]

    out = []
    for i in range(count):
        msgid, msgstr = string(ids_at, i), string(strs_at, i)
        if not msgid:
            if b"charset=UTF-8" not in msgstr and b"charset=utf-8" not in msgstr:
                raise ValueError(f"{path}: only UTF-8 catalogues are read (header: {msgstr[:200]!r})")
            continue
        if b"\0" in msgid:  # plural forms: "1 unit"/"$n units" are labels, not prose
            continue
        out.append((msgid.split(b"\x04")[-1].decode("utf-8"), msgstr.decode("utf-8")))
    return out


# Game text the engine fills in or styles: variables, Pango markup, WML macros and tags.
_MARKUP = re.compile(r"[$<>{}\[\]@&]")
_BLANK_LINE = re.compile(r"\n\s*\n")


def message_paragraphs(msgid: str, msgstr: str, min_words: int) -> list[tuple[str, str]]:
    """(English, Chinese) paragraph pairs of one translated message worth keeping."""
    en = [re.sub(r"\s+", " ", p).strip() for p in _BLANK_LINE.split(msgid)]
    zh = [re.sub(r"\s+", " ", p).strip() for p in _BLANK_LINE.split(msgstr)]
    if len(en) != len(zh):  # the translator merged or split paragraphs: no reliable pairs
        return []
    return [(e, z) for e, z in zip(en, zh)
            if len(e.split()) >= min_words and not _MARKUP.search(e + z)
            and is_prose(e, "en") and is_prose(z, "zh")]


@dataclass(frozen=True)
class CatalogText:
    """One language of a source kept in gettext catalogues spread over several packages
    (a game's campaigns): the English originals ("msgid") or the translations ("msgstr")."""

    packages: tuple[str, ...]
    version: str
    pages: str           # glob of the catalogues, relative to each extracted package root
    side: str            # "msgid" or "msgstr"
    min_words: int = 30  # English words per paragraph: narration and speeches, not one-liners

    def __post_init__(self):
        if self.side not in ("msgid", "msgstr"):
            raise ValueError(f"side={self.side!r} must be 'msgid' (the English originals) or 'msgstr'")

    def requires(self) -> list[tuple[str, str]]:
        return [(package, self.version) for package in self.packages]

    def extract(self, roots: dict[str, Path], lang: str) -> list[list[str]]:
        """Cleaned paragraphs, one list per message, messages in the order of the sha256
        of their English text: a fixed order that mixes the packages and their stories,
        so the first windows of a file come from many passages (a compiled catalogue is
        sorted by msgid, which would start the file with every "A..." line)."""
        messages = []
        for package in self.packages:
            paths = sorted(roots[package].glob(self.pages))
            if not paths:
                raise FileNotFoundError(f"no {self.pages} in {roots[package]}: is this {package} {self.version}?")
            for path in paths:
                messages.extend(mo_messages(path))
        messages.sort(key=lambda m: hashlib.sha256(m[0].encode("utf-8")).hexdigest())
        side = 0 if self.side == "msgid" else 1
        return [[pair[side] for pair in message_paragraphs(msgid, msgstr, self.min_words)]
                for msgid, msgstr in messages]


@dataclass(frozen=True)
class TextSource:
    """A named bundled text: `<role>_<name>_<lang>.txt` for each language."""

    name: str
    role: str        # "eval" (out-of-domain evaluation) or "calib" (extra calibration)
    langs: dict      # lang -> PackageText or CatalogText
    budget: int      # at most this many UTF-8 bytes per file (whole paragraphs)
    license_file: str
    title: str

    def file_name(self, lang: str) -> str:
        return f"{self.role}_{self.name}_{lang}.txt"


HANDBOOK = "usr/share/doc/debian-handbook/html"
GNOME_HELP = "usr/share/help"
# The Battle for Wesnoth: five story campaigns by different authors (narration, letters,
# journals, speeches), each its own package; the zh_CN catalogue of each holds the
# English originals and their Simplified Chinese translation.
WESNOTH_VERSION = "1:1.16.9-1"
WESNOTH_CAMPAIGNS = ("wesnoth-1.16-l", "wesnoth-1.16-did", "wesnoth-1.16-dm", "wesnoth-1.16-sota",
                     "wesnoth-1.16-tsg")
WESNOTH_CATALOGS = "usr/share/games/wesnoth/1.16/locale/zh_CN/LC_MESSAGES/wesnoth-*.mo"
# Evaluation and extra-calibration sources; none shares a package with another or with
# the Debian Reference (calib_{en,zh}.txt / heldout_{en,zh}.txt).
SOURCES = (
    TextSource(
        name="handbook", role="eval", budget=90_000, license_file="LICENSE-GPL-2.txt",
        title="The Debian Administrator's Handbook (Raphaël Hertzog, Roland Mas; translators)",
        langs={"en": PackageText("debian-handbook", "11.20220922", f"{HANDBOOK}/en-US/*.html", "html"),
               "zh": PackageText("debian-handbook", "11.20220922", f"{HANDBOOK}/zh-CN/*.html", "html")},
    ),
    TextSource(
        name="gnomehelp", role="eval", budget=90_000, license_file="LICENSE-CC-BY-SA-3.0.txt",
        title="GNOME Help (the GNOME Documentation Project; translators)",
        langs={"en": PackageText("gnome-user-docs", "43.0-2", f"{GNOME_HELP}/C/gnome-help/*.page", "mallard"),
               "zh": PackageText("gnome-user-docs", "43.0-2", f"{GNOME_HELP}/zh_CN/gnome-help/*.page", "mallard")},
    ),
    TextSource(
        name="wesnoth", role="eval", budget=99_000, license_file="LICENSE-GPL-2.txt",
        title="The Battle for Wesnoth campaign stories (the Wesnoth project; Wesnoth Simplified Chinese Team)",
        langs={"en": CatalogText(WESNOTH_CAMPAIGNS, WESNOTH_VERSION, WESNOTH_CATALOGS, "msgid"),
               "zh": CatalogText(WESNOTH_CAMPAIGNS, WESNOTH_VERSION, WESNOTH_CATALOGS, "msgstr")},
    ),
    TextSource(
        name="faq", role="calib", budget=200_000, license_file="LICENSE-debian-faq.txt",
        title="The Debian GNU/Linux FAQ (Susan G. Kleinmann, Sven Rudolph, Santiago Vila, "
              "Josip Rodin, Javier Fernández-Sanguino Peña; translators)",
        langs={"en": PackageText("debian-faq", "11.1", "usr/share/doc/debian/FAQ/*.en.html", "html"),
               "zh": PackageText("debian-faq-zh-cn", "11.1", "usr/share/doc/debian/FAQ/zh-cn/*.zh-cn.html", "html")},
    ),
    TextSource(
        name="maintguide", role="calib", budget=200_000, license_file="LICENSE-GPL-2.txt",
        title="Debian New Maintainers' Guide (Josip Rodin, Osamu Aoki; translators)",
        langs={"en": PackageText("maint-guide", "1.2.53", "usr/share/doc/maint-guide/html/*.en.html", "html"),
               "zh": PackageText("maint-guide-zh-cn", "1.2.53",
                                 "usr/share/doc/maint-guide-zh-cn/html/*.zh-cn.html", "html")},
    ),
)


def packages() -> set[tuple[str, str]]:
    return {req for s in SOURCES for t in s.langs.values() for req in t.requires()}
