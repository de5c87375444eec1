"""The ONNX engine against transformers, token for token, on a tiny random CodeGen.

The model (n_embd 128, 2 layers, 8 heads: two per block of CodeGen's ``mp_num=4`` qkv layout,
rotary_dim 8 of head_dim 16: partial rotary) is built
here with transformers, saved, and exported with our own export code (fp32 and int8), in both
graph kinds: ``optimum`` (the reference export) and ``gqa`` (our graph on GroupQueryAttention:
one in-place cache per layer, int8 when quantized).
Greedy tokens must equal ``CodeGenForCausalLM.generate(do_sample=False)`` exactly, also when
the prompt cache is reused across overlapping prompts; ``Engine.tokens_fed`` proves the reuse.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("optimum.exporters.onnx")

from codegen_ls.engine.backends import GqaState, PastState  # noqa: E402
from codegen_ls.engine.engine import (  # noqa: E402
    Engine,
    EngineOptions,
    PromptCache,
    _Snapshot,
    common_prefix,
    log_softmax,
    sample_token,
)
from codegen_ls.errors import Cancelled, ModelError  # noqa: E402
from codegen_ls.export.pipeline import export, random_checkpoint  # noqa: E402
from helpers import hf_model_greedy  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "models" / "codegen-ls-small" / "tokenizer.json"
VOCAB = 8192
MAX_NEW = 10


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_checkpoint(
        tmp_path_factory.mktemp("tiny") / "src",
        vocab_size=VOCAB,
        n_positions=1024,
        n_embd=128,
        n_layer=2,
        n_head=8,
        rotary_dim=8,
        tokenizer=TOKENIZER,
    )


@pytest.fixture(scope="module")
def hf_model(checkpoint: Path):  # type: ignore[no-untyped-def]
    from transformers import CodeGenForCausalLM

    torch.set_num_threads(1)  # tiny model: threads only add contention
    return CodeGenForCausalLM.from_pretrained(str(checkpoint)).eval()


@pytest.fixture(scope="module", params=["optimum", "gqa"])
def fp32_dir(request: pytest.FixtureRequest, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(f"fp32-{request.param}") / "model"
    export(str(checkpoint), out, quantize_int8=False, graph=request.param)
    return out


@pytest.fixture(scope="module", params=["optimum", "gqa", "gqa-int4"])
def int8_dir(request: pytest.FixtureRequest, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(f"int8-{request.param}") / "model"
    export(
        str(checkpoint),
        out,
        quantize_int8=True,
        graph=request.param.split("-")[0],
        int4="int4" in request.param,
        kv_bits=8,
    )  # the int8 cache (the 4-bit one: test_kv4.py)
    return out


@pytest.fixture()
def engine(fp32_dir: Path) -> Engine:
    return Engine(fp32_dir, EngineOptions(threads=1))


def hf_greedy(model, ids: list[int], max_new: int = MAX_NEW) -> list[int]:  # type: ignore[no-untyped-def]
    return hf_model_greedy(model, ids, max_new)


def hf_logprobs(model, ids: list[int]) -> np.ndarray:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def random_ids(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(1, VOCAB, size=n)]


def test_greedy_matches_transformers_with_cache_reuse(engine: Engine, hf_model) -> None:  # type: ignore[no-untyped-def]
    base = random_ids(1, 40)
    other = random_ids(2, 30)
    edited = base[:20] + [(base[20] + 1) % VOCAB or 1] + base[21:]
    # (doc, prompt, tokens expected from the cache)
    steps = [
        ("a", base, 0),  # cold
        ("a", base + random_ids(3, 5), 40),  # extended prefix: only the 5 new tokens are fed
        ("a", edited, 20),  # edited in the middle: reuse up to the edit
        ("a", edited[:25], 24),  # shortened: cached, but one token is always fed for fresh logits
        ("b", other, 0),  # a second document ...
        ("a", edited[:25] + [7, 8, 9], 25),  # ... does not evict the first one (interleaved)
        ("b", other + [11], 30),
        ("a", edited[:25], 24),
        ("a", edited[:25] + random_ids(12, 800), 25),  # long: several chunks, the buffer grows
        ("a", edited[:25] + random_ids(12, 150), 174),  # much shorter: the buffer shrinks
    ]
    for doc, ids, cached in steps:
        before = engine.tokens_fed
        gen = engine.generate(ids, doc_key=doc, n=1, max_new_tokens=MAX_NEW)
        cand = gen.candidates[0]
        assert cand.token_ids == hf_greedy(hf_model, ids), (doc, len(ids))
        assert gen.stats.cached_tokens == cached
        assert gen.stats.fed_tokens == len(ids) - cached
        # the work really done: the uncached part of the prompt, then one token per decode step
        assert engine.tokens_fed - before == len(ids) - cached + (MAX_NEW - 1)
        assert cand.finish_reason == "length"
    past = engine.cache.get("a").past  # the 825-token buffer was shrunk back for 175 tokens
    if isinstance(past, GqaState):  # room for the prompt and a decode's rows
        assert past.room == 512 and past.length == 175


def test_a_model_of_the_retired_flat_graph_is_refused_in_one_line(tmp_path: Path) -> None:
    """A model directory exported with the retired ``--graph flat`` fails to load with a
    :class:`ModelError` that says so and how to fix it (the server shows it as one line)."""
    import json

    shipped = REPO / "models" / "codegen-ls-small"
    manifest = json.loads((shipped / "manifest.json").read_text())
    manifest["extra"]["graph"] = "flat"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / manifest["onnx"]).write_bytes(b"")  # refused before it is read
    (tmp_path / manifest["tokenizer"]).write_bytes((shipped / manifest["tokenizer"]).read_bytes())
    with pytest.raises(ModelError, match=r"--graph flat, which this version no longer runs.*export it again") as err:
        Engine(tmp_path, EngineOptions(threads=1))
    assert "\n" not in str(err.value)


def test_gqa_cache_is_allocated_once_and_shared_by_the_candidates(
    fp32_dir: Path, hf_model, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """gqa: a multi-chunk prefill allocates the prompt's cache (plus a decode's room) once; the
    next keystroke and a 3-candidate decode run in those same buffers, never copying them."""
    engine = Engine(fp32_dir, EngineOptions(threads=1, prefill_chunk=64))
    if engine.graph != "gqa":
        pytest.skip("gqa graph only")
    allocs: list[int] = []
    alloc = engine.backend._alloc  # type: ignore[attr-defined]
    monkeypatch.setattr(engine.backend, "_alloc", lambda room: allocs.append(room) or alloc(room))
    ids = random_ids(21, 300)
    assert engine.generate(ids, doc_key="p", max_new_tokens=MAX_NEW).candidates[0].token_ids == hf_greedy(hf_model, ids)
    state = engine.cache.get("p").past
    buffers = [b.ctypes.data for b in state.buffers]
    assert allocs == [640] and state.room == 640 and state.length == 300
    assert engine.cache.nbytes == state.nbytes == 2 * 2 * 8 * 16 * 640 * 4  # layers, k+v, heads, dim, room, fp32
    longer = ids + random_ids(22, 50)
    gen = engine.generate(longer, doc_key="p", n=3, max_new_tokens=MAX_NEW, temperature=1.5, seed=3)
    assert gen.candidates[0].token_ids == hf_greedy(hf_model, longer) and gen.stats.cached_tokens == len(ids)
    assert allocs == [640] and engine.cache.get("p").past is state
    assert [b.ctypes.data for b in state.buffers] == buffers and state.length == len(longer)


def test_text_prompt_and_real_logprobs(engine: Engine, hf_model) -> None:  # type: ignore[no-untyped-def]
    prompt = "def fibonacci(n):\n    if n < 2:\n        return n\n"
    ids = engine.tokenizer.encode(prompt)
    gen = engine.generate(prompt, doc_key="t", max_new_tokens=MAX_NEW)
    cand = gen.candidates[0]
    assert cand.token_ids == hf_greedy(hf_model, ids)
    assert cand.text == engine.tokenizer.decode(cand.token_ids)
    ref = hf_logprobs(hf_model, ids + cand.token_ids)
    expected = [ref[len(ids) - 1 + i, t] for i, t in enumerate(cand.token_ids)]
    np.testing.assert_allclose(cand.logprobs, expected, atol=1e-4)


def test_n_candidates_share_one_prefill(engine: Engine, hf_model) -> None:  # type: ignore[no-untyped-def]
    ids = random_ids(4, 50)
    before = engine.tokens_fed
    gen = engine.generate(ids, doc_key="n", n=3, max_new_tokens=MAX_NEW, temperature=1.5, top_k=50, seed=1)
    assert len(gen.candidates) == 3
    assert gen.candidates[0].token_ids == hf_greedy(hf_model, ids)
    assert not gen.candidates[0].sampled and all(c.sampled for c in gen.candidates[1:])
    assert gen.stats.fed_tokens == len(ids)
    # the prompt was fed once, then each of the 3 rows one token per decode step
    assert engine.tokens_fed - before == len(ids) + 3 * (MAX_NEW - 1)
    for sampled in gen.candidates[1:]:  # each row attended to the prompt and its own tokens only
        ref = hf_logprobs(hf_model, ids + sampled.token_ids)
        np.testing.assert_allclose(
            sampled.logprobs, [ref[len(ids) - 1 + i, t] for i, t in enumerate(sampled.token_ids)], atol=1e-4
        )
    assert len({tuple(c.token_ids) for c in gen.candidates}) > 1  # samples at T=1.5 differ


def test_rows_that_finish_early_leave_the_others_exact(engine: Engine, hf_model) -> None:
    # type: ignore[no-untyped-def]
    """A candidate stopped mid-decode is dropped from the batch; the rows after it stay exact."""
    ids = random_ids(5, 30)
    calls = 0

    def stop(text: str) -> int | None:  # called per row per step: the 5th call is row 1 at step 1
        nonlocal calls
        calls += 1
        return len(text) if calls == 5 else None

    gen = engine.generate(
        ids, doc_key="early", n=3, max_new_tokens=MAX_NEW, temperature=1.5, top_k=50, seed=2, stop=stop
    )
    assert [len(c.token_ids) for c in gen.candidates] == [MAX_NEW, 2, MAX_NEW]
    assert gen.candidates[1].finish_reason == "stop"
    assert gen.candidates[0].token_ids == hf_greedy(hf_model, ids)
    last = gen.candidates[2]
    ref = hf_logprobs(hf_model, ids + last.token_ids)
    np.testing.assert_allclose(
        last.logprobs, [ref[len(ids) - 1 + i, t] for i, t in enumerate(last.token_ids)], atol=1e-4
    )


def test_score_verifies_a_draft_in_one_pass(engine: Engine, hf_model) -> None:  # type: ignore[no-untyped-def]
    prompt, draft = random_ids(5, 30), random_ids(6, 6)
    engine.generate(prompt, doc_key="s", max_new_tokens=2)
    before = engine.tokens_fed
    draft_lp, greedy, last = engine.score(prompt, draft, doc_key="s")
    assert engine.tokens_fed - before == len(draft) + 1  # the last prompt token re-fed for its logits
    ref = hf_logprobs(hf_model, prompt + draft)
    np.testing.assert_allclose(draft_lp, [ref[len(prompt) - 1 + i, t] for i, t in enumerate(draft)], atol=1e-4)
    assert greedy == [int(np.argmax(ref[len(prompt) - 1 + i])) for i in range(len(draft))]
    np.testing.assert_allclose(last, ref[-1], atol=1e-4)


def test_cache_is_lru_bounded_in_bytes(fp32_dir: Path) -> None:
    probe = Engine(fp32_dir, EngineOptions(threads=1))
    probe.generate(random_ids(7, 40), doc_key="x", max_new_tokens=1)
    one = probe.cache.nbytes  # one 40-token snapshot
    engine = Engine(fp32_dir, EngineOptions(threads=1, cache_bytes=int(2.5 * one)))
    for doc in "abc":
        engine.generate(random_ids(ord(doc), 40), doc_key=doc, max_new_tokens=1)
        assert engine.cache.nbytes <= engine.cache.max_bytes
    assert len(engine.cache) == 2 and engine.cache.get("a") is None  # least recently used went
    engine.generate(random_ids(ord("b"), 40), doc_key="b", max_new_tokens=1)  # b is now most recent
    engine.generate(random_ids(ord("d"), 40), doc_key="d", max_new_tokens=1)
    assert engine.cache.get("c") is None and engine.cache.get("b") is not None
    gen = engine.generate(random_ids(ord("a"), 40), doc_key="a", max_new_tokens=1)
    assert gen.stats.cached_tokens == 0  # evicted documents start cold


def test_qkv_reorder_matches_transformers_split() -> None:
    """graph_builder.qkv_weight vs CodeGenAttention's own reshape/split/_split_heads."""
    from transformers.models.codegen.modeling_codegen import CodeGenAttention, CodeGenConfig

    from codegen_ls.export.graph_builder import qkv_weight

    attn = CodeGenAttention(CodeGenConfig(n_embd=96, n_head=12, rotary_dim=4, n_positions=8), layer_idx=0)
    x = torch.randn(2, 5, 96)
    with torch.no_grad():
        qkv = attn.qkv_proj(x).reshape(2, 5, 4, -1)
        q, v, k = torch.split(qkv, 96 // 4, dim=-1)  # transformers' order: query, value, key
        heads = [attn._split_heads(t, 12, 8, mp_num=4).reshape(2, 5, 96) for t in (q, k, v)]
        ours = x @ torch.from_numpy(qkv_weight(attn.qkv_proj.weight.numpy(), 12)).T
    for got, want in zip(torch.split(ours, 96, dim=-1), heads):
        torch.testing.assert_close(got, want)


def test_prompt_cache_unit() -> None:
    cache = PromptCache(max_bytes=1000)
    cache.put("big", _Snapshot([1], PastState([np.zeros(300, np.float32)])))  # 1200 bytes: not kept
    assert len(cache) == 0
    cache.put("a", _Snapshot([1], PastState([np.zeros(100, np.float32)])))
    cache.put("b", _Snapshot([2], PastState([np.zeros(100, np.float32)])))
    cache.get("a")
    cache.put("c", _Snapshot([3], PastState([np.zeros(100, np.float32)])))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.nbytes == 800
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([], [1]) == 0


def test_cancel_raises(engine: Engine) -> None:
    with pytest.raises(Cancelled):
        engine.generate(random_ids(8, 20), doc_key="c", cancel=lambda: True)
    assert engine.cache.get("c") is None  # nothing was fed, nothing is cached
    calls = iter(range(1000))
    with pytest.raises(Cancelled):  # cancelled between decode steps
        engine.generate(random_ids(9, 20), doc_key="c", max_new_tokens=MAX_NEW, cancel=lambda: next(calls) >= 3)


def test_cancelled_prefill_leaves_a_consistent_cache(fp32_dir: Path, hf_model) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(fp32_dir, EngineOptions(threads=1, prefill_chunk=16))
    old = random_ids(13, 40)
    engine.generate(old, doc_key="k", max_new_tokens=2)
    new = old[:20] + random_ids(14, 80)
    checks = iter(range(1000))
    with pytest.raises(Cancelled):  # two 16-token chunks are fed, then the third is cancelled
        engine.generate(new, doc_key="k", max_new_tokens=2, cancel=lambda: next(checks) >= 2)
    gen = engine.generate(new, doc_key="k", max_new_tokens=MAX_NEW)
    assert gen.candidates[0].token_ids == hf_greedy(hf_model, new)
    # the 20 common tokens and the two chunks fed before the cancel are kept: the next request
    # of the document continues from there
    assert gen.stats.cached_tokens == 20 + 32
    with pytest.raises(Cancelled):  # nothing in common, cancelled before the first chunk
        engine.generate(random_ids(15, 40), doc_key="k", cancel=lambda: True)
    gen = engine.generate(new, doc_key="k", max_new_tokens=MAX_NEW)
    assert gen.candidates[0].token_ids == hf_greedy(hf_model, new)  # the cache stayed consistent


def test_deadline_stops_decoding(engine: Engine) -> None:
    gen = engine.generate(random_ids(10, 20), doc_key="d", n=2, max_new_tokens=40, deadline_ms=0)
    for cand in gen.candidates:
        assert cand.finish_reason == "deadline"
        assert 1 <= len(cand.token_ids) < 40
    assert gen.stats.steps == 0


def test_stop_function_is_checked_every_step(engine: Engine) -> None:
    seen: list[str] = []

    def stop(text: str) -> int | None:
        seen.append(text)
        return max(0, len(text) - 1) if len(seen) == 3 else None

    gen = engine.generate(random_ids(11, 20), doc_key="stop", max_new_tokens=MAX_NEW, stop=stop)
    cand = gen.candidates[0]
    assert cand.finish_reason == "stop" and len(cand.token_ids) == 3
    assert cand.text == seen[-1][:-1]


def test_token_healing_constrains_the_first_token(engine: Engine) -> None:
    gen = engine.generate("import os\nos.pa", doc_key="heal", max_new_tokens=3, heal=True)
    assert gen.healed
    first = engine.tokenizer.token_bytes()[gen.candidates[0].token_ids[0]]
    assert first.startswith(gen.healed.encode())


def test_sampling_filters() -> None:
    rng = np.random.default_rng(0)
    logp = log_softmax(np.array([3.0, 2.9, 1.0, 0.5, -1.0]))
    assert sample_token(logp, rng, 0.0, 0, 1.0) == 0  # temperature 0: greedy
    assert {sample_token(logp, rng, 1.0, 1, 1.0) for _ in range(20)} == {0}  # top-k 1
    assert {sample_token(logp, rng, 1.0, 0, 0.01) for _ in range(20)} == {0}  # tiny nucleus
    assert {sample_token(logp, rng, 1.0, 2, 1.0) for _ in range(200)} == {0, 1}  # top-k 2
    assert {sample_token(logp, rng, 1.0, 0, 1.0) for _ in range(500)} == {0, 1, 2, 3, 4}  # top-p 1
    hot = [sample_token(logp, rng, 5.0, 0, 1.0) for _ in range(500)]
    cold = [sample_token(logp, rng, 0.2, 0, 1.0) for _ in range(500)]
    assert hot.count(0) < cold.count(0)  # temperature flattens / sharpens


def test_int8_agreement_with_transformers(int8_dir: Path, hf_model) -> None:  # type: ignore[no-untyped-def]
    """Quantized greedy vs fp32 transformers. Random weights have near-tied logits, so the number
    that matters is teacher-forced: the engine's argmax after each of transformers' own tokens."""
    engine = Engine(int8_dir, EngineOptions(threads=1))
    same_next = same_prefix = forced = total = 0
    prompts = [random_ids(100 + i, 24 + 4 * i) for i in range(8)]
    for i, ids in enumerate(prompts):
        got = engine.generate(ids, doc_key=str(i), max_new_tokens=MAX_NEW).candidates[0].token_ids
        ref = hf_greedy(hf_model, ids)
        _, argmax, _ = engine.score(ids, ref, doc_key=str(i))
        same_next += got[0] == ref[0]
        same_prefix += common_prefix(got, ref)
        forced += sum(a == r for a, r in zip(argmax, ref))
        total += len(ref)
    print(
        f"{engine.manifest.quantization} ({engine.graph} graph, KV "
        f"{engine.manifest.extra.get('kv_dtype', 'float32')}) vs transformers fp32: teacher-forced "
        f"{forced}/{total} tokens, first token {same_next}/{len(prompts)}, greedy prefix {same_prefix}/{total}"
    )
    floor = 0.35 if engine.manifest.quantization.startswith("int4") else 0.8  # 4-bit is coarser
    assert forced >= floor * total
    if engine.manifest.extra.get("kv_dtype") == "int8":  # the gqa cache really is int8: a quarter
        state = engine.cache.get("0").past
        assert {b.dtype for b in state.buffers} == {np.dtype(np.int8)}
        assert (
            state.nbytes == 2 * engine.manifest.n_layer * engine.manifest.n_head * engine.manifest.head_dim * state.room
        )
    if engine.manifest.extra.get("kv_dtype") == "float16":  # the cache really is half size
        state = engine.cache.get("0").past
        assert {b.dtype for b in state.buffers} == {np.dtype(np.float16)}
        assert (
            state.nbytes
            == 2 * engine.manifest.n_layer * engine.manifest.n_head * engine.manifest.head_dim * state.room * 2
        )
