"""What a quantization run writes, and what it may never delete or corrupt (issue 15):
file modes, the output lock, --overwrite refusals, failed writes, the report after publishing,
and the source tensors the checkpoint copies as they are."""
import json
import logging
import os
import re
import stat
import subprocess
import sys

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import bluelm_quant.saving as saving
import bluelm_quant.workdir as workdir
from bluelm_quant import atomic
from bluelm_quant.config import QuantConfig
from bluelm_quant.lock import OutputLockError, lock_path
from bluelm_quant.layer_job import LayerJob
from bluelm_quant.outputs import OutputError
from bluelm_quant.pipeline import RunOptions, quantize_model
from bluelm_quant.saving import save_quantized
from bluelm_quant.shards import CheckpointError

from tiny_models import save_tiny_llama_dir, tiny_llama, tokens

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = QuantConfig(bits=4, group_size=32, desc_act=True)
OPTS = dict(progress=False)


def windows():
    return tokens(8, 32, vocab=258, seed=3)


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    return save_tiny_llama_dir(str(tmp_path_factory.mktemp("fp") / "tiny"), num_hidden_layers=3)


def run(fp_dir, out, **opts):
    return quantize_model(fp_dir, str(out), CONFIG, windows(), RunOptions(**{**OPTS, **opts}))


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def tree(path):
    """{relative path: bytes} of every file under `path`."""
    found = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            found[os.path.relpath(full, path)] = open(full, "rb").read()
    return found


# --- file modes ----------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_atomic_writes_follow_the_umask(tmp_path, mask):
    from bluelm_quant.nn import replace_linear

    old = os.umask(mask)
    try:
        assert atomic.umask() == mask
        atomic.write_json(str(tmp_path / "a.json"), {"x": 1})
        model = tiny_llama()
        replace_linear(model, CONFIG, quantize=True)
        out = str(tmp_path / "q")
        save_quantized(model, out, CONFIG)
        plain = str(tmp_path / "plain")
        open(plain, "w").close()
        os.mkdir(str(tmp_path / "plain_dir"))
    finally:
        os.umask(old)
    assert _mode(str(tmp_path / "a.json")) == _mode(plain) == 0o666 & ~mask
    assert _mode(out) == _mode(str(tmp_path / "plain_dir")) == 0o777 & ~mask
    for name in os.listdir(out):
        assert _mode(os.path.join(out, name)) == 0o666 & ~mask, name


def test_a_quantized_checkpoint_is_readable_by_others(fp_dir, tmp_path):
    old = os.umask(0o022)
    try:
        run(fp_dir, tmp_path / "q")
    finally:
        os.umask(old)
    out = str(tmp_path / "q")
    assert _mode(out) == 0o755
    modes = {f: _mode(os.path.join(out, f)) for f in os.listdir(out)}
    assert {"config.json", "quantize_config.json", "model.safetensors.index.json", "quantize_report.json"} <= set(modes)
    # copied tokenizer files keep the source's mode (written by save_pretrained: 0644 too)
    assert all(mode == 0o644 for mode in modes.values()), modes


# --- the lock ------------------------------------------------------------------------------

HOLDER = """
import sys
from bluelm_quant.lock import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def hold_lock(out):
    """Another process holding the output's lock (until it is killed or its stdin closes)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"locked"
    return proc


def test_a_second_run_on_a_locked_output_fails_at_once_and_a_killed_holder_is_taken_over(fp_dir, tmp_path, caplog):
    out = tmp_path / "q"
    holder = hold_lock(out)
    try:
        record = json.load(open(lock_path(str(out))))
        assert record["pid"] == holder.pid
        for opts in ({}, {"overwrite": True}, {"resume": True}):
            with pytest.raises(OutputLockError, match=rf"{out} is being written by another run \(pid {holder.pid}\b"):
                run(fp_dir, out, **opts)
        assert not os.path.exists(str(out) + ".partial") and not os.path.exists(out)
    finally:
        holder.kill()  # SIGKILL: no clean-up runs; the kernel drops the flock
        holder.wait()
    assert os.path.exists(lock_path(str(out)))  # left behind, naming a dead pid
    with caplog.at_level(logging.WARNING, logger="bluelm_quant"):
        run(fp_dir, out)
    assert f"pid {holder.pid}" in caplog.text and "taking over" in caplog.text
    assert os.path.exists(os.path.join(out, "config.json"))
    assert not os.path.exists(lock_path(str(out)))  # released and removed


