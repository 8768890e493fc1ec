"""The digits suite: the demo's comparison on scikit-learn's handwritten digits.

  mcl-reproduce --suite=digits --seeds=0,1 --workdir=runs/digits

`make demo` (mcl_jax/demo.py) runs it when Fashion-MNIST is not installed. The rows are
variants of mcl_jax/configs/digits.py.
"""

from mcl_jax.suites import Row

CONFIG = "digits"

TABLES = {"demo": "scikit-learn's digits: two independent networks vs MCL x2"}
ROWS = [
  Row("demo_baseline", "baseline", "demo", label="baseline (2 independent)"),
  Row("demo_mcl_x2", "mcl_x2", "demo", label="MCL x2"),
]
