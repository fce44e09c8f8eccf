"""One library's timed calls of one rule, in its own process (driven by benchmarks/peers.py).

Runs under the repository's Python for ``--lib=ftjax`` and under the peers'
Python (torch, ByzFL, byzpy) for ``--lib=byzfl`` and ``--lib=byzpy``; it
imports only what its library needs, and nothing of ftjax for the peers.
Reads the rows [W, d] (float32) from ``--input``, times ``--reps`` calls after
one warm-up call (fewer when a call is slow), saves the last output to ``--output`` (a .npz with ``out``
and, for ftjax's krum/multikrum, ``selected``) and prints one JSON line.
"""
import argparse
import json
import os
import sys
import time

import numpy as np


TIMED_RULES = ("krum", "multikrum", "nnm", "cwtm", "cwmed")
# The agreement cases (benchmarks/peers.py --only=agreement): name -> (ftjax's
# spec and options, the peers that define the same rule). Each peer is built
# with the parameters that make its definition ftjax's (see _peer_rule).
AGREEMENT = {
    "avg": ("avg", {}, ("byzfl",)),
    "meamed": ("meamed", {}, ("byzfl", "byzpy")),
    # ByzFL: 3 smoothed Weiszfeld steps from zero; byzpy: from the median until
    # a step moves at most 1e-6 (at most 256), distances floored at 1e-12.
    "gm_zero_3": ("gm", {"gm": {"iters": 3, "nu": 0.1, "init": "zero"}}, ("byzfl",)),
    "gm_median_tol": ("gm", {"gm": {"nu": 1e-12, "init": "cwmed", "tol": 1e-6,
                                    "max_iters": 256}}, ("byzpy",)),
    "cclip_zero_1": ("centered_clipping",
                     {"centered_clipping": {"tau": 10.0, "iters": 1, "init": "zero"}}, ("byzfl",)),
    "cclip_mean_10": ("centered_clipping",
                      {"centered_clipping": {"tau": 10.0, "iters": 10, "init": "mean"}},
                      ("byzpy",)),
    "mda": ("mda", {}, ("byzfl", "byzpy")),
    "smea": ("smea", {}, ("byzfl", "byzpy")),
    "monna": ("monna", {}, ("byzfl", "byzpy")),
    "cge": ("cge", {}, ("byzpy",)),
    "caf": ("caf", {}, ("byzfl", "byzpy")),
    "arc": ("arc(avg)", {}, ("byzfl", "byzpy")),
    "clip": ("clip(avg)", {"clip": {"tau": 2.0}}, ("byzfl", "byzpy")),
}


def _ftjax(rule, f, m):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  from ftjax import aggregators as agg_lib

  if rule == "nnm":
    fn = jax.jit(lambda x: (agg_lib.nearest_neighbour_mix(x, f), None))
  else:
    if rule in AGREEMENT:
      spec, options, _ = AGREEMENT[rule]
      agg = agg_lib.make_aggregator(spec, f, options=options)
    else:
      agg = {"krum": lambda: agg_lib.krum(f), "multikrum": lambda: agg_lib.multikrum(f, m),
             "cwtm": lambda: agg_lib.cwtm(f), "cwmed": lambda: agg_lib.cwmed(f=f)}[rule]()
    fn = jax.jit(lambda x: (lambda out, diag: (out, diag.get("krum_selected")))(*agg(x)))

  def prepare(x):
    return jnp.asarray(x)

  def call(x):
    return jax.block_until_ready(fn(x))

  def result(res):
    out, selected = res
    extra = {} if selected is None else {"selected": np.flatnonzero(np.asarray(selected))}
    return np.asarray(out), extra

  return prepare, call, result


def _byzfl_rule(rule, f):
  """ByzFL's function of the [W, d] tensor for ``rule``."""
  # byzfl/__init__ imports its benchmark package (torchvision); the rules
  # themselves do not need it, so the package is entered without running it.
  import importlib.util  # pylint: disable=g-import-not-at-top
  import types
  spec = importlib.util.find_spec("byzfl")
  pkg = types.ModuleType("byzfl")
  pkg.__path__ = list(spec.submodule_search_locations)
  sys.modules["byzfl"] = pkg
  from byzfl import aggregators as fa  # pylint: disable=g-import-not-at-top
  return {"krum": lambda: fa.Krum(f=f), "multikrum": lambda: fa.MultiKrum(f=f),
          "nnm": lambda: fa.NNM(f=f), "cwtm": lambda: fa.TrMean(f=f),
          "cwmed": lambda: fa.Median(), "avg": fa.Average,
          "meamed": lambda: fa.Meamed(f=f),
          "gm_zero_3": lambda: fa.GeometricMedian(nu=0.1, T=3),
          # ByzFL's centred clipping starts each call from the previous call's
          # output (ftjax's init="previous"): a fresh one per call starts from
          # zero, as the first call of a run does.
          "cclip_zero_1": lambda: lambda x: fa.CenteredClipping(L=1, tau=10.0)(x),
          "mda": lambda: fa.MDA(f=f), "smea": lambda: fa.SMEA(f=f),
          "monna": lambda: fa.MoNNA(f=f, idx=0), "caf": lambda: fa.CAF(f=f),
          "arc": lambda: _mean_of_rows(fa.ARC(f=f)),
          "clip": lambda: _mean_of_rows(fa.Clipping(c=2.0))}[rule]()