def test_the_lock_is_held_for_the_whole_run(fp_dir, tmp_path, monkeypatch):
    """While layers are being quantized, another process cannot take the lock."""
    out = tmp_path / "q"
    seen = []
    real = LayerJob.quantize

    def probe(job, *args, **kwargs):
        attempt = subprocess.run([sys.executable, "-c", HOLDER, str(out)], cwd=ROOT, input=b"", capture_output=True)
        seen.append((attempt.returncode, attempt.stderr.decode()))
        return real(job, *args, **kwargs)

    monkeypatch.setattr(LayerJob, "quantize", probe)
    run(fp_dir, out)
    assert len(seen) == 3
    for code, stderr in seen:
        assert code != 0 and f"pid {os.getpid()}" in stderr and "OutputLockError" in stderr


# --- --overwrite never deletes what this tool did not write --------------------------------


def test_output_equal_to_inside_or_containing_the_source_is_refused(tmp_path):
    parent = tmp_path / "models"
    src = save_tiny_llama_dir(str(parent / "tiny"), num_hidden_layers=1)
    (parent / "notes.txt").write_text("mine")
    before = tree(str(parent))
    for out, relation in ((src, "is"), (str(parent), "contains"), (os.path.join(src, "q"), "is inside")):
        for opts in ({}, {"overwrite": True}, {"resume": True, "overwrite": True}):
            with pytest.raises(OutputError, match=rf"{out} {relation} the source model .*outside"):
                run(src, out, **opts)
    assert tree(str(parent)) == before


def test_overwrite_replaces_only_a_checkpoint(fp_dir, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match=r"does not look like a quantized checkpoint \(it has no quantize_config.json\)"):
        run(fp_dir, out, overwrite=True)
    assert (out / "thesis.tex").read_text() == "years of work"
    (out / "quantize_config.json").write_text("{}")
    (out / "data").mkdir()
    with pytest.raises(OutputError, match=r"it has subdirectories \(data\)"):
        run(fp_dir, out, overwrite=True)
    assert (out / "thesis.tex").exists()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(OutputError, match="is not a directory"):
        run(fp_dir, a_file, overwrite=True)

    good = tmp_path / "good"
    run(fp_dir, good)
    first = tree(str(good))
    run(fp_dir, good, overwrite=True)  # a checkpoint is replaced
    assert tree(str(good)).keys() == first.keys()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".old-")]


