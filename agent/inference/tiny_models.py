"""Build tiny random-weight MedSigLIP and MedGemma stand-ins, offline and deterministically.

Real weights cannot be downloaded everywhere (tests, CI, a laptop before licence approval), yet
the flow should still run through the very code that loads the real checkpoints. These builders
write folders that :mod:`agent.inference.medsiglip` and :mod:`agent.inference.medgemma` load
with the same Auto classes as ``google/medsiglip-448`` and ``google/medgemma-4b-it``: the model,
tokenizer, image-processor and processor classes are the real ones, only the sizes are tiny and
the weights random. Their output is meaningless; their shapes, special tokens, chat template and
pre-processing are faithful enough that bugs in the adapters show up.

Used by the ``--test-models`` switch, by the fallback when real weights are missing, by
``tools/make_test_models.py`` and by the test suite.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import string
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from agent.inference.labels import CXR_LABELS_V1

#: Bump when a builder changes: folders built by an older version are then rebuilt.
BUILD_VERSION = 1
#: Written last into a finished folder; a folder without it (a killed build) is rebuilt.
MARKER_NAME = ".medagent-test-model.json"
MEDSIGLIP_DIRNAME = "tiny-random-medsiglip"
MEDGEMMA_DIRNAME = "tiny-random-medgemma"
MEDGEMMA_TEXT_DIRNAME = "tiny-random-medgemma-text"
SEED = 1234

#: Gemma 3's chat template as shipped with google/gemma-3-4b-it and google/medgemma-4b-it. There
#: is no system turn: a system message is folded into the first user turn.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

# Gemma's special tokens, in Gemma's order where it has one (pad 0, eos 1, bos 2, unk 3, mask 4).
# <unused94>/<unused95> open and close MedGemma's thinking block.
_GEMMA_CORE_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
_GEMMA_TURN_SPECIALS = ["<start_of_turn>", "<end_of_turn>", "<unused94>", "<unused95>"]
_GEMMA_IMAGE_SPECIALS = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}

# Whole-word pieces so random output reads as words and prompts take fewer tokens; every other
# text falls back to single characters. No <0xNN> byte pieces exist, so nothing decodes to '�'.
# fmt: off
_GEMMA_WORDS = (
    "the", "of", "and", "to", "in", "is", "a", "with", "no", "for", "on", "at", "as", "or", "be",
    "are", "was", "this", "that", "not", "there", "from", "by", "patient", "history", "findings",
    "finding", "impression", "chest", "x-ray", "lung", "lungs", "heart", "pleural", "effusion",
    "opacity", "cardiomegaly", "pneumothorax", "atelectasis", "consolidation", "pneumonia",
    "normal", "acute", "stable", "left", "right", "bilateral", "lower", "upper", "lobe", "mild",
    "moderate", "severe", "small", "large", "prior", "study", "image", "images", "report",
    "summary", "evidence", "cited", "observation", "condition", "medication", "procedure", "blood",
    "pressure", "temperature", "date", "year", "years", "old", "male", "female", "answer",
    "question", "diagnosis",
)
# fmt: on
_GEMMA_EXTRA_CHARS = "°µ±é–—’“”≤≥×"


def build_tiny_medsiglip(target: Path) -> Path:
    """Build a tiny random-weight MedSigLIP (``SiglipModel`` + ``SiglipProcessor``) in ``target``.

    The towers are tiny but the interface matches ``google/medsiglip-448``: 448x448 inputs with
    pixels scaled to [-1, 1], text padded to 64 tokens, a sentencepiece tokenizer that lower-cases
    and drops punctuation, and the model's own ``logit_scale``/``logit_bias``.

    Args:
        target: folder to write; created if missing, existing files are overwritten.

    Returns:
        ``target``.
    """
    from transformers import (
        SiglipConfig,
        SiglipImageProcessorPil,
        SiglipModel,
        SiglipProcessor,
        SiglipTokenizer,
    )

    target.mkdir(parents=True, exist_ok=True)
    _remove_marker(target)
    embed_dim = 32
    with tempfile.TemporaryDirectory() as scratch:
        spm_path = Path(scratch) / "spiece.model"
        spm_path.write_bytes(_train_siglip_sentencepiece())
        vocab_size = _sentencepiece_size(spm_path)
        tokenizer = SiglipTokenizer(vocab_file=str(spm_path), model_max_length=64)
        tokenizer.save_pretrained(target)
    # Re-read from target, so the processor saved below refers to the kept file, not the
    # scratch copy that disappeared with the block above.
    tokenizer = SiglipTokenizer.from_pretrained(target)

    config = SiglipConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": embed_dim,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            # MedSigLIP pads text to 64 tokens and pools the last position.
            "max_position_embeddings": 64,
            "projection_size": embed_dim,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            # SigLIP texts have no start token; the class default (49406) lies outside this vocab.
            "bos_token_id": None,
        },
        vision_config={
            "hidden_size": embed_dim,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 448,
            # 448 / 32 = 14x14 patches: the real input size at a fraction of the conv weights.
            "patch_size": 32,
        },
    )
    torch.manual_seed(SEED)
    model = SiglipModel(config).eval()
    with _quiet_saving():
        model.save_pretrained(target)

    image_processor = SiglipImageProcessorPil(
        size={"height": 448, "width": 448},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(target)
    _write_marker(target, kind="medsiglip")
    return target


def build_tiny_medgemma(target: Path) -> Path:
    """Build a tiny random-weight MedGemma (``Gemma3ForConditionalGeneration``) in ``target``.

    Faithful to ``google/medgemma-4b-it`` where the adapter depends on it: Gemma's special tokens
    (turn markers, image markers, ``<unused94>``/``<unused95>`` thinking markers), the Gemma 3
    chat template, a SigLIP vision tower whose patches are pooled to ``mm_tokens_per_image``
    soft tokens (``image_seq_length`` in the processor), and a generation config that stops on
    ``<eos>`` or ``<end_of_turn>`` and, like the real one, defaults to sampling.

    Args:
        target: folder to write; created if missing, existing files are overwritten.

    Returns:
        ``target``.
    """
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
    )

    target.mkdir(parents=True, exist_ok=True)
    _remove_marker(target)
    tokenizer = _build_gemma_tokenizer()
    tokenizer.save_pretrained(target)

    # 112 / 28 = 4x4 patches, average-pooled 2x2 into 4 soft tokens per image. The pooling needs
    # sqrt(mm_tokens_per_image) to divide the patches per side, as 16 divides 64 in the real model.
    image_size, patch_size, tokens_per_image = 112, 28, 4
    special_ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in _all_gemma_specials()}
    config = Gemma3Config(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "max_position_embeddings": 8192,
            "sliding_window": 512,
            # One local and one global layer, so both attention kinds run.
            "layer_types": ["sliding_attention", "full_attention"],
            "pad_token_id": special_ids["<pad>"],
            "bos_token_id": special_ids["<bos>"],
            "eos_token_id": special_ids["<eos>"],
        },
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch_size,
            "vision_use_head": False,
        },
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=special_ids["<start_of_image>"],
        eoi_token_index=special_ids["<end_of_image>"],
        image_token_index=special_ids["<image_soft_token>"],
    )
    torch.manual_seed(SEED)
    model = Gemma3ForConditionalGeneration(config).eval()
    _silence_special_logits(model, [special_ids[tok] for tok in _all_gemma_specials()])
    model.generation_config = _gemma_generation_config(special_ids)
    with _quiet_saving():
        model.save_pretrained(target)

    image_processor = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=tokens_per_image,
    )
    processor.save_pretrained(target)
    _write_marker(target, kind="medgemma")
    return target


def build_tiny_medgemma_text(target: Path) -> Path:
    """Build a tiny random-weight text-only MedGemma (``Gemma3ForCausalLM``) in ``target``.

    The stand-in for ``google/medgemma-27b-text-it``: config ``model_type`` ``gemma3_text``, no
    vision tower and no processor, only the tokenizer (the same one as the multimodal stand-in,
    with the Gemma 3 chat template), loaded with ``AutoModelForCausalLM`` + ``AutoTokenizer``.

    Args:
        target: folder to write; created if missing, existing files are overwritten.

    Returns:
        ``target``.
    """
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    target.mkdir(parents=True, exist_ok=True)
    _remove_marker(target)
    tokenizer = _build_gemma_tokenizer()
    tokenizer.save_pretrained(target)
    special_ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in _all_gemma_specials()}
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=8192,
        sliding_window=512,
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=special_ids["<pad>"],
        bos_token_id=special_ids["<bos>"],
        eos_token_id=special_ids["<eos>"],
    )
    torch.manual_seed(SEED)
    model = Gemma3ForCausalLM(config).eval()
    _silence_special_logits(model, [special_ids[tok] for tok in _all_gemma_specials()])
    model.generation_config = _gemma_generation_config(special_ids)
    with _quiet_saving():
        model.save_pretrained(target)
    _write_marker(target, kind="medgemma-text")
    return target


def _gemma_generation_config(special_ids: dict[str, int]) -> Any:
    """Return the real checkpoints' generation config: stop at <eos> or <end_of_turn>, sampling defaults.

    The real checkpoint ships sampling defaults; the adapter must override them for greedy decoding.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=special_ids["<bos>"],
        pad_token_id=special_ids["<pad>"],
        eos_token_id=[special_ids["<eos>"], special_ids["<end_of_turn>"]],
        do_sample=True,
        top_k=64,
        top_p=0.95,
    )


