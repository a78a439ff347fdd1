"""``medagent bench agent``: this agent against the EHR Navigator call pattern, side by side, on one model.

Both sides run in one process on the same real-size random-weight MedGemma-4B (the
``google/medgemma-4b-it`` architecture: Gemma 3, 34 layers, 2560 wide, 262k vocabulary, a
SigLIP-so400m tower at 896 px), wrapped in the project's :class:`~agent.inference.medgemma.MedGemma`
adapter, greedy, with the same fixed number of generated tokens per call, on the same fixture
patient (the chest X-ray patient, ``cxr``) and the same questions:

- this agent: :func:`agent.runner.run_ask` on the embedded fixtures, with the oracle plan when the
  agent has a planning step; model calls, their durations and prompt tokens come from the trace;
- the Navigator pattern (:mod:`agent.bench.navigator`): manifest, identify types, per type one
  fetch and one fact-extraction call over its raw JSON, then synthesis, with the oracle types.

Random weights cost what trained ones do, so latency and token figures hold for the real model;
the answers are noise, which is why the choices are given (oracle) and fact recall is counted on
what each side put before the model. The questions need text only, so no image goes to the model
on either side (``reasoner_max_images`` 0; the Navigator pattern is text-only).

No Gemma tokenizer can be downloaded here, so the prompts are tokenised by a stand-in built at run
time with Gemma's special tokens and chat template: whole words of the texts involved are single
pieces, digits are single pieces (as in Gemma's tokenizer) and runs of punctuation are single
pieces. Its counts drive the model's work, so they are the ones reported; the word-piece proxy
of ``medagent bench fhir`` is reported beside them as a cross-check.

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import string
import tempfile
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from agent.audit.reader import load_run
from agent.audit.recorder import MODEL_CALL
from agent.bench.fhir import FIXTURE_AS_OF, fixture_resources
from agent.bench.navigator import (
    EXTRACT_PROMPT,
    IDENTIFY_PROMPT,
    NAVIGATOR_SYSTEM,
    SYNTHESIS_PROMPT,
    Navigator,
    NavigatorRun,
)
from agent.config import DEFAULT_FIXTURES, get_settings
from agent.domain.events import ListObserver
from agent.domain.imaging import LabelScore
from agent.eval.harness import fixture_patient_ids, gold_for, oracle_plan_kwargs
from agent.eval.questions import EVAL_QUESTIONS, EvalQuestion
from agent.history.context import build_context
from agent.inference.factory import LoadedModels
from agent.inference.labels import LabelSet
from agent.inference.loading import dtype_name, select_device, select_dtype
from agent.inference.medgemma import MedGemma
from agent.inference.protocols import (
    GenerationRequest,
    GenerationResult,
    GenerationStream,
    ModelIdentity,
    Reasoner,
)
from agent.inference.tiny_models import GEMMA3_CHAT_TEMPLATE
from agent.runner import run_ask
from agent.runtime import AgentRuntime, ModelCache
from agent.sources.fhir_bundle_dir import BundleDirFhirSource

Echo = Callable[[str], None]

PATIENT = "cxr"
#: One question keeps the default run near 15 minutes on an idle 2-core CPU (the Navigator side dominates).
DEFAULT_QUESTIONS = 1
#: ``google/medgemma-4b-it``'s text model: every 6th layer global, the rest sliding-window (1024).
MEDGEMMA_4B_TEXT: dict[str, Any] = {
    "vocab_size": 262208,
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "num_hidden_layers": 34,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 1024,
    "max_position_embeddings": 131072,
    "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(34)],
}
#: Its vision tower: SigLIP so400m/14 at 896 px, pooled to 256 soft tokens per image.
MEDGEMMA_4B_VISION: dict[str, Any] = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 896,
    "patch_size": 14,
    "vision_use_head": False,
}
MM_TOKENS_PER_IMAGE = 256
GEMMA_CORE_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
GEMMA_TURN_SPECIALS = ("<start_of_turn>", "<end_of_turn>", "<unused94>", "<unused95>")
GEMMA_IMAGE_SPECIALS = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}
# Letters runs (with the space before them), single digits, punctuation runs, whitespace runs.
_PIECES = r"▁?[^\W\d_▁]+|\d|▁?[^\w\s▁]+|_|▁+|\s+"


# -- the stand-in tokenizer and the real-size model -------------------------------------------------


def benchmark_corpus() -> list[str]:
    """Return the texts both sides' prompts are made of: fixture JSON, contexts, prompt templates."""
    texts = [NAVIGATOR_SYSTEM, IDENTIFY_PROMPT, EXTRACT_PROMPT, SYNTHESIS_PROMPT]
    from agent.graph.prompts import SYSTEM_PROMPT

    texts.append(SYSTEM_PROMPT)
    texts += [q.text for q in EVAL_QUESTIONS]
    for patient, resources in fixture_resources().values():
        texts += [json.dumps(r) for r in [patient, *resources]]
        texts.append(build_context(patient, resources, as_of=FIXTURE_AS_OF).text)
    return texts


