"""The tiktoken-backed Tokenizer gives the ids Hugging Face's `tokenizers` gives for the same files.

References are built here from the model files themselves (tokens and merges read with the `gguf`
package's own reader, small vocabularies trained with `tokenizers`), never from hard-coded ids.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path

import gguf
import pytest
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from neuron_explainer.models.registry import smollm2_gguf_path
from neuron_explainer.models.tokenizer import Tokenizer
from neuron_explainer.models.tokenizer_files import (
    GGUF_PRE_PATTERNS,
    GPT2_PATTERN,
    SMOLLM_PATTERN,
    TokenizerError,
)

FAMILY_EMOJI = "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466"

TEXTS = [
    "The capital of France is Paris. It's John's book, isn't it? They'll say we'd've gone.",
    "I'M SHOUTING, YOU'LL SEE -- rock'n'roll ''quoted'' 's 'S",
    "def square(x: int) -> int:\n    if x > 0:\n\treturn x ** 2  # tab\n    return -x\n",
    "for (int i = 0; i < n; ++i) {\n        sum += a[i];\n}\r\n",
    "12345.678",
    "Pi is 3.14159, a million is 1,000,000 and today is 2024-01-31 at 09:45.",
    "a   b\n\n\n  c",
    "   leading spaces",
    "trailing spaces   ",
    " \t \n\t\n  mixed whitespace \r\n\r\n",
    "😀 smile, 👍🏽 thumbs, " + FAMILY_EMOJI + " family, 🇫🇷🇯🇵 flags, ❤️ heart",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "Café naïve résumé Ångström façade Œuvre Straße ĳ",
    "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم. नमस्ते दुनिया. สวัสดีชาวโลก",
    "∑x² ≤ ½ + ⅓, Ⅻ o'clock, ٣٤٥ and ５６",
    "nbsp\u00a0thin\u2009ideographic\u3000zero\u200bwidth\ufeffbom line\u2028sep",
    'Mixed: café 123 😀 日本 <b>bold</b> {"json": [1, 2.5e-3]} C:\\path\\file.txt',
    "<|endoftext|> is only special where the tokenizer says so",
    "",
]

FUZZ_ALPHABET = (
    "abcXYZ019 \n\t\r'.,!?-_()[]{}<>|/\\\"#@$%^&*=+~`"
    "éüñçÅßœ日本語中文한국어ภาษาไทยشكрусский"
    "😀👍🏽🇫🇷\u200d\u0301\u0308\u00a0\u2009\u3000\u2028\u0085\u200b"
    "½²٣５Ⅻ"
)


def fuzz_strings(count: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        "".join(rng.choice(FUZZ_ALPHABET) for _ in range(rng.randint(0, 40))) for _ in range(count)
    ]


FUZZ = fuzz_strings()

# ---- the default model (SmolLM2-135M-Instruct GGUF) ----------------------------------------------


@pytest.fixture(scope="module")
def gguf_reader() -> gguf.GGUFReader:
    return gguf.GGUFReader(smollm2_gguf_path())


@pytest.fixture(scope="module")
def smollm() -> Tokenizer:
    """Built from the file path (the fast metadata-only reader)."""
    return Tokenizer.from_gguf(smollm2_gguf_path())


@pytest.fixture(scope="module")
def smollm_hf(gguf_reader: gguf.GGUFReader) -> HFTokenizer:
    """SmolLM2's real tokenizer configuration over the GGUF's tokens and merges."""
    tokens = gguf_reader.fields["tokenizer.ggml.tokens"].contents()
    token_types = gguf_reader.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in gguf_reader.fields["tokenizer.ggml.merges"].contents()]
    hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, token_types, strict=True) if kind == 3]
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return hf


def hf_ids(hf: HFTokenizer, text: str) -> list[int]:
    return list(hf.encode(text, add_special_tokens=False).ids)


def test_gguf_metadata_facts(smollm: Tokenizer, gguf_reader: gguf.GGUFReader) -> None:
    tokens = gguf_reader.fields["tokenizer.ggml.tokens"].contents()
    assert smollm.vocab_size == len(tokens)
    assert smollm.pattern == SMOLLM_PATTERN  # tokenizer.ggml.pre = "smollm"
    assert smollm.bos_token_id == gguf_reader.fields["tokenizer.ggml.bos_token_id"].contents()
    assert smollm.eos_token_id == gguf_reader.fields["tokenizer.ggml.eos_token_id"].contents()
    token_types = gguf_reader.fields["tokenizer.ggml.token_type"].contents()
    assert smollm.special_tokens == {t: i for i, t in enumerate(tokens) if token_types[i] == 3}


def test_from_reader_equals_from_path(smollm: Tokenizer, gguf_reader: gguf.GGUFReader) -> None:
    from_reader = Tokenizer.from_gguf(gguf_reader)
    assert_same_tokenizer(from_reader, smollm)


@pytest.mark.parametrize("text", TEXTS + FUZZ)
def test_smollm_encodes_like_hf_and_round_trips(
    smollm: Tokenizer, smollm_hf: HFTokenizer, text: str
) -> None:
    ids = smollm.encode(text)
    assert ids == hf_ids(smollm_hf, text)
    assert smollm.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS)
def test_encoding_ranks_are_model_ids(smollm: Tokenizer, text: str) -> None:
    assert smollm.encoding.encode_ordinary(text) == smollm.encode(text, allow_special=False)


def test_bytes_without_a_token_are_dropped_like_hf(
    smollm: Tokenizer, smollm_hf: HFTokenizer
) -> None:
    # Some byte values (control characters, bytes never valid in UTF-8) have no token at all.
    alphabet = byte_level_alphabet()
    missing = [b for b in range(128) if smollm_hf.token_to_id(alphabet[b]) is None]
    assert missing, "expected SmolLM2 to lack some single-byte tokens"
    text = "a" + "".join(chr(b) for b in missing) + " b"
    assert smollm.encode(text) == hf_ids(smollm_hf, text)
    assert smollm.decode(smollm.encode(text)) == "a b"
    assert all(i < smollm.vocab_size for i in smollm.encode(text))


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's stand-in characters for the ASCII bytes, as the ByteLevel pre-tokenizer maps them."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return {b: pre.pre_tokenize_str(chr(b))[0][0] for b in range(128)}


def test_special_tokens(smollm: Tokenizer, smollm_hf: HFTokenizer) -> None:
    text = "<|im_start|>user\nhi<|im_end|>"
    start, end = smollm_hf.token_to_id("<|im_start|>"), smollm_hf.token_to_id("<|im_end|>")
    ids = smollm.encode(text)
    assert ids[0] == start and ids[-1] == end
    assert ids == hf_ids(smollm_hf, text)

    plain = smollm.encode(text, allow_special=False)
    assert start not in plain and end not in plain
    smollm_hf.encode_special_tokens = True
    try:
        assert plain == hf_ids(smollm_hf, text)
    finally:
        smollm_hf.encode_special_tokens = False
    assert smollm.decode(plain) == smollm.decode(ids) == text
    assert smollm.token_display(start) == "<|im_start|>"


def unescape_display(display: str) -> bytes:
    """The bytes a display string stands for: text as UTF-8, \\xNN escapes as single bytes."""
    parts = re.split(r"(\\x[0-9a-f]{2})", display)
    return b"".join(
        bytes([int(p[2:], 16)]) if re.fullmatch(r"\\x[0-9a-f]{2}", p) else p.encode() for p in parts
    )


def test_token_display(smollm: Tokenizer) -> None:
    def is_partial(i: int) -> bool:
        try:
            smollm.token_bytes(i).decode("utf-8")
        except UnicodeDecodeError:
            return True
        return False

    partial = next(i for i in range(smollm.vocab_size) if is_partial(i))
    display = smollm.token_display(partial)
    assert re.search(r"\\x[0-9a-f]{2}", display)
    assert unescape_display(display) == smollm.token_bytes(partial)

    paris = smollm.single_token_id(" Paris")
    assert smollm.token_display(paris) == " Paris"

    ids = smollm.encode(FAMILY_EMOJI)
    assert len(ids) > 1
    assert unescape_display("".join(smollm.display_tokens(ids))).decode() == FAMILY_EMOJI


def test_single_token_id(smollm: Tokenizer, smollm_hf: HFTokenizer) -> None:
    paris = smollm.single_token_id(" Paris")
    assert hf_ids(smollm_hf, " Paris") == [paris]
    assert smollm.decode([paris]) == " Paris"
    with pytest.raises(TokenizerError, match="Parisianistically"):
        smollm.single_token_id(" Parisianistically")
    with pytest.raises(TokenizerError):
        smollm.single_token_id("")


def test_bad_ids_raise(smollm: Tokenizer) -> None:
    for bad in (-1, smollm.vocab_size):
        with pytest.raises(TokenizerError):
            smollm.decode([bad])


# ---- save_hf -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_smollm(smollm: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smollm_hf")
    smollm.save_hf(out)
    return out


SPECIAL_TEXTS = ["<|im_start|>user\nhi<|im_end|>", "<|endoftext|><|endoftext|>x<repo_name>"]


def test_save_hf_loads_in_tokenizers(smollm: Tokenizer, saved_smollm: Path) -> None:
    hf = HFTokenizer.from_file(str(saved_smollm / "tokenizer.json"))
    for text in TEXTS + FUZZ + SPECIAL_TEXTS:
        assert hf_ids(hf, text) == smollm.encode(text), text
        assert hf.decode(smollm.encode(text), skip_special_tokens=False) == text


def test_save_hf_loads_in_transformers(smollm: Tokenizer, saved_smollm: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(saved_smollm)
    for text in TEXTS + FUZZ + SPECIAL_TEXTS:
        assert hf.encode(text, add_special_tokens=False) == smollm.encode(text), text
    assert hf.bos_token_id == smollm.bos_token_id
    assert hf.eos_token_id == smollm.eos_token_id


def test_save_hf_round_trip(smollm: Tokenizer, saved_smollm: Path) -> None:
    assert_same_tokenizer(Tokenizer.from_hf_folder(saved_smollm), smollm)


def assert_same_tokenizer(ours: Tokenizer, expected: Tokenizer) -> None:
    assert ours.vocab_size == expected.vocab_size
    assert ours.special_tokens == expected.special_tokens
    assert ours.pattern == expected.pattern
    assert (ours.bos_token_id, ours.eos_token_id) == (expected.bos_token_id, expected.eos_token_id)
    for i in range(expected.vocab_size):
        assert ours.token_bytes(i) == expected.token_bytes(i)
    for text in TEXTS + FUZZ + SPECIAL_TEXTS:
        assert ours.encode(text) == expected.encode(text)
        assert ours.encode(text, allow_special=False) == expected.encode(text, allow_special=False)


# ---- small vocabularies trained here -------------------------------------------------------------

TRAINING_TEXT = TEXTS * 3 + FUZZ[:100]


def train_bpe(pre_tokenizer: pre_tokenizers.PreTokenizer, vocab_size: int = 500) -> HFTokenizer:
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizer
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    hf.train_from_iterator(TRAINING_TEXT, trainer)
    return hf


def byte_level(use_regex: bool) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


def split_then_byte_level(pattern: str) -> pre_tokenizers.PreTokenizer:
    split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    return pre_tokenizers.Sequence([split, byte_level(use_regex=False)])


def digits_then_byte_level() -> pre_tokenizers.PreTokenizer:
    digits = pre_tokenizers.Digits(individual_digits=True)
    return pre_tokenizers.Sequence([digits, byte_level(use_regex=True)])


def transformers_gguf_split(pre: str) -> str:
    """transformers' own regex for a llama.cpp pre-tokenizer name (an independent source)."""
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    return str(mapping.GGUF_PRE_TOKENIZER_SPLITS[pre])


