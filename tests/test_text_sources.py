"""The paragraph extraction behind tools/build_texts.py, on small hand-made pages."""
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import text_sources as ts  # noqa: E402


def page(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_html_paragraphs_keep_prose_and_skip_listings_tables_and_navigation(tmp_path):
    html = page(tmp_path, "a.html", """<html><body>
<div class="toc"><p>Table of Contents entry that is not prose at all here</p></div>
<div class="para">APT is the <code class="command">apt</code> tool &amp; more.
  It installs packages:
  <pre class="screen">$ apt install foo</pre>
  and then it is done.</div>
<p class="title"><strong>Tip: a sidebar title</strong></p>
<a class="indexterm" id="x"></a>
<table><tr><td><p>cell text inside a table</p></td></tr></table>
<div class="para">Outer <div class="itemizedlist"><p>inner list text</p></div> tail.</div>
<p>Last one.</p>
</body></html>""")
    assert ts.html_paragraphs(html) == [
        "APT is the apt tool & more. It installs packages:",
        "and then it is done.",
        "Outer inner list text tail.",
        "Last one.",
    ]


def test_mallard_paragraphs_drop_holes_and_keep_inline_text(tmp_path):
    mallard = page(tmp_path, "p.page", """<?xml version="1.0" encoding="utf-8"?>
<page xmlns="http://projectmallard.org/1.0/" id="p">
  <info><desc>Short description.</desc><license><p>Licensed under CC-BY-SA.</p></license></info>
  <title>Title</title>
  <p>Press <keyseq><key>Ctrl</key><key>Alt</key><key>T</key></keyseq> to open a
     <app>Terminal</app>, then type <code>ls</code>.</p>
  <p>See <link xref="other"/> for more.</p>
  <p>Click the <media type="image" src="x.svg">icon</media> button.</p>
  <section><title>Sec</title><list><item><p>Open <link xref="a">the panel</link>.</p></item></list>
  <code>block code is not prose</code></section>
</page>""")
    assert ts.mallard_paragraphs(mallard) == [
        "Press Ctrl+Alt+T to open a Terminal, then type ls.",
        "Open the panel.",
    ]


def test_is_prose():
    assert ts.is_prose("This sentence has more than six words in it.", "en")
    assert not ts.is_prose("Too short to count.", "en")
    assert not ts.is_prose("Table 3.1. List of the things that a table lists here", "en")
    assert not ts.is_prose("-a, --all, -b, --bare, -c, --count, -d, --dir words here", "en")
    assert not ts.is_prose("An English sentence with 中文 characters in the middle of it.", "en")
    assert ts.is_prose("这是一个足够长的中文句子，用来测试过滤规则。", "zh")
    assert not ts.is_prose("Untranslated English paragraph left in the zh pages by translators.", "zh")
    assert not ts.is_prose("中文太短。", "zh")


def write_mo(path, messages, byte_order="<", charset="UTF-8"):
    """A gettext .mo file (the GNU layout: magic, revision, count, two offset tables)."""
    entries = sorted([(b"", f"Content-Type: text/plain; charset={charset}\n".encode())]
                     + [(k.encode(), v.encode()) for k, v in messages])
    count = len(entries)
    ids_at, strs_at = 28, 28 + 8 * count
    blob_at = strs_at + 8 * count
    tables, blob = [b"", b""], b""
    for side in (0, 1):
        for entry in entries:
            tables[side] += struct.pack(byte_order + "2I", len(entry[side]), blob_at + len(blob))
            blob += entry[side] + b"\0"
    header = struct.pack(byte_order + "7I", 0x950412DE, 0, count, ids_at, strs_at, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + tables[0] + tables[1] + blob)
    return path


LONG_EN = ("The river ran high that spring, and the old ferryman said he had never seen the "
           "water so dark nor the current so strong in all the years he had lived beside it.")
LONG_ZH = "那年春天河水涨得很高，老船夫说，他在河边住了这么多年，从没见过河水这么黑，水流这么急。"


@pytest.mark.parametrize("byte_order", ["<", ">"])
def test_mo_messages_read_both_byte_orders_and_skip_header_plurals_and_context(tmp_path, byte_order):
    mo = write_mo(tmp_path / "a.mo", [("Hello", "你好"), ("menu\x04Open", "打开"),
                                      ("one unit\0$n units", "$n 个单位")], byte_order)
    assert sorted(ts.mo_messages(mo)) == [("Hello", "你好"), ("Open", "打开")]
    with pytest.raises(ValueError, match="not a gettext .mo catalogue"):
        ts.mo_messages(page(tmp_path, "b.mo", "plain text, not a catalogue"))
    with pytest.raises(ValueError, match="only UTF-8"):
        ts.mo_messages(write_mo(tmp_path / "d.mo", [("Hello", "Hallo")], charset="ISO-8859-1"))


def test_message_paragraphs_pair_long_paragraphs_without_markup():
    two = f"{LONG_EN}\n\nShort line here.\n\n{LONG_EN} Again."
    assert ts.message_paragraphs(two, f"{LONG_ZH}\n\n短句。\n\n{LONG_ZH}又一次。", 30) == [
        (LONG_EN, LONG_ZH), (LONG_EN + " Again.", LONG_ZH + "又一次。")]
    assert ts.message_paragraphs(two, LONG_ZH, 30) == []  # paragraphs merged: no reliable pairs
    for marked in (f"{LONG_EN} $second_unit.name", f"<i>{LONG_EN}</i>", f"{LONG_EN} {{MACRO}}"):
        assert ts.message_paragraphs(marked, LONG_ZH, 30) == []
    assert ts.message_paragraphs(LONG_EN, LONG_EN, 30) == []  # untranslated
    assert ts.message_paragraphs(LONG_EN, LONG_ZH, 40) == []  # 32 words < 40


def test_catalog_text_reads_every_package_in_one_hashed_order(tmp_path):
    glob = "locale/zh_CN/wesnoth-*.mo"
    other_en, other_zh = LONG_EN.replace("river", "road"), LONG_ZH.replace("河", "路")
    write_mo(tmp_path / "a" / "locale/zh_CN/wesnoth-a.mo", [(LONG_EN, LONG_ZH), ("Go!", "走！")], ">")
    write_mo(tmp_path / "b" / "locale/zh_CN/wesnoth-b.mo", [(other_en, other_zh)])
    roots = {"pkg-a": tmp_path / "a", "pkg-b": tmp_path / "b"}
    en = ts.CatalogText(("pkg-a", "pkg-b"), "1:1.0-1", glob, "msgid")
    zh = ts.CatalogText(("pkg-a", "pkg-b"), "1:1.0-1", glob, "msgstr")
    assert en.requires() == [("pkg-a", "1:1.0-1"), ("pkg-b", "1:1.0-1")]
    pages_en, pages_zh = en.extract(roots, "en"), zh.extract(roots, "zh")
    assert sorted(p for page in pages_en for p in page) == sorted([LONG_EN, other_en])
    # Same order in both languages: the Chinese file translates the English one.
    translation = {LONG_EN: LONG_ZH, other_en: other_zh}
    assert [[translation[p] for p in page] for page in pages_en] == pages_zh
    with pytest.raises(FileNotFoundError, match="is this pkg-c 1:1.0-1"):
        ts.CatalogText(("pkg-c",), "1:1.0-1", glob, "msgid").extract({"pkg-c": tmp_path}, "en")


def test_sources_are_disjoint_and_named():
    pkgs = [(pkg, t.pages) for s in ts.SOURCES for t in s.langs.values() for pkg, _ in t.requires()]
    names = [s.file_name(lang) for s in ts.SOURCES for lang in s.langs]
    assert "eval_handbook_en.txt" in names and "calib_faq_zh.txt" in names and "eval_wesnoth_zh.txt" in names
    assert not {p for p, _ in pkgs} & {"debian-reference-en", "debian-reference-zh-cn"}
    # Each (package, pages) pair feeds one source; both languages of a catalogue source
    # read the same catalogues (msgid and msgstr).
    owners = {}
    for s in ts.SOURCES:
        for t in s.langs.values():
            for pkg, _ in t.requires():
                owners.setdefault((pkg, t.pages), set()).add(s.name)
    assert all(len(o) == 1 for o in owners.values())
    # Evaluation and calibration sources never share a package.
    roles = {}
    for s in ts.SOURCES:
        for t in s.langs.values():
            for pkg, _ in t.requires():
                roles.setdefault(pkg, set()).add(s.role)
    assert all(len(r) == 1 for r in roles.values())
    assert ("wesnoth-1.16-l", "1:1.16.9-1") in ts.packages()


def test_build_budget_dedupe_and_license_paragraph(tmp_path):
    import build_texts

    seen = {"already in the Debian Reference"}
    pages = [["already in the Debian Reference", "one", "two"], ["two", "three", "four"]]
    # A paragraph costs its bytes + 2 (the blank line): 5 + 5 + 7 = 17 bytes.
    assert build_texts._within_budget(pages, seen, 17) == "one\n\ntwo\n\nthree\n"
    assert "four" not in seen  # the paragraph over budget is not marked as used
    copyright = page(tmp_path, "copyright", "Files: *\nCopyright: X\nLicense: CC-BY-SA-3.0\n\n"
                     "License: CC-BY-SA-3.0\n Creative Commons\n .\n Second paragraph.\n\nFiles: y\n")
    assert build_texts._copyright_license(copyright, "CC-BY-SA-3.0") == "Creative Commons\n\nSecond paragraph.\n"