def stand_in_tokenizer(corpus: Iterable[str]) -> Any:
    """Return a Gemma-style fast tokenizer whose pieces are the corpus's words, single digits and punctuation runs.

    A piece seen in the corpus is one token (``ignore_merges``); anything else is spelled from
    merges of its prefixes, down to single characters, so every text can be encoded.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces: set[str] = set()
    splitter = re.compile(_PIECES)
    for text in corpus:
        pieces.update(splitter.findall(text.replace(" ", "▁")))
    vocab: dict[str, int] = {}
    for special in (*GEMMA_CORE_SPECIALS, *GEMMA_TURN_SPECIALS, *GEMMA_IMAGE_SPECIALS.values()):
        vocab[special] = len(vocab)
    for char in ["\n", "▁", *string.printable[:94], *"°µ±é–—’“”≤≥×"]:
        vocab.setdefault(char, len(vocab))
    merges: list[tuple[str, str]] = []
    for piece in sorted(pieces):
        for char in piece:
            vocab.setdefault(char, len(vocab))
        for end in range(2, len(piece) + 1):
            if piece[:end] not in vocab:
                merges.append((piece[: end - 1], piece[end - 1]))
                vocab[piece[:end]] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", ignore_merges=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECES), behavior="isolated")
    backend.decoder = decoders.Replace("▁", " ")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        extra_special_tokens=GEMMA_IMAGE_SPECIALS,
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in GEMMA_TURN_SPECIALS], True)
    tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    return tokenizer


def medgemma_4b_config(tokenizer: Any) -> Any:
    """Return the ``Gemma3Config`` of ``google/medgemma-4b-it`` with the tokenizer's special-token ids."""
    from transformers import Gemma3Config

    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in GEMMA_CORE_SPECIALS}
    image_ids = {key: tokenizer.convert_tokens_to_ids(tok) for key, tok in GEMMA_IMAGE_SPECIALS.items()}
    return Gemma3Config(
        text_config={
            **MEDGEMMA_4B_TEXT,
            "pad_token_id": ids["<pad>"],
            "bos_token_id": ids["<bos>"],
            "eos_token_id": ids["<eos>"],
        },
        vision_config=MEDGEMMA_4B_VISION,
        mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
        boi_token_index=image_ids["boi_token"],
        eoi_token_index=image_ids["eoi_token"],
        image_token_index=image_ids["image_token"],
    )


def stand_in_processor(tokenizer: Any) -> Any:
    """Return a ``Gemma3Processor`` with MedGemma-4B's image settings (896 px, 256 soft tokens) and the tokenizer."""
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    image_processor = Gemma3ImageProcessorPil(
        size={"height": 896, "width": 896}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=MM_TOKENS_PER_IMAGE,
    )


class TokenCounter:
    """A reasoner that only counts: the prompt as MedGemma's adapter would build it, tokenised, nothing generated.

    For ``--count-only``: the prompt-token comparison over many questions in seconds, since the
    token counts do not depend on the weights. Its timings mean nothing.
    """

    identity = ModelIdentity(model_id="token counter (no model)", backend="test", test_model=True)

    def __init__(self, processor: Any) -> None:
        """Keep the processor whose chat template and tokenizer do the counting."""
        self.processor = processor

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Return an empty answer with the prompt's token count."""
        messages: list[dict[str, Any]] = []
        if request.system.strip():
            messages.append({"role": "system", "content": [{"type": "text", "text": request.system}]})
        messages.append({"role": "user", "content": [{"type": "text", "text": request.user_text}]})
        inputs = self.processor.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True
        )
        return GenerationResult(
            text="", prompt_tokens=int(inputs["input_ids"].shape[-1]), output_tokens=0, latency_s=0.0
        )

    def stream(self, request: GenerationRequest) -> GenerationStream:
        """Return :meth:`generate`'s result as a stream with no deltas."""
        return _as_stream(self.generate(request))


