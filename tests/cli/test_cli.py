"""The `trellm` command end to end (in-process through main(), and once as a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trellm.cli.main import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_one_line_per_prompt_in_order(capsys, tiny_chat_model):
    code, out, _ = run(capsys, "generate", "-m", str(tiny_chat_model), "-p", "Hello", "-p", "The quick brown",
                       "--max-tokens", "7", "--temperature", "0", "--json", "--device", "cpu")
    assert code == 0
    lines = [json.loads(x) for x in out.splitlines()]
    assert [x["prompt_index"] for x in lines] == [0, 1]
    for x in lines:
        assert {"prompt_index", "text", "completion_tokens", "tokens_per_second"} <= set(x)
        assert 1 <= x["completion_tokens"] <= 7 and isinstance(x["text"], str) and x["tokens_per_second"] >= 0


def test_several_prompts_run_as_one_batch_with_the_answers_of_each_alone(capsys, tiny_chat_model):
    prompts = ["Hello", "The quick brown fox jumps", "A"]
    common = ["--max-tokens", "8", "--temperature", "0", "--json", "--device", "cpu"]
    code, out, err = run(capsys, "generate", "-m", str(tiny_chat_model), *sum((["-p", p] for p in prompts), []),
                         *common)
    assert code == 0
    batched = [json.loads(x) for x in out.splitlines()]
    alone = [json.loads(run(capsys, "generate", "-m", str(tiny_chat_model), "-p", p, *common)[1]) for p in prompts]
    for b, a in zip(batched, alone, strict=True):
        for key in ("text", "completion_tokens", "prompt_tokens", "finish_reason"):
            assert b[key] == a[key], key
    code, out, err = run(capsys, "generate", "-m", str(tiny_chat_model), "-p", "Hi", "-p", "Yo", "--max-tokens", "3",
                         "--temperature", "0")
    assert code == 0 and len(out.splitlines()) == 2 and "batch of 2" in err


def test_generate_streams_text_and_reports_speed(capsys, tiny_chat_model):
    code, out, err = run(capsys, "generate", "-m", str(tiny_chat_model), "-p", "Hello", "--chat", "--system",
                         "Be brief.", "--max-tokens", "5", "--temperature", "0.8", "--seed", "3")
    assert code == 0 and "tokens/s" in err
    code2, out2, _ = run(capsys, "generate", "-m", str(tiny_chat_model), "-p", "Hello", "--chat", "--system",
                         "Be brief.", "--max-tokens", "5", "--temperature", "0.8", "--seed", "3")
    assert out == out2  # seeded sampling is reproducible


def test_greedy_json_text_equals_library_generate(capsys, tiny_chat_model):
    from trellm import LLM

    code, out, _ = run(capsys, "generate", "-m", str(tiny_chat_model), "-p", "fox", "--max-tokens", "9", "--json",
                       "--temperature", "0")
    assert json.loads(out)["text"] == LLM(tiny_chat_model, device="cpu").generate("fox", max_new_tokens=9)


def test_inspect(capsys, tiny_chat_model):
    code, out, _ = run(capsys, "inspect", str(tiny_chat_model), "--json")
    d = json.loads(out)
    assert code == 0 and d["architecture"] == "LlamaForCausalLM" and d["layers"] == 3
    assert d["context_length"] == 512 and d["parameters"] > 0 and d["bytes"] > 0
    code, out, _ = run(capsys, "inspect", str(tiny_chat_model))
    assert "LlamaForCausalLM" in out and "context length" in out


def test_errors_are_one_line_without_traceback(capsys, tmp_path, tiny_chat_model):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NopeForCausalLM"]}))
    code, out, err = run(capsys, "inspect", str(tmp_path))
    assert code == 2 and err.startswith("error: ") and "NopeForCausalLM" in err and "Traceback" not in err
    code, _, err = run(capsys, "generate", "-m", str(tmp_path / "missing"), "-p", "x")
    assert code == 2 and "not a folder" in err
    code, _, err = run(capsys, "generate", "-m", str(tiny_chat_model), "-p", "x", "--top-p", "2")
    assert code == 2 and "top_p" in err


def test_no_chat_template_error(capsys, tiny_model_dir, tmp_path):
    import shutil

    from conftest import write_tiny_tokenizer

    dst = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama")[0], dst)
    write_tiny_tokenizer(dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    code, _, err = run(capsys, "generate", "-m", str(dst), "-p", "x", "--chat")
    assert code == 2 and "no chat template" in err


def test_console_script_runs(tiny_chat_model):
    proc = subprocess.run([sys.executable, "-m", "trellm.cli.main", "generate", "-m", str(tiny_chat_model),
                           "-p", "Hi", "--max-tokens", "3", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["completion_tokens"] <= 3


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["import-gguf", "--help"], ["inspect", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0


def test_import_gguf_rejects_a_corrupt_file_and_leaves_nothing(capsys, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    out_dir = tmp_path / "out"
    code, _, err = run(capsys, "import-gguf", str(bad), "-o", str(out_dir))
    assert code == 2 and err.startswith("error: ") and "broken.gguf" in err
    assert not out_dir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf"]  # no temp folder left either
