"""``road-vlm chat | chat-ui | merge | export | compose | serve`` (registered by road_vlm/cli.py through ``register``)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _adapter_spec(value: str) -> tuple[str, str]:
    name, sep, directory = value.partition("=")
    if not sep or not name or not directory:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {value!r}")
    return name, directory


def _add_sampling(parser: argparse.ArgumentParser, *, max_new_tokens: int = 512) -> None:
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="base LLaVA-1.5 checkpoint (HF format dir or hub id)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None,
                        help="float32 / bfloat16 / float16 (default: bf16 on CUDA, fp32 on CPU)")
    _add_quantization(parser)


def _add_quantization(parser: argparse.ArgumentParser) -> None:
    from road_vlm.quantization import METHODS

    parser.add_argument("--quantization", choices=METHODS, default=None,
                        help="load the base's language model in 4-bit (nf4/fp4) or 8-bit (int8) with bitsandbytes "
                             "(default: what the adapters were trained on, else none)")


def _int_in(low: int, high: int | None = None):
    """An argparse type: an int in [low, high], checked before anything is loaded."""
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if number < low or (high is not None and number > high):
            raise argparse.ArgumentTypeError(f"{number} is out of range [{low}, {high if high is not None else 'inf'}]")
        return number
    return parse


def _add_server(parser: argparse.ArgumentParser, *, port: int) -> None:
    parser.add_argument("--adapters", nargs="+", type=_adapter_spec, default=[], metavar="NAME=DIR",
                        help="adapters to serve; a request's `model` picks one by NAME")
    parser.add_argument("--base-name", default=None,
                        help="`model` name that selects the base without adapter (default: the base folder name)")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback only)")
    parser.add_argument("--port", type=_int_in(1, 65535), default=port)
    parser.add_argument("--max-batch-size", type=_int_in(1), default=8, help="requests generated together at most")
    parser.add_argument("--batching", choices=["continuous", "static"], default="continuous",
                        help="continuous: requests join the running batch between decode steps and leave when done "
                             "(default); static: a batch runs to its longest answer before the next one starts")
    parser.add_argument("--max-prefill-tokens", type=_int_in(1), default=4096,
                        help="continuous batching: newcomers' prompt tokens (rows x longest prompt) prefilled "
                             "between two decode steps; more wait for the next step (default: %(default)s)")
    parser.add_argument("--max-queue", type=_int_in(1), default=64, help="waiting+running requests before 429")
    parser.add_argument("--batch-window-ms", type=float, default=20.0,
                        help="when idle, how long the batcher waits for more requests after the first one")
    parser.add_argument("--max-tokens", type=_int_in(1), default=None,
                        help="max_tokens of a request that sends none (default: the rest of the context, at most "
                             "--max-tokens-cap)")
    parser.add_argument("--max-tokens-cap", type=_int_in(1), default=2048,
                        help="largest max_tokens a request may ask for (larger: 400)")
    parser.add_argument("--max-image-bytes", type=_int_in(1), default=20 * 1024 * 1024,
                        help="largest image a request may send, in bytes (decoded)")
    parser.add_argument("--max-image-pixels", type=_int_in(1), default=4096 * 4096,
                        help="largest width x height of an image, checked before decoding")
    parser.add_argument("--max-concurrent-decodes", type=_int_in(1), default=2,
                        help="images decoded at the same time at most")
    parser.add_argument("--max-body-bytes", type=_int_in(1), default=None,
                        help="largest request body (default: one base64 image of --max-image-bytes + 1 MiB)")
    parser.add_argument("--allowed-hosts", nargs="+", default=None, metavar="HOST",
                        help="Host header names served (default: localhost, 127.0.0.1, ::1 and --host); '*' = any, "
                        "only behind a proxy that checks them")
    parser.add_argument("--allow-image-urls", action="store_true",
                        help="fetch http(s) image URLs (public addresses only, no redirects, --max-image-bytes, "
                             "--image-url-timeout); off by default")
    parser.add_argument("--image-url-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="time limit of one image URL fetch (default: %(default)s)")
    parser.add_argument("--allow-local-images", action="store_true",
                        help="accept local file paths as image URLs (only for trusted clients)")
    parser.add_argument("--api-key", default=None,
                        help="require `Authorization: Bearer KEY` on API routes (the page: open /#key=KEY); visible "
                        "in `ps`: prefer --api-key-file or the ROAD_VLM_API_KEY environment variable")
    parser.add_argument("--api-key-file", default=None, help="read the API key from this file (first line)")


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key is not None and args.api_key_file is not None:
        raise ValueError("give --api-key or --api-key-file, not both")
    if args.api_key_file is not None:
        key = Path(args.api_key_file).read_text().splitlines()[0].strip() if Path(args.api_key_file).is_file() else ""
        if not key:
            raise ValueError(f"{args.api_key_file}: no API key in the first line")
        return key
    return args.api_key or os.environ.get("ROAD_VLM_API_KEY") or None


def register(subparsers: Any) -> None:
    """Add ``chat``, ``chat-ui``, ``merge``, ``export``, ``compose`` and ``serve``."""
    chat = subparsers.add_parser("chat", help="chat with a (tuned) model about an image in the terminal",
                                 description="Multi-turn terminal chat, streamed. Commands: /image PATH, /reset, "
                                 "/quit. With --prompt it answers once and exits.")
    _add_model(chat)
    chat.add_argument("--adapter", default=None, metavar="DIR", help="adapter directory (road_vlm or PEFT RoAd)")
    chat.add_argument("--merge", action="store_true", help="fold the adapter into the weights (faster generation)")
    chat.add_argument("--image", default=None, help="image to talk about")
    chat.add_argument("--prompt", default=None, help="answer this one question and exit")
    chat.add_argument("--json", action="store_true",
                      help="with --prompt: print {answer, prompt, adapter, tokens, ...} as one JSON line")
    _add_sampling(chat)
    chat.set_defaults(func=run_chat)

    ui = subparsers.add_parser("chat-ui", help="web chat page (image upload, streaming, adapter choice)",
                               description="Serves a chat page at http://HOST:PORT/ on top of the OpenAI-compatible "
                               "API (same batcher, same adapters).")
    _add_model(ui)
    ui.add_argument("--adapter", default=None, metavar="DIR", help="a single adapter (served as 'default')")
    _add_server(ui, port=7860)
    ui.set_defaults(func=run_chat_ui)

    merge = subparsers.add_parser("merge", help="merge an adapter into a standalone HF checkpoint",
                                  description="Writes base + adapter (+ trained projector) as a plain "
                                  "LlavaForConditionalGeneration checkpoint with processor and prompt_format.json.")
    merge.add_argument("--model", required=True, help="base checkpoint")
    merge.add_argument("--adapter", required=True, metavar="DIR")
    merge.add_argument("--output", required=True, metavar="DIR")
    merge.add_argument("--dtype", default=None, help="weights dtype (default: the base checkpoint's)")
    _add_quantization(merge)
    merge.add_argument("--dequantize", action="store_true",
                       help="for an adapter trained on a quantized base: load that base, dequantize it to --dtype, "
                            "then merge (a quantized base cannot take the merge itself)")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    merge.set_defaults(func=run_merge)

    export = subparsers.add_parser("export", help="export a RoAd or LoRA adapter for the PEFT library",
                                   description="Writes a PEFT adapter directory (RoadConfig or LoraConfig; a trained "
                                   "projector as modules_to_save). The RoAd1+LoRA hybrid has no PEFT form.")
    export.add_argument("--format", required=True, choices=["peft"])
    export.add_argument("--adapter", required=True, metavar="DIR")
    export.add_argument("--output", required=True, metavar="DIR")
    export.add_argument("--base-model", default=None,
                        help="recorded as base_model_name_or_path (default: the base the adapter records)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    export.set_defaults(func=run_export)

    compose = subparsers.add_parser(
        "compose", help="compose RoAd adapters trained on disjoint pair subsets into one adapter",
        description="R_C = R_A R_B, exactly: adapters trained with disjoint adapter.pair_subset values (e.g. 1/2 and "
        "2/2) combine without retraining. Checks base, variant, group size, targets, disjoint pairs and at most one "
        "projector; writes a normal adapter directory (loads, merges, serves and exports like any other).")
    compose.add_argument("adapters", nargs="+", metavar="DIR", help="two or more adapter directories")
    compose.add_argument("--output", required=True, metavar="DIR")
    compose.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    compose.add_argument("--ignore-base-name", action="store_true",
                         help="compose even if the adapters record different base paths (same base, moved)")
    compose.set_defaults(func=run_compose)

    serve = subparsers.add_parser("serve", help="OpenAI-compatible server, many adapters in one batch",
                                  description="POST /v1/chat/completions (model = adapter name or the base name, "
                                  "stream supported), GET /v1/models, GET /v1/stats.")
    _add_model(serve)
    _add_server(serve, port=8000)
    serve.add_argument("--web-ui", action="store_true", help="also serve the chat page at /")
    serve.set_defaults(func=run_serve)


def _error(command: str, err: BaseException) -> int:
    print(f"road-vlm {command}: error: {err}", file=sys.stderr)
    return 2


def run_chat(args: argparse.Namespace) -> int:
    from road_vlm.adapters import AdapterConfigError, AdapterFileError, AdapterStateError
    from road_vlm.data.images import ImageLoadError
    from road_vlm.model import load_vlm

    from .chat import ChatSession, answer_once, run_interactive
    from road_vlm.generation import PromptTooLongError, SamplingError, SamplingParams

    if args.json and args.prompt is None:
        return _error("chat", ValueError("--json needs --prompt (non-interactive mode)"))
    try:
        sampling = SamplingParams(args.temperature, args.top_p, args.max_new_tokens)
        loaded = load_vlm(args.model, args.adapter, device=args.device, dtype=args.dtype, merge=args.merge,
                          quantization=args.quantization)
    except (SamplingError, AdapterFileError, AdapterConfigError, AdapterStateError, FileNotFoundError,
            ValueError) as err:
        return _error("chat", err)
    session = ChatSession(loaded, sampling=sampling, adapter=args.adapter)
    if args.image:
        try:
            session.set_image(args.image)
        except ImageLoadError as err:
            if args.prompt is not None:
                return _error("chat", err)
            print(f"error: {err}", file=sys.stderr)  # interactive: say so and chat without an image
    if args.prompt is not None:
        try:
            return answer_once(session, args.prompt, as_json=args.json)
        except (PromptTooLongError, ValueError) as err:
            return _error("chat", err)
    return run_interactive(session)


def _load_engine(args: argparse.Namespace, adapters: dict[str, str]) -> Any:
    from .engine import ServingEngine

    return ServingEngine.load(args.model, adapters, device=args.device, dtype=args.dtype, base_name=args.base_name,
                              quantization=args.quantization)


def _adapters_from(args: argparse.Namespace) -> dict[str, str]:
    adapters: dict[str, str] = {}
    if getattr(args, "adapter", None):
        adapters["default"] = args.adapter
    for name, directory in args.adapters:
        if name in adapters:
            raise ValueError(f"adapter name {name!r} given twice")
        adapters[name] = directory
    return adapters


def _run_server(args: argparse.Namespace, *, command: str, web_ui: bool) -> int:
    import uvicorn

    from .messages import ImagePolicy
    from .http_guards import LOOPBACK_HOSTS
    from .server import create_app

    try:  # every setting is checked before the model loads
        api_key = _api_key(args)
        images = ImagePolicy(allow_local_images=args.allow_local_images, allow_image_urls=args.allow_image_urls,
                             url_timeout_s=args.image_url_timeout, max_bytes=args.max_image_bytes,
                             max_pixels=args.max_image_pixels, max_concurrent_decodes=args.max_concurrent_decodes)
        if args.max_tokens is not None and args.max_tokens > args.max_tokens_cap:
            raise ValueError(f"--max-tokens {args.max_tokens} exceeds --max-tokens-cap {args.max_tokens_cap}")
        hosts = args.allowed_hosts or [*LOOPBACK_HOSTS, args.host]
        allowed_hosts = None if "*" in hosts else tuple(hosts)
        engine = _load_engine(args, _adapters_from(args))
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        return _error(command, err)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and api_key is None:
        logger.warning("listening on %s without an API key: anyone who can reach this port can use the model",
                       args.host)
    app = create_app(
        engine,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        batch_window_s=args.batch_window_ms / 1000.0,
        batching=args.batching,
        max_prefill_tokens=args.max_prefill_tokens,
        default_max_tokens=args.max_tokens,
        max_tokens_cap=args.max_tokens_cap,
        images=images,
        max_body_bytes=args.max_body_bytes,
        allowed_hosts=allowed_hosts,
        api_key=api_key,
        web_ui=web_ui,
    )
    names = ", ".join(engine.model_names())
    where = f"http://{args.host}:{args.port}/" if web_ui else f"http://{args.host}:{args.port}/v1"
    print(f"road-vlm {command}: serving {names} at {where}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def run_chat_ui(args: argparse.Namespace) -> int:
    return _run_server(args, command="chat-ui", web_ui=True)


def run_serve(args: argparse.Namespace) -> int:
    return _run_server(args, command="serve", web_ui=args.web_ui)


def run_merge(args: argparse.Namespace) -> int:
    from .export import merge_checkpoint

    try:
        out = merge_checkpoint(args.model, args.adapter, args.output, dtype=args.dtype, overwrite=args.overwrite,
                               quantization=args.quantization, dequantize=args.dequantize)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        return _error("merge", err)
    print(f"merged checkpoint written to {out}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from .export import export_peft

    try:
        out = export_peft(args.adapter, args.output, base_model_name_or_path=args.base_model,
                          overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as err:
        return _error("export", err)
    print(f"PEFT adapter written to {out}")
    return 0


def run_compose(args: argparse.Namespace) -> int:
    from road_vlm.adapters.compose import compose_dirs

    try:
        out = compose_dirs(args.adapters, args.output, overwrite=args.overwrite,
                           ignore_base_name=args.ignore_base_name)
    except (ValueError, FileNotFoundError) as err:
        return _error("compose", err)
    print(f"composed adapter written to {out}")
    return 0
