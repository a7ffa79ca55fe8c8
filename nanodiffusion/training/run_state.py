"""What every trainer shares: the generator behind every random draw, the epoch order, counters, learning-rate
warm-up, the loop with its progress bar and log, and checkpoints from which a run resumes exactly.

A trainer builds its networks and optimizer, hands them to `RunState.register`, and gives `RunState.fit` its
`train_step(indices) -> {"loss": ..., other terms}`. Each step draws its randomness from `generator`, whose
state is saved in every checkpoint with the global RNG (dropout) and the state from which the epoch's
permutation was drawn: a resumed run replays the uninterrupted one. In a torchrun run every rank holds the
same generator and draws the same global batch (see `distributed`); rank 0 writes checkpoints and logs.
"""

import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nanodiffusion.atomic import check_output_folder, remove_stale_temporaries
from nanodiffusion.errors import UserError
from nanodiffusion.training import distributed
from nanodiffusion.training.ema import EMA
from nanodiffusion.validation import check_float, check_int, check_seed
from nanodiffusion.weights.checkpoint import (
    load_checkpoint, load_module, optimizer_from_tensors, optimizer_to_tensors, prefixed, require,
    save_checkpoint, unprefixed,
)

LR_SCHEDULES = ("constant", "cosine")
OUT_DIR = "the output folder (out_dir)"          # how messages name it


def prepare_output(out_dir: Path) -> None:
    """Refuse an output folder that cannot be written; delete the temporary files of killed saves."""
    check_output_folder(out_dir, OUT_DIR)
    stale = remove_stale_temporaries(out_dir)
    if stale:
        print(f"removed {len(stale)} temporary file(s) left in {out_dir} by an interrupted save: "
              f"{', '.join(path.name for path in stale[:3])}{' ...' if len(stale) > 3 else ''}")


@dataclass(frozen=True)
class LoopConfig:
    """The settings every training stage has; each stage's config adds its own (saved in checkpoints)."""

    out_dir: str = "runs/train"
    epochs: int = 10
    max_steps: int | None = None          # stop early after this many optimizer steps (tiny runs, tests)
    batch_size: int = 128                 # the global batch, split over the processes of a torchrun run
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100               # linear learning-rate warm-up
    lr_schedule: str = "constant"         # after warm-up: "constant", or "cosine" to 10 % of lr at the end
    bf16: bool = False                    # bf16 autocast (CPU: AVX-512-BF16 / AMX)
    seed: int = 0
    save_every_steps: int = 0             # also checkpoint `last` every N steps (0: only at epoch ends)
    sample_every_epochs: int = 0          # write a sample grid every N epochs (0: never)
    device: str = "cpu"                   # "cuda" trains rank r on cuda:LOCAL_RANK under torchrun

    def __post_init__(self):
        for name in ("epochs", "batch_size", "max_steps"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=1)
        for name in ("warmup_steps", "save_every_steps", "sample_every_epochs"):
            check_int(name, getattr(self, name), minimum=0)
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(f"unknown learning-rate schedule {self.lr_schedule!r}; "
                            f"valid: {', '.join(LR_SCHEDULES)}")
        check_float("lr", self.lr, above=0)
        check_float("weight_decay", self.weight_decay, minimum=0)
        check_seed(self.seed)


@dataclass
class TrainState:
    """Counters that advance during training; saved with the checkpoint."""

    epoch: int = 0                        # epochs completed
    step: int = 0                         # optimizer steps completed
    step_in_epoch: int = 0
    best_loss: float = math.inf           # lowest epoch-mean loss so far
    epoch_sums: dict = field(default_factory=dict)   # this epoch's sum of each reported term
    losses: list = field(default_factory=list)       # per-step losses of this run (for inspection and tests)


