"""`trellm chat` driven through a pseudo-terminal, as a person would use it."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import subprocess
import sys
import termios
import time


def _controlling_terminal() -> None:
    """In the child: a new session whose controlling terminal is the pty, so Ctrl-C sends SIGINT."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    def __init__(self, argv):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                                     preexec_fn=_controlling_terminal)
        os.close(slave)
        self.seen = ""

    def read_until(self, text: str, timeout: float = 120) -> str:
        end = time.time() + timeout
        while text not in self.seen:
            if time.time() > end:
                raise AssertionError(f"timed out waiting for {text!r}; screen so far:\n{self.seen[-2000:]}")
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    self.seen += os.read(self.master, 4096).decode(errors="replace")
                except OSError:
                    break
        at = self.seen.index(text) + len(text)
        consumed, self.seen = self.seen[:at], self.seen[at:]
        return consumed

    def wait_for_output(self, timeout: float = 60) -> None:
        """Until something more has been printed."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        assert ready, "no output"
        self.seen += os.read(self.master, 4096).decode(errors="replace")

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=30)
        finally:
            os.close(self.master)


def test_chat_session_commands_save_and_ctrl_c(tmp_path, tiny_chat_model):
    term = Terminal([sys.executable, "-m", "trellm.cli.main", "chat", "-m", str(tiny_chat_model), "--device", "cpu",
                     "--temperature", "0", "--max-tokens", "6"])
    term.read_until("> ")
    term.send("Hello there\n")
    screen = term.read_until("tokens/s]")
    assert "Hello there" in screen  # the echo of the typed line
    term.read_until("> ")
    term.send("/system Be brief.\n")
    term.read_until("(system message set)")
    term.send("And again\n")
    term.read_until("tokens/s]")
    saved = tmp_path / "chat.json"
    term.send(f"/save {saved}\n")
    term.read_until("(saved 5 messages")
    term.send("/clear\n")
    term.read_until("(conversation cleared)")
    term.send("/nonsense\n")
    term.read_until("/save FILE")  # unknown commands print the help
    term.send("\x04")  # Ctrl-D leaves
    assert term.close() == 0
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "Be brief." and messages[1]["content"] == "Hello there"


def test_ctrl_c_stops_an_answer_but_not_the_program(tiny_chat_model):
    # Seed 1 makes this tiny model talk until its 512-token context is full (472 tokens): the answer is
    # still streaming when its first bytes arrive and Ctrl-C is sent.
    term = Terminal([sys.executable, "-m", "trellm.cli.main", "chat", "-m", str(tiny_chat_model), "--device", "cpu",
                     "--temperature", "1.0", "--seed", "1", "--max-tokens", "100000"])
    term.read_until("> ")
    term.send("Tell me a very long story\n")
    term.read_until("story\r\n")  # the echo of the typed line
    term.wait_for_output()  # the first piece of the answer
    term.send("\x03")
    screen = term.read_until("tokens/s]")
    assert "stopped" in screen
    term.read_until("> ")
    term.send("/quit\n")
    assert term.close() == 0


def test_models_without_a_template_need_a_mode(tmp_path, tiny_model_dir):
    path = tiny_model_dir("qwen2")[0]  # no tokenizer/template: the error names the fix
    proc = subprocess.run([sys.executable, "-m", "trellm.cli.main", "chat", "-m", str(path), "--device", "cpu"],
                          capture_output=True, text=True, timeout=120, input="")
    assert proc.returncode == 2 and "error:" in proc.stderr


def test_thinking_blocks_are_shown_distinctly_even_when_tags_are_split():
    import io

    from trellm.cli.chat import _ThinkPrinter

    for tty, expected in ((False, "Hi [thinking: hmm <no>]\n ok\n"), (True, "Hi \x1b[2mhmm <no>\x1b[0m ok\n")):
        out = io.StringIO()
        p = _ThinkPrinter(out, tty)
        for piece in ("Hi <th", "ink>hmm <n", "o></thi", "nk> ok"):
            p.write(piece)
        p.finish()
        assert out.getvalue() == expected
