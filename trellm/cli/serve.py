"""`trellm serve`: the OpenAI-compatible HTTP server (needs the `server` extra)."""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path

from trellm.errors import TrellmError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="Serve a model folder through /v1/chat/completions, /v1/completions, /v1/models "
                                   "and /v1/token/encode|decode (FastAPI + uvicorn; pip install 'trellm[server]').")
    p.add_argument("-m", "--model", help="model folder (16-bit or EXL3) to serve at start")
    p.add_argument("--model-dir", help="folder whose model folders POST /v1/model/load may load (default: the "
                   "folder holding --model)")
    p.add_argument("--admin-key", help="key for /v1/model/load and /unload; default $TRELLM_ADMIN_KEY (without one "
                   "those routes take the API key)")
    p.add_argument("--name", help="model id clients send (default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    p.add_argument("--api-key", help="required key (Authorization: Bearer KEY or x-api-key); default $TRELLM_API_KEY. "
                   "Without one the server only listens on a loopback address")
    p.add_argument("--max-seq-len", type=int, help="longest sequence, prompt + answer (default: the model's context)")
    p.add_argument("--cache-tokens", type=int, help="KV cache size in tokens (default: 85%% of free GPU memory)")
    p.add_argument("--max-batch", type=int, default=64, help="sequences decoded at once (default 64)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="waiting sequences beyond which requests get 429 (default 256)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16")
    p.set_defaults(run=run)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    key = args.api_key or os.environ.get("TRELLM_API_KEY") or None
    if key is None and not is_loopback(args.host):
        raise TrellmError(f"refusing to serve on {args.host} without an API key: pass --api-key (or set "
                          "TRELLM_API_KEY), or listen on 127.0.0.1")
    try:
        import uvicorn

        from trellm.server.app import ServerState, create_app
    except ImportError as e:
        raise TrellmError(f"the server needs its extra dependencies ({e.name} is missing): "
                          "pip install 'trellm[server]'") from e
    from trellm.engine.llm import LLM

    if args.model is None and args.model_dir is None:
        raise TrellmError("give a model to serve (-m FOLDER) or a folder of models to load from (--model-dir)")
    llm = LLM(args.model, device=args.device, dtype=args.dtype) if args.model else None
    model_dir = args.model_dir or (str(Path(args.model).resolve().parent) if args.model else None)
    state = ServerState(llm, name=args.name or (Path(args.model).name if args.model else None), api_key=key,
                        admin_key=args.admin_key or os.environ.get("TRELLM_ADMIN_KEY") or None, model_dir=model_dir,
                        max_seq_len=args.max_seq_len, cache_tokens=args.cache_tokens, max_batch=args.max_batch,
                        max_queue=args.max_queue, load_options={"device": args.device, "dtype": args.dtype})
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level="warning")
    return 0
