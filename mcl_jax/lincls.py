"""Linear probe on a frozen exported member (docs/SPEC.md 4; official main_lincls.py).

  python -m mcl_jax.main --config=lincls_r18 --workdir=DIR \\
      --config.lincls.pretrained=EXPORT_DIR

The pretrained network comes from an export directory (`python -m mcl_jax.export`), so a
probe never needs the pre-training config or its cohort. As the official script:
- the classifier is re-initialised, weight normal(0, 0.01), bias 0, with the dataset's
  number of classes; it is the only thing trained (SGD 0.9, lr 30, x0.1 at epochs 60 and
  80, wd 0, 100 epochs, batch 256);
- the backbone and its BatchNorm are frozen and run in eval mode (running statistics), in
  training as in evaluation: "it is not legitimate to change any part of the pre-trained
  model" (main_lincls.py);
- augmentation: the streaming ImageNet sources' random-resized crop + flip (eval: resize
  256, centre crop 224); in-memory datasets use their supervised recipe (CIFAR: pad-4
  crop + flip, digits: crop), normalised with the dataset's mean/std.
Reports top-1/top-5 on the whole eval split (padded, masked).

The trainable state is the classifier only; the frozen variables travel with every step
as replicated arguments (never baked into the compiled program as constants), and only
the classifier is differentiated, so XLA runs the backbone forward only.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mcl_jax import export
from mcl_jax import loop
from mcl_jax import metrics as metrics_lib
from mcl_jax import models
from mcl_jax import regimes
from mcl_jax import sharding as sharding_lib
from mcl_jax import train_state
from mcl_jax.data import protocol as data_protocol
from mcl_jax.errors import ConfigError

Array = jax.Array
INIT_STD = 0.01  # official: model.fc.weight.data.normal_(mean=0.0, std=0.01)


class LinclsState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any  # the classifier only: {name: {'kernel', 'bias'}}
  opt_state: Any
  rng: jax.Array


def classifier_names(arch: str, image_shape: tuple[int, ...]) -> tuple[str, ...]:
  """Top-level param names of `arch` whose shapes depend on num_classes (its classifier)."""

  def shapes(n):
    net = models.create(arch, n)
    tree = jax.eval_shape(
      lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)), False)
    )["params"]
    return jax.tree.map(lambda s: s.shape, tree)

  one, two = shapes(1), shapes(2)
  names = tuple(k for k in one if one[k] != two[k])
  if not names:
    raise ValueError(f"Cannot find the classifier of {arch}.")
  return names


def init_classifier(rng: Array, template: dict[str, Any]) -> dict[str, Any]:
  """Kernels normal(0, INIT_STD), biases 0 (official main_lincls.py)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
  keys = jax.random.split(rng, len(leaves))
  out = []
  for key, (path, s) in zip(keys, leaves):
    if getattr(path[-1], "key", None) == "kernel":
      out.append(INIT_STD * jax.random.normal(key, s.shape, s.dtype))
    else:
      out.append(jnp.zeros(s.shape, s.dtype))
  return jax.tree.unflatten(treedef, out)


def _logits(net: Any, head: Any, frozen: dict[str, Any], images: Array) -> Array:
  variables = {"params": {**frozen["params"], **head}, "batch_stats": frozen["batch_stats"]}
  logits, _ = net.apply(variables, images, False)  # eval-mode BN, always
  return logits.astype(jnp.float32)


