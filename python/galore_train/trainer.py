"""The training loop: exact accumulation, mid-epoch resume, evaluation, checkpoints, reports.

Order of work, so that a failure costs nothing: configuration and preflight checks (nothing written),
data and model loading, routing and its checks, optimizer, resume; only then are outputs written.

Loss: the sum of token losses of a window divided by the number of target tokens in the whole window
(all micro-batches, all ranks), so any split of a window into micro-batches and ranks gives the same
gradient. Checkpoints are taken after an optimizer step, after that step's log and evaluation
records, so a resumed run repeats nothing and skips nothing.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed, preflight
from .batching import Plan
from .checkpoint import (
    CHECKPOINT_DIRNAME,
    SHARDED_OPTIMIZER_DIRNAME,
    CheckpointError,
    TrainingStopped,
    abandon_checkpoint,
    begin_checkpoint,
    finish_checkpoint,
    list_checkpoints,
    capture_rng_state,
    load_model_weights,
    load_training_state,
    prune_checkpoints,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
)
from .config import Config
from .data import TokenizedDataset, collate, default_data_ready, load_records, load_tokenizer
from .memory import MemoryTracker
from .modeling import build_model, resolve_device
from .optim import OptimizerBundle, build_optimizer
from .preflight import PreflightError
from .report import MetricsLog, plot_losses, read_metrics, results_table, write_json
from .routing import route_parameters

logger = logging.getLogger("galore_train")


@dataclass
class TrainerState:
    """Where the run is; saved in every checkpoint (plain numbers and lists only)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro: int = 0  # next unseen micro-batch of this epoch
    tokens: int = 0  # target tokens trained on
    interval_loss: float = 0.0  # sum of window losses since the last train log record
    interval_windows: int = 0
    eval_loss_per_epoch: list = field(default_factory=list)  # one per finished epoch
    # Evaluation at the step where max_steps ended the run inside an epoch (epoch and micro stay
    # where they are, so resuming with a larger max_steps continues that epoch); None otherwise.
    partial_epoch_eval_loss: Optional[float] = None
    train_time_s: float = 0.0
    world_size: int = 1  # the data position means nothing under another world size


@dataclass
class LoadedData:
    tokenizer: object
    train: TokenizedDataset
    eval: TokenizedDataset
    description: str


# ------------------------------------------------------------------------------------- entry
def train(config: Config, *, resume: Optional[str] = None, overwrite: bool = False) -> dict:
    """Runs the configured training; returns the summary (also written to summary.json)."""
    info = distributed.from_environment()
    device = resolve_device(config.training.device)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    out = Path(config.output_dir)
    preflight.check_output_dir(out)
    if info.is_main:  # the output_dir that is written: rank 0's (a failure there ends the others' run too)
        preflight.check_fresh_start(out, resume, overwrite)
    preflight.check_bitsandbytes(config)
    preflight.check_combination(config, world_size=info.world_size, device=device)
    distributed.init(info, device, config.training.distributed_timeout_minutes)
    try:
        return Trainer(config, info, device, out).run(resume, overwrite=overwrite)
    finally:
        distributed.shutdown(info)