# (llama.cpp pre-tokenizer name, the Hugging Face pre_tokenizer it stands for)
PRE_TOKENIZERS: list[tuple[str, Callable[[], pre_tokenizers.PreTokenizer]]] = [
    ("gpt2", lambda: byte_level(use_regex=True)),
    ("smollm", digits_then_byte_level),
    ("llama-bpe", lambda: split_then_byte_level(transformers_gguf_split("llama-bpe"))),
    ("qwen2", lambda: split_then_byte_level(transformers_gguf_split("qwen2"))),
]


def assert_encodes_like(ours: Tokenizer, hf: HFTokenizer) -> None:
    for text in TEXTS + FUZZ + SPECIAL_TEXTS[1:]:
        assert ours.encode(text) == hf_ids(hf, text), text
        assert ours.decode(ours.encode(text)) == text


def test_gpt2_style_folder(tmp_path: Path) -> None:
    hf = train_bpe(byte_level(use_regex=True))
    hf.model.save(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merges.txt", "vocab.json"]
    ours = Tokenizer.from_hf_folder(tmp_path)
    assert ours.pattern == GPT2_PATTERN
    end_of_text = hf.token_to_id("<|endoftext|>")
    assert ours.special_tokens == {"<|endoftext|>": end_of_text}
    assert ours.bos_token_id == ours.eos_token_id == end_of_text
    assert ours.vocab_size == hf.get_vocab_size()
    assert_encodes_like(ours, hf)


@pytest.mark.parametrize("pre", [name for name, _ in PRE_TOKENIZERS])
def test_tokenizer_json_and_gguf_routes(pre: str, tmp_path: Path) -> None:
    hf = train_bpe(dict(PRE_TOKENIZERS)[pre]())
    hf.save(str(tmp_path / "tokenizer.json"))
    from_json = Tokenizer.from_hf_folder(tmp_path)
    assert from_json.pattern == GGUF_PRE_PATTERNS[pre]
    assert_encodes_like(from_json, hf)

    # The same vocabulary as llama.cpp would store it, named by its pre-tokenizer.
    vocab = hf.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    end_of_text = vocab["<|endoftext|>"]
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(path, arch="gpt2")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i == end_of_text else 1 for i in range(len(tokens))])
    writer.add_token_merges(gguf_merges(hf))
    writer.add_bos_token_id(end_of_text)
    writer.add_eos_token_id(end_of_text)
    write_gguf(writer)
    from_gguf = Tokenizer.from_gguf(path)
    assert from_gguf.pattern == GGUF_PRE_PATTERNS[pre]
    assert_encodes_like(from_gguf, hf)
    assert_same_tokenizer(from_gguf, from_json)


