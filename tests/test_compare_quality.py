"""tools/compare_quality.py: the table's columns and gap-closed arithmetic (no model)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import compare_quality as cq  # noqa: E402


def row(method, gs, act, in_en, in_zh, out_en, out_zh, **extra):
    return {"method": method, "group_size": gs, "act_order": act,
            "in_en": in_en, "in_zh": in_zh, "out_en": out_en, "out_zh": out_zh, **extra}


def test_table_reports_gap_closed_per_domain_and_language(capsys):
    rows = [row("fp32", None, None, 10.0, 20.0, 30.0, 40.0),
            row("rtn", 128, None, 12.0, 24.0, 36.0, 50.0),
            row("gptq", 128, True, 11.0, 21.0, 34.0, 51.0, seconds=200.4)]
    cq.print_table(rows, ["in", "out"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["method", "group", "act", "ppl", "in/en", "gap", "ppl", "in/zh", "gap",
                                "ppl", "out/en", "gap", "ppl", "out/zh", "gap", "time", "s"]
    # (12-11)/2 = 50%, (24-21)/4 = 75%, (36-34)/6 = 33%, (50-51)/10 = -10%
    assert lines[-1].split() == ["gptq", "128", "yes", "11.000", "50%", "21.000", "75%",
                                 "34.000", "33%", "51.000", "-10%", "200"]
    cq.print_table(rows, ["out"])
    assert "in/en" not in capsys.readouterr().out


def test_sets_table_reports_gap_closed_per_evaluation_file(capsys):
    rows = [row("fp32", None, None, 0, 0, 0, 0, sets={"eval_a_en": 10.0, "eval_b_en": 20.0}),
            row("rtn", 128, None, 0, 0, 0, 0, sets={"eval_a_en": 14.0, "eval_b_en": 30.0}),
            row("gptq", 128, True, 0, 0, 0, 0, sets={"eval_a_en": 11.0, "eval_b_en": 32.0}),
            row("other", 64, False, 0, 0, 0, 0, sets={"eval_a_en": 12.0, "eval_b_en": 25.0})]
    cq.print_sets_table(rows)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["evaluation", "file", "fp32", "rtn", "g128", "gptq", "g128", "gap",
                                "other", "g64", "gap"]
    # (14-11)/4 = 75%, (30-32)/10 = -20%; no g64 RTN row: no gap for "other"
    assert lines[1].split() == ["eval_a_en", "10.000", "14.000", "11.000", "75%", "12.000"]
    assert lines[2].split() == ["eval_b_en", "20.000", "30.000", "32.000", "-20%", "25.000"]


def test_checkpoint_grid_reads_quantize_config(tmp_path):
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 64, "desc_act": True}))
    assert cq.checkpoint_grid(str(tmp_path)) == (4, 64, True)
    with pytest.raises(SystemExit, match="not a GPTQ checkpoint"):
        cq.checkpoint_grid(str(tmp_path / "missing"))