def _byzpy_rule(rule, f, m):
  """byzpy's function of the list of W per-worker tensors for ``rule``."""
  import torch  # pylint: disable=g-import-not-at-top
  from byzpy import pre_aggregators as pre
  from byzpy.aggregators import coordinate_wise as cw
  from byzpy.aggregators import geometric_wise as gw
  from byzpy.aggregators import norm_wise as nw
  pres = {"nnm": lambda: pre.NearestNeighborMixing(f=f), "arc": lambda: pre.ARC(f=f),
          "clip": lambda: pre.Clipping(threshold=2.0)}
  if rule in pres:
    p = pres[rule]()
    rows = lambda xs: torch.stack(list(p.pre_aggregate(xs)))
    return rows if rule == "nnm" else lambda xs: rows(xs).mean(0)
  return {"krum": lambda: gw.Krum(f=f), "multikrum": lambda: gw.MultiKrum(f=f, q=m),
          "cwtm": lambda: cw.CoordinateWiseTrimmedMean(f=f),
          "cwmed": lambda: cw.CoordinateWiseMedian(),
          "meamed": lambda: cw.MeanOfMedians(f=f),
          "gm_median_tol": lambda: gw.GeometricMedian(tol=1e-6, max_iter=256, eps=1e-12,
                                                      init="median"),
          "cclip_mean_10": lambda: nw.CenteredClipping(c_tau=10.0, M=10, init="mean"),
          "mda": lambda: gw.MinimumDiameterAveraging(f=f), "smea": lambda: gw.SMEA(f=f),
          "monna": lambda: gw.MoNNA(f=f, reference_index=0),
          "cge": lambda: nw.ComparativeGradientElimination(f=f),
          "caf": lambda: nw.CAF(f=f)}[rule]().aggregate


def _peer(lib, rule, f, m):
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(2)
  if lib == "byzfl":
    method = _byzfl_rule(rule, f)
    prepare = torch.from_numpy
  else:
    method = _byzpy_rule(rule, f, m)

    def prepare(x):  # byzpy takes a sequence of per-worker tensors
      return list(torch.unbind(torch.from_numpy(x), 0))

  def call(x):
    with torch.no_grad():
      return method(x)

  def result(res):
    return res.numpy(), {}

  return prepare, call, result


def _mean_of_rows(pre_aggregator):
  """A ByzFL pre-aggregator followed by the mean of the rows it returns (a copy of the input)."""
  return lambda x: pre_aggregator(x.clone()).mean(0)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--lib", required=True, choices=["ftjax", "byzfl", "byzpy"])
  p.add_argument("--rule", required=True, choices=list(TIMED_RULES) + list(AGREEMENT))
  p.add_argument("--f", type=int, required=True)
  p.add_argument("--m", type=int, default=None)
  p.add_argument("--input", required=True)
  p.add_argument("--output", required=True)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--budget_s", type=float, default=3.0,
                 help="Fewer timed calls when one call is slow.")
  a = p.parse_args()
  load = os.getloadavg()[0]
  if a.lib == "ftjax":
    prepare, call, result = _ftjax(a.rule, a.f, a.m)
  else:
    prepare, call, result = _peer(a.lib, a.rule, a.f, a.m)
  x = prepare(np.load(a.input))
  t0 = time.perf_counter()
  res = call(x)  # warm-up (compiles ftjax's function)
  first = time.perf_counter() - t0
  times = []
  while True:
    t0 = time.perf_counter()
    res = call(x)
    times.append(time.perf_counter() - t0)
    # The first timed call sets how many follow within the budget.
    if len(times) >= max(1, min(a.reps, int(a.budget_s / times[0]))):
      break
  out, extra = result(res)
  np.savez(a.output, out=out, **extra)
  print(json.dumps({"times": times, "first": first, "load": load}))


if __name__ == "__main__":
  main()
