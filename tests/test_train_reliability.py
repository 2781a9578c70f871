"""Training always reaches its export: kill -9 between the last checkpoint and final.safetensors, then --resume
(or `dar-fast export`) writes it, bit-identical; temp files of killed runs are cleaned; skipped images logged."""
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from dar_fast.cli import main
from dar_fast.training.ar_train import ARTrainer
from dar_fast.training.loop import read_metrics
from test_train_ar import _argv, ar_cfg_file, fixed_codes  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def _same_file_tensors(a, b):
    ta, tb = load_file(a), load_file(b)
    assert sorted(ta) == sorted(tb)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def _killed_at_export(argv):
    """Run the training in a forked child whose export writes half a temp file and then SIGKILLs its own process:
    the kill lands after the last checkpoint, inside the export's atomic write."""
    pid = os.fork()
    if pid == 0:
        try:
            def die(self, model_sd, path):
                d, name = os.path.split(path)
                with open(os.path.join(d, f".{name}.k9.tmp"), "wb") as f:
                    f.write(b"half")
                os.kill(os.getpid(), signal.SIGKILL)
            ARTrainer.export = die
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            main(argv)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_kill_before_export_then_resume_writes_final(ar_cfg_file, fixed_codes, tmp_path, capsys):  # noqa: F811
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(_argv(ar_cfg_file, fixed_codes, ref, 4)) == 0
    assert _killed_at_export(_argv(ar_cfg_file, fixed_codes, run, 4))
    assert (run / "checkpoint.pt").exists() and not (run / "final.safetensors").exists()
    assert (run / ".final.safetensors.k9.tmp").exists()
    capsys.readouterr()
    assert main(_argv(ar_cfg_file, fixed_codes, run, 4, "--resume")) == 0
    err = capsys.readouterr().err
    assert "removed 1 temporary file" in err
    assert not (run / ".final.safetensors.k9.tmp").exists()
    _same_file_tensors(ref / "final.safetensors", run / "final.safetensors")   # the weights training would write
    # once written, a further --resume at the final step is a clear error, not a rewrite
    mtime = os.stat(run / "final.safetensors").st_mtime_ns
    assert main(_argv(ar_cfg_file, fixed_codes, run, 4, "--resume")) == 2
    assert "already at step 4 and final.safetensors is written" in capsys.readouterr().err
    assert os.stat(run / "final.safetensors").st_mtime_ns == mtime


def test_export_command_from_checkpoint(ar_cfg_file, fixed_codes, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    assert main(_argv(ar_cfg_file, fixed_codes, run, 3)) == 0
    final = run / "final.safetensors"
    assert main(["export", str(run)]) == 2                               # never replaces without --overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(tmp_path / "ema.safetensors")]) == 0
    _same_file_tensors(final, tmp_path / "ema.safetensors")
    assert main(["export", str(run / "checkpoint.pt"), "--weights", "model", "--out", str(tmp_path / "raw.safetensors")]) == 0
    ema, raw = load_file(str(tmp_path / "ema.safetensors")), load_file(str(tmp_path / "raw.safetensors"))
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)            # the raw weights are another set
    assert sorted(raw) == sorted(ema)
    assert main(["export", str(tmp_path / "nowhere")]) == 2
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert main(["export", str(junk), "--out", str(tmp_path / "j.safetensors")]) == 2
    assert not (tmp_path / "j.safetensors").exists()


def test_stale_checkpoint_temps_removed_on_start(ar_cfg_file, fixed_codes, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    assert main(_argv(ar_cfg_file, fixed_codes, run, 2)) == 0
    stale = [run / ".checkpoint.pt.abc.tmp", run / "checkpoint.pt.tmp12345"]
    for p in stale:
        p.write_bytes(b"x" * 1000)
    capsys.readouterr()
    assert main(_argv(ar_cfg_file, fixed_codes, run, 3, "--resume")) == 0
    assert "removed 2 temporary file" in capsys.readouterr().err
    assert not any(p.exists() for p in stale)
    assert [r["step"] for r in read_metrics(str(run))] == [1, 2, 3]