def train_step(
  state: LinclsState,
  batch: dict[str, Array],
  consts: dict[str, Any],
  *,
  net: Any,
  tx: optax.GradientTransformation,
  materialize: Callable[..., dict[str, Array]] = data_protocol.as_given,
  preprocess: Callable[[Array, Array], Array],
) -> tuple[LinclsState, dict]:
  """One SGD step of the classifier on the frozen backbone's features; `materialize`: the
  source's (data.protocol.Source), turning the host's batch into images and labels."""
  batch = materialize(consts, batch)
  rng, aug_rng = jax.random.split(state.rng)
  images = preprocess(aug_rng, batch["image"])
  labels = batch["label"]

  def loss_fn(head):
    logits = _logits(net, head, consts["frozen"], images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits.argmax(-1) == labels).mean()

  (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
  metrics = {"loss": loss, "accuracy": accuracy}
  metrics["finite"] = metrics_lib.all_finite(metrics)
  return new_state, metrics


def eval_step(
  state: LinclsState,
  batch: dict[str, Array],
  frozen: dict[str, Any],
  *,
  net: Any,
  preprocess: Callable[[Array], Array],
) -> dict[str, Array]:
  """Correct-prediction counts [1] (the cohort layout of metrics.cohort_accuracy, one
  "member")."""
  logits = _logits(net, state.params, frozen, preprocess(batch["image"]))
  top1, top5 = metrics_lib.topk_correct(logits[None], batch["label"], batch["mask"])
  return {"top1": top1, "top5": top5, "count": batch["mask"].astype(jnp.float32).sum()}


class LinclsTask:
  """The probe as a `loop.Task`: an exported member frozen, a fresh classifier trained.

  evaluate(state) -> {split: {'top1', 'top5'}} for 'test' and, when one is held out,
  'validation' (floats in [0, 1], whole split; the cohort's split-first shape).
  """

  collapse_remedy = ""  # a frozen backbone: nothing of its own to collapse
  collapse_cosine_grace_epochs = 0.0

  def __init__(self, setup: loop.Setup):
    self.setup = setup
    config, mesh, source = setup.config, setup.mesh, setup.source
    try:
      _, exported, self.info = export.load_exported(config.lincls.pretrained)
    except FileNotFoundError as e:
      raise ConfigError(f"config.lincls.pretrained: {e}") from None
    image_shape = tuple(source.image_shape)
    pre = self.info["preprocessing"]
    if pre["image_shape"][-1] != image_shape[-1]:
      raise ConfigError(
        f"config.lincls.pretrained was trained on {pre['image_shape'][-1]}-channel images "
        f"but {config.input.dataset} has {image_shape[-1]}; probe on a matching dataset."
      )
    if not np.allclose(pre["mean"], source.mean) or not np.allclose(pre["std"], source.std):
      logging.warning(
        "The export was pre-trained with mean/std %s/%s; the probe normalises with %s's %s/%s.",
        pre["mean"],
        pre["std"],
        config.input.dataset,
        source.mean,
        source.std,
      )
    arch = self.info["arch"]
    self.describe = f"Linear probe of {config.lincls.pretrained} ({arch})"
    self.eval_every_epochs = config.eval_every_epochs
    self.num_classes = train_state.num_classes(config, source)
    self.net = models.create(arch, self.num_classes)
    names = classifier_names(arch, image_shape)
    template = jax.eval_shape(
      lambda: self.net.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)), False)
    )
    self._head_template = {k: template["params"][k] for k in names}
    frozen = {
      "params": {k: v for k, v in exported["params"].items() if k not in names},
      "batch_stats": exported.get("batch_stats", {}),
    }
    replicated = sharding_lib.replicated(mesh)
    # The source's device arrays, and the frozen backbone's variables (a nested dict).
    self.consts: dict[str, Any] = setup.device_arrays()
    self.consts["frozen"] = jax.device_put(frozen, replicated)
    self.shardings = jax.tree.map(lambda _: replicated, self.abstract_state())
    self.compiled_train_step = sharding_lib.compile_step(
      functools.partial(
        train_step,
        net=self.net,
        tx=setup.tx,
        materialize=source.materialize,
        preprocess=source.train_preprocess,
      ),
      self.shardings,
      mesh,
    )
    self.compiled_eval_step = jax.jit(
      functools.partial(eval_step, net=self.net, preprocess=source.eval_preprocess)
    )

  def _init(self, seed: int) -> LinclsState:
    head_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
    head = init_classifier(head_rng, self._head_template)
    return LinclsState(
      step=jnp.zeros((), jnp.int32), params=head, opt_state=self.setup.tx.init(head), rng=state_rng
    )

  def abstract_state(self) -> LinclsState:
    return jax.eval_shape(self._init, 0)

  def init_state(self) -> LinclsState:
    return jax.jit(self._init, static_argnums=0, out_shardings=self.shardings)(
      self.setup.config.seed
    )

  def eval_step_inputs(self, state: Any, batch: dict[str, Any]) -> tuple:
    return (state, batch, self.consts["frozen"])

  def train_step(self, state: LinclsState, batch: dict[str, Array]) -> tuple[LinclsState, dict]:
    return self.compiled_train_step(state, batch, self.consts)

  def evaluate(self, state: LinclsState) -> dict[str, dict[str, float]]:
    result = {}
    for split in self.setup.source.eval_split_names():
      totals = loop.count_over_split(
        self.setup,
        split,
        lambda batch: self.compiled_eval_step(state, batch, self.consts["frozen"]),
      )
      result[split] = {
        k: float(np.asarray(v).reshape(-1)[0])
        for k, v in metrics_lib.cohort_accuracy(totals).items()
      }
    return result

  @staticmethod
  def eval_scalars(result: dict[str, dict[str, float]]) -> dict[str, float]:
    """`{split}/{top1|top5}/member_0` (one network, the cohort's naming)."""
    return {
      f"{split}/{metric}/member_0": value
      for split, split_metrics in result.items()
      for metric, value in split_metrics.items()
    }

  @staticmethod
  def format_eval(r: dict[str, dict[str, float]]) -> str:
    test = r["test"]
    text = f"eval top-1 {100 * test['top1']:.2f}% top-5 {100 * test['top5']:.2f}%"
    if "validation" in r:
      text += f" (validation top-1 {100 * r['validation']['top1']:.2f}%)"
    return text

  def logits(self, state: LinclsState, images: np.ndarray) -> jax.Array:
    """The probe's logits for raw images (preprocessed here), e.g. for inspection."""
    return _logits(
      self.net,
      state.params,
      self.consts["frozen"],
      self.setup.source.eval_preprocess(jnp.asarray(images)),
    )

  def meta(self) -> dict[str, Any]:
    config = self.setup.config
    return {
      "trainer": REGIME.name,
      "arch": self.info["arch"],
      "num_classes": self.num_classes,
      "pretrained": config.lincls.pretrained,
      "export": self.info,
      "config": config.to_json_best_effort(),
    }


def check_config(config) -> None:
  """The probe needs the export it probes."""
  if not config.lincls.pretrained:
    raise ConfigError(
      "config.lincls.pretrained is empty; pass the export directory, e.g. "
      "--config.lincls.pretrained=DIR."
    )
  if config.model.bn_group_size:
    raise ConfigError(
      "config.model.bn_group_size does not apply to the probe: its backbone is frozen, "
      "with the exported BatchNorm statistics."
    )


# The probe trains one classifier on a frozen exported member: nothing of it is a cohort to
# export, and its loss has no contrastive candidates.
REGIME = regimes.Regime(
  name="lincls", module=__name__, loss_regimes=("batch",), exportable=False, check=check_config
)


def build_task(setup: loop.Setup) -> LinclsTask:
  return LinclsTask(setup)
