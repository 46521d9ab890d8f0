"""The CPU kernels' tensors in one arena on transparent huge pages (bluelm_quant.huge_pages, issue 14):
the packed model computes and saves exactly what the unpacked one does, the arena is 2 MB-aligned private
memory that really gets huge pages, it is freed when nothing points into it, and a platform without
MADV_HUGEPAGE gets plain memory instead of an error."""
import copy
import gc
import io
import mmap
import os
import weakref

import pytest
import torch
from safetensors.torch import load_file

from bluelm_quant import extension, hf, huge_pages
from bluelm_quant.config import QuantConfig
from bluelm_quant.fuse import FusedMember, fuse_projections
from bluelm_quant.huge_pages import (HUGE_PAGE_BYTES, TENSOR_ALIGN_BYTES, allocate_arena, kernel_tensor_slots,
                                     pack_kernel_tensors, tensor_in)
from bluelm_quant.loading import load_quantized
from bluelm_quant.nn import QuantLinear, find_linears, set_module
from bluelm_quant.placement import Int8Linear
from bluelm_quant.quantizer import rtn
from bluelm_quant.saving import save_quantized

from tiny_models import byte_tokenizer, save_tiny_4bit, tiny_llama, tokens

pytestmark = [pytest.mark.skipif(extension.quant_cuda() is None, reason="needs the compiled quant_cuda extension"),
              pytest.mark.usefixtures("one_thread")]

THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
GROUP = 32


def thp_mode() -> str | None:
    """The bracketed mode of THP_ENABLED ('always', 'madvise', 'never'), None without THP."""
    try:
        text = open(THP_ENABLED).read()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")]


def mapping_of(address: int) -> dict:
    """/proc/self/smaps's entry for the mapping holding `address`: its range, permissions, and fields."""
    entry = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):  # a mapping's header line
                if entry is not None:
                    return entry
                lo, hi = (int(v, 16) for v in head[0].split("-"))
                if lo <= address < hi:
                    entry = {"range": (lo, hi), "perms": head[1]}
            elif entry is not None:
                key, _, value = line.partition(":")
                entry[key] = value.split()
    if entry is None:
        raise AssertionError(f"no mapping holds {address:#x}")
    return entry


@pytest.fixture
def mappings(monkeypatch):
    """Weak references to every mmap the code under test creates."""
    made, real = [], mmap.mmap

    def recording(*args, **kwargs):
        m = real(*args, **kwargs)
        made.append(weakref.ref(m))
        return m

    monkeypatch.setattr(mmap, "mmap", recording)
    return made


