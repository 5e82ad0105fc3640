"""A trainer callback that makes the model document the job's live log.

Progress and metrics are written as the trainer reports them, gathered into one write a second at
most (a write per logged step cost a fast run 40% of its time on the embedded server); each save is
uploaded to GridFS and then listed, after the metrics logged before it; `cancel: true` on the
document stops training after a final checkpoint.
Every write is filtered on the job's `run`, so a stale child can never touch a newer run.
"""

import logging
import math
import os
import time
from pathlib import Path

from transformers import TrainerCallback

from training import checkpoints, defaults, events
from training.config import SpecError
from training.limits import Limits

log = logging.getLogger(__name__)


def fence(model_id, run: int, owner: str | None) -> dict:
    """What every write of a training child matches: its run, and only while its daemon holds the lease.

    A child whose lease passed to another daemon (its own was partitioned away, or a user reset the
    status) can then write nothing, not even a checkpoint listing, and leaves at once.
    """
    return {"_id": model_id, "run": run, **({"lease.owner": owner} if owner else {})}


def _lease_lost():
    log.error("another daemon holds this run now (or its document is gone); stopping without another write")
    os._exit(defaults.ChildExit.LEASE_LOST)


class MongoProgress(TrainerCallback):
    def __init__(self, db, model_id, run: int, keep: int | None, daemon: int, owner: str,
                 limits: Limits = Limits(), ranking: tuple[str, bool] = ("eval_loss", False), hold_best: bool = False):
        """`ranking` picks the run's best checkpoint (`checkpoints.ranking`); with `hold_best`, an earlier run's
        checkpoint serves and `best_checkpoint` waits for the promotion gate at the end of this run."""
        self.db, self.limits = db, limits
        self.ranking, self.hold_best = ranking, hold_best
        self.models = db[defaults.MODELS]
        self.match = fence(model_id, run, owner)
        self.model_id, self.run, self.keep = model_id, run, keep
        self.cancelled = False
        self.stop_requested = False  # set by SIGTERM: save, stop, let any daemon resume the run
        self._daemon = daemon
        self._eval: dict = {}
        self._loss, self._loss_step = None, None  # the latest training loss logged, and its step
        self._unwritten: list[dict] = []  # metrics logged since the last write
        self._checked = 0.0
        self._saves = 0  # saves this process stored: a resumed run counts again from its resume
        self._writing_s = self._uploading_s = 0.0  # time the training loop spent on the database (`seconds`)

    def seconds(self) -> dict:
        """What the callbacks cost the training loop: document writes, and checkpoint uploads with their listing."""
        return {"progress_writes": round(self._writing_s, 2), "checkpoint_uploads": round(self._uploading_s, 2)}

    def _event(self, kind: str, **details) -> dict:
        return events.push(events.event(kind, run=self.run, **details))

    def _set(self, update: dict, array_filters: list | None = None) -> dict:
        """Write, and read back `cancel` in the same round trip."""
        started = time.perf_counter()
        document = self.models.find_one_and_update(self.match, update, projection={"cancel": 1},
                                                   array_filters=array_filters)
        self._writing_s += time.perf_counter() - started
        if document is None:
            _lease_lost()
        return document

    def _progress(self, state) -> dict:
        done = state.global_step - self._first_step
        elapsed = time.monotonic() - self._started
        eta = (state.max_steps - state.global_step) * elapsed / done if done > 0 else None
        return {
            "step": state.global_step, "total_steps": state.max_steps, "epoch": state.epoch,
            "loss": self._loss, "eta_s": None if eta is None else round(eta, 1),
            "updated_at": defaults.now(),
        }

    def on_train_begin(self, args, state, control, **kwargs):
        """The number of steps is known only now (epochs times batches): hold it to the operator's cap."""
        if state.max_steps <= 0:
            raise SpecError("trainer.num_train_epochs", "this run would train zero steps; select more documents or "
                            "raise trainer.num_train_epochs or trainer.max_steps")
        if state.max_steps > self.limits.max_steps:
            raise checkpoints.LimitExceeded("trainer.num_train_epochs", self.limits.refusal(
                "max_steps", f"{state.max_steps} steps (epochs times batches)"))
        self._first_step, self._started = state.global_step, time.monotonic()
        resumed = {"$push": self._event("resumed", step=state.global_step)} if state.global_step else {}
        self._set({"$set": {"progress": self._progress(state)}, **resumed})

    def on_log(self, args, state, control, logs=None, **kwargs):
        numbers = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if "loss" in numbers:
            self._loss, self._loss_step = numbers["loss"], state.global_step
        if "eval_loss" in numbers:
            if numbers["eval_loss"] < 700:  # beyond, exp overflows: no finite perplexity to report
                numbers["eval_perplexity"] = math.exp(numbers["eval_loss"])
            self._eval = {"step": state.global_step, **{k: v for k, v in numbers.items() if k.startswith("eval_")}}
        self._unwritten.append({"run": self.run, "step": state.global_step, "epoch": state.epoch, **numbers})
        log.info("step %d/%d %s", state.global_step, state.max_steps,
                 " ".join(f"{k}={v:.4g}" for k, v in numbers.items()))
        if "eval_loss" in numbers or time.monotonic() - self._checked >= defaults.PROGRESS_WRITE_S:
            self._write(state, control)

    def _write(self, state, control=None) -> None:
        """Progress and the metrics logged since the last write, reading `cancel` back: one round trip. Without
        `control` (at a save) `cancel` is left for the next check: a stop decided in `on_save` would be rank 0's
        alone, past the ranks' last agreement, and its extra save or early exit would leave the others waiting."""
        update = {"$set": {"progress": self._progress(state)}}
        if self._unwritten:
            update["$push"] = {"metrics": {"$each": self._unwritten, "$slice": -defaults.MAX_METRICS}}
        written = self._set(update)
        self._unwritten = []
        if control is not None:
            self._stop_if_cancelled(written, state, control)

    def on_step_end(self, args, state, control, **kwargs):
        if os.getppid() != self._daemon:
            log.error("the daemon that started this training is gone; exiting so the run can be resumed once")
            os._exit(defaults.ChildExit.ORPHANED)
        if self.stop_requested:
            log.info("stop requested at step %d: saving a checkpoint to resume from", state.global_step)
            if not control.should_training_stop:
                self._set({"$push": self._event("stop_requested", step=state.global_step, reason="sigterm")})
            control.should_training_stop = True
            control.should_save = True
        elif time.monotonic() - self._checked >= defaults.CANCEL_POLL_S:
            self._write(state, control)

    def on_train_end(self, args, state, control, **kwargs):
        if self._unwritten:
            self._write(state, control)

    def _stop_if_cancelled(self, document: dict, state, control) -> None:
        """At every log and every few seconds: `cancel: true` stops training after a final save."""
        self._checked = time.monotonic()
        if document.get("cancel"):
            log.info("cancel requested at step %d: saving and stopping", state.global_step)
            if not self.cancelled:
                self._set({"$push": self._event("stop_requested", step=state.global_step, reason="cancel")})
            self.cancelled = True
            control.should_training_stop = True
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        if self._unwritten:
            self._write(state)
        started, writing = time.perf_counter(), self._writing_s
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self._saves += 1
        _check_finite(folder, state.global_step)
        checkpoints.check_room(self.db, folder, self.model_id, self._saves, self.limits)
        entry = checkpoints.upload(self.db, folder, model_id=self.model_id, run=self.run, step=state.global_step)
        metrics = {k: v for k, v in self._eval.items() if k != "step"} if self._eval.get("step") == state.global_step else {}
        own_loss = {"loss": self._loss} if self._loss_step == state.global_step else {}  # never an older step's
        entry["metrics"] = {**own_loss, **metrics}
        self._record(entry)
        log.info("checkpoint step %d stored in GridFS (%.1f MB)", state.global_step, entry["size"] / 1e6)
        self._uploading_s += time.perf_counter() - started - (self._writing_s - writing)

    def _record(self, entry: dict) -> None:
        """List the new checkpoint, then prune; what a user wrote into `checkpoints` is only read, never obeyed."""
        current = self.models.find_one(self.match, {"checkpoints": 1, "runs.number": 1})
        if current is None:
            _lease_lost()
        kept = current.get("checkpoints", [])
        listed = checkpoints.listed(kept) + [entry]
        pruned = checkpoints.to_prune(listed, self.run, self.keep, *self.ranking)
        best = checkpoints.best_of([c for c in listed if c["run"] == self.run and c not in pruned], *self.ranking)
        ref = {"run": best["run"], "step": best["step"]}
        sets = {} if self.hold_best else {"best_checkpoint": ref}
        filters = None
        if isinstance(current.get("runs"), list):  # the run's entry (`training.lineage`) keeps the run's own best
            sets["runs.$[r].best"], filters = {**ref, "metrics": best.get("metrics", {})}, [{"r.number": self.run}]
        stored = self._event("checkpoint_stored", step=entry["step"])
        if isinstance(kept, list):
            self._set({"$push": {"checkpoints": entry, **stored}, **({"$set": sets} if sets else {})}, filters)
        else:  # not a list: nothing there was ours
            self._set({"$set": {**sets, "checkpoints": [entry]}, "$push": stored}, filters)
        self._prune(pruned)

    def _prune(self, pruned: list[dict]) -> None:
        """Unlist and delete the pruned files GridFS shows are this run's; any other entry is left as it is."""
        doomed = []
        for c in pruned:
            try:
                doomed.append(checkpoints.verified(self.db, c.get("files_id"), self.model_id, self.run).files_id)
            except checkpoints.CheckpointRefused as exc:
                log.warning("not pruning checkpoint {run: %d, step: %d}: %s", c["run"], c["step"], exc)
        if doomed:
            self._set({"$pull": {"checkpoints": {"files_id": {"$in": doomed}}}})
            for files_id in doomed:
                checkpoints.delete(self.db, files_id, model_id=self.model_id, run=self.run)


