"""tools/compare_quality.py: the table's columns, the gap-closed arithmetic and the variants (no model)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import compare_quality as cq  # noqa: E402


def row(method, bits, gs, in_en, in_zh, out_en, out_zh, **extra):
    return {"method": method, "bits": bits, "group_size": gs,
            "in_en": in_en, "in_zh": in_zh, "out_en": out_en, "out_zh": out_zh, **extra}


def test_table_reports_gap_closed_per_domain_and_language(capsys):
    rows = [row("fp32", None, None, 10.0, 20.0, 30.0, 40.0),
            row("rtn", 4, 128, 12.0, 24.0, 36.0, 50.0),
            row("rtn", 3, 128, 20.0, 40.0, 60.0, 80.0),
            row("gptq:static", 4, 128, 11.0, 21.0, 34.0, 51.0, seconds=200.4),
            row("gptq:static", 3, 128, 15.0, 30.0, 45.0, 60.0, seconds=210)]
    cq.print_table(rows, ["in", "out"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["method", "bits", "group", "ppl", "in/en", "gap", "ppl", "in/zh", "gap",
                                "ppl", "out/en", "gap", "ppl", "out/zh", "gap", "time", "s"]
    # 4-bit against 4-bit RTN: (12-11)/2 = 50%, (24-21)/4 = 75%, (36-34)/6 = 33%, (50-51)/10 = -10%
    assert lines[-2].split() == ["gptq:static", "4", "128", "11.000", "50%", "21.000", "75%",
                                 "34.000", "33%", "51.000", "-10%", "200"]
    # 3-bit against 3-bit RTN: (20-15)/10 = 50%, 10/20, 15/30, 20/40
    assert lines[-1].split()[3:11] == ["15.000", "50%", "30.000", "50%", "45.000", "50%", "60.000", "50%"]
    cq.print_table(rows, ["out"])
    assert "in/en" not in capsys.readouterr().out


def test_variants_build_valid_configs():
    for name in cq.VARIANTS:
        config, calib = cq.variant_config(name, 4, 128)
        assert config.bits == 4 and config.group_size == 128
        assert set(calib) <= set(cq.CALIB_KEYS)
    static, _ = cq.variant_config("static", 3, 64)
    assert static.act_order == "static" and static.to_dict()["desc_act"] is False
    assert cq.variant_config("static+diverse", 4, 128)[1] == {"mix": "diverse"}


def test_sets_table_reports_gap_closed_per_evaluation_file(capsys):
    rows = [row("fp32", None, None, 0, 0, 0, 0, sets={"eval_a_en": 10.0, "eval_b_en": 20.0}),
            row("rtn", 4, 128, 0, 0, 0, 0, sets={"eval_a_en": 14.0, "eval_b_en": 30.0}),
            row("gptq", 4, 128, 0, 0, 0, 0, sets={"eval_a_en": 11.0, "eval_b_en": 32.0}),
            row("other", 4, 64, 0, 0, 0, 0, sets={"eval_a_en": 12.0, "eval_b_en": 25.0})]
    cq.print_sets_table(rows)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["evaluation", "file", "fp32", "rtn", "4b", "g128", "gptq", "4b", "g128", "gap",
                                "other", "4b", "g64", "gap"]
    # (14-11)/4 = 75%, (30-32)/10 = -20%; no g64 RTN row: no gap for "other"
    assert lines[1].split() == ["eval_a_en", "10.000", "14.000", "11.000", "75%", "12.000"]
    assert lines[2].split() == ["eval_b_en", "20.000", "30.000", "32.000", "-20%", "25.000"]
