"""layerwise_perplexity (one decoder layer in memory at a time) gives what evaluate.perplexity
gives on the whole model: full precision and 4-bit, tied and untied heads, LLaMA and BlueLM."""
import pytest
import torch

from bluelm_quant.config import QuantConfig
from bluelm_quant.eval_data import heldout_text
from bluelm_quant.evaluate import perplexity
from bluelm_quant.hf import load_model_and_tokenizer
from bluelm_quant.layerwise import layerwise_perplexity
from bluelm_quant.pipeline import RunOptions, quantize_model

from bluelm_fixtures import SP_VOCAB, make_tiny_bluelm_dir
from tiny_models import save_tiny_llama_dir, tokens

pytestmark = pytest.mark.usefixtures("one_thread")

SEQLEN, WINDOWS = 64, 5
TEXTS = {lang: heldout_text(lang)[:30000] for lang in ("en", "zh")}


def _dirs(root, fp, vocab):
    q = str(root / "q")
    quantize_model(fp, q, QuantConfig(bits=4, group_size=32, desc_act=True), tokens(8, 32, vocab=vocab, seed=3),
                   RunOptions(progress=False))
    return fp, q


@pytest.fixture(scope="module", params=["llama", "llama-tied", "bluelm"])
def dirs(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "bluelm":
        return _dirs(root, make_tiny_bluelm_dir(str(root / "fp"), seed=3), SP_VOCAB)
    fp = save_tiny_llama_dir(str(root / "fp"), num_hidden_layers=3, tie=request.param.endswith("tied"))
    return _dirs(root, fp, 258)


@pytest.mark.parametrize("which", ["full precision", "4-bit"])
def test_layer_by_layer_equals_the_whole_model(dirs, which):
    path = dirs[0] if which == "full precision" else dirs[1]
    model, tokenizer = load_model_and_tokenizer(path, dtype=torch.float32)
    expected = {lang: perplexity(model, tokenizer, text, seqlen=SEQLEN, max_windows=WINDOWS, progress=False)
                for lang, text in TEXTS.items()}
    got = layerwise_perplexity(path, tokenizer, TEXTS, seqlen=SEQLEN, max_windows=WINDOWS, progress=False)
    assert got.keys() == expected.keys()
    for lang in TEXTS:
        assert got[lang] == pytest.approx(expected[lang], rel=1e-5), lang
    assert len({round(v, 3) for v in got.values()}) == 2  # each text scored on its own windows


def test_layers_are_dropped_after_use(dirs, monkeypatch):
    """At most one decoder layer holds real tensors at any time."""
    import bluelm_quant.layerwise as layerwise

    real, peaks = layerwise.run_layer, []

    def spy(layer, hidden, kwargs, device, batch, out=None):
        model_layers = layer_list[0]
        peaks.append(sum(1 for m in model_layers if any(not p.is_meta for p in m.parameters())))
        return real(layer, hidden, kwargs, device, batch, out=out)

    layer_list = []
    real_capture = layerwise.capture_first_layer_inputs

    def capture(model, layers, *args):
        layer_list.append(layers)
        return real_capture(model, layers, *args)

    monkeypatch.setattr(layerwise, "run_layer", spy)
    monkeypatch.setattr(layerwise, "capture_first_layer_inputs", capture)
    _, tokenizer = load_model_and_tokenizer(dirs[1], dtype=torch.float32)
    layerwise_perplexity(dirs[1], tokenizer, {"en": TEXTS["en"]}, seqlen=SEQLEN, max_windows=2, progress=False)
    assert peaks and max(peaks) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_estimated_host_bytes_match_the_loaded_model(dirs, dtype):
    """What bluelm-quantize uses to decide whether the 4-bit demo answer fits (kernel repacks included)."""
    from bluelm_quant.loading import estimate_host_bytes, load_quantized
    from bluelm_quant.placement import tensor_bytes

    estimate = estimate_host_bytes(dirs[1], dtype)
    held = tensor_bytes(load_quantized(dirs[1], dtype=dtype), "cpu")
    assert estimate == pytest.approx(held, rel=0.01)
