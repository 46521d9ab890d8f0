"""BlueLMTokenizer on a SentencePiece model trained at test time (tests/data corpus)."""
import json
import os
import shutil

import pytest
from transformers import AutoTokenizer

import bluelm_quant  # noqa: F401  (registers BlueLM with the Auto classes)
from bluelm_fixtures import SP_VOCAB, make_tiny_bluelm_dir, trained_sp_model, write_tokenizer_dir
from bluelm_quant.models.bluelm import BlueLMTokenizer, BlueLMTokenizerError

TEXTS = [
    "The weather today is clear and the river is quiet.",
    "今天天气很好，我们一起去公园散步吧。",
    "Mixed 北京 Beijing, 32768 tokens; 量化 to 4 bits!",
    "Unseen characters: 鹦鹉 and émigré use byte fallback.",
]


@pytest.fixture(scope="module")
def real_layout(tmp_path_factory):
    """Chat tokens at 100000.. as in the published tokenizer_config.json."""
    return AutoTokenizer.from_pretrained(write_tokenizer_dir(str(tmp_path_factory.mktemp("tok")), 100000))


def test_autotokenizer_picks_our_class_despite_remote_auto_map(real_layout):
    # tokenizer_config.json names tokenization_bluelm.py in auto_map, which is not in the directory.
    assert type(real_layout) is BlueLMTokenizer


def test_bos_added_eos_not(real_layout):
    ids = real_layout("hello world").input_ids
    assert ids[0] == 1 and real_layout.bos_token_id == 1
    assert 2 not in ids and real_layout.eos_token_id == 2
    assert real_layout("hello world", add_special_tokens=False).input_ids == ids[1:]


def test_special_ids_match_bluelm(real_layout):
    assert real_layout.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2]


def test_added_token_ids_come_from_directory(real_layout, tmp_path):
    for offset, token in enumerate(["[|Human|]:", "[|AI|]:", "[SEH]", "[SEA]"]):
        assert real_layout.convert_tokens_to_ids(token) == 100000 + offset
    # The same SentencePiece model with the tokens placed elsewhere: ids follow the files.
    small = AutoTokenizer.from_pretrained(write_tokenizer_dir(str(tmp_path), SP_VOCAB))
    assert small.convert_tokens_to_ids("[|Human|]:") == SP_VOCAB
    assert small.human_token_id == SP_VOCAB and small.ai_token_id == SP_VOCAB + 1


def test_chat_markers_are_single_tokens_and_skipped(real_layout):
    ids = real_layout("[|Human|]:你好[|AI|]:Hi there</s>").input_ids
    assert ids[:2] == [1, 100000]
    assert 100001 in ids and ids[-1] == 2
    # Legacy SentencePiece encoding puts a word-boundary piece after each marker, hence the space.
    assert real_layout.decode(ids, skip_special_tokens=True) == "你好 Hi there"
    assert "[|Human|]:" in real_layout.decode(ids)
    assert "[SEH]" not in real_layout.decode(real_layout("[SEH]x[SEA]").input_ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_with_byte_fallback(real_layout, text):
    ids = real_layout(text).input_ids
    assert real_layout.decode(ids, skip_special_tokens=True) == text


def test_byte_fallback_and_digit_split(real_layout):
    tokens = real_layout.tokenize("鹦鹉 2048")
    assert any(t.startswith("<0x") for t in tokens)  # characters absent from the tiny vocab
    digits = [t.lstrip("▁") for t in tokens if t.lstrip("▁").isdigit()]
    assert digits == ["2", "0", "4", "8"]


def test_save_and_reload(real_layout, tmp_path):
    real_layout.save_pretrained(tmp_path)
    with open(tmp_path / "tokenizer_config.json", encoding="utf-8") as f:
        assert json.load(f)["tokenizer_class"] == "BlueLMTokenizer"
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "[|Human|]:" + TEXTS[2] + "[|AI|]:"
    assert again(text).input_ids == real_layout(text).input_ids


def test_loads_from_model_directory_via_config_model_type(tmp_path):
    model_dir = make_tiny_bluelm_dir(str(tmp_path / "m"))
    with open(os.path.join(model_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    del config["tokenizer_class"]  # only config.json's model_type "BlueLM" is left to go by
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    assert type(AutoTokenizer.from_pretrained(model_dir)) is BlueLMTokenizer


def test_missing_tokenizer_model_is_a_clear_error(tmp_path):
    tok_dir = write_tokenizer_dir(str(tmp_path), 100000)
    os.remove(os.path.join(tok_dir, "tokenizer.model"))
    with pytest.raises(BlueLMTokenizerError, match="tokenizer.model"):
        AutoTokenizer.from_pretrained(tok_dir)
    with pytest.raises(BlueLMTokenizerError, match="tokenizer.model"):
        BlueLMTokenizer(vocab_file=str(tmp_path / "nope.model"))


def test_direct_construction(tmp_path):
    path = shutil.copy(trained_sp_model(), tmp_path / "tokenizer.model")
    tok = BlueLMTokenizer(vocab_file=str(path))
    assert tok("abc").input_ids[0] == 1
    assert tok.vocab_size == SP_VOCAB
    assert tok.human_token_id is None  # no guessing of ids when the files do not say
    with pytest.raises(BlueLMTokenizerError, match="neither in the SentencePiece vocabulary"):
        tok.decode([SP_VOCAB + 5])
