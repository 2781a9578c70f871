"""Every user mistake the fresh-machine review found: exit code 2, ONE line naming the problem, no traceback,
nothing written. In-process through `dar_fast.cli.main` (cheap); `test_console_script_*` run the installed
`dar-fast` script in a subprocess for the real exit codes (CI runs this file against the built wheel too)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dar_fast.cli import main

BIG_SEED = str(2 ** 70)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints and config files, good and broken."""
    import dar_fast
    from helpers import tiny_ar, tiny_tokenizer
    d = tmp_path_factory.mktemp("cli_errors")
    tok = tiny_tokenizer(seed=3)
    ar = tiny_ar(seed=4, vocab_size=tok.codebook_size, block_size=tok.num_tokens)
    dar_fast.save_tokenizer(tok, str(d / "tok.safetensors"))
    dar_fast.save_ar(ar, str(d / "ar.safetensors"))
    good = (d / "tok.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(good[: len(good) // 2])       # an interrupted download
    (d / "empty.safetensors").write_bytes(b"")
    torch.save({"model": ar.state_dict()}, d / "ar.pt")
    pt = (d / "ar.pt").read_bytes()
    (d / "truncated.pt").write_bytes(pt[: len(pt) // 2])
    (d / "random.bin").write_bytes(os.urandom(4096)[:1].replace(b"\x80", b"\x00") + os.urandom(4095))
    (d / "random.pt").write_bytes(b"\x00" + os.urandom(4095))
    (d / "ckpt_folder").mkdir()
    (d / "ckpt_folder" / "model.safetensors").write_bytes(good)
    cfg = ar.cfg.to_dict()
    (d / "bad_type.json").write_text(json.dumps({**cfg, "dim": "sixty-four"}))
    (d / "zero_size.json").write_text(json.dumps({**cfg, "n_layer": 0}))
    (d / "malformed.json").write_text('{\n  "dim": 64,\n  "n_layer": 2,,\n}\n')
    (d / "malformed.yaml").write_text("dim: 64\nn_layer: [2\nn_head: 2\n")
    (d / "a_file").write_text("not a folder")
    return d


def _ro_place(tmp_path: Path) -> Path:
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    if os.access(d, os.W_OK):                 # root ignores mode bits; sysfs refuses new entries even to root
        sysfs = Path("/sys/dar_fast_cli_test")
        if not Path("/sys").is_dir() or sysfs.exists():
            pytest.skip("no read-only place for this user")
        return sysfs / "out"
    return d / "out"


def _cli(argv, capsys):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, [ln for ln in cap.err.splitlines() if ln.strip()], cap.out


def _ckpt(files, tok="tok.safetensors", ar="ar.safetensors"):
    return ["--tokenizer", files / tok, "--ar", files / ar]


# (argv builder, words the one line must contain)
CASES = {
    "per-class-0": (lambda f, o: ["sample", "--per-class", "0", "--out", o], ["--per-class", ">= 1"]),
    "cfg-abc": (lambda f, o: ["sample", "--cfg", "abc", "--out", o], ["--cfg", "'abc'"]),
    "cfg-three": (lambda f, o: ["sample", "--cfg", "1,2,3", "--out", o], ["--cfg", "start,end"]),
    "cfg-nan": (lambda f, o: ["sample", "--cfg", "nan", "--out", o], ["--cfg", "finite"]),
    "seed-2**70": (lambda f, o: ["sample", "--seed", BIG_SEED, "--out", o], ["--seed", "2^63-1"]),
    "seed-expr": (lambda f, o: ["sample", "--seed", "2**70", "--out", o], ["--seed", "'2**70'"]),
    "seed-negative": (lambda f, o: ["sample", "--seed", "-1", "--out", o], ["--seed"]),
    "temperature-0": (lambda f, o: ["sample", "--temperature", "0", "--out", o], ["--temperature", "> 0"]),
    "top-p-2": (lambda f, o: ["sample", "--top-p", "2", "--out", o], ["--top-p", "(0, 1]"]),
    "top-k-neg": (lambda f, o: ["sample", "--top-k", "-3", "--out", o], ["--top-k", ">= 0"]),
    "batch-0": (lambda f, o: ["sample", "--batch-size", "0", "--out", o], ["--batch-size"]),
    "threads-0": (lambda f, o: ["sample", "--threads", "0", "--out", o], ["--threads"]),
    "steps-0": (lambda f, o: ["sample", "--steps", "0", "--out", o], ["--steps"]),
    "device-bogus": (lambda f, o: ["sample", "--device", "gpu7", "--out", o], ["--device", "gpu7"]),
    "unknown-option": (lambda f, o: ["sample", "--colour", "red", "--out", o], ["--colour"]),
    "unknown-command": (lambda f, o: ["smaple"], ["smaple"]),
    "out-is-file": (lambda f, o: ["sample", "--out", f / "a_file"], ["--out", "not a folder"]),
    "out-under-file": (lambda f, o: ["sample", "--out", f / "a_file" / "x"], ["--out", "a file"]),
    "labels-unknown": (lambda f, o: ["sample", "--labels", "3", "99", "--out", o], ["--labels", "99", "0..9"]),
    "one-checkpoint": (lambda f, o: ["sample", "--tokenizer", f / "tok.safetensors", "--out", o], ["--ar"]),
    "truncated-safetensors": (lambda f, o: ["sample", *_ckpt(f, tok="truncated.safetensors"), "--out", o],
                              ["truncated or corrupt safetensors file", "truncated.safetensors"]),
    "empty-checkpoint": (lambda f, o: ["sample", *_ckpt(f, tok="empty.safetensors"), "--out", o],
                         ["empty checkpoint file", "empty.safetensors"]),
    "truncated-pt": (lambda f, o: ["sample", *_ckpt(f, ar="truncated.pt"), "--out", o],
                     ["truncated or corrupt PyTorch file", "truncated.pt"]),
    "random-bytes": (lambda f, o: ["sample", *_ckpt(f, ar="random.bin"), "--out", o],
                     ["not a checkpoint", "random.bin"]),
    "random-bytes-pt": (lambda f, o: ["sample", *_ckpt(f, ar="random.pt"), "--out", o],
                        ["not a checkpoint", "random.pt"]),
    "checkpoint-folder": (lambda f, o: ["sample", *_ckpt(f, tok="ckpt_folder"), "--out", o],
                          ["is a folder", "model.safetensors"]),
    "config-bad-type": (lambda f, o: ["sample", *_ckpt(f, ar="ar.pt"), "--ar-config", f / "bad_type.json",
                                      "--out", o], ["--ar", "dim must be an integer", "sixty-four"]),
    "config-zero-size": (lambda f, o: ["sample", *_ckpt(f, ar="ar.pt"), "--ar-config", f / "zero_size.json",
                                       "--out", o], ["n_layer must be positive"]),
    "config-malformed-json": (lambda f, o: ["sample", *_ckpt(f, ar="ar.pt"), "--ar-config", f / "malformed.json",
                                            "--out", o], ["malformed JSON", "malformed.json", "line 3"]),
    "config-malformed-yaml": (lambda f, o: ["sample", *_ckpt(f, ar="ar.pt"), "--ar-config", f / "malformed.yaml",
                                            "--out", o], ["malformed YAML", "malformed.yaml", "line 3"]),
    "convert-bad-out": (lambda f, o: ["convert", f / "ar.pt", f / "x.bin", "--kind", "ar", "--config", "ar-tiny"],
                        [".safetensors"]),
    "fid-cfg-abc": (lambda f, o: ["fid", "--cfg", "abc", "--out", Path(o) / "x.npz"], ["--cfg"]),
    "fid-seed-2**70": (lambda f, o: ["fid", "--seed", BIG_SEED, "--out", Path(o) / "x.npz"], ["--seed"]),
}
if not torch.cuda.is_available():
    CASES["device-cuda-without-cuda"] = (lambda f, o: ["sample", "--device", "cuda", "--out", o],
                                         ["--device", "CUDA is not available"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_error_is_one_line_exit_2_nothing_written(case, files, tmp_path, capsys, one_thread):
    build, words = CASES[case]
    out = tmp_path / "out"
    rc, err, stdout = _cli(build(files, out), capsys)
    assert rc == 2, (case, rc, err)
    assert len(err) == 1, err
    assert "Traceback" not in err[0] + stdout
    for w in words:
        assert w in err[0], (w, err[0])
    # torch's advice for a file it cannot unpickle is the one thing a user must never follow
    assert "weights_only" not in err[0]
    if "random" in case:                     # random bytes are not "a pickle holding other objects"
        assert "holds objects" not in err[0] and "unpickle" not in err[0]
    assert not out.exists(), f"{case}: the output folder was created before the inputs were checked"


def test_read_only_out(files, tmp_path, capsys, one_thread):
    out = _ro_place(tmp_path)
    rc, err, _ = _cli(["sample", "--labels", "1", "--per-class", "1", "--out", out], capsys)
    assert rc == 2 and len(err) == 1 and "--out" in err[0] and "Traceback" not in err[0], err
    assert not out.exists()


def test_debug_shows_the_traceback(files, tmp_path, capsys):
    rc, err, _ = _cli(["sample", *_ckpt(files, tok="truncated.safetensors"), "--out", tmp_path / "o", "--debug"],
                      capsys)
    assert rc == 2 and any("Traceback" in ln for ln in err) and "truncated or corrupt" in err[-1]
    rc, err, _ = _cli(["sample", *_ckpt(files, tok="truncated.safetensors"), "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "--debug" in err[0]


def test_a_bug_keeps_its_traceback(files, tmp_path, monkeypatch):
    """RuntimeError (a CUDA failure, a bug) is not a user's mistake: it must not become a one-line 'bad input'."""
    from dar_fast.pipeline import Pipeline

    def boom(*a, **k):
        raise RuntimeError("simulated kernel failure")
    monkeypatch.setattr(Pipeline, "stream", boom)
    with pytest.raises(RuntimeError, match="simulated kernel failure"):
        main(["sample", *map(str, _ckpt(files)), "--out", str(tmp_path / "o"), "--labels", "0"])
    assert not (tmp_path / "o").exists()     # nothing written: the folder it created is removed


def test_every_option_has_help():
    from dar_fast.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in sub.choices.items() for a in p._actions
               if a.help is None]
    assert not missing, missing
    for name, p in sub.choices.items():
        assert "--threads" in p._option_string_actions and "--debug" in p._option_string_actions, name


def _script():
    """The installed console script beside this interpreter (the wheel's in CI), else `python -m dar_fast.cli`."""
    exe = Path(sys.executable).with_name("dar-fast")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dar_fast.cli"]


def test_console_script_bad_value(tmp_path):
    p = subprocess.run([*_script(), "sample", "--seed", BIG_SEED, "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "--seed" in lines[0] and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "o").exists()


def test_console_script_ctrl_c_is_quiet(tmp_path):
    """SIGINT at whatever point the run has reached (importing torch, loading, sampling): exit 130, no traceback."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # a shell without job control starts background jobs with SIGINT ignored, and Python keeps it ignored:
    # give the child the default disposition, as a terminal would
    p = subprocess.Popen([*_script(), "sample", "--per-class", "200", "--out", str(tmp_path / "o"), "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "o" / "settings.json").exists() and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    try:
        out, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    assert p.returncode == 130, (p.returncode, err[-2000:])
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    assert "interrupted" in err


class _NotATensor:
    pass


def test_loader_messages_tell_the_truth(tmp_path):
    """Library level: each broken file is named for what it is; no message passes on torch's weights_only advice."""
    from dar_fast.checkpoint import read_checkpoint
    from dar_fast.errors import UsageError
    torch.save({"w": torch.ones(50)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    legacy = (tmp_path / "legacy.pt").read_bytes()
    (tmp_path / "legacy_cut.pt").write_bytes(legacy[: len(legacy) // 2])
    torch.save({"w": torch.ones(3), "obj": _NotATensor()}, tmp_path / "object.pt")
    (tmp_path / "x.safetensors").write_bytes(os.urandom(64))
    cases = {"legacy_cut.pt": "truncated or corrupt PyTorch file", "object.pt": "refusing to unpickle",
             "x.safetensors": "truncated or corrupt safetensors file"}
    for name, words in cases.items():
        with pytest.raises(UsageError) as e:
            read_checkpoint(str(tmp_path / name))
        msg = str(e.value)
        assert words in msg and name in msg and "weights_only" not in msg, msg
    assert torch.equal(read_checkpoint(str(tmp_path / "legacy.pt"))[0]["w"], torch.ones(50))
