"""What every trainer shares about its checkpoints: `RunState` writes and restores them, the trainer only
says which checkpoints are its own."""

from pathlib import Path


class Checkpointed:
    """A trainer keeping its run in `self.run` (a RunState) and defining `_check_checkpoint(meta)`, which
    refuses with a UserError a checkpoint of another model or setting."""

    def save(self, name: str) -> Path:
        """Atomically write `out_dir/name.safetensors` with everything needed to resume."""
        return self.run.save(name)

    def resume(self, path: str | Path) -> None:
        """Restore the trained weights (and EMA), optimizer, RNG and counters from a checkpoint of `save`."""
        self.run.resume(path, self._check_checkpoint)
