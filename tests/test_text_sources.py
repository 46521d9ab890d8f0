"""The paragraph extraction behind tools/build_texts.py, on small hand-made pages."""
import sys
from pathlib import Path

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


def test_sources_are_disjoint_and_named():
    pkgs = [(t.package, t.pages) for s in ts.SOURCES for t in s.langs.values()]
    assert len(set(pkgs)) == len(pkgs)
    names = [s.file_name(lang) for s in ts.SOURCES for lang in s.langs]
    assert "eval_handbook_en.txt" in names and "calib_faq_zh.txt" in names
    assert not {p for p, _ in pkgs} & {"debian-reference-en", "debian-reference-zh-cn"}
    # Evaluation and calibration sources never share a package.
    roles = {}
    for s in ts.SOURCES:
        for t in s.langs.values():
            roles.setdefault(t.package, set()).add(s.role)
    assert all(len(r) == 1 for r in roles.values())


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