def _check_finite(folder: Path, step: int) -> None:
    """The run fails, storing nothing, at a checkpoint whose weights are not all finite, or that has none: never
    listed, it can neither serve nor be promoted."""
    try:
        bad = checkpoints.nonfinite(folder)
    except checkpoints.NoWeights as exc:
        raise SpecError("trainer.deepspeed.zero_optimization.stage3_gather_16bit_weights_on_model_save",
                        f"at step {step} {exc}, so it was not stored: under ZeRO-3 without LoRA the weights are "
                        "saved whole only when this is true (the default here); leave it out") from None
    if bad is not None:
        raise SpecError("trainer.learning_rate", f"training diverged: at step {step} the weight {bad} holds NaN or "
                        "inf, so the checkpoint was not stored; lower trainer.learning_rate (for method dpo or kto, "
                        "a larger trainer.beta or another trainer.loss_type may also keep the loss finite)")


class LogAtSaves(TrainerCallback):
    """A step that saves also logs, so every checkpoint carries the training loss of its own step.

    It goes on every rank (logging gathers the loss from all of them) and after the callbacks that decide
    to save: it only reads `should_save`.
    """

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            control.should_log = True


class Trained(Exception):
    """The checkpoint this run resumed from is its last step's: there is nothing left to train."""

    def __init__(self, step: int):
        super().__init__(f"resumed at step {step}, the run's last")
        self.step = step


class NothingPastTheLastStep(TrainerCallback):
    """A run resumed from the checkpoint of its last step trains no further step.

    transformers checks `max_steps` only after a step: resumed at `global_step == max_steps` midway
    through an epoch, it trains step max_steps + 1 (reported as step 81 of 80, with a negative ETA)
    and saves it, since a step past the end saves. That happens when a daemon loses a run between
    its final checkpoint and its end (the promotion gate): its next attempt has only the end left.
    This callback stops `train` before any step, raising `Trained`; it goes on every rank (each reads
    the same state, so all stop together) and after `MongoProgress`, which records the resume first.
    """

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step and state.global_step >= state.max_steps:
            raise Trained(state.global_step)