def real_size_medgemma(*, dtype_setting: str = "auto", seed: int = 0) -> MedGemma:
    """Build a random-weight MedGemma-4B of the real size with the stand-in tokenizer, in the project's adapter.

    Built directly in the target dtype (bf16 on a CPU with a bf16 path): half the memory and time
    of float32 then cast. The stop tokens' embedding rows are zeroed (the embeddings are tied),
    so their logits sit at 0 while 262k random logits spread around it: every call generates
    exactly the requested number of tokens, as a fixed-length benchmark needs.
    """
    from transformers import Gemma3ForConditionalGeneration, GenerationConfig
    from transformers.initialization import no_init_weights

    tokenizer = stand_in_tokenizer(benchmark_corpus())
    config = medgemma_4b_config(tokenizer)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in (*GEMMA_CORE_SPECIALS, *GEMMA_TURN_SPECIALS)}
    device = select_device("auto")
    dtype = select_dtype(dtype_setting, device)
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        # The library's initialisers (kaiming, then transformers' own pass) take minutes on 4 B
        # parameters on a small CPU; one normal draw per weight is as random and costs one pass.
        # Buffers (rotary frequencies) are still computed by the constructor.
        with no_init_weights():
            model = Gemma3ForConditionalGeneration(config).eval()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0.0, 0.02)
        model.tie_weights()
        model = model.to(device)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        model.get_input_embeddings().weight[list(ids.values())] = 0.0
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<bos>"],
        pad_token_id=ids["<pad>"],
        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
        do_sample=False,
    )
    processor = stand_in_processor(tokenizer)
    identity = ModelIdentity(
        model_id="random-weight medgemma-4b-it (benchmark)",
        backend="transformers",
        device=device,
        dtype=dtype_name(dtype),
        test_model=True,
    )
    return MedGemma(model, processor, identity)


class BenchScorer:
    """A fast stand-in for MedSigLIP: the benchmark's questions are text-only, so its scores are unused.

    The agent still embeds the study's images (it does for every patient with a study); this
    keeps that step's cost to the DICOM decoding the agent itself does.
    """

    identity = ModelIdentity(model_id="bench-scorer (constant)", backend="test", test_model=True)

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Return one constant unit vector per image."""
        return torch.nn.functional.normalize(torch.ones(len(images), 8), dim=-1)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Return one constant unit vector per text."""
        return torch.nn.functional.normalize(torch.ones(len(texts), 8), dim=-1)

    def score_embeddings(self, image_embeddings: torch.Tensor, label_set: LabelSet) -> list[list[LabelScore]]:
        """Score every label 0.5 on every image."""
        return [[LabelScore(label=n, score=0.5) for n in label_set.names] for _ in range(image_embeddings.shape[0])]

    def zero_shot(self, images: list[Image.Image], labels: list[str]) -> list[list[LabelScore]]:
        """Score every label 0.5 on every image."""
        return [[LabelScore(label=label, score=0.5) for label in labels] for _ in images]


class _Swappable:
    """The reasoner the runtime holds: a no-op for the warm-up run, then the real one."""

    def __init__(self, target: Reasoner) -> None:
        self.target: Reasoner | None = None
        self.real = target
        self.identity = target.identity

    def generate(self, request: GenerationRequest) -> GenerationResult:
        if self.target is None:
            return GenerationResult(text="warm-up", prompt_tokens=0, output_tokens=0, latency_s=0.0)
        return self.target.generate(request)

    def stream(self, request: GenerationRequest) -> GenerationStream:
        if self.target is None:
            return _as_stream(self.generate(request))
        return self.target.stream(request)


def _as_stream(result: GenerationResult) -> GenerationStream:
    def chunks() -> Generator[str, None, GenerationResult]:
        if result.text:
            yield result.text
        return result

    return GenerationStream(chunks())


# -- one question, both sides ----------------------------------------------------------------------


@dataclass
class SideRun:
    """One side's run of one question."""

    wall_s: float
    model_s: float
    prompt_tokens: int
    model_calls: int
    calls: int
    seen: set[str]
    prompts: list[str]


def bench_questions(count: int) -> list[EvalQuestion]:
    """Return the first ``count`` two-type, text-only questions about the benchmark's patient."""
    chosen = [q for q in EVAL_QUESTIONS if q.patient == PATIENT and q.kind == "two_type"]
    return chosen[:count]


async def run_agent_side(runtime: AgentRuntime, question: EvalQuestion, patient_id: str) -> SideRun:
    """Ask the agent, timing the whole run; model time, calls and tokens come from its trace."""
    started = time.perf_counter()
    result = await run_ask(
        runtime, patient_id=patient_id, question=question.text, as_of=FIXTURE_AS_OF, **oracle_plan_kwargs(question)
    )
    wall = time.perf_counter() - started
    trace = load_run(runtime.engine, result.run_id)
    calls = [e for e in trace.events if e.kind == MODEL_CALL]
    reasoner_calls = [e for e in calls if "prompt_tokens" in e.meta]
    return SideRun(
        wall_s=wall,
        model_s=sum((e.duration_ms or 0.0) for e in calls) / 1000,
        prompt_tokens=sum(int(e.meta["prompt_tokens"]) for e in reasoner_calls),
        model_calls=len(reasoner_calls),
        calls=len(calls),
        seen=set(result.sources),
        prompts=[
            f"{(e.content or {}).get('system', '')}\n\n{(e.content or {}).get('prompt', '')}" for e in reasoner_calls
        ],
    )


