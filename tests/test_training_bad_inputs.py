"""Nothing trained is lost: how a run ends, resumes, saves and reads its checkpoints when something is wrong
(issue 13). One tiny run (16 images, batches of 8: 2 steps per epoch) is trained once and reused.
"""

import json
import os
import warnings
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from nanodiffusion.cli import main
from nanodiffusion.errors import UserError
from nanodiffusion.pipelines.ddpm import DDPMPipeline
from nanodiffusion.training import run_state
from fixtures import make_fake_mnist


def train(data: Path, out: Path, *flags: str) -> None:
    argv = ["train", "--dataset", "mnist", "--data-dir", str(data), "--preset", "tiny", "--image-size", "16",
            "--batch-size", "8", "--out-dir", str(out), *flags]
    assert main(argv) == 0


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    make_fake_mnist(folder / "mnist", n=16, size=16)
    return folder


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> Path:
    """A run that --max-steps 3 ended one step into its second epoch, with sample grids every epoch."""
    out = tmp_path_factory.mktemp("run") / "run"
    umask = os.umask(0o022)
    try:
        with pytest.MonkeyPatch.context() as patch:         # grids of 2 images, 2 steps: what matters is when
            grid = DDPMPipeline.sample_grid
            patch.setattr(DDPMPipeline, "sample_grid", lambda pipe, path, **options: grid(
                pipe, path, **{**options, "num_images": 2, "num_steps": 2}))
            train(data, out, "--max-steps", "3", "--sample-every", "1")
    finally:
        os.umask(umask)
    return out


def test_a_max_steps_run_ends_as_an_epochs_run_does(finished):
    names = {str(path.relative_to(finished)) for path in finished.rglob("*")}
    assert {"best.safetensors", "last.safetensors", "samples/epoch_0001.png",
            "samples/step_0000003.png"} <= names
    log = [json.loads(line) for line in (finished / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == [2, 3] and log[1]["epoch"] == 1.5     # the partial epoch
    modes = {path.name: path.stat().st_mode & 0o777 for path in finished.glob("*.safetensors")}
    assert modes == {"best.safetensors": 0o644, "last.safetensors": 0o644}             # the umask's, not 0600


def test_a_finished_run_resumed_says_so_and_changes_nothing(data, finished, capsys):
    before = {path: path.stat().st_mtime_ns for path in finished.rglob("*")}
    train(data, finished, "--max-steps", "3", "--resume")
    assert "is a finished run (epoch 1, step 3; --max-steps 3): nothing to do" in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in finished.rglob("*")} == before


def test_temporary_files_of_a_killed_save_are_removed_at_the_next_start(data, finished, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".last.safetensors.0123abcd.tmp").write_bytes(b"half a checkpoint")
    (out / "notes.tmp").write_text("not ours")
    train(data, out, "--max-steps", "1")
    assert "removed 1 temporary file(s)" in capsys.readouterr().out
    assert sorted(path.name for path in out.glob("*tmp")) == ["notes.tmp"]


def test_a_failed_save_warns_and_training_goes_on(data, tmp_path, monkeypatch):
    """A save that fails mid-run (a full disk) keeps the previous file; the run's last save then succeeds."""
    save, calls = run_state.save_checkpoint, []

    def flaky(path, tensors, metadata):
        calls.append(metadata["state"]["step"])
        if len(calls) == 2:
            raise UserError(f"could not write {path}: No space left on device")
        save(path, tensors, metadata)

    monkeypatch.setattr(run_state, "save_checkpoint", flaky)
    with pytest.warns(UserWarning, match="No space left on device; training goes on"):
        train(data, tmp_path / "run", "--max-steps", "3", "--save-every", "1")
    assert calls[:2] == [1, 2]                                  # the save at step 2 failed, the run went on
    assert _tensors_and_metadata(tmp_path / "run" / "last.safetensors")[1]["state"]["step"] == 3


def _tensors_and_metadata(path: Path) -> tuple[dict, dict]:
    with safe_open(path, "pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys()}
        return tensors, json.loads(file.metadata()["nanodiffusion"])


def _flip_a_byte(path: Path, target: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-50] ^= 0xFF
    target.write_bytes(bytes(data))


# name -> (how the checkpoint is broken, what the error says); saved without a checksum
BROKEN = {
    "flipped": (None, "is corrupted: its tensors differ from the checksum"),
    "not-json": (lambda t, m: (t, "{step: 3"), "metadata is not valid JSON"),
    "no-optimizer": (lambda t, m: (t, {k: v for k, v in m.items() if k != "optimizer"}),
                     "has no 'optimizer'"),
    "no-rng": (lambda t, m: ({k: v for k, v in t.items() if not k.startswith("rng.")}, m),
               "is damaged: it has no 'rng.generator'"),
    "no-tensor": (lambda t, m: ({k: v for k, v in t.items() if k != "ema.conv_in.weight"}, m),
                  "does not match its config; keys 1 missing: conv_in.weight"),
    "bad-state": (lambda t, m: (t, {**m, "state": {"step": "3"}}), "is damaged: it has no 'best_loss'"),
}


@pytest.mark.parametrize("name", BROKEN)
def test_a_damaged_checkpoint_is_a_clear_error_naming_it(data, finished, tmp_path, capsys, name):
    change, message = BROKEN[name]
    path = tmp_path / f"{name}.safetensors"
    if change is None:
        _flip_a_byte(finished / "last.safetensors", path)
    else:
        tensors, metadata = change(*_tensors_and_metadata(finished / "last.safetensors"))
        text = metadata if isinstance(metadata, str) else json.dumps(metadata)
        save_file(tensors, path, metadata={"nanodiffusion": text})
    with pytest.raises(SystemExit) as exit_info:
        train(data, tmp_path / "run", "--max-steps", "9", "--resume", str(path))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{name}.safetensors" in err and message in err, err
    assert "Traceback" not in err and not (tmp_path / "run" / "last.safetensors").exists()


def test_sample_and_export_verify_the_checksum_too(finished, tmp_path, capsys):
    _flip_a_byte(finished / "last.safetensors", tmp_path / "flipped.safetensors")
    for argv in (["sample", str(tmp_path / "flipped.safetensors"), "--out", str(tmp_path / "s.png")],
                 ["export", str(tmp_path / "flipped.safetensors"), str(tmp_path / "model.safetensors")]):
        with pytest.raises(SystemExit), warnings.catch_warnings():
            main(argv)
        assert "flipped.safetensors is corrupted" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["flipped.safetensors"]
