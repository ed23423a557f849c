"""The conversion job end to end on tiny models: round trip, resume after a crash, bad inputs, CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from trellm.cli.main import main
from trellm.errors import ConfigError, TrellmError
from trellm.quant.convert.bits import LinearSlot, allocate_bits, allocate_measured, average_bits
from trellm.quant.convert.job import ConvertArgs, ConvertError, convert

pytestmark = pytest.mark.slow


def _tiny(tmp_path, layers: int = 1):
    from conftest import write_tiny_llama

    path = tmp_path / f"src{layers}"
    write_tiny_llama(path, layers, weight_scale=0.5)
    return path


def _args(src, tmp_path, name="out", **kw):
    return ConvertArgs(input=str(src), output=str(tmp_path / name), workdir=str(tmp_path / f"work-{name}"),
                       bpw=kw.pop("bpw", 4), rows=kw.pop("rows", 3), cols=kw.pop("cols", 24), **kw)


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory):
    """A 2-layer tiny model and its uninterrupted conversion (work folder beside it)."""
    tmp = tmp_path_factory.mktemp("two-layers")
    src = _tiny(tmp, layers=2)
    return src, convert(_args(src, tmp, "whole", head_bits=5))


def test_round_trip_loads_and_tracks_the_original(two_layers):
    from trellm.cache.contiguous import ContiguousKVCache
    from trellm.models.loader import load_model

    src, out = two_layers
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "exl3" and qc["bits"] == 4 and qc["head_bits"] == 5 and qc["codebook"] == "mul1"
    assert (out / "tokenizer.json").exists() and (out / "quantization_config.json").exists()
    # The default measured allocation: sensitivities kept in job.json, the widths allocated from them.
    job = json.loads((out.parent / "work-whole" / "job.json").read_text())
    slots = [LinearSlot(name, int(name.split(".")[2]), 128 * 128) for name in job["sensitivity"]]
    assert len(slots) == 14 and job["args"]["allocation"] == "measured"
    report = json.loads((out / "quantization_config.json").read_text())
    assert report["allocation"] == "measured" and report["sensitivity"] == job["sensitivity"]
    allocated = {(s.layer, s.name.rsplit(".", 1)[1]): k
                 for s, k in zip(slots, allocate_measured(slots, 4.0, job["sensitivity"]).values())}
    assert {(s["layer"], leaf): k for s in job["layer_stats"] for leaf, k in s["bits"].items()} == allocated
    quant, orig = load_model(out, device="cpu"), load_model(src, device="cpu")
    assert quant.lm_head.impl.describe() == "exl3 5-bit mul1"
    ids = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(0))

    def logits(m):
        c = ContiguousKVCache(m.config, batch_size=1, max_len=24, device="cpu", dtype=torch.float32)
        return m(ids, torch.arange(24)[None], c.step(24), max_seq_len=24)

    a, b = logits(quant), logits(orig)
    assert ((a - b).norm() / b.norm()) < 0.2
    assert (torch.softmax(b, -1) * (torch.log_softmax(b, -1) - torch.log_softmax(a, -1))).sum(-1).mean() < 0.05


class Crash(Exception):
    pass


def _stop_at(layer, stop):
    def progress(info):
        if info["layer"] == layer:
            raise stop
    return progress


@pytest.mark.parametrize("stop, interval", [
    (Crash, 0),  # checkpoints after every layer: layer 0 survives a crash
    (KeyboardInterrupt, 1e9),  # no checkpoint due yet, but Ctrl-C writes the finished layers before leaving
])
def test_resume_after_a_stop_gives_identical_output(tmp_path, two_layers, stop, interval):
    src, whole = two_layers
    args = _args(src, tmp_path, "resumed", head_bits=5)
    with pytest.raises(stop):
        convert(args, progress=_stop_at(0, stop), checkpoint_interval=interval)
    assert not (tmp_path / "resumed").exists()  # nothing half-written
    with pytest.raises(ConvertError, match="resume"):
        convert(args)  # the work folder holds a job: refuse to start over silently
    seen = []
    convert(args, resume=True, progress=lambda info: seen.append(info["layer"]), checkpoint_interval=interval)
    assert seen == ["setup", 1, "head"]  # layer 0 was not redone
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "resumed" / name).read_bytes() == (whole / name).read_bytes()


def test_a_crash_before_any_checkpoint_leaves_a_resumable_job(tmp_path, two_layers):
    src, _ = two_layers
    args = _args(src, tmp_path, "early", head_bits=5)
    with pytest.raises(Crash):
        convert(args, progress=_stop_at("setup", Crash))
    job = json.loads((tmp_path / "work-early" / "job.json").read_text())
    assert job["finished"] == 0 and job["args"] == args.identity()
    with pytest.raises(ConvertError, match="resume"):
        convert(args)


def test_refuses_a_workdir_from_another_job(tmp_path, two_layers):
    src, whole = two_layers
    shutil.copytree(whole.parent / "work-whole", tmp_path / "work-a")  # a finished bpw 4 job
    other = _args(src, tmp_path, "a", bpw=5, head_bits=5)
    with pytest.raises(ConvertError, match="different arguments.*bpw"):
        convert(other, resume=True)
    with pytest.raises(ConvertError, match=r"different arguments \(channel_scales\)"):
        convert(_args(src, tmp_path, "a", head_bits=5, channel_scales="columns"), resume=True)
    with pytest.raises(ConvertError, match=r"different arguments \(allocation\)"):
        convert(_args(src, tmp_path, "a", head_bits=5, allocation="heuristic"), resume=True)
    job = tmp_path / "work-a" / "job.json"  # a job an older converter left (its layers differ from ours)
    job.write_text(job.read_text().replace('"version": 2', '"version": 1'))
    with pytest.raises(ConvertError, match="converter version 1.*new work folder"):
        convert(_args(src, tmp_path, "a", head_bits=5), resume=True, force=True)


@pytest.mark.parametrize("change, error, words", [
    ({"bpw": 0.5}, ConfigError, "between 1 and 8"),
    ({"bpw": 9}, ConfigError, "between 1 and 8"),
    ({"head_bits": 0}, ConfigError, "head bits"),
    ({"codebook": "nope"}, ConfigError, "codebook"),
    ({"channel_scales": "rows"}, ConfigError, "channel scales"),
    ({"allocation": "guess"}, ConfigError, "allocation"),
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
                 "--rows", "--cols", "--device", "--resume", "--no-tf32", "--checkpoint-interval", "--channel-scales",
                 "--allocation"):
        assert flag in text


def test_progress_display_prints_a_line_per_layer_in_logs(capsys):
    from trellm.cli.convert import _Display

    with _Display() as show:  # stderr is not a terminal here: plain lines, no live bar
        show({"layer": "setup", "num_layers": 4, "resumed_after": 2, "elapsed": 3.5,
              "stages": {"load": 1.0, "calibration": 2.0, "states": 0.5}, "widths": {3: 5, 4: 3}})
        for layer in (2, 3):  # a resumed job reports from its first unfinished layer
            show({"layer": layer, "num_layers": 4, "bits": {"q_proj": 4, "down_proj": 3}, "rel_error": 0.01,
                  "proxy": {"q_proj": 0.0123, "down_proj": 0.02}, "seconds": 3.0, "elapsed": 3.5 + 3 * (layer - 1),
                  "stages": {"hessians": 0.2, "quantize": 2.6, "forward": 0.2, "checkpoint_wait": 0.0}})
        show({"layer": "head", "num_layers": 4, "proxy": {"lm_head": 0.005}, "elapsed": 12.0})
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == ("setup: load 1.0 s, calibration 2.0 s, states 0.5 s; resuming after layer 2; "
                        "linears at 3 bits: 5, 4 bits: 3")
    assert lines[1].startswith("layer 3/4: 3/4 bits, output error 0.0100 (SQNR 40.0 dB); proxy q_proj 0.0123 (4 b), "
                               "down_proj 0.02 (3 b)")
    # the estimate counts this run's layer times only (not the setup, not the layers done before the resume)
    assert "~3 s left" in lines[1] and "~0 s left" in lines[2]
    assert "[3.0 s, hessians 0.2, quantize 2.6, forward 0.2, checkpoint_wait 0.0; elapsed 6 s" in lines[1]
    assert lines[3] == "head: proxy error 0.005  [12 s]"
    assert len(lines) == 4


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


def test_checkpoint_files_hold_the_tensors_as_they_were_at_the_call(tmp_path, monkeypatch):
    """CPU tensors are copied at the call: changing them afterwards does not reach the files."""
    from safetensors.torch import load_file

    from trellm.quant.convert.job import _Checkpointer

    states = torch.arange(12.0).view(3, 4)
    ck = _Checkpointer()
    ck.write({tmp_path / "s.safetensors": {"states": states}}, {"finished": 1}, tmp_path / "job.json")
    states.zero_()
    ck.wait()
    assert torch.equal(load_file(str(tmp_path / "s.safetensors"))["states"], torch.arange(12.0).view(3, 4))
    assert json.loads((tmp_path / "job.json").read_text()) == {"finished": 1}


@pytest.mark.gpu
def test_gpu_checkpoint_copies_after_the_producing_work_and_keeps_the_memory(tmp_path, monkeypatch):
    """GPU tensors are copied on a side stream: after the kernels that made them (a long matmul queued just
    before), and their memory is not handed to new tensors (filled with other values at once) before the
    copy ends — both into the pinned buffer (large) and pageable memory (small)."""
    from safetensors.torch import load_file

    from trellm.quant.convert import job as job_mod

    monkeypatch.setattr(job_mod._Checkpointer, "PINNED_MIN_BYTES", 1 << 20)
    ck = job_mod._Checkpointer()
    for step in range(3):  # the pinned buffer is reused from the second call on
        a = torch.randn(4096, 4096, device="cuda")
        big = a @ a  # queued, still running when write() returns
        small = big[:8, :8].clone()
        expect_big, expect_small = big.clone(), small.clone()  # queued too: no synchronisation before write()
        ck.write({tmp_path / "s.safetensors": {"states": big}, tmp_path / f"l{step}.safetensors": {"w": small}},
                 {"finished": step}, tmp_path / "job.json")
        del big, small
        junk = [torch.full((4096, 4096), float(i), device="cuda") for i in range(4)]  # reuses freed blocks
        ck.wait()
        assert torch.equal(load_file(str(tmp_path / "s.safetensors"))["states"], expect_big.cpu())
        assert torch.equal(load_file(str(tmp_path / f"l{step}.safetensors"))["w"], expect_small.cpu())
        del junk



def test_holding_the_model_in_16_bits_changes_nothing(tmp_path):
    """On a GPU the converter holds the model in its checkpoint's 16-bit dtype and turns each layer to
    float32 in its turn (an 8B model held in float32 did not fit an 80 GB card beside its calibration
    states). For a bf16 checkpoint that is exact: embeddings, layer outputs and Hessian inputs equal those
    of a model loaded in float32."""
    import transformers

    from trellm.models.loader import load_model
    from trellm.quant.convert.job import _holding_dtype, _layer_forward

    src = _tiny(tmp_path)
    transformers.LlamaForCausalLM.from_pretrained(src).to(torch.bfloat16).save_pretrained(src)
    raw = json.loads((src / "config.json").read_text())
    assert _holding_dtype(raw, "cuda") == "bfloat16" and _holding_dtype(raw, "cpu") == "float32"
    assert _holding_dtype({"torch_dtype": "float32"}, "cuda") == "float32"
    ids = torch.randint(0, 320, (3, 24), generator=torch.Generator().manual_seed(1))
    runs = []
    for held in ("float32", "bfloat16"):
        model = load_model(src, device="cpu", dtype=held, fuse=False)
        states = model.embed(ids, dtype=torch.float32)
        model.layers[0].float()
        seen = []
        out, _ = _layer_forward(model, 0, states, 2, {"model.layers.0.mlp.down_proj": seen.append})
        runs.append((states, out, torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])))
    for a, b in zip(*runs):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    # Comparing against the reference pass overwrites it in place and measures the difference.
    model.layers[0].mlp.down_proj.impl.weight.mul_(1.01)
    ref = runs[1][1].clone()
    out, err = _layer_forward(model, 0, runs[1][0], 2, into=ref)
    assert out is ref and not torch.equal(out, runs[1][1])
    assert err == pytest.approx(float((out - runs[1][1]).norm() / runs[1][1].norm()), rel=1e-6) and err > 0
