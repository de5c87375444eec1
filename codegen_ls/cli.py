"""Command line: ``codegen-ls serve | complete | doctor | model export | model info``.

User mistakes (missing file, bad position, missing model) end with one clear line on stderr
and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codegen_ls import __version__
from codegen_ls.errors import CodegenLsError

if TYPE_CHECKING:
    from codegen_ls.settings import Settings

log = logging.getLogger("codegen_ls")

EPILOG = """\
examples:
  codegen-ls complete examples/demo.py:41:22        ranked suggestions at line 41, column 22
  codegen-ls serve                                  LSP over stdio (what editors run)
  codegen-ls doctor                                 versions, model, one timed completion
  codegen-ls stats                                  local acceptance statistics (never sent anywhere)
  codegen-ls model export ~/ckpt/codegen-350M-mono out/350m   convert a real CodeGen checkpoint
model resolution: --model DIR, else $CODEGEN_LS_MODEL, else the embedded default model.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="codegen-ls",
        description="Local, offline inline code completion with CodeGen on onnxruntime.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"codegen-ls {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    _add_serve(sub)

    _add_complete(sub)

    d = sub.add_parser("doctor", help="versions, providers, model manifest and one timed completion (for bug reports)")
    _model_arg(d)
    _log_args(d)

    t = sub.add_parser(
        "stats",
        help="acceptance rates of the suggestions shown (local statistics, never sent anywhere)",
        description="Print acceptance by source, confidence, language and latency, from the counters the "
        "server keeps in $XDG_STATE_HOME/codegen-ls/stats.json.",
    )
    t.add_argument("--reset", action="store_true", help="delete the statistics file")
    _log_args(t)

    _add_model(sub)
    from codegen_ls.cluster.cli import add_parser as add_cluster_parser  # Ray is imported only when it runs

    add_cluster_parser(sub, _log_args)
    return p


def _add_serve(sub: Any) -> None:
    """``codegen-ls serve``."""
    s = sub.add_parser(
        "serve",
        help="run the language server (LSP over stdio, or --tcp)",
        description="Run the language server. stdout carries only the protocol; logs go to stderr or --log-file.",
    )
    s.add_argument("--tcp", metavar="HOST:PORT", help="listen on TCP instead of stdio")
    s.add_argument("--stdio", action="store_true", help="LSP over stdio (the default)")
    s.add_argument(
        "--allow-remote",
        action="store_true",
        help="let --tcp listen on an address other machines can reach (0.0.0.0, a LAN address): "
        "there is no authentication, whoever connects first can read the documents sent",
    )
    s.add_argument(
        "--debug-requests",
        action="store_true",
        help="answer codegenLs/debugDocument (a document's text as the server holds it): for tests",
    )
    _model_arg(s)
    _log_args(s)


def _add_complete(sub: Any) -> None:
    """``codegen-ls complete``."""
    c = sub.add_parser(
        "complete",
        help="print ranked suggestions for FILE:LINE:COL (1-based)",
        description="Run the completion pipeline once and print ranked suggestions with scores and timings.",
    )
    c.add_argument("location", metavar="FILE:LINE:COL", help="file and 1-based line and column of the cursor")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.add_argument(
        "--workspace",
        default=None,
        metavar="DIR",
        help="the project folder indexed for repository context "
        "(default: the nearest folder above FILE with .git or pyproject.toml; 'none': off)",
    )
    c.add_argument("-n", "--num-candidates", type=int, help="model candidates (default 3)")
    c.add_argument("--max-new-tokens", type=int)
    c.add_argument("--multiline", choices=["auto", "always", "never"])
    c.add_argument("--temperature", type=float)
    c.add_argument("--no-lookup", action="store_true", help="no candidates copied from the document")
    _model_arg(c)
    _log_args(c)


def _add_model(sub: Any) -> None:
    """``codegen-ls model export`` and ``model info``."""
    m = sub.add_parser("model", help="export and inspect model directories")
    msub = m.add_subparsers(dest="model_command", metavar="ACTION")
    e = msub.add_parser(
        "export",
        help="convert a Hugging Face CodeGen checkpoint into an int8 ONNX model directory",
        description="SRC: a local checkpoint directory (config.json + safetensors/bin + tokenizer) or, "
        "when online, a hub id such as Salesforce/codegen-350M-mono. Needs the export extra.",
    )
    e.add_argument("src", metavar="SRC")
    e.add_argument("out", metavar="OUT", type=Path)
    e.add_argument("--no-quantize", action="store_true", help="keep fp32 weights")
    e.add_argument(
        "--graph",
        choices=["gqa", "optimum"],
        default="gqa",
        help="gqa (default): our graph, one in-place KV cache per layer, int8 unless --no-quantize "
        "(decode attention: our kernel where built, else onnxruntime's GroupQueryAttention); "
        "optimum: optimum-onnx's text-generation-with-past export (the reference path)",
    )
    e.add_argument("--int4", action="store_true", help="4-bit weight-only layer matrices (MatMulNBits; gqa graph)")
    e.add_argument(
        "--kv-bits",
        choices=("auto", "8", "4"),
        default="auto",
        help="gqa KV cache: 8 (int8: runs fast on any CPU) or 4 (a scale per token and head: half the "
        "memory and bandwidth at long context; needs the compiled kernel to serve, fast with AVX-512 "
        "VNNI); auto (default): 4 where this machine runs it fast, else 8",
    )
    e.add_argument("--name", help="model name in the manifest (default: SRC's last path component)")
    e.add_argument("--force", action="store_true", help="overwrite a non-empty OUT")
    _log_args(e)
    i = msub.add_parser("info", help="print a model directory's manifest and verify its files")
    i.add_argument("dir", metavar="DIR", nargs="?", help="model directory (default: the model in use)")
    _log_args(i)


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", metavar="DIR", help="model directory (default: $CODEGEN_LS_MODEL, else the embedded model)"
    )
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (default: all cores)")


