"""Direct loading onto a device: streaming equals the in-memory model, the memory savers
(embed_on_cpu, int8 lm_head), device/dtype validation, OOM reporting, peak RSS, the
synthetic 7B-layout generator at CI size, and the benchmark generation loop."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import bluelm_quant.placement as placement
from bluelm_quant import int8_ops
from bluelm_quant.loading import LoadPlan, Placement, load_quantized, oom_message
from bluelm_quant.modeldir import ModelDir
from bluelm_quant.saving import save_quantized
from bluelm_quant.config import QuantConfig
from bluelm_quant.generate import Generator
from bluelm_quant.nn import QuantLinear, replace_linear
from bluelm_quant.placement import CPUEmbedding, DeviceError, DeviceMemoryError, Int8Linear
from bluelm_quant.shards import ShardReader

from bluelm_fixtures import tiny_model
from tiny_models import tiny_llama, tokens

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _quantized(model, act_order=False):
    config = QuantConfig(bits=4, group_size=32, sym=False, desc_act=act_order)
    replace_linear(model, config, quantize=True)
    if act_order:  # permute g_idx as desc_act does; codes stay in input order
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.g_idx = m.g_idx[torch.randperm(m.in_features, generator=torch.Generator().manual_seed(3))]
                m.post_init()
    return model.requires_grad_(False), config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{(name): (in-memory 4-bit model, directory)} for a tiny LLaMA (untied, tied, act-order) and a tiny BlueLM."""
    out = {}
    for name, model, act in (("llama", tiny_llama(), False), ("tied", tiny_llama(tie=True), False),
                             ("act", tiny_llama(seed=2), True), ("bluelm", tiny_model(), False)):
        model, config = _quantized(model, act)
        path = str(tmp_path_factory.mktemp(name) / "q")
        # tiny shards: layers straddle files, so per-layer repacking must wait for all parts
        save_quantized(model, path, config, max_shard_size=20_000)
        out[name] = (model, path)
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", ["llama", "tied", "act", "bluelm"])
def test_streaming_load_equals_the_in_memory_model(saved, name):
    model, path = saved[name]
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 3
    loaded = load_quantized(path, dtype=torch.float32)
    ids = tokens(vocab=model.config.vocab_size)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    for n, m in loaded.named_modules():
        if isinstance(m, QuantLinear):  # repacked once, as post_init would
            ref = model.get_submodule(n)
            assert m.kernel_group_size == ref.kernel_group_size
            for k in ("qweight", "kernel_perm"):
                assert (getattr(m, k) is None and getattr(ref, k) is None) or torch.equal(getattr(m, k), getattr(ref, k))
    if name == "act":  # one copy of the weights: qweight itself is in the kernel's row order
        layers = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
        assert all(m.kernel_perm is not None for m in layers)
        assert all(n not in ("qweight", "kernel_perm") or t.dtype == torch.int32 for m in layers for n, t in m.named_buffers())
        assert sum(1 for m in layers for n, _ in m.named_buffers() if "qweight" in n) == len(layers)


def test_to_device_of_a_loaded_model_does_not_copy(saved):
    loaded = load_quantized(saved["llama"][1], dtype=torch.float32, embed_on_cpu=True)
    ptrs = {n: t.data_ptr() for n, t in list(loaded.named_parameters()) + list(loaded.named_buffers())}
    loaded.to("cpu")
    loaded.to(torch.device("cpu"), torch.float32)
    after = {n: t.data_ptr() for n, t in list(loaded.named_parameters()) + list(loaded.named_buffers())}
    assert after == ptrs


@pytest.mark.parametrize("name", ["llama", "tied", "bluelm"])
def test_embed_on_cpu_gives_identical_logits(saved, name):
    model, path = saved[name]
    loaded = load_quantized(path, dtype=torch.float32, embed_on_cpu=True)
    emb = loaded.get_input_embeddings()
    assert isinstance(emb, CPUEmbedding) and emb.weight.device.type == "cpu"
    assert "model.embed_tokens.weight" in loaded.state_dict()
    assert not any(p is emb.weight for p in loaded.parameters())  # model.device follows the layers
    ids = tokens(vocab=model.config.vocab_size)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    if name == "tied":  # lm_head gets the table on the device (on the CPU: the same storage, no copy)
        assert isinstance(loaded.lm_head.weight, torch.nn.Parameter)
        assert loaded.lm_head.weight.data_ptr() == emb.weight.data_ptr()


def test_cpu_embedding_follows_model_moves_without_moving_its_table():
    emb = CPUEmbedding(torch.randn(10, 4), None, "cpu")
    emb.to(torch.float16)  # a dtype cast of the model casts the table, on the CPU
    assert emb.weight.dtype == torch.float16 and emb.weight.device.type == "cpu"
    assert emb(torch.tensor([[1, 2]])).dtype == torch.float16


