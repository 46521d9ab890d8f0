"""Calibration windows: determinism, mixing, record formats and error messages."""
import json
import re
from pathlib import Path

import pytest
import torch

from bluelm_quant import data, eval_data
from bluelm_quant.data import Source, calibration_windows, token_stream
from bluelm_quant.records import CalibrationDataError

from tiny_models import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path, records):
    return write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def decode(tok, ids):
    return tok.decode(ids.tolist() if torch.is_tensor(ids) else ids)


def test_windows_deterministic_per_seed(tok, tmp_path):
    src = write(tmp_path / "a.txt", "".join(f"sentence number {i}. " for i in range(400)))
    a = calibration_windows(tok, [src], nsamples=6, seqlen=32, seed=1)
    b = calibration_windows(tok, [src], nsamples=6, seqlen=32, seed=1)
    c = calibration_windows(tok, [src], nsamples=6, seqlen=32, seed=2)
    assert a.dtype == torch.long and a.shape == (6, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    text = src.read_text()
    for row in a:  # every window is a contiguous slice of the source text
        assert decode(tok, row) in text


def test_default_mixes_english_and_chinese_evenly(tok):
    w = calibration_windows(tok, nsamples=10, seqlen=64, seed=0)
    assert w.shape == (10, 64)
    # Chinese UTF-8 is mostly bytes >= 0x80; the English text is nearly pure ASCII.
    high = [(row >= 0x80).float().mean().item() for row in w]
    n_zh = sum(h > 0.5 for h in high)
    n_en = sum(h < 0.1 for h in high)
    assert (n_en, n_zh) == (5, 5)
    assert [h > 0.5 for h in high] != [False] * 5 + [True] * 5  # rows are shuffled


def test_uneven_split_and_no_special_tokens(tok, tmp_path):
    a = write(tmp_path / "a.txt", "a" * 500)
    b = write(tmp_path / "b.txt", "b" * 500)
    w = calibration_windows(tok, [a, b], nsamples=5, seqlen=20, seed=0)
    rows = sorted(decode(tok, r)[0] for r in w)
    assert rows == ["a", "a", "a", "b", "b"]
    assert w.max().item() < 256  # no BOS/EOS inside a single-document text


def test_bundled_texts_exist_and_heldout_never_overlaps_calibration():
    for lang in data.LANGS:
        calib = data.calibration_path(lang).read_text(encoding="utf-8")
        held = eval_data.heldout_text(lang)
        assert 100_000 < len(calib.encode()) < 400_000
        assert 40_000 < len(held.encode()) < 110_000
        calib_paras = set(calib.split("\n\n"))
        assert not [p for p in held.split("\n\n") if p in calib_paras]
        # Longer shared sentences would also be an overlap.
        sentences = {s for s in re.split(r"(?<=[.。!?！？])\s*", held) if len(s) > 60}
        assert not [s for s in sentences if s in calib]
    assert re.search(r"[\u4e00-\u9fff]{20}", eval_data.heldout_text("zh"))
    with pytest.raises(ValueError, match="lang='fr'"):
        eval_data.heldout_path("fr")


def test_jsonl_presets_autodetected(tok, tmp_path):
    cases = {
        "belle": ({"instruction": "Q1", "input": "ctx", "output": "A1"}, "Q1\nctx\nA1"),
        "prompt_response": ({"prompt": "P", "response": "R"}, "P\nR"),
        "text": ({"text": "plain words", "meta": 3}, "plain words"),
        "bluelm_sft": ({"inputs": "[|Human|]:hi\n[|AI|]:", "targets": "yo"},
                       "[|Human|]:hi\n[|AI|]:yo"),
    }
    for name, (record, expected) in cases.items():
        path = jsonl(tmp_path / f"{name}.jsonl", [record])
        assert data.load_documents(path) == [expected], name
        assert data.load_documents(Source(path, fields=name)) == [expected], name


def test_belle_input_optional_and_empty(tok, tmp_path):
    path = jsonl(tmp_path / "b.jsonl", [{"instruction": "Q", "input": "", "output": "A"},
                                        {"instruction": "Q2", "output": "A2"}])
    assert data.load_documents(path) == ["Q\nA", "Q2\nA2"]


def test_json_array_and_template(tok, tmp_path):
    path = write(tmp_path / "r.json", json.dumps([{"q": "x", "a": "y"}, {"q": "1", "a": 2}]))
    docs = data.load_documents(Source(path, template="Q: {q} A: {a}"))
    assert docs == ["Q: x A: y", "Q: 1 A: 2"]


def test_chat_formats(tok, tmp_path):
    path = jsonl(tmp_path / "c.jsonl", [{"prompt": "你好", "response": "hi"}])
    assert data.load_documents(Source(path, chat="bluelm")) == ["[|Human|]:你好[|AI|]:hi</s>"]
    assert data.load_documents(Source(path, chat=lambda q, a: f"<{q}|{a}>")) == ["<你好|hi>"]
    templated = byte_tokenizer()
    templated.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    docs = data.load_documents(Source(path, chat="template"), tokenizer=templated)
    assert docs == ["<user>你好<assistant>hi"]
    with pytest.raises(CalibrationDataError, match="chat_template"):
        data.load_documents(Source(path, chat="template"), tokenizer=tok)


def test_records_joined_with_single_eos(tok, tmp_path):
    eos = tok.eos_token_id
    path = jsonl(tmp_path / "r.jsonl", [{"text": "ab"}, {"text": "cd</s>"}, {"text": "ef"}])
    ids = token_stream(tok, path).tolist()
    assert ids.count(eos) == 3  # after each record; "cd</s>" already ends with EOS
    assert decode(tok, ids).replace("</s>", "|") == "ab|cd|ef|"


def test_large_record_sets_stop_at_token_budget(tok, tmp_path):
    path = jsonl(tmp_path / "many.jsonl", [{"text": f"record {i:05d}"} for i in range(2000)])
    gen = torch.Generator().manual_seed(0)
    stream = token_stream(tok, path, max_tokens=100, generator=gen)
    assert 100 <= stream.numel() < 120
    assert "record 00000" not in decode(tok, stream)  # seeded order, not file order


def test_error_missing_file(tok, tmp_path):
    with pytest.raises(CalibrationDataError, match="nope.txt does not exist"):
        calibration_windows(tok, [tmp_path / "nope.txt"], nsamples=1, seqlen=4)


def test_error_directory_given_as_a_file(tok, tmp_path):
    (tmp_path / "texts").mkdir()
    with pytest.raises(CalibrationDataError, match=r"texts is a directory; give the files in it"):
        calibration_windows(tok, [tmp_path / "texts"], nsamples=1, seqlen=4)


@pytest.mark.parametrize("name", ["blob.txt", "blob.jsonl"])
def test_error_binary_file_is_named(tok, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"GIF89a\x01\x00\xff\xfe\x00 binary")
    with pytest.raises(CalibrationDataError, match=rf"{name} is not UTF-8 text \(byte 0xff at offset 8\)"):
        calibration_windows(tok, [path], nsamples=1, seqlen=4)


@pytest.mark.parametrize("nsamples, seqlen", [(0, 4), (1, 0), (-3, 4)])
def test_error_nonpositive_sizes(tok, tmp_path, nsamples, seqlen):
    with pytest.raises(CalibrationDataError, match="must be positive"):
        calibration_windows(tok, None, nsamples=nsamples, seqlen=seqlen)


def test_error_unknown_extension(tok, tmp_path):
    path = write(tmp_path / "x.csv", "a,b\n")
    with pytest.raises(CalibrationDataError, match=r"unknown extension '\.csv'"):
        calibration_windows(tok, [path], nsamples=1, seqlen=2)


def test_error_empty_text(tok, tmp_path):
    path = write(tmp_path / "e.txt", "  \n\n")
    with pytest.raises(CalibrationDataError, match="e.txt is empty"):
        calibration_windows(tok, [path], nsamples=1, seqlen=2)


def test_error_too_few_tokens_says_counts(tok, tmp_path):
    path = write(tmp_path / "s.txt", "short text")  # 10 bytes = 10 tokens
    with pytest.raises(CalibrationDataError, match=r"s.txt gives 10 tokens.*seqlen=64"):
        calibration_windows(tok, [path], nsamples=2, seqlen=64)


def test_error_record_missing_field_names_line(tok, tmp_path):
    path = jsonl(tmp_path / "m.jsonl", [{"instruction": "a", "output": "b"},
                                        {"instruction": "c", "outptu": "d"}])
    with pytest.raises(CalibrationDataError, match=r"m.jsonl:2: record has no field 'output'"):
        data.load_documents(path)
    with pytest.raises(CalibrationDataError, match=r"m.jsonl:1: record has no field 'text'"):
        data.load_documents(Source(path, fields="text"))


def test_error_bad_json_and_unknown_format(tok, tmp_path):
    bad = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": \n')
    with pytest.raises(CalibrationDataError, match=r"bad.jsonl:2: invalid JSON"):
        data.load_documents(bad)
    odd = jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(CalibrationDataError, match=r"\['answer', 'question'\].*template"):
        data.load_documents(odd)
    with pytest.raises(CalibrationDataError, match="not one of"):
        Source(odd, fields="alpaca")
    with pytest.raises(CalibrationDataError, match="either template or chat"):
        Source(odd, template="{question}", chat="bluelm")
    with pytest.raises(CalibrationDataError, match="not prompt/response pairs"):
        data.load_documents(Source(jsonl(tmp_path / "t.jsonl", [{"text": "x"}]), chat="bluelm"))


# ---------------------------------------------------------------- named evaluation sets and mixes

def _paragraphs(path):
    return {p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()}


def test_eval_sets_exist_and_out_of_domain_shares_nothing_with_any_calibration_source():
    calib_files = {name.format(lang=lang) for name in data.CALIB_SOURCES.values() for lang in data.LANGS}
    calib_text = {name: (data.TEXTS_DIR / name).read_text(encoding="utf-8") for name in calib_files}
    for lang in data.LANGS:
        assert list(eval_data.eval_paths(lang, "in")) == [f"heldout_{lang}"]
        assert eval_data.eval_texts(lang, "in")[f"heldout_{lang}"] == eval_data.heldout_text(lang)
        out = eval_data.eval_paths(lang, "out")
        assert sorted(out) == [f"eval_gnomehelp_{lang}", f"eval_handbook_{lang}", f"eval_wesnoth_{lang}"]
        for name, path in out.items():
            assert 40_000 < path.stat().st_size <= 100_000, name  # >= 30 windows of 512 SmolLM2 tokens
            paras = _paragraphs(path)
            for calib_name, text in calib_text.items():
                if calib_name.endswith(".txt"):
                    assert not paras & set(text.split("\n\n")), (name, calib_name)
                # A long sentence shared with any calibration file is an overlap too.
                sentences = {s for s in re.split(r"(?<=[.。!?！？])\s*", path.read_text(encoding="utf-8"))
                             if len(s) > 80}
                assert not [s for s in sentences if s in text], (name, calib_name)
    zh = eval_data.eval_texts("zh", "out")
    assert all(re.search(r"[\u4e00-\u9fff]{20}", t) for t in zh.values())
    assert not re.search(r"[\u4e00-\u9fff]", "".join(eval_data.eval_texts("en", "out").values()))


def test_eval_windows_split_evenly_and_match_text_windows(tok):
    from bluelm_quant.evaluate import text_windows

    out = eval_data.eval_windows(tok, "en", "out", seqlen=64, max_windows=5)
    assert [w.shape for w in out.values()] == [(2, 64), (2, 64), (1, 64)]
    for name, w in out.items():
        assert torch.equal(w, text_windows(tok, eval_data.eval_texts("en", "out")[name], 64, w.shape[0]))
    held = eval_data.eval_windows(tok, "zh", "in", seqlen=128, max_windows=4)
    assert torch.equal(held["heldout_zh"], text_windows(tok, eval_data.heldout_text("zh"), 128, 4))
    every = eval_data.eval_windows(tok, "en", "in", seqlen=4096)
    assert every["heldout_en"].shape[0] == len(eval_data.heldout_text("en").encode()) // 4096


def test_eval_windows_bad_input(tok):
    with pytest.raises(ValueError, match=r"domain='mid' must be one of \('in', 'out'\)"):
        eval_data.eval_windows(tok, "en", "mid")
    with pytest.raises(ValueError, match="lang='fr'"):
        eval_data.eval_paths("fr", "out")
    with pytest.raises(ValueError, match=r"max_windows=2: zh/out has 3 files"):
        eval_data.eval_windows(tok, "zh", "out", seqlen=64, max_windows=2)
    with pytest.raises(ValueError, match=r"eval_handbook_en gives 1 windows of seqlen=50000, 2 asked"):
        eval_data.eval_windows(tok, "en", "out", seqlen=50_000, max_windows=4)


def test_calibration_mixes(tok):
    assert data.calibration_mix() == data.default_sources()
    names = [Path(s.path).name for s in data.calibration_mix("diverse", chat="bluelm")]
    assert names == ["calib_en.txt", "calib_zh.txt", "calib_faq_en.txt", "calib_faq_zh.txt",
                     "calib_maintguide_en.txt", "calib_maintguide_zh.txt",
                     "calib_chat_en.jsonl", "calib_chat_zh.jsonl"]
    chat = data.calibration_mix("chat", chat="bluelm")
    assert all(s.chat == "bluelm" for s in chat)
    docs = data.load_documents(chat[1])
    assert len(docs) == 40 and all(d.startswith("[|Human|]:") and d.endswith("</s>") for d in docs)
    assert re.search(r"[\u4e00-\u9fff]{10}", docs[0])
    w = calibration_windows(tok, data.calibration_mix("diverse", chat="bluelm"), nsamples=16, seqlen=128)
    assert w.shape == (16, 128)
    with pytest.raises(ValueError, match=r"calibration mix 'web' is not one of \['chat', 'default'"):
        data.calibration_mix("web")


# ---------------------------------------------------------------- overlap warnings

def test_overlap_counts_windows_sharing_a_span():
    from bluelm_quant.overlap import count_overlapping, find_overlaps

    gen = torch.Generator().manual_seed(0)
    stream = torch.randint(0, 1000, (5000,), generator=gen)
    windows = torch.randint(0, 1000, (6, 100), generator=gen)
    assert count_overlapping(windows, stream, ngram=16) == 0
    windows[2, 10:30] = stream[700:720]   # 20 shared tokens: a 16-gram, not a 32-gram
    windows[4, 50:100] = stream[100:150]
    assert count_overlapping(windows, stream, ngram=16) == 2
    assert count_overlapping(windows, stream, ngram=32) == 1
    assert count_overlapping(windows[:, :10], stream, ngram=16) == 0  # shorter than a span
    found = find_overlaps({"eval": windows}, {"calib": stream, "other": stream + 1000}, ngram=16)
    assert [(o.a, o.b, o.windows, o.total) for o in found] == [("eval", "calib", 2, 6)]
    among = find_overlaps({"a": windows, "b": stream, "c": stream + 1000}, ngram=16)
    assert [(o.a, o.b, o.windows, o.total) for o in among] == [("a", "b", 2, 6)]


def test_eval_overlapping_calibration_warns_with_both_names(tok, tmp_path, caplog):
    held = eval_data.heldout_text("en")
    copied = write(tmp_path / "copied.txt", "Unrelated words. " * 40 + held[3000:4000])
    clean = write(tmp_path / "clean.txt", "Unrelated words, nothing else. " * 200)
    ev = eval_data.eval_windows(tok, "en", "in", seqlen=512, max_windows=16)
    with caplog.at_level("WARNING", logger="bluelm_quant"):
        found = eval_data.check_eval_overlap(tok, ev, [copied, clean])
    assert [(o.a, o.b) for o in found] == [("heldout_en", str(copied))]
    assert 2 <= found[0].windows <= 3 and found[0].total == 16  # ~1000 bytes span 2-3 windows
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "'heldout_en'" in msg and "copied.txt" in msg and f"{found[0].windows} of 16 windows" in msg
    assert "not measured on unseen text" in msg


def test_calibration_sources_that_overlap_warn(tok, tmp_path, caplog):
    a = write(tmp_path / "a.txt", "".join(f"alpha sentence {i}. " for i in range(400)))
    b = write(tmp_path / "b.txt", "".join(f"beta phrase {i}! " for i in range(400)))
    with caplog.at_level("WARNING", logger="bluelm_quant"):
        calibration_windows(tok, [a, b], nsamples=8, seqlen=128)
    assert not caplog.records
    with caplog.at_level("WARNING", logger="bluelm_quant"):
        plain = calibration_windows(tok, [a, b, a], nsamples=9, seqlen=128)
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert msg.startswith(f"'{a}' and '{a}' overlap: 3 of 3 windows") and "weighs double" in msg
    caplog.clear()
    # The check only reads: the windows are those of an unchecked run with the same seed.
    with caplog.at_level("ERROR", logger="bluelm_quant"):
        assert torch.equal(plain, calibration_windows(tok, [a, b, a], nsamples=9, seqlen=128))


def test_bundled_sets_do_not_trigger_overlap_warnings(tok, caplog):
    # Byte tokens: 64 bytes is ~10 English words, stricter than 64 SmolLM2 tokens.
    ev = {}
    for lang in data.LANGS:
        ev.update(eval_data.eval_windows(tok, lang, "out", seqlen=512, max_windows=16))
    with caplog.at_level("WARNING", logger="bluelm_quant"):
        found = eval_data.check_eval_overlap(tok, ev, data.calibration_mix("diverse", chat="bluelm"))
    assert found == [] and not caplog.records


@pytest.mark.slow
def test_out_of_domain_sets_with_the_smollm2_tokenizer():
    """What texts/SOURCES.md promises, with the tokenizer the quality tables use: every
    out-of-domain file holds >= 38 windows of 512 tokens (16 per language split over the
    files never runs out), and no window of any shares a 64-token span with any bundled
    calibration source."""
    from transformers import AutoTokenizer

    from bluelm_quant.smollm2 import ensure_smollm2

    smol = AutoTokenizer.from_pretrained(ensure_smollm2())
    ev = {}
    for lang in data.LANGS:
        ev.update(eval_data.eval_windows(smol, lang, "out", seqlen=512))
    assert min(w.shape[0] for w in ev.values()) >= 38, {n: w.shape[0] for n, w in ev.items()}
    assert eval_data.check_eval_overlap(smol, ev, data.calibration_mix("diverse")) == []
