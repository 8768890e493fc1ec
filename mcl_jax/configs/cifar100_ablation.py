"""CIFAR-100 loss ablation (paper Table 6): resnet32, MCL x4, loss terms switched on/off.

The argument names the terms that stay on, joined by '+', from vcl, icl, soft_vcl, soft_icl
(weights as the full method: 0.1, 0.1, 1, 1); every other MCL weight is 0.
  mcl-train --config=cifar100_ablation:vcl --workdir=WORKDIR
  mcl-train --config=cifar100_ablation:vcl+icl --workdir=WORKDIR
  mcl-train --config=cifar100_ablation:vcl+soft_vcl --workdir=WORKDIR
  mcl-train --config=cifar100_ablation:icl+soft_icl --workdir=WORKDIR
  mcl-train --config=cifar100_ablation:vcl+icl+soft_vcl+soft_icl --workdir=WORKDIR
The full method is 74.04% top-1 (docs/SPEC.md 5); `none` trains 4 independent networks.
Append ',smoke' for a CPU smoke run.
"""

from mcl_jax.configs import cifar100_common
from mcl_jax.configs import common

TERMS = {
  "vcl": ("vcl_weight", 0.1),
  "icl": ("icl_weight", 0.1),
  "soft_vcl": ("soft_vcl_weight", 1.0),
  "soft_icl": ("soft_icl_weight", 1.0),
}


def _terms(variant: str) -> set[str]:
  return set() if variant == "none" else set(variant.split("+"))


def get_config(arg=None):
  variant, is_smoke = common.parse_arg(
    arg, lambda v: v == "none" or _terms(v) <= set(TERMS), "vcl+icl+soft_vcl+soft_icl"
  )
  c = cifar100_common.set_variant(cifar100_common.base("resnet32"), "mcl_x4")
  for term, (field, weight) in TERMS.items():
    c.loss[field] = weight if term in _terms(variant) else 0.0
  return common.smoke(c) if is_smoke else c