async def run_navigator_side(
    navigator: Navigator, question: EvalQuestion, patient_id: str
) -> tuple[SideRun, NavigatorRun]:
    """Answer the question the Navigator way over the oracle types, on the same fixtures."""
    fhir = BundleDirFhirSource(DEFAULT_FIXTURES / "fhir", observer=ListObserver())
    try:
        run = await navigator.run(fhir, patient_id, question.text, types=question.gold_types)
    finally:
        await fhir.aclose()
    side = SideRun(
        wall_s=run.wall_s,
        model_s=run.model_seconds,
        prompt_tokens=run.prompt_tokens,
        model_calls=len(run.model_steps),
        calls=len(run.steps),
        seen=run.seen,
        prompts=[step.prompt for step in run.model_steps],
    )
    return side, run


# -- the command -----------------------------------------------------------------------------------


def _word_pieces(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]", text))


def run_benchmark(
    *,
    generated_tokens: int = 16,
    questions: int = DEFAULT_QUESTIONS,
    repeats: int = 1,
    echo: Echo = print,
    reasoner: Reasoner | None = None,
    count_only: bool = False,
) -> dict[str, Any]:
    """Run both sides on the same questions, print a line per figure and a closing JSON line, return the figures.

    Args:
        generated_tokens: tokens generated by every model call, on both sides.
        questions: how many questions (two-type questions about the chest X-ray patient).
        repeats: timed runs per side and question, interleaved; medians are compared.
        echo: where each line goes.
        reasoner: the model both sides use; by default the real-size random-weight MedGemma-4B
            (tests pass the tiny one).
        count_only: no model: count both sides' prompt tokens with the stand-in tokenizer (fast,
            any number of questions); the timing figures are then None.
    """
    if count_only:
        counter: Reasoner = TokenCounter(stand_in_processor(stand_in_tokenizer(benchmark_corpus())))
        reasoner = counter
    if reasoner is None:
        echo("building a random-weight MedGemma-4B (real size) ...")
        built = time.perf_counter()
        reasoner = real_size_medgemma()
        echo(f"  built in {time.perf_counter() - built:.0f} s ({reasoner.identity.dtype}, {reasoner.identity.device})")
    chosen = bench_questions(questions)
    patient_id = fixture_patient_ids()[PATIENT]
    patient, resources = fixture_resources()[PATIENT]
    with tempfile.TemporaryDirectory(prefix="medagent-bench-agent-") as scratch:
        settings = get_settings(
            fhir={"bundle_dir": DEFAULT_FIXTURES / "fhir", "base_url": None},
            dicom={"dicom_dir": DEFAULT_FIXTURES / "dicom", "dicomweb_url": None},
            db={"url": f"sqlite:///{Path(scratch) / 'trace.db'}"},
            models={"max_new_tokens": generated_tokens, "reasoner_max_images": 0},
            imaging={"similar_cases": 0},
            # the oracle plan is given; it narrows nothing: the agent reads every record type and the
            # study's images, as it always did before the "auto" planner (the conservative case)
            agent={"fetch": "all", "images": "always"},
        )
        swappable = _Swappable(reasoner)
        loaded = LoadedModels(scorer=BenchScorer(), reasoner=swappable, used_test_models=True)
        runtime = AgentRuntime(settings=settings, models=ModelCache(loader=lambda _s: loaded))
        navigator = Navigator(reasoner, max_new_tokens=generated_tokens)
        try:
            figures = asyncio.run(
                _measure(runtime, swappable, navigator, chosen, patient_id, [patient, *resources], repeats, echo)
            )
        finally:
            runtime.engine.dispose()
    figures.update(
        {
            "generated_tokens": generated_tokens,
            "repeats": repeats,
            "patient": PATIENT,
            "questions": [q.text for q in chosen],
            "model": reasoner.identity.model_id,
            "dtype": reasoner.identity.dtype,
            "oracle_plan": bool(oracle_plan_kwargs(chosen[0])) if chosen else False,
        }
    )
    if count_only:
        figures.update(speedup_vs_navigator=None, overhead_share=None, count_only=True)
        echo(
            f"prompt-token reduction vs Navigator:   {figures['prompt_token_reduction_vs_navigator']:.2f}x (count only)"
        )
        echo(json.dumps(figures))
        return figures
    echo(f"speedup vs Navigator pattern:          {figures['speedup_vs_navigator']:.2f}x (median wall time, summed)")
    echo(f"prompt-token reduction vs Navigator:   {figures['prompt_token_reduction_vs_navigator']:.2f}x")
    echo(
        f"gold-fact recall, agent / Navigator:   {figures['fact_recall']:.1%} / {figures['navigator_fact_recall']:.1%}"
    )
    echo(f"agent overhead (wall - model compute): {figures['overhead_share']:.2%} of wall time")
    echo(json.dumps(figures))
    return figures


