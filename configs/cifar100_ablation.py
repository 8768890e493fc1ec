"""CIFAR-100 loss ablation (paper Table 6): resnet32, MCL x4, loss terms switched on/off.

The argument names the terms that stay on, joined by '+', from vcl, icl, soft_vcl, soft_icl
(weights as the full method: 0.1, 0.1, 1, 1); every other MCL weight is 0.
  python -m mcl_jax.main --config=configs/cifar100_ablation.py:vcl --workdir=WORKDIR
  python -m mcl_jax.main --config=configs/cifar100_ablation.py:vcl+icl --workdir=WORKDIR
  python -m mcl_jax.main --config=configs/cifar100_ablation.py:vcl+soft_vcl --workdir=WORKDIR
  python -m mcl_jax.main --config=configs/cifar100_ablation.py:icl+soft_icl --workdir=WORKDIR
  python -m mcl_jax.main --config=configs/cifar100_ablation.py:vcl+icl+soft_vcl+soft_icl --workdir=WORKDIR
The full method is 74.04% top-1 (SPEC section 5); `none` trains 4 independent networks.
Append ',smoke' for a CPU smoke run.
"""
from configs import cifar100_common

TERMS = {"vcl": ("vcl_weight", 0.1), "icl": ("icl_weight", 0.1),
         "soft_vcl": ("soft_vcl_weight", 1.0), "soft_icl": ("soft_icl_weight", 1.0)}


def get_config(arg=None):
  parts = [p for p in (arg or "vcl+icl+soft_vcl+soft_icl").split(",") if p]
  is_smoke = "smoke" in parts
  terms = [p for p in parts if p != "smoke"] or ["vcl+icl+soft_vcl+soft_icl"]
  on = set() if terms[0] == "none" else set(terms[0].split("+"))
  if len(terms) > 1 or not on <= set(TERMS):
    raise ValueError(f"config argument {arg!r}: expected terms joined by '+' from "
                     f"{', '.join(TERMS)} (or 'none'), optionally ',smoke'.")
  c = cifar100_common.set_variant(cifar100_common.base("resnet32"), "mcl_x4")
  for term, (field, weight) in TERMS.items():
    c.loss[field] = weight if term in on else 0.0
  return cifar100_common.smoke(c) if is_smoke else c