def _log_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    p.add_argument("--log-file", metavar="FILE", help="log to FILE instead of stderr")


def setup_logging(verbose: int, log_file: str | None) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def parse_location(location: str) -> tuple[Path, int, int]:
    path_s, sep1, rest = location.rpartition(":")
    path_s2, sep2, line_s = path_s.rpartition(":")
    if not (sep1 and sep2):
        raise CodegenLsError(f"expected FILE:LINE:COL, got '{location}'")
    try:
        line, col = int(line_s), int(rest)
    except ValueError:
        raise CodegenLsError(f"LINE and COL must be numbers in '{location}'") from None
    path = Path(path_s2)
    if not path.is_file():
        raise CodegenLsError(f"file not found: {path}")
    return path, line, col


def _complete_settings(args: argparse.Namespace) -> Settings:
    """``complete``'s settings: the defaults and its options (given ones count as the user's)."""
    from codegen_ls.settings import Settings

    settings = Settings(model_path=args.model, threads=args.threads)
    for name in ("num_candidates", "max_new_tokens", "multiline", "temperature"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
            settings.explicit |= {name}
    if args.no_lookup:
        settings.lookup = False
    problems = settings.validate()
    if problems:
        raise CodegenLsError("; ".join(problems))
    return settings


def cmd_complete(args: argparse.Namespace) -> int:
    path, line, col = parse_location(args.location)
    from codegen_ls.suggest.pipeline import Completer, CompletionRequest

    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise CodegenLsError(f"cannot read {path}: {exc.strerror}") from None
    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        raise CodegenLsError(f"line {line} is out of range: {path} has {len(lines)} lines")
    width = len(lines[line - 1].rstrip("\r"))
    if not 1 <= col <= width + 1:
        raise CodegenLsError(
            f"column {col} is out of range: line {line} has {width} characters (columns 1..{width + 1})"
        )
    settings = _complete_settings(args)
    t0 = time.perf_counter()
    completer = Completer()
    completer.load(settings.model_path, threads=settings.threads) if _accepts_threads(completer) else completer.load(
        settings.model_path
    )
    load_ms = (time.perf_counter() - t0) * 1000
    repo = _workspace_snapshot(path, args.workspace)
    req = CompletionRequest(
        text=text,
        line=line - 1,
        character=col - 1,
        uri=path.resolve().as_uri(),
        language_id="python" if path.suffix == ".py" else path.suffix.lstrip("."),
        explicit=True,
        repo=repo,
    )
    result = completer.complete(req, settings)
    result.timings.setdefault("load", round(load_ms, 1))
    if args.json:
        print(json.dumps(_result_json(result, path, line, col), indent=2))
        return 0
    cur = lines[line - 1][: col - 1]
    print(f"{path}:{line}:{col}  mode={result.mode}  {('(' + result.reason + ')') if result.reason else ''}")
    print(f"  before cursor: {cur[-60:]!r}")
    if not result.suggestions:
        print("  no suggestion")
    for rank, s in enumerate(result.suggestions, 1):
        print(f"  #{rank} score={s.score:+.3f} conf={s.confidence:.2f} src={s.source:<12} {s.insert_text!r}")
    t = result.timings
    st = result.stats
    print("  timings ms: " + "  ".join(f"{k}={v:.1f}" for k, v in t.items()))
    if st:
        print("  stats: " + "  ".join(f"{k}={v:g}" for k, v in st.items()))
    return 0


def _workspace_snapshot(path: Path, workspace: str | None) -> Any:
    """The repository index of FILE's project (read now, in full), or None."""
    from codegen_ls.suggest.repo import RepoIndex

    if workspace == "none":
        return None
    root = (
        Path(workspace)
        if workspace
        else next((d for d in path.resolve().parents if (d / ".git").exists() or (d / "pyproject.toml").exists()), None)
    )
    if root is None:
        return None
    index = RepoIndex()
    index.add_root(str(root.resolve()))
    index.wait_idle(60)
    index.close()
    return index.snapshot


def _accepts_threads(completer: Any) -> bool:
    import inspect

    return "threads" in inspect.signature(completer.load).parameters


def _result_json(result: Any, path: Path, line: int, col: int) -> dict[str, Any]:
    return {
        "file": str(path),
        "line": line,
        "column": col,
        "mode": result.mode,
        "reason": result.reason,
        "suggestions": [
            {
                "rank": i + 1,
                "text": s.insert_text,
                "score": round(s.score, 4),
                "confidence": round(s.confidence, 4),
                "source": s.source,
                "logprob_mean": round(s.logprob_mean, 4),
                "finish_reason": s.finish_reason,
                "range": {
                    "start": {"line": s.start[0] + 1, "column": s.start[1] + 1},
                    "end": {"line": s.end[0] + 1, "column": s.end[1] + 1},
                },
            }
            for i, s in enumerate(result.suggestions)
        ],
        "timings_ms": result.timings,
        "stats": result.stats,
        "prompt": getattr(result, "prompt_info", {}),
        "candidates": getattr(result, "candidates", []),
    }


def _print_environment(threads: int) -> None:
    """``doctor``'s first lines: versions, onnxruntime providers, cores."""
    from importlib.metadata import PackageNotFoundError, version

    import onnxruntime as ort

    print(f"codegen-ls {__version__} on Python {platform.python_version()} ({platform.platform()})")
    for name in ("onnxruntime", "tokenizers", "numpy", "pygls", "lsprotocol", "cattrs"):
        try:
            print(f"  {name:<12} {version(name)}")
        except PackageNotFoundError:
            print(f"  {name:<12} not installed")
    print(f"onnxruntime providers: {', '.join(ort.get_available_providers())}")
    print(f"cpu cores: {os.cpu_count()}  threads used: {threads or os.cpu_count()}")


def cmd_doctor(args: argparse.Namespace) -> int:
    from codegen_ls.engine import kernels
    from codegen_ls.engine.modeldir import read_manifest, resolve_model_dir, verify_files
    from codegen_ls.settings import Settings
    from codegen_ls.suggest.pipeline import Completer, CompletionRequest

    _print_environment(args.threads)
    model_dir = resolve_model_dir(args.model)
    source = (
        "--model" if args.model else ("$CODEGEN_LS_MODEL" if os.environ.get("CODEGEN_LS_MODEL") else "embedded default")
    )
    print(f"model: {model_dir} ({source})")
    manifest = read_manifest(model_dir)
    for k, v in manifest.to_json().items():
        if k not in ("files", "extra"):
            print(f"  {k}: {v}")
    print(f"  graph: {manifest.extra.get('graph', 'optimum')}  KV cache: {manifest.extra.get('kv_dtype', 'float32')}")
    problems = verify_files(model_dir, manifest)
    print(
        f"  files: {len(manifest.files)} checked, " + ("all checksums match" if not problems else "; ".join(problems))
    )
    print(f"decode-attention kernel: {kernels.status()}")
    snippet = (
        "import os\n\n\ndef list_python_files(root):\n    result = []\n    for name in os.listdir(root):\n        if "
        "name.endswith('.py'):\n            result."
    )
    t0 = time.perf_counter()
    completer = Completer()
    engine = completer.load(args.model)
    load_ms = (time.perf_counter() - t0) * 1000
    print(f"decode attention in use: {engine.attention}")
    lines = snippet.split("\n")
    settings = Settings(model_path=args.model)
    req = CompletionRequest(
        text=snippet, line=len(lines) - 1, character=len(lines[-1]), uri="doctor:snippet", explicit=True
    )
    t1 = time.perf_counter()
    result = completer.complete(req, settings)
    total = (time.perf_counter() - t1) * 1000
    best = result.suggestions[0].insert_text if result.suggestions else "(none)"
    print(f"timed completion: load {load_ms:.0f} ms, completion {total:.0f} ms, mode {result.mode}, best {best!r}")
    print("  " + "  ".join(f"{k}={v:.1f}" for k, v in result.timings.items()))
    if completer.speeds is not None:  # measured at load (or read from the cache), and what the target makes of it
        from codegen_ls.engine import latency

        for line in latency.describe(
            completer.speeds, settings.latency_target_ms, settings.num_candidates, engine.context_length
        ):
            print(f"latency: {line}")
    return 1 if problems else 0


def cmd_stats(args: argparse.Namespace) -> int:
    from codegen_ls import stats

    if args.reset:
        stats.state_path().unlink(missing_ok=True)
        print(f"removed {stats.state_path()}")
        return 0
    print("\n".join(stats.report()))
    return 0


def cmd_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from codegen_ls.engine.modeldir import read_manifest, resolve_model_dir, verify_files

    if args.model_command == "export":
        from codegen_ls.export.pipeline import export

        export(
            args.src,
            args.out,
            quantize_int8=not args.no_quantize,
            force=args.force,
            graph=args.graph,
            int4=args.int4,
            name=args.name,
            kv_bits=None if args.kv_bits == "auto" else int(args.kv_bits),
        )
        return 0
    if args.model_command == "info":
        directory = resolve_model_dir(args.dir)
        manifest = read_manifest(directory)
        print(json.dumps(manifest.to_json(), indent=2))
        problems = verify_files(directory, manifest)
        size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
        print(
            f"{directory}: {size / 1e6:.1f} MB, "
            + ("all files verified" if not problems else "PROBLEMS: " + "; ".join(problems))
        )
        return 1 if problems else 0
    parser.parse_args(["model", "--help"])
    return 2


def cmd_serve(args: argparse.Namespace) -> int:
    from codegen_ls.lsp import server

    tcp = None
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        if not host or not port.isdigit():
            raise CodegenLsError(f"--tcp expects HOST:PORT, got '{args.tcp}'")
        tcp = (host, int(port))
        if not _is_loopback(host):
            if not args.allow_remote:
                raise CodegenLsError(
                    f"refusing to listen on {host}: other machines could connect and read the "
                    "documents sent; use 127.0.0.1, or pass --allow-remote to accept that"
                )
            print(
                f"codegen-ls: warning: listening on {host}:{port} with --allow-remote: any machine that reaches "
                "this port can connect first and read the documents sent (no authentication)",
                file=sys.stderr,
            )
    return server.serve(tcp=tcp, model=args.model, threads=args.threads, debug_requests=args.debug_requests)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # another host name: it may resolve to anything
        return False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    setup_logging(args.verbose, args.log_file)
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "complete":
            return cmd_complete(args)
        if args.command == "doctor":
            return cmd_doctor(args)
        if args.command == "stats":
            return cmd_stats(args)
        if args.command == "cluster":
            from codegen_ls.cluster.cli import run as run_cluster

            return run_cluster(args)
        return cmd_model(args, parser)
    except CodegenLsError as exc:
        print(f"codegen-ls: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
