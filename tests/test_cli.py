"""The console scripts as a user meets them (issue 15): every expected failure is one line on
stderr and exit status 2 (a traceback only with --debug), bad numbers are refused when parsed,
every flag has help that shows its default, and only our own INFO messages are shown."""
import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import SafetensorError

import bluelm_quant.workdir as workdir
from bluelm_quant.cli import chat as chat_cli
from bluelm_quant.cli import configure_logging
from bluelm_quant.cli import eval_ppl as eval_cli
from bluelm_quant.cli import quantize as quantize_cli
from bluelm_quant.eval_data import heldout_text
from bluelm_quant.evaluate import perplexity
from bluelm_quant.hf import load_model_and_tokenizer
from bluelm_quant.outputs import OutputError
from bluelm_quant.shards import CheckpointError

from test_output_safety import refuse_writes_under
from tiny_models import save_tiny_llama_dir

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(autouse=True)
def _restore_logging():
    root, ours = logging.getLogger(), logging.getLogger("bluelm_quant")
    levels = root.level, ours.level
    yield
    root.setLevel(levels[0])
    ours.setLevel(levels[1])


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    return save_tiny_llama_dir(str(tmp_path_factory.mktemp("cli") / "tiny"), num_hidden_layers=2)


def quantize_args(fp_dir, out, *extra):
    return ["--model", fp_dir, "--out", str(out), "--group-size", "32", "--nsamples", "4", "--seqlen", "32",
            "--eval-windows", "0", "-q", *extra]


def one_error_line(capsys, rc, *patterns):
    """The tool failed with status 2 and exactly one stderr line, 'error: ...' matching the patterns."""
    err = capsys.readouterr().err
    # progress bars (transformers' "Loading weights") are not messages
    lines = [line for line in err.splitlines() if line.strip() and not re.search(r"(it/s|s/it)\]", line)]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for pattern in patterns:
        assert re.search(pattern, lines[0]), (pattern, lines[0])
    return lines[0]


def usage_error(capsys, main, argv, *patterns):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    for pattern in patterns:
        assert re.search(pattern, last), (pattern, last)


# --- bluelm-quantize -----------------------------------------------------------------------


def test_quantize_calibration_file_errors_name_the_file(fp_dir, tmp_path, capsys):
    missing = tmp_path / "missing.txt"
    rc = quantize_cli.main(quantize_args(fp_dir, tmp_path / "q1", "--calib", str(missing)))
    one_error_line(capsys, rc, r"missing\.txt does not exist")
    rc = quantize_cli.main(quantize_args(fp_dir, tmp_path / "q2", "--calib", str(tmp_path)))
    one_error_line(capsys, rc, rf"{tmp_path} is a directory; give the files in it")
    binary = tmp_path / "data.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    rc = quantize_cli.main(quantize_args(fp_dir, tmp_path / "q3", "--calib", str(binary)))
    one_error_line(capsys, rc, r"data\.txt is not UTF-8 text \(byte 0x80 at offset 128\)")
    assert not [p for p in os.listdir(tmp_path) if p.startswith("q")]


@pytest.mark.parametrize("flag, value, message", [
    ("--nsamples", "0", "0 is not a positive integer"),
    ("--nsamples", "-4", "-4 is not a positive integer"),
    ("--seqlen", "0", "0 is not a positive integer"),
    ("--seqlen", "x", "'x' is not an integer"),
    ("--eval-windows", "-1", "-1 is negative"),
    ("--max-shard-size", "0", "0 is not a positive number"),
    ("--bits", "5", "invalid choice"),
])
def test_quantize_bad_numbers_are_refused_when_parsed(fp_dir, tmp_path, capsys, flag, value, message):
    usage_error(capsys, quantize_cli.main, quantize_args(fp_dir, tmp_path / "q") + [flag, value],
                rf"argument {flag}: .*{re.escape(message)}")


def test_quantize_seqlen_1_with_evaluation(fp_dir, tmp_path, capsys):
    usage_error(capsys, quantize_cli.main, quantize_args(fp_dir, tmp_path / "q", "--seqlen", "1", "--eval-windows", "2"),
                r"--seqlen 1: an evaluation window needs at least 2 tokens")


