"""`spd loadcheck`: N concurrent clients for T seconds against a local `spd serve` (cache filled first)."""

from __future__ import annotations

import argparse
import json

from spd.cli.args import check_output_file, positive_float, positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("loadcheck", help="N concurrent clients for T seconds against a local spd serve (cache full)")
    p.add_argument("--model", required=True, help="model folder for the server (as spd serve --model)")
    p.add_argument("--clients", type=positive_int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--seconds", type=positive_float, default=30.0, help="duration (default 30)")
    p.add_argument("--points", type=positive_int, default=64, help="new random points per request (default 64)")
    p.add_argument("--images", type=positive_int, default=3, help="images the clients query (default 3)")
    p.add_argument("--cache-mb", type=positive_float, default=256.0, help="server cache bound, filled first (default 256)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="the server's dtype (default fp32)")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch", help="the server's backend (default torch)")
    p.add_argument("--hostile", action="store_true",
                   help="also run misbehaving clients (oversized chunked bodies, pixel bombs, slow uploads, bursts)")
    p.add_argument("--json", default=None, help="write the figures as JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from spd.serve.loadcheck import run_loadcheck

    check_output_file(args.json, "--json")
    serve_args = ["--dtype", args.dtype, "--backend", args.backend]
    if args.hostile:
        from spd.serve.hostile import run_hostile

        hostile = run_hostile(args.model, args.clients, args.seconds, args.points, args.images, args.cache_mb, serve_args)
        print(hostile.format())
        if args.json:
            Path(args.json).write_text(json.dumps(hostile.to_dict(), indent=2))
        return 0 if hostile.normal_errors == 0 and hostile.hostile_failures == 0 else 1
    result = run_loadcheck(args.model, args.clients, args.seconds, args.points, args.images, args.cache_mb,
                           serve_args=serve_args)
    print(result.format())
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2))
    return 0 if result.errors == 0 else 1
