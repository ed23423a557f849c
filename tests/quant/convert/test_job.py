"""The conversion job end to end on tiny models: round trip, resume after a crash, bad inputs, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from trellm.cli.main import main
from trellm.errors import ConfigError, TrellmError
from trellm.quant.convert.bits import LinearSlot, allocate_bits, average_bits
from trellm.quant.convert.job import ConvertArgs, ConvertError, convert

pytestmark = pytest.mark.slow


def _tiny(tmp_path, layers: int = 1):
    import transformers

    from conftest import write_tiny_tokenizer

    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.5 / p.shape[1] ** 0.5)
    path = tmp_path / f"src{layers}"
    model.save_pretrained(path)
    write_tiny_tokenizer(path)
    return path


def _args(src, tmp_path, name="out", **kw):
    return ConvertArgs(input=str(src), output=str(tmp_path / name), workdir=str(tmp_path / f"work-{name}"),
                       bpw=kw.pop("bpw", 4), rows=kw.pop("rows", 3), cols=kw.pop("cols", 24), **kw)


def test_round_trip_loads_and_tracks_the_original(tmp_path):
    from trellm.cache.contiguous import ContiguousKVCache
    from trellm.models.loader import load_model

    src = _tiny(tmp_path)
    out = convert(_args(src, tmp_path, head_bits=5))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "exl3" and qc["bits"] == 4 and qc["head_bits"] == 5 and qc["codebook"] == "mul1"
    assert (out / "tokenizer.json").exists() and (out / "quantization_config.json").exists()
    quant, orig = load_model(out, device="cpu"), load_model(src, device="cpu")
    assert quant.lm_head.impl.describe() == "exl3 5-bit mul1"
    ids = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(0))

    def logits(m):
        c = ContiguousKVCache(m.config, batch_size=1, max_len=24, device="cpu", dtype=torch.float32)
        return m(ids, torch.arange(24)[None], c.step(24), max_seq_len=24)

    a, b = logits(quant), logits(orig)
    assert ((a - b).norm() / b.norm()) < 0.2
    assert (torch.softmax(b, -1) * (torch.log_softmax(b, -1) - torch.log_softmax(a, -1))).sum(-1).mean() < 0.05


def test_resume_after_a_crash_gives_identical_output(tmp_path):
    src = _tiny(tmp_path, layers=2)
    whole = convert(_args(src, tmp_path, "whole"))

    class Crash(Exception):
        pass

    def crash_after_first_layer(info):
        if info["layer"] == 0:
            raise Crash

    args = _args(src, tmp_path, "resumed")
    with pytest.raises(Crash):
        convert(args, progress=crash_after_first_layer)
    assert not (tmp_path / "resumed").exists()  # nothing half-written
    with pytest.raises(ConvertError, match="resume"):
        convert(args)  # the work folder holds a job: refuse to start over silently
    seen = []
    convert(args, resume=True, progress=lambda info: seen.append(info["layer"]))
    assert seen == [1, "head"]  # layer 0 was not redone
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "resumed" / name).read_bytes() == (whole / name).read_bytes()


def test_refuses_a_workdir_from_another_job(tmp_path):
    src = _tiny(tmp_path)
    convert(_args(src, tmp_path, "a", bpw=3))
    other = _args(src, tmp_path, "a", bpw=5)
    with pytest.raises(ConvertError, match="different arguments.*bpw"):
        convert(other, resume=True)
    job = tmp_path / "work-a" / "job.json"  # a job an older converter left (its layers differ from ours)
    job.write_text(job.read_text().replace('"version": 2', '"version": 1'))
    with pytest.raises(ConvertError, match="converter version 1.*new work folder"):
        convert(_args(src, tmp_path, "a", bpw=3), resume=True, force=True)


@pytest.mark.parametrize("change, error, words", [
    ({"bpw": 0.5}, ConfigError, "between 1 and 8"),
    ({"bpw": 9}, ConfigError, "between 1 and 8"),
    ({"head_bits": 0}, ConfigError, "head bits"),
    ({"codebook": "nope"}, ConfigError, "codebook"),
])
def test_bad_arguments(tmp_path, change, error, words):
    with pytest.raises(error, match=words):
        _args(tmp_path / "x", tmp_path, **change)


def test_bad_inputs(tmp_path):
    with pytest.raises(ConvertError, match="not a model folder"):
        convert(_args(tmp_path / "missing", tmp_path))
    weird = tmp_path / "weird"
    weird.mkdir()
    (weird / "config.json").write_text(json.dumps({"architectures": ["NopeForCausalLM"], "vocab_size": 10}))
    with pytest.raises(TrellmError, match="not supported"):
        convert(_args(weird, tmp_path, "w"))


def test_fractional_allocation_spends_the_budget_on_attention_and_edge_layers():
    slots = [LinearSlot(f"model.layers.{i}.{kind}", i, 128 * 128)
             for i in range(8) for kind in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")]
    bits = allocate_bits(slots, 2.25, 8)
    avg = average_bits(slots, bits)
    assert 2.2 <= avg <= 2.25 and set(bits.values()) == {2, 3}
    assert bits["model.layers.0.self_attn.q_proj"] == 3 and bits["model.layers.7.self_attn.o_proj"] == 3
    assert bits["model.layers.4.mlp.up_proj"] == 2
    assert set(allocate_bits(slots, 4.0, 8).values()) == {4}


def test_cli_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "-h"])
    text = capsys.readouterr().out
    for flag in ("--input", "--output", "--workdir", "--bpw", "--head-bits", "--codebook", "--calibration",
                 "--rows", "--cols", "--device", "--resume", "--no-tf32"):
        assert flag in text


def test_progress_display_prints_a_line_per_layer_in_logs(capsys):
    from trellm.cli.convert import _Display

    with _Display() as show:  # stderr is not a terminal here: plain lines, no live bar
        for layer in (2, 3):  # a resumed job reports from its first unfinished layer
            show({"layer": layer, "num_layers": 4, "bits": {"q_proj": 4, "down_proj": 3}, "rel_error": 0.01,
                  "proxy": {"q_proj": 0.0123, "down_proj": 0.02}, "seconds": 1.5, "elapsed": 10.0 * (layer - 1),
                  "stages": {"hessians": 0.2, "quantize": 1.1, "forward": 0.2, "checkpoint_wait": 0.0}})
        show({"layer": "head", "num_layers": 4, "proxy": {"lm_head": 0.005}, "elapsed": 31.0})
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("layer 3/4: 3/4 bits, output error 0.0100 (SQNR 40.0 dB); proxy q_proj 0.0123")
    assert "~3 s left" in lines[0] and "~0 s left" in lines[1]  # 10 s for 3 layers -> 1 left ≈ 3 s
    assert "[1.5 s, hessians 0.2, quantize 1.1, forward 0.2, checkpoint_wait 0.0; elapsed 10 s" in lines[0]
    assert lines[2] == "head: proxy error 0.005  [31 s]"
    assert len(lines) == 3


@pytest.mark.gpu
def test_gpu_generated_calibration_is_one_seeded_batch(tmp_path):
    """On a GPU the default calibration rows come from the Generator in one batch: the right shape, each
    row its prompt then sampled text, the same rows for the same seed, others for another, and the
    caller's CUDA random stream left as it was."""
    from trellm.io.tokenizer import Tokenizer
    from trellm.models.loader import load_model
    from trellm.quant.convert.calibration import calibration_rows

    src = _tiny(tmp_path)
    model = load_model(src, device="cuda", dtype="float32", fuse=False)
    tok = Tokenizer.from_folder(src)
    torch.cuda.manual_seed(123)
    before = torch.cuda.get_rng_state()
    a = calibration_rows(model, tok, rows=12, cols=40, text_file=None, seed=1)
    assert torch.equal(torch.cuda.get_rng_state(), before)
    b = calibration_rows(model, tok, rows=12, cols=40, text_file=None, seed=1)
    c = calibration_rows(model, tok, rows=12, cols=40, text_file=None, seed=2)
    assert a.shape == (12, 40) and torch.equal(a, b) and not torch.equal(a, c)
    first = tok.encode("The history of")
    assert a[0, : len(first)].tolist() == first
    assert len({tuple(r) for r in a[:8].tolist()}) == 8  # sampled, not one greedy text per prompt