def test_quantize_bad_config_values_are_one_line(fp_dir, tmp_path, capsys):
    rc = quantize_cli.main(quantize_args(fp_dir, tmp_path / "q", "--group-size", "30"))
    one_error_line(capsys, rc, r"group_size=30 must be -1")
    rc = quantize_cli.main(quantize_args(fp_dir, tmp_path / "q", "--damp", "0"))
    one_error_line(capsys, rc, r"damp_percent=0.0 must be in \(0, 1\)")


def test_quantize_read_only_output(fp_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "ro").mkdir()
    refuse_writes_under(monkeypatch, tmp_path / "ro")
    rc = quantize_cli.main(quantize_args(fp_dir, tmp_path / "ro" / "q"))
    one_error_line(capsys, rc, r"cannot write .*Permission denied; choose an --out in a directory you can write to")


def test_quantize_disk_full(fp_dir, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(workdir, "save_file", full)
    rc = quantize_cli.main(quantize_args(fp_dir, tmp_path / "q"))
    one_error_line(capsys, rc, r"no space left on the device holding .*q\.partial.*run the same command with --resume")
    with pytest.raises(OutputError):  # --debug: the traceback, for a bug report
        quantize_cli.main(quantize_args(fp_dir, tmp_path / "q2", "--debug"))


def test_quantize_into_the_source_model_is_refused(fp_dir, tmp_path, capsys):
    before = sorted(os.listdir(fp_dir))
    rc = quantize_cli.main(quantize_args(fp_dir, fp_dir, "--overwrite"))
    one_error_line(capsys, rc, r"is the source model .* would delete it")
    assert sorted(os.listdir(fp_dir)) == before


def test_quantize_locked_output(fp_dir, tmp_path, capsys):
    from test_output_safety import hold_lock

    holder = hold_lock(tmp_path / "q")
    try:
        rc = quantize_cli.main(quantize_args(fp_dir, tmp_path / "q", "--overwrite", "--seed", "1"))
        one_error_line(capsys, rc, rf"is being written by another run \(pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()


def test_quantize_model_without_tokenizer(fp_dir, tmp_path, capsys):
    src = str(tmp_path / "no-tokenizer")
    shutil.copytree(fp_dir, src)
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, name)):
            os.remove(os.path.join(src, name))
    rc = quantize_cli.main(quantize_args(src, tmp_path / "q"))
    one_error_line(capsys, rc, r"cannot load the tokenizer of .*no-tokenizer")


# --- bluelm-chat and bluelm-eval-ppl: loader errors ----------------------------------------