def gguf_merges(hf: HFTokenizer) -> list[str]:
    """The merges of a Hugging Face BPE as GGUF stores them ("Ġ t")."""
    merges = json.loads(hf.to_str())["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def write_gguf(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_overlapping_special_tokens_match_longest_first(tmp_path: Path) -> None:
    hf = train_bpe(byte_level(use_regex=True))
    hf.add_special_tokens(["<|a|>", "<|a|>b", "<|a|>bc<|a|>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.from_hf_folder(tmp_path)
    for text in ["<|a|>bcd", "x<|a|>b<|a|>", "<|a|>bc<|a|>b", "<|a|<|a|>>"]:
        assert ours.encode(text) == hf_ids(hf, text), text


def test_nfc_normalizer(tmp_path: Path) -> None:
    hf = train_bpe(byte_level(use_regex=True))
    hf.normalizer = normalizers.NFC()
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.from_hf_folder(tmp_path)
    ours.save_hf(tmp_path / "saved")
    saved = HFTokenizer.from_file(str(tmp_path / "saved" / "tokenizer.json"))
    for text in [*TEXTS, *FUZZ, "cafe\u0301 A\u030a", "<|endoftext|>\u0301"]:
        assert ours.encode(text) == hf_ids(hf, text) == hf_ids(saved, text), text


# ---- what is refused -----------------------------------------------------------------------------


def test_sentencepiece_gguf_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "spm.gguf"
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>", "▁a", "▁b"])
    writer.add_token_scores([0.0, 0.0, 0.0, -1.0, -2.0])
    writer.add_token_types([2, 3, 3, 1, 1])
    write_gguf(writer)
    with pytest.raises(TokenizerError, match="SentencePiece"):
        Tokenizer.from_gguf(path)
    with pytest.raises(TokenizerError, match="SentencePiece"):
        Tokenizer.from_gguf(gguf.GGUFReader(path))


def test_merge_order_must_follow_id_order() -> None:
    vocab = {"a": 0, "b": 1, "c": 2, "bc": 3, "ab": 4}
    with pytest.raises(TokenizerError, match="merge priority"):
        Tokenizer(
            vocab=vocab, merges=[("a", "b"), ("b", "c")], special_tokens={}, pattern=GPT2_PATTERN
        )
    ok = Tokenizer(
        vocab=vocab, merges=[("b", "c"), ("a", "b")], special_tokens={}, pattern=GPT2_PATTERN
    )
    assert ok.encode("abc") == [0, 3]  # "bc" merges first, as its merge comes first


def test_unsupported_pre_tokenizer_is_refused(tmp_path: Path) -> None:
    hf = train_bpe(pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), byte_level(False)]))
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="pre_tokenizer"):
        Tokenizer.from_hf_folder(tmp_path)


