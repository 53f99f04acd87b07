"""A kill or a full disk at the wrong moment loses nothing: checkpoints by time, a
save that always leaves one complete checkpoint (or model), loading that never
unpickles arbitrary objects, and one pipeline at a time per artifacts folder."""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from tiny import tiny_lm

from instructflow.config import OptimConfig, ProjectConfig
from instructflow.lm.training import (
    CheckpointClock,
    load_checkpoint,
    make_accelerator,
    save_checkpoint,
    save_model_atomic,
)


class _Stop(RuntimeError):
    pass


def _accelerator_with_model():
    model, tok = tiny_lm()
    acc = make_accelerator(ProjectConfig(device="cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = acc.prepare(model, opt)
    return acc, model, tok


class _Counter:
    def __init__(self, n=0):
        self.n, self.t = n, torch.arange(3.0) * n

    def state_dict(self):
        return {"n": self.n, "t": self.t}

    def load_state_dict(self, state):
        self.n, self.t = state["n"], state["t"]


def test_a_checkpoint_is_saved_by_time_when_steps_alone_would_save_none(monkeypatch):
    acc = make_accelerator(ProjectConfig(device="cpu"))
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    clock = CheckpointClock(acc, every=0, minutes=10)
    assert not clock.due(1)
    now[0] += 599
    assert not clock.due(2)
    now[0] += 2
    assert clock.due(3)  # ten minutes since the start
    clock.saved()
    assert not clock.due(4)
    assert CheckpointClock(acc, every=5, minutes=0).due(10) and not CheckpointClock(acc, every=5, minutes=0).due(11)


def test_train_loop_saves_by_time_and_resumes_from_it(tmp_path):
    from instructflow.lm.training import train_loop

    model, _ = tiny_lm()
    data = [torch.randint(3, 250, (16,)) for _ in range(32)]
    calls = {"n": 0}

    def loss_fn(m, b):
        calls["n"] += 1
        if calls["n"] == 6:
            raise _Stop
        x = b["input_ids"]
        return torch.nn.functional.cross_entropy(m(input_ids=x).logits[:, :-1].reshape(-1, 300), x[:, 1:].reshape(-1)), {}

    cfg = OptimConfig(lr=1e-3, batch_size=4, epochs=1, checkpoint_every=0, checkpoint_minutes=1e-9, log_every=1)
    with pytest.raises(_Stop):
        train_loop(name="t", model=model, examples=data, collate=lambda xs: {"input_ids": torch.stack(xs)},
                   loss_fn=loss_fn, cfg=cfg, out_dir=tmp_path, accelerator=make_accelerator(ProjectConfig(device="cpu")), seed=1)
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["step"] == 5


def test_our_objects_are_saved_without_pickle_and_restored(tmp_path):
    acc, _, _ = _accelerator_with_model()
    save_checkpoint(acc, tmp_path, {"step": 3, "run_key": "k"}, {"counter": _Counter(7)})
    ckpt = tmp_path / "checkpoint"
    assert not list(ckpt.glob("custom_checkpoint_*"))  # accelerate would pickle registered objects
    restored = _Counter()
    assert load_checkpoint(acc, tmp_path, "k", {"counter": restored})["step"] == 3
    assert restored.n == 7 and torch.equal(restored.t, torch.arange(3.0) * 7)


def test_loading_a_tampered_checkpoint_never_runs_its_pickle(tmp_path):
    acc, _, _ = _accelerator_with_model()
    save_checkpoint(acc, tmp_path, {"step": 1, "run_key": ""})
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = tmp_path / "checkpoint"
    for victim in [*ckpt.glob("*.pkl"), ckpt / "optimizer.bin"]:  # the RNG states and the optimizer state
        victim.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(pickle.UnpicklingError):  # torch.load(weights_only=True) refuses os.system
        load_checkpoint(acc, tmp_path, "")
    assert not marker.exists()


def test_a_kill_between_the_two_renames_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    acc, _, _ = _accelerator_with_model()
    save_checkpoint(acc, tmp_path, {"step": 1, "run_key": "k"})
    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old one is aside, the new one not yet in place
            raise _Stop
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(_Stop):
        save_checkpoint(acc, tmp_path, {"step": 2, "run_key": "k"})
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (tmp_path / "checkpoint").exists()
    assert load_checkpoint(acc, tmp_path, "k")["step"] == 1  # recovered from checkpoint.old
    save_checkpoint(acc, tmp_path, {"step": 3, "run_key": "k"})
    assert load_checkpoint(acc, tmp_path, "k")["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_a_kill_between_the_two_renames_of_a_model_save_leaves_the_previous_model(tmp_path, monkeypatch):
    model, tok = tiny_lm()
    dest = tmp_path / "model"
    save_model_atomic(model, tok, dest, {"marker": 1})
    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise _Stop
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(_Stop):
        save_model_atomic(model, tok, dest, {"marker": 2})
    monkeypatch.setattr(os, "replace", real_replace)
    save_model_atomic(model, tok, dest, {"marker": 3})
    assert json.loads((dest / "config.json").read_text())["marker"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


DISK_FULL_SCRIPT = textwrap.dedent('''
    import json, os, sys
    sys.path.insert(0, sys.argv[2])
    from pathlib import Path
    import torch
    from tiny import tiny_lm
    from instructflow.config import ProjectConfig
    from instructflow.lm.training import load_checkpoint, make_accelerator, save_checkpoint, save_model_atomic

    out = Path(sys.argv[1])
    model, tok = tiny_lm()
    acc = make_accelerator(ProjectConfig(device="cpu"))
    model, opt = acc.prepare(model, torch.optim.AdamW(model.parameters()))
    save_checkpoint(acc, out / "run", {"step": 1, "run_key": ""})
    save_model_atomic(acc.unwrap_model(model), tok, out / "model", {"marker": 1})
    filler = out / "filler"
    free = os.statvfs(out).f_bavail * os.statvfs(out).f_frsize
    filler.write_bytes(b"0" * max(0, free - 20_000))  # the disk is now all but full
    errors = []
    for what, save in (("checkpoint", lambda: save_checkpoint(acc, out / "run", {"step": 2, "run_key": ""})),
                       ("model", lambda: save_model_atomic(acc.unwrap_model(model), tok, out / "model", {"marker": 2}))):
        try:
            save()
        except OSError as err:
            errors.append([what, err.errno])
    filler.unlink()
    state = load_checkpoint(acc, out / "run", "")
    print(json.dumps({"errors": errors, "step": state and state["step"],
                      "marker": json.loads((out / "model" / "config.json").read_text())["marker"],
                      "files": sorted(p.name for p in out.iterdir()) + sorted(p.name for p in (out / "run").iterdir())}))
''')


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_model(tmp_path):
    """On a real 4 MB filesystem (tmpfs in a user namespace): both saves fail with ENOSPC,
    the previous checkpoint and model load as they were, and no partial folder is left."""
    if not shutil.which("unshare"):
        pytest.fail("this test needs util-linux's unshare (Debian: util-linux)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = tmp_path / "disk_full.py"
    script.write_text(DISK_FULL_SCRIPT)
    tests_dir = os.path.dirname(__file__)
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
           f"mount -t tmpfs -o size=4m tmpfs {mnt} && exec {sys.executable} {script} {mnt} {tests_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([tests_dir, os.getcwd()])})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["errors"] == [["checkpoint", 28], ["model", 28]]  # ENOSPC, raised to the caller
    assert result["step"] == 1 and result["marker"] == 1
    assert result["files"] == ["model", "run", "checkpoint"]  # no checkpoint.tmp, model.tmp or .old left


def test_one_pipeline_at_a_time_per_artifacts_folder(tmp_path):
    (tmp_path / "params.yaml").write_text("project: {artifacts_dir: artifacts}\n")
    holder = subprocess.Popen([sys.executable, "-c", "import time\nfrom instructflow.io import exclusive\n"
                               "with exclusive('artifacts', 'a test'):\n    print('held', flush=True)\n    time.sleep(600)"],
                              cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for cmd in (["-m", "instructflow.cli", "run", "--stages", "data"], ["-m", "flows.pipeline"]):
            proc = subprocess.run([sys.executable, *cmd], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                                  env={**os.environ, "PYTHONPATH": os.getcwd()})
            assert proc.returncode != 0
            assert f"artifacts is in use by another pipeline (pid {holder.pid}" in proc.stderr, proc.stderr[-2000:]
            assert "Traceback" not in proc.stderr
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel drops a dead holder's lock
        holder.wait()
    proc = subprocess.run([sys.executable, "-m", "instructflow.cli", "run", "--stages", "data"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
