"""Reading Hugging Face model directories: config, weights, tokenizer, preprocessor.

Weights come from ``model.safetensors`` (optionally sharded with ``model.safetensors.index.json``)
or ``pytorch_model.bin`` read with ``torch.load(weights_only=True)``, which refuses arbitrary
pickled objects. Every failure is a one-line :class:`ConversionError` naming the file.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer
from tokenizers.decoders import ByteLevel as ByteLevelDecoder
from tokenizers.decoders import WordPiece as WordPieceDecoder
from tokenizers.models import BPE, WordPiece
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer, ByteLevel

from .. import checkpoint
from ..config import DTYPES
from ..errors import ConversionError, one_line

# A zip member (torch.save writes its members uncompressed) may unpack to at most this many bytes
# more than it takes in the archive: a larger announced growth is a decompression bomb.
MAX_INFLATION = 64 * 2 ** 20


def read_json(path: Path) -> dict:
    """The JSON object in ``path``, read with the checkpoint reader's bounds (size, nesting, finite
    numbers)."""
    if not path.is_file():
        raise ConversionError(f"{path}: file not found")
    data = checkpoint.read_json(path, ConversionError)
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return data


def read_weights(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF model directory, on CPU."""
    single, index, pt = src / "model.safetensors", src / "model.safetensors.index.json", src / "pytorch_model.bin"
    if single.is_file():
        return load_safetensors(single)
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(v, str) and v and Path(v).name == v for v in weight_map.values()):
            raise ConversionError(f"{index}: weight_map must map tensor names to shard files beside it")
        shards = sorted(set(weight_map.values()))
        tensors: dict[str, torch.Tensor] = {}
        for name in shards:
            tensors.update(load_safetensors(src / name))
        return tensors
    if pt.is_file():
        return load_torch(pt)
    raise ConversionError(f"{src}: no weights (model.safetensors, model.safetensors.index.json or "
                          f"pytorch_model.bin)")


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConversionError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ConversionError(f"{path}: corrupt or truncated safetensors file ({one_line(e)})") from None


def check_archive(path: Path) -> None:
    """Refuse a zip archive (a ``torch.save`` file) whose central directory announces a member that
    unpacks to more than :data:`MAX_INFLATION` bytes beyond its stored size, before anything is
    unpacked; an unreadable directory is a corrupt file. Other files pass."""
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ConversionError(f"{path}: corrupt or truncated PyTorch file ({one_line(e)})") from None
    for info in infos:
        if info.file_size - info.compress_size > MAX_INFLATION:
            raise ConversionError(f"{path}: refused: zip member {info.filename!r} would unpack from "
                                  f"{info.compress_size} to {info.file_size} bytes (a member may grow by at most "
                                  f"{MAX_INFLATION} bytes)")