class RunState:
    """The bookkeeping of one run over `num_items` training items; see the module docstring.

    Seeds the global RNG with `config.seed` first, so that networks built after it start from the same
    weights on every rank. `drop_last` leaves out each epoch's last, incomplete batch.
    """

    def __init__(self, config: LoopConfig, num_items: int, *, drop_last: bool = False):
        self.config, self.num_items, self.drop_last = config, num_items, drop_last
        self.rank, self.world_size = distributed.world()
        self.device = distributed.process_device(config.device)
        self._check_batches()
        check_seed(config.seed, self.world_size)             # rank r seeds its dropout with seed + r
        self.out_dir = Path(config.out_dir)
        if self.is_main:
            prepare_output(self.out_dir)
        torch.manual_seed(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.epoch_generator_state = self.generator.get_state()
        self.state = TrainState()
        self.optimizer: torch.optim.Optimizer | None = None
        self.modules: dict[str, torch.nn.Module] = {}
        self.emas: tuple[EMA, ...] = ()
        self.metadata: dict = {}
        self.saved: dict[str, int] = {}               # checkpoint name -> step of its last successful save

    def _check_batches(self) -> None:
        size, last = self.config.batch_size, self.num_items % self.config.batch_size
        if self.steps_per_epoch < 1:
            raise UserError(f"the data set has {self.num_items} items, fewer than one batch of {size}")
        if self.world_size > 1 and 0 < last < self.world_size and not self.drop_last:
            raise UserError(f"each epoch ends with a batch of {last} items, fewer than the {self.world_size} "
                            "processes: choose a batch size that leaves none or more")

    def register(self, optimizer: torch.optim.Optimizer, modules: dict[str, torch.nn.Module], metadata: dict,
                 emas: tuple[EMA, ...] = ()) -> None:
        """Set what checkpoints hold: `modules` under their prefixes, the optimizer, JSON `metadata`, and the
        update count of `emas` (updated once per step, their shadows among `modules`)."""
        self.optimizer, self.modules, self.metadata, self.emas = optimizer, modules, metadata, emas
        if self.world_size > 1:
            torch.manual_seed(self.config.seed + self.rank)    # the weights are built: own dropout draws

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def steps_per_epoch(self) -> int:
        batches = self.num_items / self.config.batch_size
        return math.floor(batches) if self.drop_last else math.ceil(batches)

    def autocast(self) -> torch.autocast:
        """bf16 autocast on the training device when `config.bf16`, else a no-op context."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    @property
    def total_steps(self) -> int:
        return self.config.max_steps or self.config.epochs * self.steps_per_epoch

    def learning_rate(self) -> float:
        """Linear warm-up, then constant or cosine decay to 10 % of the peak at the last step."""
        cfg, step = self.config, self.state.step
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return cfg.lr
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, self.total_steps - cfg.warmup_steps))
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """Backpropagate `loss` and take one optimizer step at the scheduled learning rate."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def shard(self, batch_size: int) -> slice:
        """This rank's slice of a global batch (all of it in a single process)."""
        return distributed.shard(batch_size)

    def loss_scale(self, local_count: int, global_count: int) -> float:
        """Factor on this rank's mean loss that makes DDP's average gradient the global mean's (alone: 1)."""
        return local_count * self.world_size / global_count

    def batch_means(self, local_means: dict[str, torch.Tensor], local_count: int,
                    global_count: int) -> dict[str, float]:
        """Means over the global batch of per-item terms, from their means over this rank's slice."""
        if self.world_size == 1:
            return {name: value.item() for name, value in local_means.items()}
        sums = torch.stack([value.detach().float() * local_count for value in local_means.values()])
        sums = distributed.all_reduce_sum(sums.to(self.device))
        return dict(zip(local_means, (sums / global_count).tolist()))

    def epoch_batches(self) -> Iterator[torch.Tensor]:
        """Index tensors of this epoch's global batches, in a permutation drawn at its start, from the
        current step of the epoch on."""
        saved = self.generator.get_state()
        self.generator.set_state(self.epoch_generator_state)
        order = torch.randperm(self.num_items, generator=self.generator)
        if self.state.step_in_epoch == 0:                 # a fresh epoch: continue from after the permutation
            saved = self.generator.get_state()
        self.generator.set_state(saved)
        size = self.config.batch_size
        for start in range(self.state.step_in_epoch * size, self.steps_per_epoch * size, size):
            yield order[start:start + size]

    @property
    def finished(self) -> bool:
        """True when the run has reached `epochs` or `max_steps`: fit() has nothing left to do."""
        cfg, st = self.config, self.state
        return st.epoch >= cfg.epochs or (cfg.max_steps is not None and st.step >= cfg.max_steps)

    def fit(self, train_step: Callable[[torch.Tensor], dict[str, float]],
            sample_grid: Callable[[Path], None] | None = None) -> TrainState:
        """Run `train_step` on each batch until `epochs` (or `max_steps`), writing `last` and `best`
        checkpoints and, every `sample_every_epochs`, `sample_grid(out_dir/samples/epoch_NNNN.png)`.

        A run that --max-steps ends inside an epoch ends like one that --epochs ends: its (partial) epoch is
        logged, `best`, `last` and, with sample_every_epochs, a grid `samples/step_NNNNNNN.png` are written.
        """
        cfg, st = self.config, self.state
        if self.finished:
            return st
        if self.is_main:
            check_output_folder(self.out_dir, OUT_DIR, size=self.checkpoint_bytes())
        last_epoch = min(cfg.epochs, math.ceil(self.total_steps / self.steps_per_epoch))
        epochs_bar = tqdm(range(st.epoch, last_epoch), desc="epochs", initial=st.epoch, total=last_epoch,
                          disable=not self.is_main)
        for _ in epochs_bar:
            steps = self.steps_per_epoch if not cfg.max_steps else \
                min(self.steps_per_epoch, st.step_in_epoch + cfg.max_steps - st.step)
            bar = tqdm(total=steps, initial=st.step_in_epoch, desc=f"epoch {st.epoch + 1}", leave=False,
                       disable=not self.is_main)
            tic, images = time.perf_counter(), 0
            for indices in self.epoch_batches():
                terms = train_step(indices)
                self._count(terms)
                images += len(indices)
                bar.update(1)
                bar.set_postfix({name: f"{value:.4g}" for name, value in terms.items()},
                                img_s=f"{images / (time.perf_counter() - tic):.0f}")
                if self.finished:
                    break
                if cfg.save_every_steps and st.step % cfg.save_every_steps == 0:
                    self._save_or_warn("last")
            bar.close()
            self._end_epoch(epochs_bar, images / (time.perf_counter() - tic), sample_grid)
        return st

    def _count(self, terms: dict[str, float]) -> None:
        st = self.state
        st.losses.append(terms["loss"])
        st.step += 1
        st.step_in_epoch += 1
        for name, value in terms.items():
            st.epoch_sums[name] = st.epoch_sums.get(name, 0.0) + value

    def _end_epoch(self, epochs_bar, images_per_s: float, sample_grid) -> None:
        """Log the epoch's means, write `best` when it is the best so far, `last`, and the sample grid. An
        epoch that --max-steps cut short keeps its counters (a resume continues it) and always gets a grid."""
        st = self.state
        means = {name: total / max(st.step_in_epoch, 1) for name, total in st.epoch_sums.items()}
        complete = st.step_in_epoch == self.steps_per_epoch
        if complete:
            st.epoch += 1
            st.step_in_epoch, st.epoch_sums = 0, {}
            self.epoch_generator_state = self.generator.get_state()
        epochs_bar.set_postfix(loss=f"{means.get('loss', math.nan):.4f}")
        self.log({"epoch": st.epoch if complete else st.epoch + st.step_in_epoch / self.steps_per_epoch,
                  "step": st.step, **means, "images_per_s": round(images_per_s, 1)})
        if means.get("loss", math.inf) < st.best_loss:
            previous, st.best_loss = st.best_loss, means["loss"]
            if not self._save_or_warn("best"):
                st.best_loss = previous                 # not saved: a later epoch tries again
        self._save_or_warn("last", final=self.finished)
        every = self.config.sample_every_epochs
        if sample_grid and every and self.is_main and (not complete or st.epoch % every == 0):
            name = f"epoch_{st.epoch:04d}.png" if complete else f"step_{st.step:07d}.png"
            try:
                sample_grid(self.out_dir / "samples" / name)
            except UserError as error:
                warnings.warn(f"{error}; training goes on without this sample grid", stacklevel=2)

    def _save_or_warn(self, name: str, *, final: bool = False) -> bool:
        """`save(name)`; when the write fails (full disk...) say so and go on training with the state in
        memory, the previous file kept, unless this is the run's last save. True when it was written."""
        try:
            self.save(name)
        except UserError as error:
            if final:
                last = (f"the latest checkpoint is {self.out_dir / 'last.safetensors'} at step "
                        f"{self.saved['last']}" if "last" in self.saved
                        else "no checkpoint of it was written")
                raise UserError(f"{error}; the run ended but its last state could not be saved: {last}") \
                    from None
            warnings.warn(f"{error}; training goes on with the previous {name}.safetensors kept, the next "
                          "save tries again", stacklevel=2)
            return False
        self.saved[name] = self.state.step
        return True

    def checkpoint_bytes(self) -> int:
        """About the size of one checkpoint: the modules' tensors and AdamW's two moments per parameter."""
        module_bytes = sum(value.numel() * value.element_size() for module in self.modules.values()
                           for value in module.state_dict().values())
        moment_bytes = sum(2 * p.numel() * p.element_size() for group in (self.optimizer.param_groups
                                                                          if self.optimizer else [])
                           for p in group["params"])
        return module_bytes + moment_bytes + 2**20                          # + RNG states and the header

    def log(self, record: dict) -> None:
        """Append `record` to out_dir/log.jsonl and print it (rank 0)."""
        if not self.is_main:
            return
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "log.jsonl", "a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")
        except OSError as error:
            warnings.warn(f"could not append to {self.out_dir / 'log.jsonl'} ({error.strerror}); training "
                          "goes on", stacklevel=2)
        tqdm.write(", ".join(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}"
                             for name, value in record.items()))

    def save(self, name: str) -> Path:
        """Atomically write `out_dir/name.safetensors` with everything needed to resume.

        Every rank calls it (the ranks' global RNG states are gathered); rank 0 writes.
        """
        rng = self._rng_tensors()
        path = self.out_dir / f"{name}.safetensors"
        if not self.is_main:
            return path
        opt_tensors, opt_meta = optimizer_to_tensors(self.optimizer)
        tensors = {key: value for prefix, module in self.modules.items()
                   for key, value in prefixed(prefix, module.state_dict()).items()}
        tensors |= {**prefixed("optim", opt_tensors), **rng}
        state = {k: v for k, v in asdict(self.state).items() if k != "losses"}
        best = self.state.best_loss
        state["best_loss"] = None if math.isinf(best) else best        # strict JSON has no inf
        if self.emas:
            state["ema_updates"] = self.emas[0].num_updates
        meta = self.metadata | {"train": asdict(self.config), "optimizer": opt_meta, "state": state,
                                "world_size": self.world_size}
        save_checkpoint(path, tensors, meta)
        return path

    def _rng_tensors(self) -> dict[str, torch.Tensor]:
        """The generator, the epoch start's generator state, and every rank's global RNG (rank r > 0 under
        keys ending in `.rankR`)."""
        tensors = {"rng.generator": self.generator.get_state(),
                   "rng.epoch_generator": self.epoch_generator_state}
        own = {"rng.torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            own["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        for rank, states in enumerate(distributed.all_gather_objects(own)):
            tensors |= {key + (f".rank{rank}" if rank else ""): value for key, value in states.items()}
        return tensors

    def resume(self, path: str | Path, check: Callable[[dict], None]) -> dict:
        """Restore modules, optimizer, RNG and counters from a checkpoint written by `save`; return its
        metadata. `check(metadata)` raises a UserError when the checkpoint belongs to another setup."""
        tensors, meta = load_checkpoint(path)
        if "state" not in meta:
            raise UserError(f"{path} holds no training state (it is an exported model); "
                            "cannot resume from it")
        require(meta, path, "optimizer")
        try:
            check(meta)
            state = _saved_state(meta["state"])
            for prefix, module in self.modules.items():
                load_module(module, tensors, prefix, path)
            optimizer_from_tensors(self.optimizer, unprefixed("optim", tensors), meta["optimizer"])
            self.generator.set_state(tensors["rng.generator"])
            self.epoch_generator_state = tensors["rng.epoch_generator"]
        except UserError:
            raise
        except KeyError as error:
            raise UserError(f"{path} is damaged: it has no {error.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError, RuntimeError) as error:
            raise UserError(f"{path} is damaged: {type(error).__name__}: {error}") from None
        self._restore_global_rng(tensors, meta.get("world_size", 1))
        ema_updates = state.pop("ema_updates", state["step"])
        for ema in self.emas:
            ema.num_updates = ema_updates
        self.state = TrainState(**state)
        return meta

    def _restore_global_rng(self, tensors: dict[str, torch.Tensor], saved_world_size: int) -> None:
        suffix = f".rank{self.rank}" if self.rank else ""
        if "rng.torch" + suffix not in tensors:
            warnings.warn(f"the checkpoint was written by {saved_world_size} process(es) and holds no "
                          f"global RNG state for rank {self.rank}: its dropout draws differ from an "
                          "uninterrupted run", stacklevel=3)
            return
        torch.set_rng_state(tensors["rng.torch" + suffix])
        if self.device.type == "cuda" and "rng.cuda" + suffix in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda" + suffix], self.device)


def _saved_state(saved: dict) -> dict:
    """TrainState's fields (and "ema_updates") from a checkpoint's "state" metadata."""
    saved = dict(saved)
    if "epoch_loss_sum" in saved:               # DDPM checkpoints from before the loss terms were kept apart
        loss_sum = saved.pop("epoch_loss_sum")
        saved["epoch_sums"] = {"loss": loss_sum} if saved["step_in_epoch"] else {}
    best = saved["best_loss"]
    saved["best_loss"] = math.inf if best is None else best
    ema_updates = saved.pop("ema_updates", None)
    TrainState(**saved)                         # unknown or missing fields fail here, before any change
    return saved | ({"ema_updates": ema_updates} if ema_updates is not None else {})