class Trainer:
    def __init__(self, config: Config, info: distributed.DistInfo, device: torch.device, out: Path):
        self.config, self.info, self.device, self.out = config, info, device, out
        self.t = config.training
        # FSDP2: parameters, gradients and optimizer state sharded by rows across the ranks (preflight
        # refused it for one process).
        self.fsdp = info.enabled and config.training.distributed == "fsdp2"
        self.tracker = MemoryTracker(device)
        self.state = TrainerState(world_size=info.world_size)
        self.metrics: Optional[MetricsLog] = None
        self.tensors_recorded = False  # optimizer state exists only after the first step
        self.stop_requested = False  # set by SIGTERM; the loop stops after the current step
        self.stop_agreed = False  # some rank's stop_requested, as of the last window's all-reduce

    # ------------------------------------------------------------------------- set-up
    def setup(self, resume: Optional[str]) -> Optional[Path]:
        config, t = self.config, self.t
        with self.tracker.phase("load"):
            self.data = load_data(config, self.out)
            self.data_fp = data_fingerprint(self.data.train)  # saved with each checkpoint, checked on resume
            torch.manual_seed(t.seed)
            self.model = build_model(config, vocab_size=len(self.data.tokenizer), device=self.device)
        preflight.check_seq_len(self.model, config)
        if config.quantization.enabled:
            preflight.check_quantized_model(self.model)
        self.routing = route_parameters(self.model, config)
        preflight.check_ranks(self.model, self.routing, config)
        self.plan = Plan(len(self.data.train), t.micro_batch_size, t.gradient_accumulation_steps,
                         self.info.world_size, t.seed)
        self.total_steps = self.plan.total_steps(t.epochs, t.max_steps)
        checkpoint = resolve_resume(resume, self.out)  # before anything is written
        # The weights go in before sharding (the checkpoint holds them whole); the optimizer's
        # parameters are the sharded ones, so it is built after.
        saved = self._restore_weights(checkpoint) if checkpoint is not None else None
        if self.fsdp:
            distributed.shard_model(self.model, self.info, self.device)
        self.bundle: OptimizerBundle = build_optimizer(self.model, self.routing, config, self.total_steps)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16-mixed" else None
        if checkpoint is not None:
            self._restore_training(checkpoint, saved)
        self.ddp_model = self._wrap_ddp()
        return checkpoint

    def _wrap_ddp(self):
        if not self.info.enabled or self.fsdp:  # an FSDP2 model is its own wrapper
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=ids)

    def _restore_weights(self, checkpoint: Path) -> dict:
        """The checkpoint's weights into the (unsharded) model; returns its training state."""
        saved = load_training_state(checkpoint)
        # Refused before anything is loaded: a changed optimizer or model would otherwise fail inside
        # the loaders with their own messages.
        check_resumable(saved, self.config, self.info.world_size, checkpoint, self.data_fp)
        load_model_weights(checkpoint, self.model)
        return saved

    def _restore_training(self, checkpoint: Path, saved: dict) -> None:
        """Optimizer, schedule, scaler, data position and RNG, once the optimizer exists."""
        load_optimizer = None
        if self.fsdp:
            folder = checkpoint / SHARDED_OPTIMIZER_DIRNAME
            load_optimizer = lambda: distributed.load_sharded_optimizer(  # noqa: E731
                self.model, self.bundle.optimizer, folder, self.info, self.device)
        self.bundle.load_state_dict(saved["optimizer"], load_optimizer)
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        self.state = TrainerState(**saved["trainer"])
        if self.state.micro >= self.plan.micro_batches_per_epoch:  # a checkpoint from before the data check
            raise CheckpointError(
                f"cannot resume from {checkpoint}: it stopped at micro-batch {self.state.micro} of the epoch, but "
                f"the epoch now has {self.plan.micro_batches_per_epoch}: the training data changed. Resume with the "
                "data the run was saved with, or start a new run in another output_dir.")
        restore_rng_state(rank_rng_state(saved, self.info.rank))
        self._log(f"resumed from {checkpoint} at step {self.state.step} (epoch {self.state.epoch + 1}, micro-batch {self.state.micro})")

    # --------------------------------------------------------------------------- run
    def run(self, resume: Optional[str], overwrite: bool = False) -> dict:
        checkpoint = self.setup(resume)
        if self.info.is_main:
            self._announce()
            self.out.mkdir(parents=True, exist_ok=True)
            if overwrite and checkpoint is None:  # asked for: the earlier run's checkpoints go
                shutil.rmtree(self.out / CHECKPOINT_DIRNAME, ignore_errors=True)
            resumed_at = self.state.step if checkpoint is not None else None
            self.metrics = MetricsLog(self.out / "metrics.jsonl", resume_step=resumed_at)
        previous = self._catch_sigterm()
        try:
            self._loop()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if self.metrics is not None:
                self.metrics.close()
            if self.info.is_main:
                self.tracker.write(self.out / "memory_report.json")
        return self._finish()

    def _catch_sigterm(self):
        """SIGTERM (a scheduler's preemption, torchrun's shutdown) finishes the current step, writes
        its checkpoint and stops (TrainingStopped); the previous handler is returned for restoring.
        Signals can be caught in the main thread only: elsewhere the default stays."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def request_stop(signum, frame):
            if not self.stop_requested:
                print("galore-train: SIGTERM: stopping after this step, with a checkpoint", file=sys.stderr, flush=True)
            self.stop_requested = True

        return signal.signal(signal.SIGTERM, request_stop)

    def _stop(self, epoch_done: bool, saved: bool) -> None:
        if epoch_done:
            self._end_epoch()  # evaluation and checkpoint, as the loop would do next
        elif not saved:
            self._save()
        raise TrainingStopped(
            f"stopped by SIGTERM after step {self.state.step} of {self.total_steps}; checkpoint step-{self.state.step} "
            f"in {self.out / CHECKPOINT_DIRNAME}: continue with --resume")

    def _announce(self) -> None:
        print(self.routing.format(), flush=True)
        if self.routing.fallback_note:
            logger.warning(self.routing.fallback_note)
            print(self.routing.fallback_note, flush=True)
        d = self.data
        self._log(f"data: {d.description}; {len(d.train)} train / {len(d.eval)} eval examples; "
                  f"{self.plan.windows_per_epoch} optimizer steps per epoch, {self.total_steps} in all")

    def _loop(self) -> None:
        t, plan, state = self.t, self.plan, self.state
        progress = _progress(self.total_steps, state.step, self.info.is_main)
        while state.step < self.total_steps and state.epoch < t.epochs:
            order = plan.epoch_order(state.epoch)
            first_window = state.micro // plan.accumulation
            for w in range(first_window, plan.windows_per_epoch):
                window = plan.window(w)
                started = time.perf_counter()
                lr = self.bundle.current_lr()  # what this step uses (the schedule advances after it)
                with self.tracker.phase("train"):
                    loss, targets = self._train_window(order, window)
                state.train_time_s += time.perf_counter() - started
                state.step += 1
                state.micro = window.stop
                state.tokens += targets
                state.interval_loss += loss
                state.interval_windows += 1
                epoch_done = window.stop == plan.micro_batches_per_epoch
                last = state.step >= self.total_steps
                self._after_step(progress, lr, targets / max(1e-9, time.perf_counter() - started))
                if t.eval_every and state.step % t.eval_every == 0 and not (epoch_done or last):
                    self._evaluate()
                saved = bool(t.save_every and state.step % t.save_every == 0 and not (epoch_done or last))
                if saved:
                    self._save()
                if last:
                    break
                if self.stop_agreed:
                    self._stop(epoch_done, saved)
            if state.micro == plan.micro_batches_per_epoch:
                self._end_epoch()
            else:
                self._end_inside_epoch()
        progress.close()

    def _end_epoch(self) -> None:
        """Evaluation for the epoch, then its checkpoint."""
        state = self.state
        state.eval_loss_per_epoch.append(self._evaluate())
        state.partial_epoch_eval_loss = None
        state.epoch += 1
        state.micro = 0
        self._save()

    def _end_inside_epoch(self) -> None:
        """max_steps ended the run inside an epoch: evaluation and a checkpoint at this position,
        which stays inside the epoch, so a resume with a larger max_steps takes the epoch's next
        unseen micro-batch (not the next epoch's first)."""
        self.state.partial_epoch_eval_loss = self._evaluate()
        self._save()

    # ---------------------------------------------------------------------------- window
    def _train_window(self, order: list[int], window: range) -> tuple[float, int]:
        """Forward/backward over the window's micro-batches, then one optimizer step."""
        batches = [self._micro_batch(order, j) for j in window]
        local_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        (window_targets,) = distributed.all_sum([local_targets], self.info, self.device)
        window_targets = max(window_targets, 1.0)
        loss_sum = 0.0
        for k, batch in enumerate(batches):
            with self._gradient_sync(k == len(batches) - 1):
                token_loss = self._token_loss_sum(self.ddp_model, batch)
                scaled = token_loss * (self.info.world_size / window_targets)
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += float(token_loss.detach())
        self._optimizer_step(len(batches))
        # Whether any rank was asked to stop rides on the window's loss sum (no collective of its own).
        total_loss, stop_requests = distributed.all_sum([loss_sum, float(self.stop_requested)], self.info, self.device)
        self.stop_agreed = stop_requests > 0
        return total_loss / window_targets, int(window_targets)

    def _gradient_sync(self, sync: bool):
        """Gradients are reduced across ranks after the window's last micro-batch only."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(sync)  # unsynced: each rank accumulates unsharded gradients
            return contextlib.nullcontext()
        if self.info.enabled and not sync:
            return self.ddp_model.no_sync()
        return contextlib.nullcontext()

    def _micro_batch(self, order: list[int], index: int) -> dict:
        indices = self.plan.micro_batch(order, index, self.info.rank)
        if indices:
            return self._collate(indices)
        # This rank's share of a short last micro-batch is empty: it still runs one example, with no
        # target tokens, so that it takes part in DDP's gradient reduction (FSDP2's gathers).
        return self._placeholder(self.plan.global_micro_batch(order, index)[:1])

    def _placeholder(self, indices: list[int], dataset=None) -> dict:
        """A batch of ``indices`` whose tokens count nothing (no targets): a rank with no share of
        the data still runs the collectives a forward and backward take part in."""
        batch = self._collate(indices, dataset)
        batch["labels"].fill_(-100)
        return batch

    def _collate(self, indices: list[int], dataset=None) -> dict:
        dataset = self.data.train if dataset is None else dataset
        batch = collate([dataset[i] for i in indices], self.data.tokenizer.pad_token_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _token_loss_sum(self, model, batch: dict) -> torch.Tensor:
        with self._autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum")

    def _autocast(self):
        precision = self.t.precision
        if precision == "bf16-mixed":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if precision == "fp16-mixed":
            return torch.autocast(self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def _optimizer_step(self, micro_batches: int) -> None:
        bundle, t = self.bundle, self.t
        if bundle.layerwise is not None:
            # The hooks stepped during backward; a short tail window still has to be closed.
            bundle.layerwise.flush()
            self._record_tensors_once()
            return
        opt = bundle.optimizer
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        if t.max_grad_norm is not None:
            clip_if_finite(self.trainable, t.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        bundle.scheduler.step()
        self._record_tensors_once()
        opt.zero_grad(set_to_none=True)

    def _record_tensors_once(self) -> None:
        if not self.tensors_recorded:
            self.tensors_recorded = True
            target = self.bundle.layerwise if self.bundle.layerwise is not None else self.bundle.optimizer
            self.tracker.record_tensors(self.model, target)
            if self.info.is_main:
                self.tracker.write(self.out / "memory_report.json")

    # -------------------------------------------------------------------- logs, eval, save
    def _after_step(self, progress, lr: float, tokens_per_s: float) -> None:
        state, t = self.state, self.t
        progress.update(1)
        progress.set_postfix(loss=f"{state.interval_loss / max(1, state.interval_windows):.3f}", lr=f"{lr:.2e}",
                             tok_s=f"{tokens_per_s:.0f}", refresh=False)
        if state.step % t.log_every == 0 or state.step >= self.total_steps:
            self._write({"type": "train", "step": state.step, "epoch": state.epoch + 1,
                         "loss": state.interval_loss / state.interval_windows, "lr": lr,
                         "tokens": state.tokens, "tokens_per_s": round(tokens_per_s, 1)})
            state.interval_loss, state.interval_windows = 0.0, 0

    @torch.no_grad()
    def _evaluate(self) -> float:
        model, data = self.model, self.data
        was_training = model.training
        model.eval()
        loss_sum, targets = 0.0, 0
        with self.tracker.phase("eval"):
            size = self.t.micro_batch_size
            mine = list(range(self.info.rank, len(data.eval), self.info.world_size))
            batches = math.ceil(len(mine) / size)
            if self.fsdp:  # every rank runs rank 0's number of forwards: each one gathers parameters
                batches = math.ceil(math.ceil(len(data.eval) / self.info.world_size) / size)
            for start in range(0, batches * size, size):
                indices = mine[start:start + size]
                batch = self._collate(indices, data.eval) if indices else self._placeholder([0], data.eval)
                loss_sum += float(self._token_loss_sum(model, batch))
                targets += int((batch["labels"][:, 1:] != -100).sum())
        model.train(was_training)
        total, count = distributed.all_sum([loss_sum, targets], self.info, self.device)
        loss = total / max(count, 1.0)
        self._write({"type": "eval", "step": self.state.step, "epoch": self.state.epoch + 1,
                     "eval_loss": loss, "perplexity": float(torch.tensor(loss).exp())})
        return loss

    def _save(self) -> None:
        # Every rank's RNG state (dropout draws differ between ranks): a collective, so all ranks call it.
        rng_per_rank = distributed.gather_objects(capture_rng_state(), self.info)
        if self.fsdp:
            failure = self._write_sharded_checkpoint(rng_per_rank)
        else:
            failure = None
            if self.info.is_main:
                try:
                    self._write_checkpoint(rng_per_rank)
                except Exception as err:  # noqa: BLE001 - a full disk surfaces as OSError, safetensors' or torch's own error
                    failure = err
        if failure is not None:  # a traceback only where it is not the trainer's own error
            logger.warning("saving the checkpoint of step %d failed", self.state.step,
                           exc_info=None if isinstance(failure, CheckpointError) else failure)
        # Every rank learns whether the save worked (rank 0 alone raising would leave the others
        # waiting in the barrier).
        if distributed.any_rank_failed(failure, self.info, self.device):
            kept = [path.name for _, path in list_checkpoints(self.out)]
            raise CheckpointError(
                f"could not write the checkpoint of step {self.state.step} in {self.out / CHECKPOINT_DIRNAME}"
                + (f": {type(failure).__name__}: {failure}" if failure is not None else " (another rank failed)")
                + f". The checkpoints already there are intact ({', '.join(kept) or 'none yet'}): free space or fix "
                "the folder, then continue with --resume.") from failure
        distributed.barrier(self.info)

    def _write_checkpoint(self, rng_per_rank: list) -> None:
        """Rank 0: the checkpoint of this step (model, optimizer, position, every rank's RNG), then pruning."""
        save_checkpoint(self.out, self.state.step, model=self.model, training_state=self._training_state(rng_per_rank))
        self._prune()

    def _write_sharded_checkpoint(self, rng_per_rank: list) -> Optional[BaseException]:
        """FSDP2, on every rank: the same checkpoint folder, its model gathered whole (rank 0 writes
        it, loadable by from_pretrained) and its optimizer state sharded (each rank writes its own
        rows with torch.distributed.checkpoint into ``optimizer/``). Returns this rank's failure.
        The ranks agree after each part, so a failure on one rank never leaves the others waiting
        in a collective it skipped, and rank 0 removes the unfinished folder."""
        tmp = None
        model_state, failure = distributed.full_model_state(self.model)  # collective; empty off rank 0
        if failure is None:
            try:
                optimizer_state = distributed.optimizer_state(self.model, self.bundle.optimizer)
                if self.info.is_main:
                    tmp = begin_checkpoint(self.out, self.state.step)
            except Exception as err:  # noqa: BLE001
                failure = err
        shared = distributed.broadcast_object(str(tmp) if tmp is not None else None, self.info)
        if distributed.any_rank_failed(failure, self.info, self.device) or shared is None:
            return self._abandon(tmp, failure, "another rank could not prepare it (that rank's log says why)")
        try:
            distributed.save_sharded_optimizer(optimizer_state, Path(shared) / SHARDED_OPTIMIZER_DIRNAME)
        except Exception as err:  # noqa: BLE001
            failure = err
        if distributed.any_rank_failed(failure, self.info, self.device):
            return self._abandon(tmp, failure, "another rank could not write its optimizer shard (that rank's log says why)")
        if not self.info.is_main:
            return None
        try:
            finish_checkpoint(tmp, model=self.model, training_state=self._training_state(rng_per_rank),
                              model_state=model_state)
        except Exception as err:  # noqa: BLE001
            return err
        self._prune()
        return None

    def _abandon(self, tmp: Optional[Path], failure: Optional[BaseException], elsewhere: str) -> BaseException:
        if tmp is not None:
            abandon_checkpoint(tmp)
        return failure or CheckpointError(elsewhere)

    def _training_state(self, rng_per_rank: list) -> dict:
        return {
            "optimizer": self.bundle.state_dict(optimizer=not self.fsdp),
            "trainer": asdict(self.state),
            "rng": rng_per_rank[0],
            "rng_per_rank": rng_per_rank,
            "config": self.config.to_dict(),
            "data": self.data_fp,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def _prune(self) -> None:
        try:
            prune_checkpoints(self.out, self.t.keep_last)
        except OSError as err:  # the new checkpoint is written; older ones just stay
            logger.warning("pruning old checkpoints in %s failed (%s); they are kept", self.out, err)

    def _write(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(record)

    def _log(self, message: str) -> None:
        if self.info.is_main:
            logger.info(message)
            print(message, flush=True)

    # ---------------------------------------------------------------------------- finish
    def _finish(self) -> dict:
        state, config = self.state, self.config
        report = self.tracker.report()
        # The epochs run to their end, and the one max_steps stopped inside (its last entry then).
        partial = state.partial_epoch_eval_loss
        evals = state.eval_loss_per_epoch + ([partial] if partial is not None else [])
        summary = {
            "mode": run_mode(config, self.bundle.kind),
            "optimizer": self.bundle.kind,
            "output_dir": str(self.out),
            "eval_loss_per_epoch": evals,
            "eval_perplexity_per_epoch": [float(torch.tensor(x).exp()) for x in evals],
            "last_epoch_partial": state.partial_epoch_eval_loss is not None,
            "steps": state.step,
            "target_tokens": state.tokens,
            "train_time_s": round(state.train_time_s, 2),
            "peak_memory_bytes": peak_memory(report),
            "device": str(self.device),
            "precision": self.t.precision,
            "routing": self.routing.counts(),
            "world_size": self.info.world_size,
            "distributed": self.t.distributed if self.info.enabled else None,
        }
        if self.info.is_main:
            write_json(self.out / "summary.json", summary)
            plot_losses(read_metrics(self.out / "metrics.jsonl"), self.out / "loss.png",
                        f"{summary['mode']} ({summary['optimizer']})")
            print("\n" + results_table([summary]), flush=True)
            print(f"\noutputs in {self.out}: metrics.jsonl, memory_report.json, summary.json, loss.png, checkpoints/",
                  flush=True)
        return summary


# ------------------------------------------------------------------------------------ helpers
def load_data(config: Config, out: Path) -> LoadedData:
    d, t = config.data, config.training
    if d.train_file is None:
        data_dir = out / "data"
        if not default_data_ready(data_dir, seed=t.seed, n_train=d.default_train_examples,
                                  n_eval=d.default_eval_examples, vocab_size=d.default_vocab_size):
            raise PreflightError(
                f"the embedded default dataset is not prepared in {data_dir}: run "
                "`galore-train --config <this config> --prepare-data` first (`make train` does), or set "
                "data.train_file to your own JSON/JSONL data."
            )
        train_path, eval_path = data_dir / "train.jsonl", data_dir / "eval.jsonl"
        tokenizer_source = d.tokenizer or str(data_dir / "tokenizer")
        description = f"embedded default ({data_dir})"
    else:
        train_path = Path(d.train_file)
        eval_path = Path(d.eval_file) if d.eval_file else None
        tokenizer_source = d.tokenizer or config.model.name_or_path
        if tokenizer_source is None:
            raise PreflightError(
                "data.train_file is set but no tokenizer is known: set data.tokenizer to a tokenizer "
                "folder, or model.name_or_path to a model folder that has one."
            )
        description = str(train_path)
    tokenizer = load_tokenizer(tokenizer_source)
    train_records = load_records(train_path)
    if eval_path is not None:
        eval_records = load_records(eval_path)
    else:
        train_records, eval_records = split_eval(train_records, d.eval_fraction, t.seed)
    train = TokenizedDataset(train_records, tokenizer, t.max_seq_len)
    evalset = TokenizedDataset(eval_records, tokenizer, t.max_seq_len)
    preflight.check_dataset(len(train), len(evalset), train.dropped + evalset.dropped,
                            f"{description} (training.max_seq_len={t.max_seq_len})")
    return LoadedData(tokenizer, train, evalset, description)


def split_eval(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded hold-out of ``fraction`` of the records (at least one) for evaluation."""
    indices = list(range(len(records)))
    random.Random(seed).shuffle(indices)
    n_eval = max(1, int(len(records) * fraction)) if len(records) > 1 else 0
    held = set(indices[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


# What a resumed run must share with the run that saved: the batch plan (the saved position counts
# micro-batches of this size, on this many ranks) and the optimizer (its state is loaded as saved).
RESUME_MUST_MATCH = (
    "training.seed", "training.micro_batch_size", "training.gradient_accumulation_steps",
    "optimizer.type", "optimizer.rank", "optimizer.update_proj_gap", "optimizer.scale", "optimizer.proj_type",
    "optimizer.target_modules", "optimizer.svd", "optimizer.refresh_policy", "optimizer.state_dtype",
    "optimizer.stochastic_rounding", "quantization.enabled", "data.train_file", "model.name_or_path",
    "training.distributed",
)
# Keys naming a file or folder: the same place spelled another way (relative, absolute) is no change.
RESUME_PATHS = ("data.train_file", "model.name_or_path")
# What a checkpoint written before a key existed ran with.
RESUME_DEFAULTS = {"optimizer.state_dtype": "float32", "optimizer.stochastic_rounding": False,
                   "training.distributed": "ddp"}


def data_fingerprint(train: TokenizedDataset) -> dict:
    """What the saved data position counts in: the training examples, as tokenized (a changed
    eval split, tokenizer, max_seq_len or data file changes them, and the seeded epoch orders)."""
    digest = hashlib.sha256()
    for example in train.examples:
        digest.update(np.asarray(example["input_ids"], dtype=np.int64).tobytes())
        digest.update(np.asarray(example["labels"], dtype=np.int64).tobytes())
        digest.update(b"|")
    return {"examples": len(train), "sha256": digest.hexdigest()}


def check_resumable(saved: dict, config: Config, world_size: int, checkpoint: Path,
                    data: Optional[dict] = None) -> None:
    """Refuses a resume whose data position or optimizer state would mean something else now."""
    before, now = saved["config"], config.to_dict()
    changed = []
    if data is not None and saved.get("data") is not None and saved["data"] != data:
        changed.append(f"the training examples were {saved['data']['examples']} (sha256 {saved['data']['sha256'][:12]}), "
                       f"now {data['examples']} (sha256 {data['sha256'][:12]}): the data, its eval split, the "
                       "tokenizer or max_seq_len changed")
    for key in RESUME_MUST_MATCH:
        section, name = key.split(".")
        saved_value = before.get(section, {}).get(name, RESUME_DEFAULTS.get(key))
        if key in RESUME_PATHS and _same_path(saved_value, now[section][name]):
            continue
        if saved_value != now[section][name]:
            changed.append(f"{key} was {saved_value!r}, now {now[section][name]!r}")
    saved_world = saved["trainer"].get("world_size", 1)
    if saved_world != world_size:
        changed.append(f"the number of processes was {saved_world}, now {world_size}")
    if changed:
        raise CheckpointError(
            f"cannot resume from {checkpoint}: " + "; ".join(changed) + ". Resume with the settings the run "
            "was saved with, or start a new run in another output_dir."
        )


def rank_rng_state(saved: dict, rank: int) -> dict:
    """This rank's RNG state from a checkpoint; one written before per-rank states were kept holds
    rank 0's only, which every rank then takes (as such checkpoints were restored)."""
    per_rank = saved.get("rng_per_rank")
    return per_rank[rank] if per_rank and rank < len(per_rank) else saved["rng"]


def _same_path(a, b) -> bool:
    """Whether two config values name the same existing file or folder (hub ids compare as strings)."""
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def clip_if_finite(params: list, max_norm: float) -> torch.Tensor:
    """Global-norm clipping that leaves a non-finite gradient alone: clipping by an infinite norm
    would zero every other gradient (and a refresh would then build a basis from zeros), while the
    optimizer's guard skips just the parameters whose gradient is not finite."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)  # a replicated DTensor when the gradients are sharded
    whole = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    if bool(torch.isfinite(whole)):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return whole


def run_mode(config: Config, kind: str) -> str:
    if config.quantization.enabled:
        return "A: 8-bit base, float params trained"
    if kind in ("galore", "galore_layerwise"):
        return "B: GaLore full-parameter"
    return "full-parameter " + ("AdamW8bit" if kind == "adamw8bit" else "AdamW")


def peak_memory(report: dict) -> Optional[int]:
    """The run's peak: CUDA max allocated when on a GPU, else the process's peak RSS."""
    key = "cuda_max_allocated_bytes" if str(report.get("device", "")).startswith("cuda") else "peak_rss_bytes"
    peaks = [phase.get(key) for phase in report.get("phases", {}).values()]
    peaks = [p for p in peaks if p]
    return max(peaks) if peaks else report.get("current", {}).get("peak_rss_since_process_start_bytes")


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step",
                file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