def load_torch_object(path: Path, trust_pickle: bool | None = None):
    """The object ``torch.save`` wrote to ``path``, read with ``weights_only=True`` (plain tensors,
    containers and numbers; memory-mapped when the file allows). A file that holds other pickled
    objects is refused, or fully unpickled when ``trust_pickle`` is True; the refusal tells the user
    about ``--trust-pickle`` when it is False, and not when it is None (a format that never needs it).
    A decompression bomb is refused first (:func:`check_archive`)."""
    check_archive(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # files written before torch 1.6 (not zip-based) cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            hint = "" if trust_pickle is None else "; if you trust this file, pass trust_pickle=True (--trust-pickle)"
            raise ConversionError(f"{path}: refused to load: it holds more than plain tensors and would need "
                                  f"full unpickling ({one_line(e)}){hint}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise ConversionError(f"{path}: corrupt or truncated PyTorch file ({one_line(e)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # full unpickling can raise anything the pickled classes raise
        raise ConversionError(f"{path}: cannot unpickle ({type(e).__name__}: {one_line(e)})") from None


def load_torch(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a PyTorch file, read with ``weights_only=True`` (never arbitrary pickles)."""
    data = load_torch_object(path)
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ConversionError(f"{path}: expected a state dict of tensors")
    return data


def special_tokens(src: Path, default=("<|endoftext|>",)) -> list[str]:
    """Special token strings of ``special_tokens_map.json`` (``default``, GPT-2's ``<|endoftext|>``,
    without one)."""
    path = src / "special_tokens_map.json"
    if not path.is_file():
        return list(default)
    tokens = []
    for value in read_json(path).values():
        for item in value if isinstance(value, list) else [value]:
            item = item.get("content") if isinstance(item, dict) else item
            if isinstance(item, str) and item not in tokens:
                tokens.append(item)
    return tokens


def tokenizer_json(src: Path, workdir: Path) -> Path:
    """Path of a ``tokenizer.json`` for ``src``: the one there, or one built in ``workdir`` from
    GPT-2 style ``vocab.json`` + ``merges.txt`` (byte-level BPE) or BERT style ``vocab.txt``
    (WordPiece, :func:`wordpiece_tokenizer`) with the special tokens marked special."""
    if (src / "tokenizer.json").is_file():
        try:
            Tokenizer.from_file(str(src / "tokenizer.json"))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise ConversionError(f"{src / 'tokenizer.json'}: unreadable tokenizer ({one_line(e)})") from None
        return src / "tokenizer.json"
    vocab, merges = src / "vocab.json", src / "merges.txt"
    if (src / "vocab.txt").is_file() and not vocab.is_file():
        out = workdir / "tokenizer.json"
        wordpiece_tokenizer(src).save(str(out))
        return out
    if not (vocab.is_file() and merges.is_file()):
        raise ConversionError(f"{src}: no tokenizer (tokenizer.json, vocab.json + merges.txt, or vocab.txt)")
    try:
        tok = Tokenizer(BPE.from_file(str(vocab), str(merges)))
    except Exception as e:
        raise ConversionError(f"{src}: unreadable vocab.json/merges.txt ({one_line(e)})") from None
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = ByteLevelDecoder()
    tok.add_special_tokens(special_tokens(src))
    out = workdir / "tokenizer.json"
    tok.save(str(out))
    return out


def wordpiece_tokenizer(src: Path) -> Tokenizer:
    """BERT's tokenizer from ``vocab.txt``: BERT normalization (lower case unless
    ``tokenizer_config.json`` says ``do_lower_case: false``), WordPiece, then the tokens of
    ``added_tokens.json`` (BLIP's ``[DEC]``, ...) at their ids, all special tokens marked special."""
    config = read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
    try:
        tok = Tokenizer(WordPiece.from_file(str(src / "vocab.txt"), unk_token=config.get("unk_token", "[UNK]")))
    except Exception as e:  # tokenizers raises plain Exception subclasses
        raise ConversionError(f"{src / 'vocab.txt'}: unreadable vocabulary ({one_line(e)})") from None
    tok.normalizer = BertNormalizer(lowercase=bool(config.get("do_lower_case", True)))
    tok.pre_tokenizer = BertPreTokenizer()
    tok.decoder = WordPieceDecoder(prefix="##")
    added = read_json(src / "added_tokens.json") if (src / "added_tokens.json").is_file() else {}
    for token, index in sorted(added.items(), key=lambda kv: kv[1]):
        if index != tok.get_vocab_size(with_added_tokens=True):
            raise ConversionError(f"{src / 'added_tokens.json'}: {token!r} has id {index}, but the next free id "
                                  f"is {tok.get_vocab_size(with_added_tokens=True)}")
        tok.add_special_tokens([token])
    known = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.add_special_tokens([t for t in known + special_tokens(src, default=[]) if tok.token_to_id(t) is not None])
    return tok


def tensor_dtype_name(tensors: dict[str, torch.Tensor]) -> str:
    """The floating dtype most of the source's parameters use (float64 and others -> float32)."""
    counts: dict[torch.dtype, int] = {}
    for t in tensors.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    name = str(max(counts, key=counts.get)).removeprefix("torch.") if counts else "float32"
    return name if name in DTYPES else "float32"