def test_a_partial_directory_this_tool_did_not_create_is_left_alone(fp_dir, tmp_path):
    out = tmp_path / "q"
    partial = tmp_path / "q.partial"
    partial.mkdir()
    (partial / "photos").mkdir()
    (partial / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    for opts in ({"overwrite": True}, {"resume": True}, {"resume": True, "overwrite": True}):
        with pytest.raises(OutputError, match=r"q.partial was not made by bluelm-quant \(it holds photos\)"):
            run(fp_dir, out, **opts)
    assert (partial / "photos" / "cat.jpg").read_bytes() == b"\xff\xd8"
    (partial / "photos" / "cat.jpg").unlink()
    (partial / "photos").rmdir()
    (partial / "layers").mkdir()
    (partial / "layers" / "notes.txt").write_text("x")
    (partial / "settings.json").write_text("{}")
    with pytest.raises(OutputError, match=r"it holds layers/notes.txt"):
        run(fp_dir, out, overwrite=True)
    (partial / "layers" / "notes.txt").unlink()
    (partial / "settings.json").unlink()
    (partial / "README").write_text("x")
    with pytest.raises(OutputError, match=r"it holds README"):
        run(fp_dir, out, overwrite=True)


# --- failed writes -------------------------------------------------------------------------


def test_disk_full_while_saving_a_layer_keeps_the_finished_ones(fp_dir, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    run(fp_dir, straight)
    out = tmp_path / "q"
    real, calls = workdir.save_file, []

    def full_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')
        return real(*args, **kwargs)

    monkeypatch.setattr(workdir, "save_file", full_on_third)
    with pytest.raises(OutputError, match=r"no space left on the device holding .*q.partial.*--resume"):
        run(fp_dir, out)
    monkeypatch.setattr(workdir, "save_file", real)
    assert sorted(os.listdir(str(out) + ".partial/layers")) == ["layer_0000.safetensors", "layer_0001.safetensors"]
    run(fp_dir, out, resume=True)
    assert tree(str(out)).keys() == tree(str(straight)).keys()
    for name, data in tree(str(straight)).items():
        if not name.startswith("quantize_report"):
            assert tree(str(out))[name] == data, name


def test_disk_full_while_assembling_keeps_every_layer(fp_dir, tmp_path, monkeypatch):
    out = tmp_path / "q"

    def full(tensors, path, metadata=None):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(saving, "save_file", full)
    with pytest.raises(OutputError, match="no space left.*--resume"):
        run(fp_dir, out)
    monkeypatch.undo()
    assert len(os.listdir(str(out) + ".partial/layers")) == 3 and not os.path.exists(out)
    run(fp_dir, out, resume=True)
    assert os.path.exists(os.path.join(out, "config.json"))


def refuse_writes_under(monkeypatch, directory):
    """Make `directory` behave as read-only for this process (the tests may run as root,
    which chmod does not stop)."""
    directory = str(directory)
    real_open, real_mkdir = os.open, os.mkdir

    def guarded_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and os.path.abspath(path).startswith(directory + os.sep):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if os.path.abspath(path).startswith(directory + os.sep):
            raise PermissionError(13, "Permission denied", path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)


def test_a_read_only_output_directory(fp_dir, tmp_path, monkeypatch):
    (tmp_path / "ro").mkdir()
    refuse_writes_under(monkeypatch, tmp_path / "ro")
    with pytest.raises(OutputError, match=r"cannot write .*ro/q\.lock: Permission denied; choose an --out in a directory"):
        run(fp_dir, tmp_path / "ro" / "q")
    assert os.listdir(tmp_path / "ro") == []


# --- the report comes after the checkpoint -------------------------------------------------


def test_a_missing_plotting_library_is_a_warning_after_publishing(fp_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out = tmp_path / "q"
    with caplog.at_level(logging.WARNING, logger="bluelm_quant"):
        report = run(fp_dir, out)
    assert report["summary"]["layers"] == 3
    assert os.path.exists(os.path.join(out, "config.json")) and not os.path.exists(str(out) + ".partial")
    assert os.path.exists(os.path.join(out, "quantize_report.json"))
    assert not os.path.exists(os.path.join(out, "quantize_report.png"))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "quantize_report.png" in r.getMessage()]
    assert len(warnings) == 1 and "matplotlib" in warnings[0].getMessage() and "\n" not in warnings[0].getMessage()


def test_the_report_is_written_once_the_checkpoint_is_in_place(fp_dir, tmp_path, monkeypatch):
    import bluelm_quant.report as report

    seen = []
    real = report.plot
    monkeypatch.setattr(report, "plot", lambda per_layer, path: seen.append(
        (path, os.path.exists(os.path.join(os.path.dirname(path), "model.safetensors.index.json")))) or real(per_layer, path))
    run(fp_dir, tmp_path / "q")
    assert seen == [(os.path.join(str(tmp_path / "q"), "quantize_report.png"), True)]


# --- tensors copied from the source as they are --------------------------------------------


def rewrite_tensor(directory, key, change):
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        path = os.path.join(directory, json.load(f)["weight_map"][key])
    tensors = load_file(path)
    tensors[key] = change(tensors[key])
    save_file(tensors, path, metadata={"format": "pt"})


def _poison(t):
    t = t.clone()
    t.view(-1)[1] = float("nan")
    t.view(-1)[2] = float("inf")
    return t


@pytest.mark.parametrize("key", ["model.norm.weight", "lm_head.weight", "model.embed_tokens.weight",
                                 "model.layers.2.post_attention_layernorm.weight"])
def test_nan_or_inf_in_a_copied_tensor_is_refused_before_any_work(tmp_path, key):
    src = save_tiny_llama_dir(str(tmp_path / "fp"), num_hidden_layers=3)
    rewrite_tensor(src, key, _poison)
    with pytest.raises(CheckpointError, match=rf"tensor {key} in .* holds 2 NaN/Inf values"):
        run(src, tmp_path / "q")
    assert not os.path.exists(str(tmp_path / "q.partial"))


def test_a_copied_tensor_of_the_wrong_shape_is_refused(tmp_path):
    src = save_tiny_llama_dir(str(tmp_path / "fp"), num_hidden_layers=1)
    rewrite_tensor(src, "model.norm.weight", lambda t: t[:1].clone())
    with pytest.raises(CheckpointError, match=r"model.norm.weight in .* has shape \[1\], .* implies \[64\]"):
        run(src, tmp_path / "q")


def test_the_finite_check_reads_large_tensors_in_pieces(tmp_path):
    from bluelm_quant.shards import ShardReader

    src = save_tiny_llama_dir(str(tmp_path / "fp"), num_hidden_layers=1)
    reader = ShardReader(src)
    key = "model.embed_tokens.weight"
    pieces = list(reader.scan(key, chunk_bytes=1000))
    assert all(p.numel() * p.element_size() <= 1000 for p in pieces) and len(pieces) > 10
    assert torch.equal(torch.cat(pieces), reader.get(key).reshape(-1))


GATED_QUANTIZE = """
import os, runpy, sys, time
import bluelm_quant.layer_job as layer_job
gate, real = sys.argv.pop(1), layer_job.LayerJob.quantize

def gated(*args, **kwargs):  # hold the first layer until the test opens the gate
    open(gate + ".waiting", "w").close()
    while not os.path.exists(gate):
        time.sleep(0.01)
    return real(*args, **kwargs)

layer_job.LayerJob.quantize = gated
sys.argv[0] = os.path.join(os.getcwd(), "tools", "quantize.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_two_quantize_commands_on_one_output(fp_dir, tmp_path):
    """Issue 15's scenario with the real tool: while one run works (held at its first layer
    until the second has tried), a second with --overwrite --seed 1 fails at once naming the
    first; the first then publishes its own checkpoint (seed 0)."""
    import time

    out, gate = str(tmp_path / "q"), str(tmp_path / "gate")
    args = ["--model", fp_dir, "--out", out, "--group-size", "32", "--nsamples", "8", "--seqlen", "32",
            "--eval-windows", "0", "-q"]
    first = subprocess.Popen([sys.executable, "-c", GATED_QUANTIZE, gate, *args], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not os.path.exists(gate + ".waiting") and first.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert first.poll() is None, first.stderr.read()
        second = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "quantize.py"), *args, "--overwrite",
                                 "--seed", "1"], cwd=ROOT, capture_output=True, text=True)
    finally:
        open(gate, "w").close()
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(rf"error: {re.escape(out)} is being written by another run \(pid {first.pid}\b",
                                        lines[0]), second.stderr
    assert first.wait(timeout=300) == 0, first.stderr.read()
    report = json.load(open(os.path.join(out, "quantize_report.json")))
    assert report["settings"]["seed"] == 0
    assert not os.path.exists(lock_path(out))
