"""What a new user meets in the first hour: help, progress, interrupts and resume, output
folders, file modes, checkpoints from DataParallel, python: specs, start-up."""

import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

import sub8
from sub8.cli import QuantCommand, main
from sub8.registry import register, unregister
from tinymodels import tiny


def _run(args):
    return CliRunner().invoke(main, args)


def _quantize_args(calib, out, *extra):
    return ["quantize", "--model", "python:tinymodels:tiny", "--calib", calib, "--out", str(out), *extra]


# -- help -----------------------------------------------------------------------------------------
def test_help_groups_the_options_by_stage_and_lists_steps_and_pipelines():
    text = _run(["quantize", "--help"]).output
    sections = ["Model and data:", "Precision:", "Recipe:", "Output:", "AdaQuant (method settings):",
                "Allocation (method settings):", "Bias tuning (method settings):", "Run:",
                "Steps (--steps", "Pipelines (--pipeline):"]
    positions = [text.index(s) for s in sections]
    assert positions == sorted(positions)
    assert "Other:" not in text  # every option has its stage
    for step in ("ranges", "bias_correction", "gptq", "adaquant", "allocate", "bn_tuning", "bias_tuning"):
        assert f"\n  {step} " in text
    assert "light     ranges, allocate, bn_tuning, bias_tuning" in text


def test_every_option_has_a_help_line():
    command = main.commands["quantize"]
    assert isinstance(command, QuantCommand)
    import click
    ctx = click.Context(command)
    missing = [p.opts[0] for p in command.get_params(ctx) if isinstance(p, click.Option) and not p.help]
    assert missing == []


# -- start-up --------------------------------------------------------------------------------------
def test_a_bad_bit_width_is_an_error_before_torch_is_imported():
    code = textwrap.dedent("""
        import sys
        from sub8.cli import main
        sys.argv = ["sub8", "quantize", "--model", "python:nowhere:nothing", "--calib", "x", "--out", "x",
                    "--w-bits", "9"]
        try:
            main()
        except SystemExit as exc:
            print("torch" in sys.modules, exc.code)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False", "2"]
    assert "--w-bits 9: bits must be in 2..8" in done.stderr


def test_help_needs_no_torch():
    code = "import sys\nfrom sub8.cli import main\nsys.argv = ['sub8', '--help']\ntry:\n    main()\n" \
           "except SystemExit:\n    pass\nprint('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().endswith("False") and "quantize" in done.stdout


# -- progress, interrupts, resume ------------------------------------------------------------------
def test_a_run_says_which_stage_it_is_in(image_dirs, tmp_path):
    calib, _ = image_dirs
    result = _run(_quantize_args(calib, tmp_path / "run"))
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("sub8: ")]
    assert lines[:2] == ["sub8: loading the model python:tinymodels:tiny",
                         f"sub8: reading up to 256 calibration samples from {calib}"]
    assert "sub8: step 1/3 ranges" in lines and "sub8: step 3/3 bias_correction" in lines


@pytest.fixture
def interrupting_step():
    calls = []

    @register("interrupt_once")
    def interrupt_once(ctx):
        """Raises KeyboardInterrupt the first time (a user's Ctrl-C)."""
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
    yield calls
    unregister("interrupt_once")


def test_ctrl_c_exits_130_saying_what_was_kept_and_the_rerun_resumes(image_dirs, tmp_path, interrupting_step):
    calib, _ = image_dirs
    args = _quantize_args(calib, tmp_path / "run", "--steps", "ranges,interrupt_once")
    first = _run(args)
    assert first.exit_code == 130
    cache = os.environ["SUB8_CACHE_DIR"]
    assert f"interrupted; every step this run finished is checkpointed in {cache}" in first.stderr
    assert not (tmp_path / "run").exists()  # nothing half-written
    second = _run(args)
    assert second.exit_code == 0, second.output
    assert "sub8: step 1/2 ranges: resumed, finished by an earlier run of this command" in second.stderr
    assert len(interrupting_step) == 2


def test_cache_list_and_clear(tmp_path):
    from sub8.cache import DiskCache
    folder = tmp_path / "cache"
    cache = DiskCache(str(folder))
    cache.put("checkpoint", "0" * 24, {"x": torch.zeros(3)})
    cache.put("sensitivity", "1" * 24, {"y": 1.0})
    (folder / "notes.txt").write_text("mine")
    listed = _run(["cache", "list", "--cache-dir", str(folder)])
    assert listed.exit_code == 0 and "2 entries" in listed.output
    assert "checkpoint" in listed.output and "sensitivity" in listed.output
    cleared = _run(["cache", "clear", "--cache-dir", str(folder), "--kind", "checkpoint"])
    assert "removed 1 entries" in cleared.output
    assert sorted(os.listdir(folder)) == ["notes.txt", "sensitivity-" + "1" * 24 + ".pt"]
    _run(["cache", "clear", "--cache-dir", str(folder)])
    assert os.listdir(folder) == ["notes.txt"]  # not sub8's: left alone


# -- output folders and file modes ----------------------------------------------------------------
def test_force_keeps_files_sub8_did_not_write(image_dirs, tmp_path):
    calib, _ = image_dirs
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    refused = _run(_quantize_args(calib, out, "--pipeline", "rtn"))
    assert refused.exit_code == 2 and "notes.txt" in refused.output and "--force" in refused.output
    forced = _run(_quantize_args(calib, out, "--pipeline", "rtn", "--force"))
    assert forced.exit_code == 0, forced.output
    assert "keeping its 1 other entries (notes.txt)" in forced.stderr
    assert (out / "notes.txt").read_text() == "keep me"
    assert {"report.json", "model.safetensors"} <= set(os.listdir(out))


def test_outputs_follow_the_umask(image_dirs, tmp_path):
    calib, _ = image_dirs
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert _run(_quantize_args(calib, out, "--pipeline", "rtn")).exit_code == 0
        assert _run(["export", str(out), "--onnx", str(tmp_path / "m.onnx")]).exit_code == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    for path in (out / "report.json", out / "model.safetensors", tmp_path / "m.onnx"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path


# -- models ---------------------------------------------------------------------------------------
def test_a_data_parallel_state_dict_loads_with_a_warning(tmp_path):
    from sub8.zoo import load_model
    model, _ = tiny()
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "dp.pt")
    with pytest.warns(UserWarning, match="saved from nn.DataParallel"):
        loaded = load_model("python:tinymodels:tiny", str(tmp_path / "dp.pt"))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[k], v)


def test_a_mismatched_state_dict_is_one_short_whole_message(tmp_path):
    from sub8.zoo import load_model
    model, _ = tiny()
    state = {k.replace("block.", "body."): v for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(sub8.Sub8Error) as err:
        load_model("python:tinymodels:tiny", str(tmp_path / "other.pt"))
    text = str(err.value)
    n = sum(1 for k in model.state_dict() if k.startswith("block."))
    assert f"{n} missing keys (block." in text and f"{n} unexpected (body." in text
    assert f"({n - 3} more)" in text and len(text) < 400


def test_a_python_spec_is_found_in_the_current_folder(tmp_path, monkeypatch):
    from sub8.zoo import load_model
    (tmp_path / "users_models_here.py").write_text(
        "import torch\ndef tiny():\n    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    loaded = load_model("python:users_models_here:tiny")
    assert isinstance(loaded.module, torch.nn.Sequential)
    with pytest.raises(sub8.Sub8Error, match=f"no 'not_there' in the current folder \\({tmp_path}\\)"):
        load_model("python:not_there:tiny")