@pytest.mark.parametrize("name", ["llama", "tied"])
def test_int8_lm_head_is_close_and_half_the_size(saved, name):
    model, path = saved[name]
    loaded = load_quantized(path, dtype=torch.float32, lm_head_bits=8)
    head = loaded.lm_head
    assert isinstance(head, Int8Linear) and head.weight_int8.dtype == torch.int8
    w = model.lm_head.weight
    err = (head.dequantize() - w).abs()
    assert bool((err <= head.weight_scale[:, None] / 2 + 1e-6).all())  # round to nearest on the stored grid
    ids = tokens(vocab=model.config.vocab_size)
    ref, got = _logits(model, ids), _logits(loaded, ids)
    assert (got - ref).abs().max() < 0.02 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95
    x = torch.randn(3, w.shape[1])
    torch.testing.assert_close(head(x), x @ head.dequantize().T, rtol=1e-4, atol=1e-4)


def test_int8_linear_chunks_give_the_same_product(monkeypatch):
    w = torch.randn(50, 64)
    layer = Int8Linear.from_weight(w, torch.float32)
    x = torch.randn(2, 3, 64)
    whole = x @ layer.dequantize().T
    monkeypatch.setattr(Int8Linear, "CHUNK_ROWS", 16)  # 4 chunks, the last one partial
    monkeypatch.setattr(int8_ops, "CPU_INT8_DEQUANT_MIN_M", 0)  # the chunked path, not the int8 kernel
    torch.testing.assert_close(layer(x), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", ["cuda:7", "xpu:0", "banana", "meta"])
def test_device_that_does_not_exist_is_refused(saved, device):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(DeviceError, match=f"device='{device}'"):
        load_quantized(saved["llama"][1], device=device)


def test_cuda_without_gpu_says_use_cpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(DeviceError, match="device='cpu'"):
        placement.resolve_device("cuda")


def test_dtype_the_device_cannot_run(saved, monkeypatch):
    path = saved["llama"][1]
    monkeypatch.setattr(placement, "dtype_support",
                        lambda d, dt: (dt != torch.bfloat16, "this device (a test stand-in) has no bfloat16"))
    with pytest.raises(DeviceError, match=r"dtype=torch.bfloat16 cannot be honoured on cpu: .*allow_dtype_fallback"):
        load_quantized(path, dtype=torch.bfloat16)
    cfg = os.path.join(path, "config.json")
    hf = json.load(open(cfg))
    hf["dtype"] = "bfloat16"
    json.dump(hf, open(cfg, "w"))
    try:
        with pytest.raises(DeviceError, match="config.json torch_dtype"):
            load_quantized(path)  # the checkpoint's own dtype is checked too
        fallback = load_quantized(path, allow_dtype_fallback=True)
        assert fallback.dtype == torch.float32 and fallback.model.layers[0].mlp.up_proj.scales.dtype == torch.float32
    finally:
        hf["dtype"] = "float32"
        json.dump(hf, open(cfg, "w"))
    with pytest.raises(DeviceError, match="float64"):
        load_quantized(path, dtype=torch.float64)


def test_out_of_memory_message_names_sizes_and_remedies(saved):
    model, path = saved["llama"]
    model_dir = ModelDir(path)
    reader = model_dir.reader
    skeleton = load_quantized(path, dtype=torch.float16)
    plan = LoadPlan(skeleton, model_dir, [], Placement(torch.device("cpu"), torch.float16))
    total = plan.device_bytes(reader.keys())
    fp16_bytes = sum(t.numel() * (2 if t.is_floating_point() else 4) for t in model.state_dict().values())
    assert total == fp16_bytes
    embed = model.model.embed_tokens.weight.numel() * 2
    plan_cpu = LoadPlan(skeleton, model_dir, [], Placement(torch.device("cpu"), torch.float16, embed_on_cpu=True, lm_head_bits=8))
    head = model.lm_head.weight
    assert plan_cpu.device_bytes(reader.keys()) == total - embed - head.numel() + head.shape[0] * 2
    msg = oom_message(path, plan, 5 * 1024**3, 4 * 1024**3, free=1024**3, total=8 * 1024**3)
    assert "needs about 5.00 GiB" in msg and "4.00 GiB of it loaded" in msg and "1.00 GiB of 8.00 GiB are free" in msg
    assert "embed_on_cpu=True" in msg and "device='cpu'" in msg


@pytest.mark.cuda
def test_cuda_load_matches_cpu_and_oom_is_reported(saved):
    model, path = saved["bluelm"]
    ids = tokens(vocab=model.config.vocab_size)
    cpu = load_quantized(path, dtype=torch.float16)
    gpu = load_quantized(path, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(_logits(gpu, ids.cuda()).cpu().float(), _logits(cpu.float(), ids), rtol=2e-2, atol=2e-2)
    del gpu
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1e-9)
    try:
        with pytest.raises(DeviceMemoryError, match="embed_on_cpu"):
            load_quantized(path, device="cuda", dtype=torch.float16)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def test_shard_reader_drops_mappings_after_its_byte_budget(saved):
    reader = ShardReader(saved["llama"][1], remap_bytes=1)
    key = reader.keys()[0]
    kept = reader.get(key)
    assert reader._open and not reader._transient  # views the model keeps share the long-lived map
    moved = reader.get(key, transient=True)
    assert not reader._transient  # over budget: that map goes as soon as `moved` is dropped
    assert torch.equal(kept, moved) and reader.dtype(key) == kept.dtype == torch.float32


def test_peak_rss_of_a_load_stays_near_the_checkpoint_size(tmp_path):
    # ~24 MB of checkpoint: big enough to see a second copy, small enough for CI.
    model, config = _quantized(tiny_llama(vocab_size=8192, hidden_size=256, intermediate_size=512,
                                          num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=4))
    path = str(tmp_path / "q")
    save_quantized(model, path, config, max_shard_size=4 * 1024**2)
    bench = os.path.join(REPO, "tools", "bench_load.py")
    out = subprocess.run([sys.executable, bench, "--child", "--model", path, "--variant", "fp32", "--threads", "1",
                          "--device", "cpu", "--context", "0"], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    assert r["cpu_tensor_bytes"] >= 0.9 * size
    assert r["rss_peak"] - r["rss_imports"] < 1.5 * size + 32 * 1024**2, r
    assert r["rss_peak_forward"] - r["rss_imports"] < 1.5 * size + 64 * 1024**2, r  # every weight touched


def test_synthetic_checkpoint_has_the_bluelm_layout_and_loads(tmp_path):
    make = _tool("make_synthetic_checkpoint")
    args = ["--layers", "2", "--hidden", "256", "--intermediate", "512", "--heads", "4", "--vocab", "512",
            "--max-shard-size", "0.0005"]
    make.main(["--out", str(tmp_path / "q"), "--act-order"] + args)
    make.main(["--out", str(tmp_path / "fp"), "--fp16"] + args)
    hf = json.load(open(tmp_path / "q" / "config.json"))
    assert hf["model_type"] == "BlueLM" and hf["quantization_config"]["desc_act"] is True
    index = json.load(open(tmp_path / "q" / "model.safetensors.index.json"))["weight_map"]
    assert "model.layers.1.mlp.down_proj.qweight" in index and "model.embed_layer_norm.bias" in index
    assert len(set(index.values())) > 2
    q = load_quantized(str(tmp_path / "q"), dtype=torch.float32)
    assert q.model.layers[1].mlp.down_proj.qweight.shape == (512 // 8, 256)
    attn = q.model.layers[1].self_attn  # projections of one input share their act-order, as GPTQ's do
    assert torch.equal(attn.q_proj.g_idx, attn.v_proj.g_idx) and not torch.equal(attn.q_proj.g_idx, attn.o_proj.g_idx)
    logits = _logits(q, tokens(vocab=512))
    assert torch.isfinite(logits).all() and 0.1 < logits.std() < 10  # activations stay in range
    from transformers import AutoModelForCausalLM

    fp = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp"), dtype=torch.float32)
    assert fp.model.layers[1].mlp.down_proj.weight.shape == (256, 512)
    with pytest.raises(SystemExit, match="inside the repository"):
        make.main(["--out", os.path.join(REPO, "synthetic-test-out")] + args)


@pytest.mark.parametrize("name", ["llama", "bluelm"])
@pytest.mark.parametrize("embed_on_cpu", [False, True])
def test_bench_loop_matches_generate_greedy(saved, name, embed_on_cpu):
    model, path = saved[name]
    loaded = load_quantized(path, dtype=torch.float32, embed_on_cpu=embed_on_cpu)
    ids = tokens(batch=2, seq=8, vocab=model.config.vocab_size)
    gen = Generator(loaded, max_len=32)
    first = gen.generate(ids, 12)
    ref = loaded.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(first.tokens, ref)
    again = gen.generate(ids, 12)  # the cache is reset in place between runs
    assert torch.equal(again.tokens, ref)
    assert first.prefill_tokens_per_s > 0 and first.decode_tokens_per_s > 0
    with pytest.raises(ValueError, match="max_len=32"):
        gen.generate(ids, 30)