async def _measure(
    runtime: AgentRuntime,
    swappable: _Swappable,
    navigator: Navigator,
    chosen: list[EvalQuestion],
    patient_id: str,
    resources: list[dict[str, Any]],
    repeats: int,
    echo: Echo,
) -> dict[str, Any]:
    # Warm-up: the graph compiles, the trace schema is created, decoders load, and the model runs
    # once, so no one-time cost lands on either side's timed runs.
    await run_agent_side(runtime, chosen[0], patient_id)
    swappable.target = swappable.real
    swappable.real.generate(GenerationRequest(system="", user_text="warm up", max_new_tokens=1))

    agent_runs: dict[int, list[SideRun]] = {i: [] for i in range(len(chosen))}
    nav_runs: dict[int, list[SideRun]] = {i: [] for i in range(len(chosen))}
    for repeat in range(repeats):
        for i, question in enumerate(chosen):  # interleaved: machine noise hits both sides alike
            agent = await run_agent_side(runtime, question, patient_id)
            nav, _ = await run_navigator_side(navigator, question, patient_id)
            agent_runs[i].append(agent)
            nav_runs[i].append(nav)
            echo(
                f"  q{i + 1} repeat {repeat + 1}/{repeats}: agent {agent.wall_s:.1f} s, {agent.prompt_tokens} tokens, "
                f"{agent.model_calls} model calls | Navigator {nav.wall_s:.1f} s, {nav.prompt_tokens} tokens, "
                f"{nav.model_calls} model calls ({nav.calls} calls)"
            )

    found = nav_found = gold_total = 0
    for i, question in enumerate(chosen):
        gold, _ = gold_for(question, resources)
        gold_total += len(gold)
        found += sum(g in agent_runs[i][-1].seen for g in gold)
        nav_found += sum(g in nav_runs[i][-1].seen for g in gold)

    def total(runs: dict[int, list[SideRun]], key: Callable[[SideRun], float]) -> float:
        return sum(statistics.median(key(r) for r in per_question) for per_question in runs.values())

    agent_wall, nav_wall = total(agent_runs, lambda r: r.wall_s), total(nav_runs, lambda r: r.wall_s)
    agent_model = total(agent_runs, lambda r: r.model_s)
    agent_tokens = sum(runs[-1].prompt_tokens for runs in agent_runs.values())
    nav_tokens = sum(runs[-1].prompt_tokens for runs in nav_runs.values())
    agent_words = sum(_word_pieces(p) for runs in agent_runs.values() for p in runs[-1].prompts)
    nav_words = sum(_word_pieces(p) for runs in nav_runs.values() for p in runs[-1].prompts)
    return {
        "speedup_vs_navigator": nav_wall / agent_wall,
        "prompt_token_reduction_vs_navigator": nav_tokens / agent_tokens if agent_tokens else None,
        "fact_recall": found / gold_total if gold_total else None,
        "navigator_fact_recall": nav_found / gold_total if gold_total else None,
        "overhead_share": (agent_wall - agent_model) / agent_wall,
        "agent_wall_s": agent_wall,
        "navigator_wall_s": nav_wall,
        "agent_model_s": agent_model,
        "navigator_model_s": total(nav_runs, lambda r: r.model_s),
        "agent_prompt_tokens": agent_tokens,
        "navigator_prompt_tokens": nav_tokens,
        "agent_model_calls": sum(runs[-1].model_calls for runs in agent_runs.values()),
        "navigator_model_calls": sum(runs[-1].model_calls for runs in nav_runs.values()),
        "navigator_calls": sum(runs[-1].calls for runs in nav_runs.values()),
        "gold_facts": gold_total,
        "agent_prompt_word_pieces": agent_words,
        "navigator_prompt_word_pieces": nav_words,
        "prompt_word_piece_reduction_vs_navigator": nav_words / agent_words if agent_words else None,
    }