def ensure_test_text_model(base_dir: Path) -> Path:
    """Return the tiny text-only MedGemma folder under ``base_dir``, building it when missing.

    Separate from :func:`ensure_test_models` because only runs configured for the text-only
    checkpoint (and its tests) need it; the same atomic build-and-rename applies.
    """
    base_dir.mkdir(parents=True, exist_ok=True)
    folder = base_dir / MEDGEMMA_TEXT_DIRNAME
    _ensure_one(folder, "medgemma-text", build_tiny_medgemma_text)
    return folder


def ensure_test_models(base_dir: Path) -> tuple[Path, Path]:
    """Return the tiny MedSigLIP and MedGemma folders under ``base_dir``, building what is missing.

    A folder counts as built only when its marker file (written last) names the current
    :data:`BUILD_VERSION`. Each model is built in a scratch folder beside its final place and
    renamed into place, so a killed build never leaves a folder that looks complete, and two
    processes building at once both end with a complete folder.

    Args:
        base_dir: parent folder, e.g. ``.medagent/test-models``.

    Returns:
        ``(medsiglip_dir, medgemma_dir)``.
    """
    base_dir.mkdir(parents=True, exist_ok=True)
    medsiglip_dir = base_dir / MEDSIGLIP_DIRNAME
    medgemma_dir = base_dir / MEDGEMMA_DIRNAME
    _ensure_one(medsiglip_dir, "medsiglip", build_tiny_medsiglip)
    _ensure_one(medgemma_dir, "medgemma", build_tiny_medgemma)
    return medsiglip_dir, medgemma_dir


