"""`trellm generate`: generate text from one or more prompts, streamed to stdout."""

from __future__ import annotations

import argparse
import json
import sys

from trellm.engine.generate import GenerationStats
from trellm.engine.sampling import SamplingParams


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from prompts",
                       description="Generate text with a model folder (Hugging Face layout, 16-bit or EXL3).")
    p.add_argument("-m", "--model", required=True, help="model folder")
    p.add_argument("-p", "--prompt", action="append", required=True,
                   help="prompt text; repeat for several prompts (run together as one continuous batch)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--max-tokens", type=int, default=256, help="most new tokens per prompt (default 256)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the model's generation_config, "
                   "greedy if it does not sample)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default 1 = off)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens (default 0 = off)")
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: bf16/fp16 on GPU, fp32 on CPU)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt instead of streaming text")
    p.set_defaults(run=run)


def sampling_from_args(args: argparse.Namespace, default: SamplingParams) -> SamplingParams:
    explicit = any(v is not None for v in (args.temperature, args.top_p, args.top_k))
    base = default if not explicit else SamplingParams(temperature=1.0)
    return SamplingParams(
        temperature=args.temperature if args.temperature is not None else base.temperature,
        top_k=args.top_k if args.top_k is not None else base.top_k,
        top_p=args.top_p if args.top_p is not None else base.top_p,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    from trellm.engine.llm import LLM

    llm = LLM(args.model, device=args.device, dtype=args.dtype)
    sampling = sampling_from_args(args, llm.default_sampling())
    if len(args.prompt) > 1:
        return _run_batch(args, llm, sampling)
    out = sys.stdout
    for index, text in enumerate(args.prompt):
        prompt = _prompt(args, text)
        stats = GenerationStats()
        pieces = []
        for piece in llm.stream(prompt, max_new_tokens=args.max_tokens, sampling=sampling, stats=stats):
            if args.json:
                pieces.append(piece)
            else:
                out.write(piece)
                out.flush()
        if args.json:
            out.write(_json_line(index, "".join(pieces), stats.completion_tokens, stats.tokens_per_second,
                                 stats.prompt_tokens, stats.finish_reason))
            out.flush()
        else:
            out.write("\n")
            print(f"[{stats.completion_tokens} tokens, {stats.tokens_per_second:.1f} tokens/s on "
                  f"{llm.model.device.type}; prompt {stats.prompt_tokens} tokens in {stats.prefill_seconds:.2f} s; "
                  f"finish: {stats.finish_reason}]", file=sys.stderr)
    return 0


def _json_line(index: int, text: str, completion_tokens: int, tokens_per_second: float, prompt_tokens: int,
               finish_reason: str | None) -> str:
    """The --json record of one prompt (the same whether it ran alone or in a batch)."""
    return json.dumps({"prompt_index": index, "text": text, "completion_tokens": completion_tokens,
                       "tokens_per_second": round(tokens_per_second, 2), "prompt_tokens": prompt_tokens,
                       "finish_reason": finish_reason}, ensure_ascii=False) + "\n"


def _prompt(args: argparse.Namespace, text: str):
    if not args.chat:
        return text
    return ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": text}]


def _run_batch(args: argparse.Namespace, llm, sampling: SamplingParams) -> int:
    """Several prompts: one continuous batch through the generator, printed in prompt order."""
    results = llm.generate_many([_prompt(args, t) for t in args.prompt], max_new_tokens=args.max_tokens,
                                sampling=sampling)
    for index, c in enumerate(results):
        if args.json:
            sys.stdout.write(_json_line(index, c.text, c.completion_tokens, c.tokens_per_second, c.prompt_tokens,
                                        c.finish_reason))
        else:
            sys.stdout.write(c.text + "\n")
            print(f"[prompt {index}: {c.completion_tokens} tokens in {c.seconds:.2f} s of the batch; "
                  f"prompt {c.prompt_tokens} tokens; finish: {c.finish_reason}]", file=sys.stderr)
        sys.stdout.flush()
    total = sum(c.completion_tokens for c in results)
    seconds = max(c.seconds for c in results)
    print(f"[batch of {len(results)}: {total} tokens in {seconds:.2f} s = {total / max(seconds, 1e-9):.1f} tokens/s on "
          f"{llm.model.device.type}]", file=sys.stderr)
    return 0