@pytest.fixture(scope="module")
def broken_dirs(fp_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    no_tokenizer = str(root / "no-tokenizer")
    shutil.copytree(fp_dir, no_tokenizer)
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(no_tokenizer, name)):
            os.remove(os.path.join(no_tokenizer, name))
    no_weights = str(root / "no-weights")
    shutil.copytree(fp_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors*"))
    bad_config = str(root / "bad-config")
    shutil.copytree(fp_dir, bad_config)
    with open(os.path.join(bad_config, "config.json"), "w") as f:
        f.write('{"model_type": "no-such-model"}')
    return {
        "missing": (str(root / "nothing-here"), r"nothing-here is not a directory"),
        "no tokenizer": (no_tokenizer, r"cannot load the tokenizer of .*no-tokenizer"),
        "no weights": (no_weights, r"no-weights"),
        "bad config": (bad_config, r"bad-config"),
    }


@pytest.mark.parametrize("case", ["missing", "no tokenizer", "no weights", "bad config"])
@pytest.mark.parametrize("tool", ["chat", "eval"])
def test_loader_errors_are_one_line(broken_dirs, capsys, monkeypatch, tool, case):
    path, pattern = broken_dirs[case]
    monkeypatch.setattr("sys.stdin", open(os.devnull))
    main = chat_cli.main if tool == "chat" else eval_cli.main
    argv = ["--model", path] + (["--max-windows", "1", "--seqlen", "16"] if tool == "eval" else [])
    one_error_line(capsys, main(argv), pattern)
    with pytest.raises(Exception):
        main(argv + ["--debug"])


def test_eval_text_errors(fp_dir, tmp_path, capsys):
    binary = tmp_path / "t.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    rc = eval_cli.main(["--model", fp_dir, "--text", str(binary), "--seqlen", "16"])
    one_error_line(capsys, rc, r"t\.txt is not UTF-8 text \(byte 0xff at offset 0\)")
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    rc = eval_cli.main(["--model", fp_dir, "--text", str(short), "--seqlen", "64"])
    one_error_line(capsys, rc, r"the text gives 16 tokens, fewer than one window of seqlen=64")
    usage_error(capsys, eval_cli.main, ["--model", fp_dir, "--text", str(tmp_path)], r"is a directory")
    usage_error(capsys, eval_cli.main, ["--model", fp_dir, "--text", str(tmp_path / "none.txt")], r"no such file")
    usage_error(capsys, eval_cli.main, ["--model", fp_dir, "--seqlen", "1"], r"at least 2 tokens")
    usage_error(capsys, eval_cli.main, ["--model", fp_dir, "--max-windows", "0"], r"--max-windows: 0 is not a positive")
    usage_error(capsys, eval_cli.main, ["--model", fp_dir, "--batch-size", "0"], r"--batch-size: 0 is not a positive")


@pytest.mark.parametrize("flag, value", [("--top-p", "1.5"), ("--top-p", "0"), ("--temperature", "0"),
                                         ("--top-k", "-1"), ("--max-new-tokens", "0"), ("--repetition-penalty", "-1")])
def test_chat_bad_sampling_numbers(fp_dir, capsys, flag, value):
    usage_error(capsys, chat_cli.main, ["--model", fp_dir, flag, value], rf"argument {flag}")


# --- help and logging ----------------------------------------------------------------------


@pytest.mark.parametrize("module", [quantize_cli, chat_cli, eval_cli], ids=["quantize", "chat", "eval-ppl"])
def test_every_flag_has_help_that_shows_its_default(module):
    for action in module.parser()._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and len(action.help) > 10, action.option_strings
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if action.default not in (None, False) and not switch:
            assert "default" in action.help, (action.option_strings, action.help)


def test_eval_windows_help_says_its_default_and_what_0_skips():
    action = next(a for a in quantize_cli.parser()._actions if "--eval-windows" in a.option_strings)
    assert "(default 8)" in action.help and "0 skips both" in action.help and "demo answer" in action.help


def test_only_our_own_info_messages_are_shown():
    configure_logging(logging.INFO)
    assert logging.getLogger("bluelm_quant.pipeline").isEnabledFor(logging.INFO)
    for name in ("matplotlib.font_manager", "transformers.modeling_utils", "urllib3"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
        assert logging.getLogger(name).isEnabledFor(logging.WARNING), name
    configure_logging(logging.WARNING)  # -q
    assert not logging.getLogger("bluelm_quant.pipeline").isEnabledFor(logging.INFO)


# --- engine-ready defaults ------------------------------------------------------------------


@pytest.fixture(scope="module")
def odd_width_dir(tmp_path_factory):
    """Layer widths 96 and 160: 128 and 64 leave partial groups, 32 divides both."""
    return save_tiny_llama_dir(str(tmp_path_factory.mktemp("cli") / "odd"), num_hidden_layers=1,
                               hidden_size=96, intermediate_size=160)


def test_default_group_size_steps_down_to_one_every_engine_loads(odd_width_dir, tmp_path, capsys):
    out = tmp_path / "q"
    argv = quantize_args(odd_width_dir, out)
    del argv[argv.index("--group-size"):argv.index("--group-size") + 2]
    assert quantize_cli.main(argv) == 0
    assert "Group size 32, not 128: 128 does not divide the layer width(s) 96, 160" in capsys.readouterr().out
    config = json.load(open(out / "config.json"))
    q = config["quantization_config"]
    assert (q["group_size"], q["desc_act"], q["sym"], q["meta"]["act_order"]) == (32, False, True, "static")
    assert (q["meta"]["mse_clip"], q["meta"]["clip_weights"]) == (True, "hessian")  # the default clip search
    assert config["dtype"] == "bfloat16"  # a float32 source: non-quantized tensors written in 16 bits
    from safetensors import safe_open
    with safe_open(str(out / "model-00001-of-00001.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
        assert f.get_slice("model.layers.0.self_attn.q_proj.scales").get_dtype() == "F16"


def test_a_group_size_the_user_names_is_kept_with_a_note(odd_width_dir, tmp_path, capsys):
    out = tmp_path / "q"
    argv = quantize_args(odd_width_dir, out)
    argv[argv.index("--group-size") + 1] = "64"
    assert quantize_cli.main([*argv, "--act-order", "dynamic"]) == 0
    printed = capsys.readouterr().out
    assert "group size 64 leaves a partial last group in layers of width 96, 160: vLLM and GPTQModel refuse" in printed
    assert "dynamic act-order (desc_act true): vLLM refuses it" in printed
    q = json.load(open(out / "config.json"))["quantization_config"]
    assert (q["group_size"], q["desc_act"]) == (64, True)


@pytest.mark.parametrize("clip,recorded", [("off", (False, None)), ("mse", (True, "uniform"))])
def test_clip_flag_is_recorded(odd_width_dir, tmp_path, clip, recorded):
    out = tmp_path / "q"
    assert quantize_cli.main([*quantize_args(odd_width_dir, out), "--clip", clip]) == 0
    meta = json.load(open(out / "config.json"))["quantization_config"]["meta"]
    assert (meta["mse_clip"], meta.get("clip_weights")) == recorded


# --- the default evaluation, end to end ----------------------------------------------------


def test_quantize_evaluation_matches_the_in_memory_perplexity(fp_dir, tmp_path):
    """tools/quantize.py's before/after table (now layer by layer) prints what the whole models give."""
    out = str(tmp_path / "q")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "quantize.py")] + quantize_args(fp_dir, out)
    cmd[cmd.index("--eval-windows") + 1] = "2"
    cmd[cmd.index("--seqlen") + 1] = "64"
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "4-bit model, greedy:" in run.stdout
    assert not [line for line in run.stderr.splitlines() if line.startswith("INFO") and " bluelm_quant" not in line]
    rows = dict(re.findall(r"^(en|zh)\s+(\S+\s+\S+)$", run.stdout, re.M))
    assert rows.keys() == {"en", "zh"}, run.stdout
    fp, tokenizer = load_model_and_tokenizer(fp_dir, dtype=torch.float32)
    q, _ = load_model_and_tokenizer(out, dtype=torch.float32)
    for lang, printed in rows.items():
        want = [perplexity(m, tokenizer, heldout_text(lang), seqlen=64, max_windows=2, progress=False) for m in (fp, q)]
        assert [float(x) for x in printed.split()] == pytest.approx(want, abs=1.5e-3), lang


def test_the_demo_answer_is_skipped_when_it_would_exceed_the_runs_peak(fp_dir, tmp_path, capsys, monkeypatch):
    """Loading the whole 4-bit model must not take the command past what the quantization needed."""
    monkeypatch.setattr(quantize_cli, "_rss_bytes", lambda: (10**9, 10**9))  # as if the run had needed nothing
    argv = quantize_args(fp_dir, tmp_path / "q")
    argv[argv.index("--eval-windows") + 1] = "1"
    argv[argv.index("--seqlen") + 1] = "64"
    assert quantize_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "Perplexity on bundled held-out text" in out
    assert "4-bit demo answer skipped" in out and f"bluelm-chat --model {tmp_path / 'q'}" in out
    assert "4-bit model, greedy" not in out



def test_ctrl_c_is_one_line_and_says_how_to_resume(capsys):
    from bluelm_quant.cli import EXIT_INTERRUPTED, run_tool

    def interrupted(args):
        raise KeyboardInterrupt

    assert run_tool(interrupted, argparse.Namespace(debug=False, resume=False)) == EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == ("interrupted; the finished layers are kept: run the same command "
                                               "with --resume to continue")
    assert run_tool(interrupted, argparse.Namespace(debug=False)) == EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run_tool(interrupted, argparse.Namespace(debug=True))