def quantized_tiny(act_order: bool, seed: int = 0, **overrides) -> torch.nn.Module:
    """tiny_llama with 4-bit Linears (act-order: one permuted g_idx per input width, so the permutation
    is shared and q/k/v and gate/up still fuse) and an int8 lm_head: every kind of kernel tensor."""
    model = tiny_llama(seed=seed, **overrides)
    config = QuantConfig(bits=4, group_size=GROUP, sym=False)
    perms = {}
    for name, linear in find_linears(model).items():
        qw = rtn(linear.weight.data, config)
        if act_order:
            k = linear.in_features
            perm = perms.setdefault(k, torch.randperm(k, generator=torch.Generator().manual_seed(k)))
            qw.g_idx = (torch.argsort(perm) // GROUP).to(torch.int32)
        set_module(model, name, QuantLinear.from_quantized(qw, GROUP, linear.bias, torch.float32))
    model.lm_head = Int8Linear.from_weight(model.lm_head.weight.detach(), torch.float32)
    return model.eval().requires_grad_(False)


def kernel_tensors(model) -> dict[str, torch.Tensor]:
    names = {id(m): n for n, m in model.named_modules()}
    return {f"{names[id(m)]}.{n}": getattr(m, n) for m, n in kernel_tensor_slots(model)}


def address(arena: memoryview) -> int:
    return torch.frombuffer(arena, dtype=torch.uint8, count=1).data_ptr()


def assert_in_one_arena(model) -> int:
    """The kernel tensors lie side by side in one 2 MB-aligned block (each next one on the next 64-byte
    boundary), each contiguous with a storage of exactly its own bytes; returns the block's address."""
    tensors = kernel_tensors(model)
    assert tensors
    for name, t in tensors.items():
        assert t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size(), name
    spans = sorted({(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors.values()})
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start == -(-end // TENSOR_ALIGN_BYTES) * TENSOR_ALIGN_BYTES, "the kernel tensors are not packed"
    base = spans[0][0]
    assert base % HUGE_PAGE_BYTES == 0
    return base


def logits(model, ids) -> list[torch.Tensor]:
    """A prefill's and a single-position step's logits (the M=1 kernel bodies)."""
    with torch.no_grad():
        return [model(ids).logits, model(ids[:, :1]).logits]


def assert_same_logits(a: list, b: list):
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# --- the arena -----------------------------------------------------------------------------------


def test_arena_is_2mb_aligned_private_memory_of_the_size_asked():
    arena = allocate_arena(3 * HUGE_PAGE_BYTES + 100)
    assert len(arena) == 3 * HUGE_PAGE_BYTES + 100 and not arena.readonly
    assert address(arena) % HUGE_PAGE_BYTES == 0
    # MAP_SHARED (mmap.mmap(-1, n)'s default) would be shmem, which gets no huge pages in madvise mode
    assert mapping_of(address(arena))["perms"].endswith("p")
    everything = torch.frombuffer(arena, dtype=torch.uint8).fill_(7)
    assert int(everything.sum()) == 7 * len(arena)


def test_tensors_in_the_arena_have_storages_of_their_own_that_torch_save_takes():
    arena = allocate_arena(4096)
    codes = tensor_in(arena, 0, torch.zeros(4, 8, dtype=torch.int32)).fill_(3)
    scales = tensor_in(arena, 128, torch.zeros(8, dtype=torch.float16)).fill_(0.5)
    assert scales.data_ptr() - codes.data_ptr() == 128
    assert codes.untyped_storage().nbytes() == 128 and scales.untyped_storage().nbytes() == 16
    assert tensor_in(arena, 256, torch.zeros(0, 5)).shape == (0, 5)
    # one storage viewed as int32 and float16 would be refused: "view the same data as different types"
    buffer = io.BytesIO()
    torch.save({"codes": codes, "scales": scales}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)
    assert torch.equal(loaded["codes"], codes) and torch.equal(loaded["scales"], scales)


def test_arena_mapping_lives_as_long_as_a_tensor_in_it_and_cannot_be_closed_under_it(mappings):
    arena = allocate_arena(HUGE_PAGE_BYTES)
    (ref,) = mappings
    view = tensor_in(arena, 64, torch.zeros(10, dtype=torch.uint8))
    view.fill_(5)
    del arena
    gc.collect()
    assert ref() is not None  # torch.frombuffer's storage keeps the mapping
    with pytest.raises(BufferError):  # an unmapped arena under a live tensor would crash the process
        ref().close()
    assert view.tolist() == [5] * 10
    del view
    gc.collect()
    assert ref() is None


@pytest.mark.skipif(thp_mode() in (None, "never"), reason=f"transparent huge pages are off ({THP_ENABLED}: {thp_mode()})")
def test_packed_kernel_tensors_are_on_huge_pages():
    # ~4.6 MB of kernel tensors: two whole huge pages and a partial one
    model = quantized_tiny(False, hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=8)
    total = pack_kernel_tensors(model)
    base = assert_in_one_arena(model)
    whole = total // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    assert whole >= 2 * HUGE_PAGE_BYTES
    advised = mapping_of(base)
    assert "hg" in advised["VmFlags"] and advised["range"][1] >= base + whole  # MADV_HUGEPAGE on the whole pages
    huge_kb = int(advised["AnonHugePages"][0])
    assert huge_kb * 1024 >= whole, (f"{huge_kb} kB of the arena's {whole >> 10} kB of whole huge pages are on huge "
                                     "pages: the kernel had no free 2 MB pages, or the mapping is not private anonymous")
    assert "hg" not in mapping_of(base + whole)["VmFlags"]  # the partial last page is left alone


@pytest.mark.parametrize("missing", [("MADV_HUGEPAGE",), ("MADV_HUGEPAGE", "MAP_PRIVATE")],
                         ids=["no-madv-hugepage", "windows-like"])
def test_without_madv_hugepage_the_arena_is_the_same_on_small_pages(monkeypatch, missing):
    for name in missing:
        monkeypatch.delattr(mmap, name)
    model = quantized_tiny(True, hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=8)
    reference = logits(model, tokens())
    assert pack_kernel_tensors(model) > 2 * HUGE_PAGE_BYTES
    base = assert_in_one_arena(model)
    assert "hg" not in mapping_of(base)["VmFlags"]
    assert mapping_of(base)["perms"].endswith("s" if "MAP_PRIVATE" in missing else "p")
    assert_same_logits(logits(model, tokens()), reference)


def test_a_kernel_that_refuses_the_advice_leaves_the_arena_on_small_pages(monkeypatch):
    monkeypatch.setattr(mmap, "MADV_HUGEPAGE", 1000)  # no such advice: madvise fails with EINVAL
    arena = torch.frombuffer(allocate_arena(2 * HUGE_PAGE_BYTES), dtype=torch.uint8).fill_(1)
    entry = mapping_of(arena.data_ptr())
    assert "hg" not in entry["VmFlags"]
    if thp_mode() == "madvise":
        assert entry["AnonHugePages"][0] == "0"
    assert int(arena.sum()) == arena.numel()


# --- packing a model -----------------------------------------------------------------------------


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
def test_packed_tensors_equal_the_originals_and_the_model_computes_the_same(act_order):
    model = quantized_tiny(act_order)
    before = {k: t.clone() for k, t in kernel_tensors(model).items()}
    assert any(k.endswith("kernel_perm") for k in before) == act_order
    assert any(k.endswith("weight_int8") for k in before)
    reference = logits(model, tokens())
    total = pack_kernel_tensors(model)
    assert_in_one_arena(model)
    after = kernel_tensors(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], t) and after[k].dtype == t.dtype for k, t in before.items())
    assert total >= sum(t.numel() * t.element_size() for t in before.values())
    assert_same_logits(logits(model, tokens()), reference)


def test_fusing_packs_the_fused_model_into_a_new_arena_and_frees_the_old_one(mappings):
    model = quantized_tiny(True)
    reference = logits(model, tokens())
    pack_kernel_tensors(model)
    first = assert_in_one_arena(model)
    assert fuse_projections(model) == 2 * model.config.num_hidden_layers
    gc.collect()
    assert [r() is None for r in mappings] == [True, False]  # the first arena went once everything moved
    assert assert_in_one_arena(model) != first
    assert_same_logits(logits(model, tokens()), reference)


def test_packing_again_frees_the_first_arena_once_nothing_points_into_it(mappings):
    model = quantized_tiny(False)
    pack_kernel_tensors(model)
    held = model.model.layers[0].mlp.down_proj.qweight  # someone else's view of the first arena
    expected = held.clone()
    pack_kernel_tensors(model)
    gc.collect()
    assert [r() is None for r in mappings] == [False, False]
    assert torch.equal(held, expected)
    del held
    gc.collect()
    assert [r() is None for r in mappings] == [True, False]


def test_packing_frees_each_original_tensor_as_it_goes(monkeypatch):
    model = quantized_tiny(True)
    logits(model, tokens())  # QuantLinear's kernel plans now hold the tensors too
    assert any(m._plan for m in model.modules() if isinstance(m, QuantLinear))
    originals = [weakref.ref(t) for t in kernel_tensors(model).values()]
    alive_at_each_copy, real_copy = [], torch.Tensor.copy_

    def counting_copy(dst, src, *args, **kwargs):
        alive_at_each_copy.append(sum(r() is not None for r in originals))
        return real_copy(dst, src, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", counting_copy)
    pack_kernel_tensors(model)
    monkeypatch.undo()
    gc.collect()
    assert not any(r() is not None for r in originals)
    # when the i-th tensor is copied into the arena, the i copied before are gone: memory holds
    # the arena's pages written so far and the tensors still to copy, never the whole model twice
    assert alive_at_each_copy == [len(originals) - i for i in range(len(originals))]
    assert not any(m._plan for m in model.modules() if isinstance(m, QuantLinear))


def test_a_tensor_two_layers_share_stays_shared():
    model = quantized_tiny(False)
    layers = model.model.layers
    layers[1].mlp.down_proj.scales = layers[0].mlp.down_proj.scales
    pack_kernel_tensors(model)
    assert layers[1].mlp.down_proj.scales.data_ptr() == layers[0].mlp.down_proj.scales.data_ptr()


def test_a_packed_state_dict_goes_through_torch_save():
    model = quantized_tiny(True)
    pack_kernel_tensors(model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)
    assert all(torch.equal(loaded[k], t) for k, t in model.state_dict().items())


def test_a_packed_model_saves_the_same_checkpoint(tmp_path):
    packed = quantized_tiny(True)
    plain = copy.deepcopy(packed)
    pack_kernel_tensors(packed)
    config = QuantConfig(bits=4, group_size=GROUP, sym=False)
    for name, model in (("packed", packed), ("plain", plain)):
        save_quantized(model, str(tmp_path / name), config)
    files = sorted(f for f in os.listdir(tmp_path / "plain") if f.endswith(".safetensors"))
    assert files == sorted(f for f in os.listdir(tmp_path / "packed") if f.endswith(".safetensors"))
    for f in files:
        want, got = load_file(str(tmp_path / "plain" / f)), load_file(str(tmp_path / "packed" / f))
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)


def test_nothing_to_pack_in_a_full_precision_or_meta_model():
    assert pack_kernel_tensors(tiny_llama()) == 0
    on_meta = QuantLinear(64, 64, group_size=GROUP, device="meta")  # not on the CPU: as a CUDA model is skipped
    assert pack_kernel_tensors(on_meta) == 0 and on_meta.qweight.is_meta


def test_disabled_leaves_tensors_where_they_are():
    model = quantized_tiny(False)
    before = {k: t.data_ptr() for k, t in kernel_tensors(model).items()}
    with huge_pages.disabled():
        assert pack_kernel_tensors(model) == 0
    assert {k: t.data_ptr() for k, t in kernel_tensors(model).items()} == before
    assert pack_kernel_tensors(model) > 0  # enabled again after the block


# --- the loaders ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    path = save_tiny_4bit(str(tmp_path_factory.mktemp("huge_pages") / "q"), seed=3)
    byte_tokenizer().save_pretrained(path)  # for the chat's loader
    return path


@pytest.mark.parametrize("lm_head_bits", [16, 8])
def test_load_quantized_on_the_cpu_packs_the_kernel_tensors(saved_tiny, lm_head_bits):
    model = load_quantized(saved_tiny, dtype=torch.float32, lm_head_bits=lm_head_bits)
    assert_in_one_arena(model)
    assert isinstance(model.lm_head, Int8Linear) == (lm_head_bits == 8)
    with huge_pages.disabled():
        plain = load_quantized(saved_tiny, dtype=torch.float32, lm_head_bits=lm_head_bits)
    assert len({t.untyped_storage().data_ptr() for t in kernel_tensors(plain).values()}) > 1
    assert_same_logits(logits(model, tokens()), logits(plain, tokens()))


def test_from_pretrained_through_the_hf_quantizer_packs_the_kernel_tensors(saved_tiny):
    from transformers import AutoModelForCausalLM

    with hf.enabled():
        model = AutoModelForCausalLM.from_pretrained(saved_tiny, dtype=torch.float32)
    assert_in_one_arena(model)
    assert_same_logits(logits(model, tokens()),
                       logits(load_quantized(saved_tiny, dtype=torch.float32), tokens()))


def test_the_chat_packs_its_fused_model_once(saved_tiny, mappings):
    """bluelm-chat loads, then fuses: only the fusing packs, so two arenas are never held at once."""
    from bluelm_quant.cli import chat as chat_cli

    model, _ = chat_cli.load_chat_model(chat_cli.parser().parse_args(["--model", saved_tiny]), "cpu")
    assert isinstance(model.model.layers[0].self_attn.q_proj, FusedMember)
    assert_in_one_arena(model)
    assert len(mappings) == 1
