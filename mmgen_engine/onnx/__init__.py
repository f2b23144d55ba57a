"""ONNX export of a converted checkpoint (its one-shot stages and its autoregressive decoder), ONNX
Runtime sessions over the export, and a reference greedy generation loop on them.

:func:`export_onnx` (``mmgen export-onnx``) traces each part (:data:`PARTS`) with ``torch.onnx.export``
(the torch.export-based exporter, which needs ``onnxscript``) on the reference backend, with
symbolic dimensions (:data:`~mmgen_engine.onnx.export.DIMS`: ``batch`` always), the weights as
external data (``PART.onnx.data``) and every file checked with ``onnx.checker``. ``manifest.json``
describes the export (:mod:`.manifest`): its format version, the checkpoint's identity (SHA-256 of
its config and weights, so an export is never paired with another checkpoint), per part its files
(size, SHA-256), the engine stage it replaces and its inputs and outputs, and the decoder's
geometry. :func:`load_session` checks a part against the manifest and opens it as an
``onnxruntime.InferenceSession``; :class:`OrtGenerator` runs the decoder parts as the engine's
``generate_stream`` does, greedy only.

Parts: the one-shot stages (``image_encoder``; ``text_encoder``, ``detokenizer``;
``audio_encoder``, ``motion_decoder``), and for every task with a decoder ``decoder_prefill`` and
``decoder_step`` in the layout of Optimum / ONNX Runtime GenAI (a growing cache, concatenated by
each step), plus LLaVA's ``token_embedding``:

- ``decoder_prefill``: ``input_ids [batch, prompt_len]`` and the encoder side, either
  ``encoder_hidden_states [batch, encoder_len, D_enc]`` + ``encoder_lengths [batch]`` (int64, the
  valid states per row) for a cross-attention decoder (ViT-GPT2, BLIP, min-dalle's BART, a2g-gpt),
  or ``prefix_embeds [batch, prefix_len, D]`` for a prefix decoder (GIT: exactly its image states;
  ClipCap; LLaVA: the embeddings of the text before ``<image>`` then the image's; BLIP-2: the
  projected queries), the input embeddings in front of the prompt (``prompt_len`` may be 0 then).
  Outputs ``logits [batch, vocab]`` of the last position, and per layer ``i`` the self-attention
  cache ``present.{i}.key``, ``present.{i}.value [batch, kv_heads, past_len, head_dim]`` (``past_len``
  = prefix + prompt) and, with cross-attention, ``present.{i}.encoder.key``,
  ``present.{i}.encoder.value [batch, heads, encoder_len, head_dim]``.
- ``decoder_step``: ``input_ids [batch]`` (one token per row), per layer ``past_key_values.{i}.key``,
  ``.value`` (and ``past_key_values.{i}.encoder.key``, ``.encoder.value``), then ``encoder_lengths``
  for a cross-attention decoder. Every row's token sits at position ``past_len`` (the graph reads
  it from the cache's length: one prompt length per batch). Outputs ``logits [batch, vocab]`` and
  ``present.{i}.key``, ``.value`` grown to ``past_len + 1`` (the encoder's K/V do not change and are
  not returned). Self-attention K/V thus have Optimum's decoder-only names in every family, and the
  encoder's carry ``.encoder`` as in Optimum's seq2seq names.
- ``token_embedding`` (LLaVA): ``input_ids [batch, sequence]`` -> ``inputs_embeds [batch, sequence, D]``.

``onnx``, ``onnxscript`` and ``onnxruntime`` are the ``[onnx]`` extra: this package imports without
them and raises a one-line :class:`MMGenError` naming the extra when a function needs them.
"""
from .export import PARTS, export_onnx, supported_parts
from .generate import OrtGenerator
from .manifest import check_export, read_manifest
from .session import load_session

__all__ = ["check_export", "export_onnx", "load_session", "OrtGenerator", "PARTS", "read_manifest",
           "supported_parts"]
