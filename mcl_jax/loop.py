"""The job loop every trainer shares, and the contract a trainer fulfils to use it.

A trainer is a TASK built by composition (docs/DESIGN.md, "The regime registry and the
task contract"): each regime module (`mcl_jax.regimes`: supervised, MoCo, SimCLR, the
linear probe) builds one from a `Setup`, and none inherits from another. `fit(run)` drives
it: resume, train with a progress display, log metrics, evaluate, checkpoint, stop cleanly
on a preemption notice or a diverged loss.

  Setup   what every regime needs first: config, workdir, mesh, the data source (a
          `mcl_jax.data.protocol.Source`), steps per epoch, total steps,
          the optimiser and its LR schedule (`prepare`).
  Task    describe, eval_every_epochs; init_state() -> the state, already sharded;
          abstract_state() -> its shapes and dtypes (nothing allocated: plans, restores);
          train_step(state, global_batch) -> (state, metrics); evaluate(state) -> a
          result ({split: {metric: values}}, split 'test' / 'validation') or None;
          eval_scalars(result) -> {name: float}; format_eval(result) -> str; meta() ->
          what export needs to rebuild a member.
  Run     a task and its current state: batches, one step, resume (tests drive it too).

Metrics of the step are arrays: scalars, or [M] vectors (one value per member), logged as
`name/member_m`. A step reports `finite` (0 or 1): whether every loss of the step was
finite; the loop reads it at every log and before every checkpoint, and a non-finite step
stops the run (`DivergedError`) without ever writing a checkpoint that holds it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import dataclasses
import logging as py_logging
import os
import signal
import sys
import threading
import time
from typing import Any, Protocol

from absl import logging
import jax
import ml_collections
import numpy as np
import optax

from mcl_jax import checkpointing
from mcl_jax import metrics as metrics_lib
from mcl_jax import optim
from mcl_jax import sharding as sharding_lib
from mcl_jax.data import protocol as data_protocol
from mcl_jax.errors import ConfigError


class DivergedError(RuntimeError):
  """A loss became NaN or infinite; the message says where and which checkpoint is good."""


@dataclasses.dataclass(frozen=True)
class Setup:
  """What every regime needs before it builds its task (`prepare`)."""

  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  source: data_protocol.Source
  steps_per_epoch: int
  total_steps: int
  tx: optax.GradientTransformation
  schedule: optim.Schedule

  @property
  def global_batch(self) -> int:
    return self.config.input.global_batch_size

  def batches(self, start_step: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(step, this process's share of the batch) from `start_step` to the end; the order
    is a pure function of (seed, epoch), so a resumed run sees the same batches."""
    step = start_step
    while step < self.total_steps:
      epoch, offset = divmod(step, self.steps_per_epoch)
      for batch in self.source.train_batches(
        epoch,
        seed=self.config.seed,
        global_batch_size=self.global_batch,
        samples_per_class=self.config.input.samples_per_class,
        start_step=offset,
      ):
        if step >= self.total_steps:
          return
        yield step, batch
        step += 1

  def eval_batch_size(self) -> int:
    """config.input.eval_batch_size rounded up to split over the devices."""
    size = self.config.input.eval_batch_size
    return -(-size // self.mesh.size) * self.mesh.size

  def device_arrays(self) -> dict[str, jax.Array]:
    """The source's resident arrays (an in-memory training set), replicated on every device."""
    replicated = sharding_lib.replicated(self.mesh)
    return {k: jax.device_put(v, replicated) for k, v in self.source.device_arrays().items()}


def prepare(
  config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh | None = None
) -> Setup:
  """The data source, the step counts and the optimiser of a (validated) config."""
  from mcl_jax import data  # TensorFlow stays unimported for in-memory data.
  from mcl_jax import regimes
  from mcl_jax.data import views

  mesh = mesh or sharding_lib.make_mesh()
  two_views = regimes.get(config.trainer).two_views
  source = data.make_source(
    config.input,
    two_view_crop_scale=views.VIEW_SPECS[config.ssl.views].crop_scale if two_views else None,
  )
  num_train, batch = source.num_train, config.input.global_batch_size
  steps_per_epoch = num_train // batch
  if steps_per_epoch < 1:
    raise ConfigError(
      f"config.input.global_batch_size={batch} is larger than the "
      f"{num_train} training examples of {config.input.dataset}."
    )
  per_class = config.input.samples_per_class
  if per_class and batch // per_class > source.num_classes:
    raise ConfigError(
      f"A class-aware batch of {batch} with {per_class} samples per class needs "
      f"{batch // per_class} distinct classes but {config.input.dataset} has only "
      f"{source.num_classes}; lower config.input.global_batch_size or raise "
      "config.input.samples_per_class."
    )
  total = config.schedule.num_train_steps or config.schedule.epochs * steps_per_epoch
  tx, schedule = optim.make_optimizer(config, steps_per_epoch)
  return Setup(config, workdir, mesh, source, steps_per_epoch, total, tx, schedule)


def count_over_split(
  setup: Setup, split: str, count_step: Callable[[dict[str, jax.Array]], dict[str, jax.Array]]
) -> dict[str, np.ndarray]:
  """Sums over one whole eval split of `count_step(global batch)` (counts of correct
  predictions and of real examples: padded rows carry mask 0), exact on any device count."""
  totals = None
  for local in setup.source.eval_batches(split, setup.eval_batch_size()):
    local = {k: local[k] for k in ("image", "label", "mask")}
    counts = jax.tree.map(np.asarray, count_step(sharding_lib.global_batch(local, setup.mesh)))
    totals = counts if totals is None else jax.tree.map(np.add, totals, counts)
  if totals is None:
    raise ValueError(f"The eval split {split!r} has no batches to count over.")
  return totals


def embed_split(
  setup: Setup, embed_batch: Callable[[jax.Array], jax.Array], split: str
) -> tuple[np.ndarray, np.ndarray]:
  """`embed_batch(global images) -> [M, b, F]` over one whole split of the source (an eval
  split, or data.protocol.TRAIN_SPLIT un-augmented): (features [M, N, F], labels [N]) in
  order, the padding of the last batch dropped (the kNN monitor's features)."""
  chunks, labels = [], []
  for local in setup.source.eval_batches(split, setup.eval_batch_size()):
    features = embed_batch(sharding_lib.global_batch(local["image"], setup.mesh))
    keep = _all_processes(local["mask"]) > 0
    chunks.append(np.asarray(features)[:, keep])
    labels.append(_all_processes(local["label"])[keep])
  return np.concatenate(chunks, axis=1), np.concatenate(labels)


def _all_processes(local: np.ndarray) -> np.ndarray:
  """A batch entry of every process, in process order: the global batch's rows."""
  if jax.process_count() == 1:
    return np.asarray(local)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def export_meta(setup: Setup, *, num_classes: int, **extra: Any) -> dict[str, Any]:
  """The checkpoint meta every cohort trainer writes: what export needs to rebuild a member
  without the config file (arch, cohort layout, classes, preprocessing), the trainer, the
  config itself, and the regime's `extra` keys."""
  config, source = setup.config, setup.source
  return {
    "arch": config.model.arch,
    "num_members": config.cohort.num_members,
    "shared_stages": config.model.shared_stages,
    "num_classes": int(num_classes),
    "trainer": config.trainer,
    "embed_dim": config.model.embed_dim,
    "image_shape": list(source.image_shape),
    "mean": np.asarray(source.mean).tolist(),
    "std": np.asarray(source.std).tolist(),
    **extra,
    "config": config.to_json_best_effort(),
  }


class Task(Protocol):
  """What `fit` needs from a regime (module docstring)."""

  setup: Setup
  describe: str
  eval_every_epochs: int
  # What the collapse warning (`CollapseWatch`) tells the user to try; "" where the regime
  # has no embeddings of its own to collapse (the linear probe).
  collapse_remedy: str
  # Epochs at the start during which the embeddings' cosine is not judged: 0 where healthy
  # runs start below metrics.COLLAPSE_COSINE (supervised), 1 where they start above it.
  collapse_cosine_grace_epochs: float
  # The jitted step `train_step` runs (sharding.compile_step): what `mcl-plan` lowers and
  # compiles ahead of time for an accelerator, and tests check is traced once.
  compiled_train_step: Any
  # The jitted evaluation step (supervised, probe: correct-prediction counts over an eval
  # batch; MoCo, SimCLR: the kNN monitor's features), and `eval_step_inputs(state, batch)`
  # the arguments it takes for an eval batch: what `mcl-plan` compiles next to the step.
  compiled_eval_step: Any

  def abstract_state(self) -> Any: ...  # shapes and dtypes of init_state's, nothing allocated
  def init_state(self) -> Any: ...
  def train_step(self, state: Any, batch: dict[str, jax.Array]) -> tuple[Any, dict]: ...
  def eval_step_inputs(self, state: Any, batch: dict[str, jax.Array]) -> tuple: ...
  def evaluate(self, state: Any) -> Any: ...
  def eval_scalars(self, result: Any) -> dict[str, float]: ...
  def format_eval(self, result: Any) -> str: ...
  def meta(self) -> dict[str, Any]: ...


class Run:
  """A task and its state, one step at a time (what `fit` loops over; tests drive it)."""

  def __init__(self, task: Task):
    self.task, self.setup = task, task.setup
    self.state = task.init_state()

  def batches(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    return self.setup.batches(int(self.state.step))

  def step(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    batch = sharding_lib.global_batch(local_batch, self.setup.mesh)
    self.state, metrics = self.task.train_step(self.state, batch)
    return metrics

  def train_steps(self, num_steps: int | None = None) -> list[dict]:
    """Runs `num_steps` steps (all remaining by default); returns per-step metrics."""
    history: list[dict[str, jax.Array]] = []
    for _, batch in self.batches():
      if num_steps is not None and len(history) >= num_steps:
        break
      history.append(self.step(batch))
    return history

  def evaluate(self) -> Any:
    return self.task.evaluate(self.state)

  def restore(self, ckpt: checkpointing.Checkpointer) -> bool:
    """Replaces the state with the newest checkpoint's; False when there is none."""
    restored = ckpt.restore_latest(self.state)
    if restored is None:
      return False
    self.state = restored[0]
    return True


def fit(run: Run) -> dict[str, Any]:
  """Resumes, trains to the end, evaluates and checkpoints; returns the summary.

  Logs the mean training metrics every `log_every_steps`, evaluates every
  `task.eval_every_epochs` epochs (0: only at the end) and once more for the final state,
  checkpoints every `checkpoint.every_epochs` and at the end. On SIGTERM (or JAX's
  preemption notice) it saves at the current step and returns early with preempted=True.
  Raises DivergedError when a step's loss is not finite (no checkpoint of it is written).
  Returns {"eval": the last evaluation, "train": the last logged training metrics,
  "steps": the step reached, "preempted": bool, "collapsed": None or the first collapse
  {'step', 'member', 'signal', 'value'} (`CollapseWatch`)}.
  """
  from clu import metric_writers
  from clu import periodic_actions

  from mcl_jax.data import tf_lazy

  tf_lazy.tf()  # clu's TensorBoard writer runs on TensorFlow: hide the GPUs from it first.
  task, setup = run.task, run.setup
  config, workdir = setup.config, setup.workdir
  if "://" not in workdir:  # validated writable; created only now that training starts
    os.makedirs(workdir, exist_ok=True)
  writer = metric_writers.create_default_writer(
    workdir, just_logging=jax.process_index() > 0, asynchronous=False
  )
  ckpt = checkpointing.Checkpointer(workdir, keep=config.checkpoint.keep)
  try:
    resumed_from = resume(run, ckpt)
  except Exception:
    ckpt.close()
    raise
  if resumed_from:
    logging.info("Resumed from %s at step %d.", resumed_from, int(run.state.step))
  start_step = int(run.state.step)
  spe, total = setup.steps_per_epoch, setup.total_steps
  logging.info(
    "%s for %d steps (%d per epoch) on %d devices.", task.describe, total, spe, setup.mesh.size
  )
  report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer, every_secs=30)
  bar = _progress(total, start_step)
  guard = PreemptionGuard()
  watch = DivergenceWatch(workdir, ckpt)
  pending: list[dict[str, jax.Array]] = []
  last_train: dict[str, float] = {}
  done = start_step
  evaluated: dict[str, Any] = {"result": None, "step": None}
  collapse = CollapseWatch(
    task.collapse_remedy,
    grace_steps=round(metrics_lib.COLLAPSE_GRACE_EPOCHS * spe),
    cosine_grace_steps=round(task.collapse_cosine_grace_epochs * spe),
  )

  def run_eval():
    result = task.evaluate(run.state)
    evaluated.update(result=result, step=done)
    if result is not None:
      writer.write_scalars(done, task.eval_scalars(result))
      logging.info("step %d (epoch %.2f) %s", done, done / spe, task.format_eval(result))

  def save():
    watch.check_before_save(done)
    ckpt.save(done, run.state, task.meta())

  def summary(preempted: bool) -> dict[str, Any]:
    return {
      "eval": evaluated["result"],
      "train": last_train,
      "steps": done,
      "preempted": preempted,
      "collapsed": collapse.first,
    }

  t0 = time.time()
  try:
    for step, batch in run.batches():
      metrics = run.step(batch)
      pending.append(metrics)
      watch.record(step + 1, metrics)
      done = step + 1
      report(done)
      if bar is not None:
        bar.update(1)
      if done % config.log_every_steps == 0 or done == total:
        watch.check_now()
        last_train = mean_metrics(pending)
        last_train["learning_rate"] = float(setup.schedule(step))
        writer.write_scalars(done, {f"train/{k}": v for k, v in last_train.items()})
        collapse.check(done, last_train)
        if bar is not None:
          bar.set_postfix(loss=f"{last_train['loss']:.3f}")
        pending = []
      if guard.reached(done):
        save()
        logging.warning(
          "Preemption signal: saved step %d in %s; rerun the same command to resume.", done, workdir
        )
        return summary(preempted=True)
      epoch_end = done % spe == 0
      if (
        task.eval_every_epochs and epoch_end and (done // spe) % task.eval_every_epochs == 0
      ) or done == total:
        run_eval()
      if (epoch_end and (done // spe) % config.checkpoint.every_epochs == 0) or done == total:
        save()
    if evaluated["step"] != done:  # Resumed after the last step: report the final state.
      run_eval()
  finally:
    guard.close()
    if bar is not None:
      bar.close()
    ckpt.close()
    writer.flush()
  final = evaluated["result"]
  logging.info(
    "Finished %d steps in %.1f s.%s",
    done - start_step,
    time.time() - t0,
    "" if final is None else f" Final {task.format_eval(final)}",
  )
  return summary(preempted=False)


def resume(run: Run, ckpt: checkpointing.Checkpointer) -> str | None:
  """Restores the run's newest checkpoint, or `config.resume_from`'s when it has none.

  Refuses, with one sentence, a checkpoint written with other values of the fields that
  shape the state or give it its meaning (config_lib.STATE_FIELDS), unless the user named
  it explicitly with `config.resume_from`. Returns where it resumed from, or None.
  """
  from mcl_jax import config_lib

  config, workdir = run.setup.config, run.setup.workdir
  source, explicit = ckpt, False
  if ckpt.latest_step() is None and config.resume_from:
    if not os.path.isdir(checkpointing.checkpoint_dir(config.resume_from)):
      raise ConfigError(
        f"config.resume_from={config.resume_from} holds no checkpoints; "
        "pass the workdir of a run that has saved one."
      )
    source = checkpointing.Checkpointer(config.resume_from, read_only=True)
  explicit = bool(config.resume_from)
  step = source.latest_step()
  if step is None:
    return None
  changes = config_lib.changed_state_fields(source.meta(step).get("config"), config)
  if changes and not explicit:
    fields = ", ".join(f"{f}={old!r} (now {new!r})" for f, old, new in changes)
    raise ConfigError(
      f"The checkpoints in {workdir} were written with {fields}; choose a new --workdir "
      f"for this config, or pass --config.resume_from={workdir} to resume from them "
      "anyway."
    )
  try:
    if not run.restore(source):
      return None
  except checkpointing.StateMismatchError as e:
    raise ConfigError(
      f"The checkpoint of step {step} in {source.directory} does not fit this config's state ({e})."
    ) from None
  finally:
    if source is not ckpt:
      source.close()
  return source.directory


class DivergenceWatch:
  """Stops a run whose loss is NaN or infinite before anything non-finite is saved.

  Every step's metrics carry `finite` (computed inside the step, a few scalar reductions);
  the loop keeps the newest one as a device array and reads it (one scalar transfer) at
  each log line and before each checkpoint, and also remembers the first logged step range
  that went bad, for the message.
  """

  def __init__(self, workdir: str, ckpt: checkpointing.Checkpointer):
    self.workdir, self.ckpt = workdir, ckpt
    self.history: list[tuple[int, dict]] = []  # steps since the last check

  def record(self, step: int, metrics: dict) -> None:
    self.history.append((step, metrics))

  def check_now(self) -> None:
    history, self.history = self.history, []
    if not history:
      return
    flags = jax.device_get([m["finite"] for _, m in history])
    if all(bool(f) for f in flags):
      return
    first = next(i for i, f in enumerate(flags) if not bool(f))
    step, metrics = history[first]
    raise DivergedError(self._message(step, jax.device_get(metrics)))

  def check_before_save(self, step: int) -> None:
    self.check_now()

  def _message(self, step: int, metrics: dict) -> str:
    bad = []
    for name, value in metrics.items():
      value = np.asarray(value)
      if name == "finite" or value.dtype.kind not in "fc":
        continue
      if value.ndim == 0 and not np.isfinite(value):
        bad.append(name)
      elif value.ndim == 1:
        bad += [f"{name} of member {m}" for m, v in enumerate(value) if not np.isfinite(v)]
    good = self.ckpt.latest_step()
    where = (
      f"the newest checkpoint, step {good}, is finite"
      if good is not None
      else "no checkpoint was written"
    )
    return (
      f"The loss diverged at step {step} ({', '.join(bad) or 'loss'} not finite); "
      f"stopped without saving it, and {where} in {self.workdir}; lower "
      "config.optim.lr or add a warm-up (config.schedule.warmup_epochs)."
    )


class PreemptionGuard:
  """Turns SIGTERM (a TPU preemption notice, SLURM's --signal before the time limit) into
  "save at this step and stop".

  Single process: our own handler sets a flag. Several processes: JAX's preemption
  service (on by default with jax.distributed) catches the signal and agrees on a step at
  which every host saves; `reached_preemption_sync_point` must then be asked every step.
  """

  def __init__(self):
    self._requested = False
    self._previous = None
    self._multi = jax.process_count() > 1
    self._reported = False
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._requested = True

  def reached(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils

      if not self._reported:
        # JAX puts the sync point one past the largest step the hosts have reported, and a
        # host that has reported nothing counts as step 0. A notice that came before this
        # first report (while a resumed run restored and compiled) thus set it to step 1,
        # which a run resumed at a later step never reports, and the notice was ignored.
        # Asking for step 1 once turns such a notice into a stop at this first step.
        self._reported = True
        self._requested = multihost_utils.reached_preemption_sync_point(1)
      return multihost_utils.reached_preemption_sync_point(step) or self._requested
    return self._requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class CollapseWatch:
  """Warns once when a member has collapsed, and remembers the first collapse.

  Reads the logged per-member signals of `metrics.cohort_health` from the flattened
  training metrics (`metrics.first_collapse`): `embed_cosine/member_m` above
  metrics.COLLAPSE_COSINE (every in-batch similarity about the same), or, after
  `grace_steps`, `contrastive_vs_chance/member_m` above metrics.COLLAPSE_LOSS_RATIO (the
  member's own contrastive loss at chance). Either way the contrastive terms give almost no
  gradient, so MCL is effectively off until the member recovers (docs/RESULTS.md, "The
  collapse"). `remedy`: the task's `collapse_remedy`, a sentence the warning ends with.
  `first`: None, or {'step', 'member', 'signal', 'value'} of the first collapse (`fit`'s
  summary reports it as `collapsed`).
  """

  def __init__(self, remedy: str = "", grace_steps: int = 0, cosine_grace_steps: int = 0):
    self.remedy, self.grace_steps = remedy, grace_steps
    self.cosine_grace_steps = cosine_grace_steps
    self.first: dict[str, Any] | None = None

  def check(self, step: int, train_metrics: dict[str, float]) -> None:
    if self.first is not None:
      return
    found = metrics_lib.first_collapse(
      train_metrics,
      check_loss=step >= self.grace_steps,
      check_cosine=step >= self.cosine_grace_steps,
    )
    if found is None:
      return
    self.first = {"step": step, **found}
    what = (
      "embeddings point one way (mean pairwise cosine %.3f > %.2f)"
      if found["signal"] == "embed_cosine"
      else "own contrastive loss is at chance (%.3f of log(candidates) > %.2f)"
    )
    limit = (
      metrics_lib.COLLAPSE_COSINE
      if found["signal"] == "embed_cosine"
      else metrics_lib.COLLAPSE_LOSS_RATIO
    )
    logging.warning(
      "Step %d: member %d has collapsed: its " + what + ", so the contrastive terms give "
      "almost no gradient. %s",
      step,
      found["member"],
      found["value"],
      limit,
      self.remedy,
    )


def _progress(total_steps: int, initial: int):
  """A bar in a terminal; plain log lines (from clu's ReportProgress) otherwise."""
  if sys.stderr.isatty() and jax.process_index() == 0:
    from tqdm import tqdm

    return tqdm(total=total_steps, initial=initial, unit="step", dynamic_ncols=True)
  return None


class _QuietLibraries(py_logging.Filter):
  """Keeps INFO lines of our own code; libraries (Orbax logs every save step) only warn.

  clu's lines are ours too: its metric writer logs the training metrics (`[step] train/...`
  every config.log_every_steps) and ReportProgress the steps/s and ETA, the only progress
  a run without a terminal (SLURM, nohup on a TPU host) shows between evals.
  """

  def filter(self, record: py_logging.LogRecord) -> bool:
    return (
      record.levelno >= py_logging.WARNING
      or "/mcl_jax/" in record.pathname
      or "/clu/" in record.pathname
    )


def quiet_library_logs() -> None:
  """For the command-line tools: absl's log output keeps our lines, drops libraries' INFO."""
  logging.get_absl_handler().addFilter(_QuietLibraries())


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
  """[M]-vectors become one scalar per member (`ce/member_0`)."""
  flat = {}
  for name, value in metrics.items():
    value = np.asarray(value)
    if value.ndim == 0:
      flat[prefix + name] = float(value)
    else:
      for m, v in enumerate(value):
        flat[f"{prefix}{name}/member_{m}"] = float(v)
  return flat


def mean_metrics(history: list[dict]) -> dict[str, float]:
  """Mean over steps of each metric, flattened (`flatten_metrics`); `finite` is left out."""
  host = jax.device_get([{k: v for k, v in m.items() if k != "finite"} for m in history])
  mean = jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *host)
  return flatten_metrics(mean)
