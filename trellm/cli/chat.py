"""`trellm chat`: a multi-turn chat in the terminal.

Answers stream as they are generated; `<think>...</think>` reasoning is shown dimmed (on a
terminal) or between brackets; each answer ends with its speed. Ctrl-C stops the current
answer and keeps the conversation; Ctrl-D (or /quit) leaves. Commands: /clear, /system TEXT,
/save FILE, /help.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from trellm.engine.generate import GenerationStats
from trellm.engine.generator import held_back
from trellm.errors import TrellmError

HELP = "/clear forget the conversation · /system TEXT set the system message · /save FILE write the conversation " \
       "as JSON · /quit leave (or Ctrl-D) · Ctrl-C stops an answer"
MODES = {  # for models without a chat template: how a conversation becomes a prompt
    "chatml": lambda msgs: "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
    + "<|im_start|>assistant\n",
    "plain": lambda msgs: "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in msgs) + "Assistant:",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal",
                       description="Multi-turn chat using the model's chat template. " + HELP)
    p.add_argument("-m", "--model", required=True, help="model folder")
    p.add_argument("--system", help="system message")
    p.add_argument("--mode", choices=sorted(MODES), help="prompt format for models without a chat template")
    p.add_argument("--max-tokens", type=int, default=1024, help="most new tokens per answer (default 1024)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the model's generation_config)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16")
    p.set_defaults(run=run)


class _ThinkPrinter:
    """Writes streamed text, showing <think>...</think> distinctly; tags split across pieces are handled."""

    def __init__(self, out, tty: bool):
        self.out, self.tty, self.buf, self.inside = out, tty, "", False

    def write(self, piece: str) -> None:
        self.buf += piece
        while self.buf:
            tag = "</think>" if self.inside else "<think>"
            at = self.buf.find(tag)
            if at >= 0:
                self._emit(self.buf[:at])
                self.buf = self.buf[at + len(tag):]
                self.inside = not self.inside
                self.out.write(("\x1b[2m" if self.tty else "[thinking: ") if self.inside else
                               ("\x1b[0m" if self.tty else "]\n"))
                continue
            keep = held_back(self.buf, [tag])  # a tag may be arriving in pieces
            self._emit(self.buf[: len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep:]
            break
        self.out.flush()

    def finish(self) -> None:
        self._emit(self.buf)
        self.buf = ""
        if self.inside:
            self.out.write("\x1b[0m" if self.tty else "]")
            self.inside = False
        self.out.write("\n")
        self.out.flush()

    def _emit(self, text: str) -> None:
        if text:
            self.out.write(text)


def run(args: argparse.Namespace) -> int:
    from trellm.cli.generate import sampling_from_args
    from trellm.engine.llm import LLM

    llm = LLM(args.model, device=args.device, dtype=args.dtype)
    if args.mode is None and llm.tokenizer.get_chat_template() is None:
        raise TrellmError(f"{args.model} has no chat template: choose a prompt format with --mode "
                          f"({' or '.join(sorted(MODES))})")
    sampling = sampling_from_args(args, llm.default_sampling())
    out, tty = sys.stdout, sys.stdout.isatty()
    system = args.system
    history: list[dict[str, str]] = []
    print(f"trellm chat · {llm.path.name} on {llm.model.device.type} · {HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, rest = text.partition(" ")
            if cmd in ("/quit", "/exit"):
                return 0
            if cmd == "/clear":
                history.clear()
                print("(conversation cleared)", file=sys.stderr)
            elif cmd == "/system":
                system = rest.strip() or None
                print(f"(system message {'set' if system else 'removed'})", file=sys.stderr)
            elif cmd == "/save":
                if not rest.strip():
                    print("usage: /save FILE", file=sys.stderr)
                    continue
                messages = ([{"role": "system", "content": system}] if system else []) + history
                with open(rest.strip(), "w", encoding="utf-8") as f:
                    json.dump({"model": llm.path.name, "messages": messages}, f, ensure_ascii=False, indent=1)
                print(f"(saved {len(messages)} messages to {rest.strip()})", file=sys.stderr)
            else:
                print(HELP, file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        prompt = MODES[args.mode](messages) if args.mode else messages
        stats, printer, answer = GenerationStats(), _ThinkPrinter(out, tty), []
        t0 = time.perf_counter()
        stopped = False
        try:
            for piece in llm.stream(prompt, max_new_tokens=args.max_tokens, sampling=sampling, stats=stats):
                answer.append(piece)
                printer.write(piece)
        except KeyboardInterrupt:
            stopped = True
        printer.finish()
        history.append({"role": "assistant", "content": "".join(answer)})
        seconds = time.perf_counter() - t0
        note = "stopped · " if stopped else ""
        print(f"[{note}{stats.completion_tokens} tokens, {stats.completion_tokens / max(seconds, 1e-9):.1f} tokens/s]",
              file=sys.stderr)
