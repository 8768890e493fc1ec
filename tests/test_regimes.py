"""The regime registry: every regime declares itself once, nothing else spells its name,
and a new regime is one module (here written by the test, outside the package) plus its
test."""

import ast
import os
import textwrap

import numpy as np
import pytest

from mcl_jax import config_lib
from mcl_jax import export
from mcl_jax import jobs
from mcl_jax import regimes
from mcl_jax.configs import common
from mcl_jax.errors import ConfigError

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mcl_jax")


def test_every_regime_module_declares_its_regime():
  assert regimes.names() == ("supervised", "moco", "simclr", "lincls")
  for module, regime in zip(regimes.MODULES, regimes.all_regimes()):
    assert regime.module == module and regimes.get(regime.name) is regime
  with pytest.raises(ValueError, match="Unknown regime 'mocco'"):
    regimes.get("mocco")


def string_constants(path: str) -> set[str]:
  """The string literals of a module, docstrings left out."""
  tree = ast.parse(open(path).read())
  docstrings = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
      body = node.body
      if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        docstrings.add(id(body[0].value))
  return {
    node.value
    for node in ast.walk(tree)
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
  }


def test_no_module_outside_a_regime_the_registry_and_configs_spells_a_regime_name():
  names = set(regimes.names())
  own = {r.module.replace(".", os.sep) + ".py" for r in regimes.all_regimes()}
  allowed_dirs = (os.path.join("mcl_jax", "configs"), os.path.join("mcl_jax", "suites"))
  offenders = []
  root = os.path.dirname(PACKAGE)
  for dirpath, _, files in os.walk(PACKAGE):
    for name in files:
      rel = os.path.relpath(os.path.join(dirpath, name), root)
      if (
        not name.endswith(".py")
        or rel in own
        or rel.startswith(allowed_dirs)
        or rel == os.path.join("mcl_jax", "regimes.py")
      ):
        continue
      spelled = names & string_constants(os.path.join(root, rel))
      offenders += [f"{rel}: {sorted(spelled)}"] if spelled else []
  assert not offenders, offenders


TOY_REGIME = '''
"""A toy regime: the supervised cohort without the contrastive terms, each member trained
on its own cross-entropy only (the test's example of adding a regime)."""
import functools

import jax
import jax.numpy as jnp
import optax

from mcl_jax import config_lib, loop, metrics, regimes, sharding, supervised, train_state
from mcl_jax.errors import ConfigError


def check(config):
  if config_lib.mcl_terms_on(config):
    raise ConfigError("config.loss: the no-contrast regime trains no MCL term; set the "
                      "MCL weights to 0.")


REGIME = regimes.Regime(name=__name__, module=__name__, loss_regimes=("batch",),
                        class_aware_batches=True, check=check)


def train_step(state, batch, consts, *, model, tx, materialize, preprocess):
  batch = materialize(consts, batch)
  rng, aug_rng = jax.random.split(state.rng)
  images = preprocess(aug_rng, batch["image"])

  def loss_fn(params):
    out, mutated = model.apply({"params": params, "batch_stats": state.batch_stats}, images,
                               train=True, mutable=["batch_stats"])
    ce = supervised.cross_entropy(out["logits"], batch["label"])
    step_metrics = {"ce": ce, "loss": ce.sum()}
    step_metrics["finite"] = metrics.all_finite(step_metrics)
    return ce.sum(), (step_metrics, mutated["batch_stats"])

  grads, (step_metrics, stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       batch_stats=stats, opt_state=opt_state, rng=rng), step_metrics


class NoContrastTask:
  collapse_remedy = ""
  collapse_cosine_grace_epochs = 0.0
  eval_scalars = staticmethod(supervised.cohort_eval_scalars)
  format_eval = staticmethod(supervised.format_cohort_eval)

  def __init__(self, setup):
    config, source = setup.config, setup.source
    self.setup, self.describe = setup, "No-contrast cohort"
    self.eval_every_epochs = config.eval_every_epochs
    self.num_classes = train_state.num_classes(config, source)
    self.model = train_state.build_model(config, self.num_classes)
    self.consts = setup.device_arrays()
    self.shardings = train_state.state_shardings(self.abstract_state(), setup.mesh)
    self.compiled_train_step = sharding.compile_step(functools.partial(
        train_step, model=self.model, tx=setup.tx, materialize=source.materialize,
        preprocess=source.train_preprocess), self.shardings, setup.mesh)
    self.compiled_eval_step = jax.jit(functools.partial(
        supervised.eval_step, model=self.model, preprocess=source.eval_preprocess))

  def abstract_state(self):
    return train_state.abstract_train_state(self.model, self.setup.tx,
                                            self.setup.source.image_shape, self.setup.mesh)

  def init_state(self):
    return train_state.create_train_state(self.model, self.setup.tx,
                                          self.setup.source.image_shape,
                                          jax.random.PRNGKey(self.setup.config.seed),
                                          self.setup.mesh)

  def train_step(self, state, batch):
    return self.compiled_train_step(state, batch, self.consts)

  def eval_step_inputs(self, state, batch):
    return (state, batch)

  def evaluate(self, state):
    return {split: metrics.cohort_accuracy(loop.count_over_split(
                self.setup, split, lambda batch: self.compiled_eval_step(state, batch)))
            for split in self.setup.source.eval_split_names()}

  def meta(self):
    return loop.export_meta(self.setup, num_classes=self.num_classes)


def build_task(setup):
  return NoContrastTask(setup)
'''


def test_a_new_regime_is_one_module_outside_the_package(tmp_path, monkeypatch):
  package = tmp_path / "toy_regimes"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "no_contrast.py").write_text(textwrap.dedent(TOY_REGIME))
  monkeypatch.syspath_prepend(str(tmp_path))
  config = common.smoke(config_lib.default_config(), arch="tiny", image_size=8)
  config.trainer = "toy_regimes.no_contrast"
  # The regime's own check runs in validation, as a built-in regime's does.
  with pytest.raises(ConfigError, match="no-contrast regime trains no MCL term"):
    config_lib.validate(config)
  for term in ("vcl", "icl", "soft_vcl", "soft_icl"):
    config.loss[f"{term}_weight"] = 0.0
  workdir = str(tmp_path / "run")
  summary = jobs.run(config, workdir)
  assert summary["steps"] == config.schedule.num_train_steps and not summary["preempted"]
  top1 = summary["eval"]["test"]["top1"]
  assert top1.shape == (config.cohort.num_members + 1,) and np.all((top1 >= 0) & (top1 <= 1))
  # Its members export like any cohort's: the registry says it is exportable.
  info = export.export_member(workdir, member=1, out=str(tmp_path / "member1"))
  assert info["source"]["trainer"] == "toy_regimes.no_contrast"


def test_an_unknown_module_path_is_refused_in_one_sentence():
  config = common.smoke(config_lib.default_config())
  config.trainer = "nowhere.regime"
  with pytest.raises(ConfigError, match=r"config.trainer='nowhere.regime': Unknown regime"):
    config_lib.validate(config)