def is_complete(folder: Path, kind: str) -> bool:
    """Return whether ``folder`` holds a finished tiny model of ``kind`` from this builder version."""
    try:
        marker = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("kind") == kind and marker.get("version") == BUILD_VERSION


def _ensure_one(folder: Path, kind: str, build: Callable[[Path], Path]) -> None:
    if is_complete(folder, kind):
        return
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}.building-", dir=folder.parent))
    try:
        build(scratch)
        # mkdtemp makes the folder private (0700); these files are not secret, and a model server
        # running as another user may need to read them.
        scratch.chmod(0o755)
        if folder.exists() and not is_complete(folder, kind):
            # A half-built or outdated folder: ours replaces it.
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(scratch, folder)
        except OSError:
            # Another process renamed its finished build into place first; keep that one.
            if not is_complete(folder, kind):
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def _quiet_saving() -> Iterator[None]:
    # save_pretrained draws a progress bar per shard, and saving a SiglipConfig instantiates a
    # default SiglipTextConfig whose own defaults (bos 49406 in a 32000 vocab) log a warning
    # (transformers 5.24). Both are noise about transformers' defaults, not about this model.
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


def _write_marker(folder: Path, *, kind: str) -> None:
    marker = {"kind": kind, "version": BUILD_VERSION, "seed": SEED, "random_weights": True}
    (folder / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _remove_marker(folder: Path) -> None:
    (folder / MARKER_NAME).unlink(missing_ok=True)


def _siglip_canonical(text: str) -> str:
    # SiglipTokenizer lower-cases and drops punctuation before sentencepiece sees the text, so
    # the training text must look the same or its pieces would never match.
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def _train_siglip_sentencepiece() -> bytes:
    import sentencepiece as spm

    sentences = [
        *CXR_LABELS_V1.prompts,
        *(f"a chest x-ray with no {label.label}" for label in CXR_LABELS_V1.labels),
        "a photo of a chest x-ray",
        "a frontal chest radiograph of a patient",
        "a lateral chest radiograph",
        "a ct scan of the abdomen",
        "a photo of an arm with a rash",
        "the lungs are clear",
        "the heart size is normal",
        "a small left pleural effusion",
        "a large right pneumothorax",
        "mild cardiomegaly",
        "bibasilar atelectasis",
        # Every lower-case letter and digit, so no ordinary text maps to <unk>.
        "abcdefghijklmnopqrstuvwxyz 0123456789",
    ]
    canonical = [_siglip_canonical(sentence) for sentence in sentences]
    # The words on their own as well, so whole words become pieces rather than letter pairs.
    words = sorted({word for sentence in canonical for word in sentence.split()})
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter((canonical + words) * 8),
        model_writer=model,
        model_type="unigram",
        vocab_size=128,
        # The corpus is small (about 100 pieces come out); stop there rather than fail.
        hard_vocab_limit=False,
        character_coverage=1.0,
        # SigLIP's layout: </s> ends (and pads) a text, no <s>.
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _sentencepiece_size(path: Path) -> int:
    import sentencepiece as spm

    return int(spm.SentencePieceProcessor(model_file=str(path)).get_piece_size())


def _all_gemma_specials() -> list[str]:
    return [*_GEMMA_CORE_SPECIALS, *_GEMMA_TURN_SPECIALS, *_GEMMA_IMAGE_SPECIALS.values()]


def _build_gemma_tokenizer() -> Any:
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer

    vocab: dict[str, int] = {}
    for piece in _all_gemma_specials():
        vocab[piece] = len(vocab)
    for char in ["\n", "▁", *string.printable[:94], *_GEMMA_EXTRA_CHARS]:
        vocab.setdefault(char, len(vocab))
    # Build each word left to right ("▁c"+"h" -> "▁ch", ...) so BPE can reach the whole word.
    merges: list[tuple[str, str]] = []
    for word in _GEMMA_WORDS:
        piece = "▁" + word
        for end in range(2, len(piece) + 1):
            if piece[:end] not in vocab:
                merges.append((piece[: end - 1], piece[end - 1]))
                vocab[piece[:end]] = len(vocab)

    tokenizer = GemmaTokenizer(
        vocab=vocab,
        # Annotated as list[str] in transformers 5.24, but the tokenizers BPE model it feeds
        # accepts only (left, right) pairs.
        merges=merges,  # type: ignore[arg-type]
        extra_special_tokens=_GEMMA_IMAGE_SPECIALS,
    )
    # Turn and thinking markers must be atomic, special tokens (as in the real tokenizer), or
    # BPE would spell "<start_of_turn>" out character by character.
    tokenizer.add_tokens(
        [AddedToken(tok, special=True, normalized=False) for tok in _GEMMA_TURN_SPECIALS],
        special_tokens=True,
    )
    tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    return tokenizer


def _silence_special_logits(model: Any, token_ids: list[int]) -> None:
    # With random weights any token can win the argmax. Zeroing the (tied) embedding rows of the
    # special tokens pins their logits at 0 while ordinary tokens spread around it, so greedy
    # decoding emits printable pieces instead of stopping at once on <eos> or opening a thinking
    # block. Weights stay random in every other respect.
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings[token_ids] = 0.0