def test_folder_without_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_hf_folder(tmp_path)


def test_add_bos_token_follows_the_folder_as_transformers_does(
    smollm: Tokenizer, saved_smollm: Path, tmp_path: Path
) -> None:
    """Whether a Hugging Face folder's model expects BOS (what requests with prependBos unset
    follow): not as saved (SmolLM2's does not), yes where tokenizer.json's post-processor puts BOS
    first (Llama 3's TemplateProcessing; transformers then adds it by default too), and as
    tokenizer_config.json's add_bos_token says where it says."""
    transformers = pytest.importorskip("transformers")
    assert smollm.bos_token_id is not None
    bos = smollm.token_display(smollm.bos_token_id)

    def folder(name: str, template: bool, add_bos: bool | None) -> Path:
        out = tmp_path / name
        out.mkdir()
        for file in saved_smollm.iterdir():
            (out / file.name).write_bytes(file.read_bytes())
        if template:
            data = json.loads((out / "tokenizer.json").read_text())
            data["post_processor"] = {
                "type": "TemplateProcessing",
                "single": [
                    {"SpecialToken": {"id": bos, "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}},
                ],
                "pair": [
                    {"SpecialToken": {"id": bos, "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}},
                    {"Sequence": {"id": "B", "type_id": 1}},
                ],
                "special_tokens": {bos: {"id": bos, "ids": [smollm.bos_token_id], "tokens": [bos]}},
            }
            (out / "tokenizer.json").write_text(json.dumps(data))
        config = json.loads((out / "tokenizer_config.json").read_text())
        config.pop("add_bos_token", None)
        if add_bos is not None:
            config["add_bos_token"] = add_bos
        (out / "tokenizer_config.json").write_text(json.dumps(config))
        return out

    for name, template, add_bos in [("plain", False, None), ("template", True, None)]:
        path = folder(name, template, add_bos)
        hf = transformers.AutoTokenizer.from_pretrained(path)
        adds = hf.encode("hi")[0] == smollm.bos_token_id
        assert adds == template, name
        assert Tokenizer.from_hf_folder(path).add_bos_token == adds, name
    assert Tokenizer.from_hf_folder(folder("config_yes", False, True)).add_bos_token
    assert not Tokenizer.from_hf_folder(folder("config_no", True, False)).add_bos_token
