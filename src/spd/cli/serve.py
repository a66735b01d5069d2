"""`spd serve`: the HTTP service (FastAPI + uvicorn): encode once, depth at many points, a page at /."""

from __future__ import annotations

import argparse

from spd.cli.args import add_device, add_inference_dtype, image_size, port, positive_float, positive_int
from spd.cli.models import load_any_model
from spd.errors import UserInputError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="HTTP service: encode once, depth at many points; a click-for-depth page at /")
    p.add_argument("--model", required=True, help="model folder or Hub id (an `spd export` folder with --backend onnx)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port, default=8000, help="port (default 8000)")
    add_device(p)
    add_inference_dtype(p)
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch", help="torch (default) or onnx (ONNX Runtime)")
    p.add_argument("--compile", action="store_true",
                   help="torch backend: compile the predictor for --compile-sizes (every K bucket), all before the "
                        "service starts (CUDA graphs on CUDA); images the model sees at other sizes run eager")
    p.add_argument("--compile-sizes", default=None, metavar="HxW[,HxW...]",
                   help="with --compile: the sizes the model sees that run compiled (default: the model's pixel "
                        "scale at 4:3, landscape and portrait, e.g. 480x640,640x480)")
    p.add_argument("--cache-mb", type=positive_float, default=512.0,
                   help="encoded images kept for image_id reuse, in MB (LRU; default 512, ~25 MB per 480x640 image)")
    p.add_argument("--cache-ttl", type=positive_float, default=600.0,
                   help="seconds an unused encoded image is kept (default 600)")
    p.add_argument("--max-points", type=positive_int, default=65536, help="points per request (default 65536)")
    p.add_argument("--max-upload-mb", type=positive_float, default=20.0,
                   help="request body size in MiB, enforced while it streams in (default 20)")
    p.add_argument("--max-image-pixels", type=positive_int, default=40_000_000,
                   help="width x height of an upload, checked from its header (default 40000000)")
    p.add_argument("--max-queue", type=positive_int, default=16,
                   help="requests that may wait for decoding and for the model each; beyond, 503 (default 16)")
    p.add_argument("--decode-workers", type=positive_int, default=1,
                   help="images decoded at once, each up to ~150 MB for a 36 MP image (default 1)")
    p.add_argument("--max-connections", type=positive_int, default=256,
                   help="open connections before uvicorn answers 503 (default 256)")
    p.set_defaults(func=run)


def serving_predictor(args: argparse.Namespace):
    """(predictor, info): the model behind the service and what `/v1/info` says of it."""
    from spd.predictor import Predictor

    if args.backend == "onnx":
        from spd.export.runtime import OnnxPredictor

        predictor = OnnxPredictor(args.model)
        return predictor, {"backend": "onnx", **predictor.manifest["spd_config"]}
    model = load_any_model(args.model, args.device)
    config = model.config.to_dict() if hasattr(model, "config") and hasattr(model.config, "to_dict") else {}
    if not args.compile:
        return Predictor(model, args.device, dtype=args.dtype), {"backend": "torch", **config}
    sizes = compile_sizes(args.compile_sizes, model)
    predictor = Predictor(model, args.device, dtype=args.dtype, compile=True, compile_sizes=sizes)
    print(f"spd serve: compiling for {', '.join(f'{w}x{h}' for h, w in sizes)} (every K bucket) before serving ...")
    predictor.warm_up()  # never on the model thread mid-traffic
    return predictor, {"backend": "torch", "compiled_sizes": [list(size) for size in sizes], **config}


def compile_sizes(text: str | None, model) -> list[tuple[int, int]]:
    """--compile-sizes 'HxW,HxW' -> [(h, w), ...]; default the model's scale at 4:3 both ways."""
    from spd.cameras.scale import long_side_of

    if text is None:
        long_side = long_side_of(model)
        return [(round(long_side * 3 / 4), long_side), (long_side, round(long_side * 3 / 4))]
    try:
        return [image_size(part) for part in text.split(",")]
    except argparse.ArgumentTypeError as err:
        raise UserInputError(f"--compile-sizes: {err}") from None


def run(args: argparse.Namespace) -> int:
    import socket

    if args.compile and args.backend == "onnx":
        raise UserInputError("--compile compiles the PyTorch predictor: drop it with --backend onnx")
    if args.compile_sizes is not None and not args.compile:
        raise UserInputError("--compile-sizes needs --compile")
    try:
        import uvicorn

        from spd.serve.app import Limits, create_app
        from spd.serve.cache import FeatureCache
    except ImportError as err:
        raise UserInputError(f'spd serve needs the [serve] extra: pip install "spd[serve]" ({err.name} is missing)') from None
    with socket.socket() as probe:  # a taken port: one line now, not a uvicorn traceback later
        try:
            probe.bind((args.host, args.port))
        except OSError as err:
            raise UserInputError(f"cannot listen on {args.host}:{args.port} ({err.strerror})") from None
    predictor, info = serving_predictor(args)
    cache = FeatureCache(int(args.cache_mb * 2**20), args.cache_ttl)
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_image_pixels=args.max_image_pixels,
                    max_points=args.max_points, max_queue=args.max_queue, decode_workers=args.decode_workers)
    app = create_app(predictor, str(args.model), info, cache, limits)
    from spd.cli.predict import say_provenance

    say_provenance(predictor)  # once, at start
    print(f"spd serve: {args.model} on http://{args.host}:{args.port}/ ({predictor.device}, {predictor.dtype}); "
          "no authentication: put it behind your reverse proxy to expose it")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", limit_concurrency=args.max_connections)
    return 0
