"""Robust aggregators: base rules, meta- and pre-aggregators over worker rows.

An aggregator reduces W worker updates to one. Updates are any pytree whose
leaves share a leading worker axis W (e.g. a params pytree stacked by
``jax.vmap``); norms and distances are global over all leaves, and nothing is
flattened into one big matrix. Rules compose as functions::

    rule = ctma(cwtm(f=4))
    aggregate, diagnostics = rule(updates, key)      # works under jit and vmap

Base rules (:mod:`.base`): :func:`avg`, :func:`cwmed`, :func:`cwtm`, :func:`meamed`,
:func:`gm`, :func:`krum`, :func:`multikrum`, :func:`centered_clipping`; the
peers' rules registered by name (:mod:`.subsets`: bulyan, mda, smea, monna, cge,
caf; :mod:`.filters`: dnc, signguard, clustering, clipped_clustering, flame; :mod:`.trust`:
fltrust, which also reads the server's own update, ``rule(updates, key, server=g0)``).
Meta- and pre-aggregators wrap any rule: :func:`ctma`, :func:`nnm`,
:func:`nnm_ctma`, :func:`bucketing`, :func:`clip`, :func:`arc` (:mod:`.meta`); they also wrap
a user-written function (see :func:`rule`), e.g. ``ctma(my_fn, f=2)``.

Weighted versions of avg, cwmed, cwtm, gm and ctma (:mod:`.weighted`) take a
nonnegative weight per row through the same objects, ``rule(updates, key,
weights=w)``; equal weights give the unweighted result exactly.

The same rules have a string spelling for configs and the command line::

    rule = make_aggregator("ctma(cwtm)", f=4, num_workers=17)

Spec grammar: ``rule`` or ``meta(spec)``, nested freely, e.g. ``"cwtm"``,
``"ctma(cwtm)"``, ``"bucketing(cwmed)"``, ``"nnm+ctma(cwtm)"``, ``"clip(gm)"``,
``"arc(ctma(cwtm))"``. Names are resolved through :data:`AGGREGATORS`,
:data:`META_AGGREGATORS` and :data:`ALIASES` (``rfa`` = ``gm``); the default
options of every rule are its builder's keyword defaults, listed in
:data:`DEFAULT_OPTIONS`. Your own rule is one function and :func:`register`
(:mod:`.core`).

Faulty rows. A worker may send NaN or +-inf. Distance-based rules treat a row
with any non-finite coordinate as infinitely far away; coordinate-wise rules
order NaN as +inf and trim it like any extreme value; means that should drop a
row skip it (``0 * inf`` would be NaN). With at most f such rows every rule
here except ``avg`` returns a finite output. ``avg`` is the plain mean and is
not robust.

Kernels. The rules are written in plain JAX over the worker-axis primitives of
:mod:`ftjax.kernels.rows` (means, order statistics, trimmed sums, row
distances, Gram matrices, fusion barriers). An aggregator's ``kernels`` field
chooses their implementation while it runs (see :mod:`ftjax.kernels`). Every
sum over coordinates goes through ``rows.sqdist``, ``rows.gram`` or
``rows.coordinate_sum``, so the same rules run on coordinate slices of the
rows, one per device (``ftjax.sharding.shard_aggregator``).
"""
# The package: core (Aggregator, tables, registration, specs), maths (pytree
# helpers), base and meta (the built-in rules), subsets and filters (the peers'
# rules). Importing the rule modules fills the tables.
import types as _types

from ftjax.aggregators import base as _base_rules  # noqa: F401
from ftjax.aggregators import filters as _filters  # noqa: F401
from ftjax.aggregators import meta as _meta_rules  # noqa: F401
from ftjax.aggregators import subsets as _subsets  # noqa: F401
from ftjax.aggregators import trust as _trust  # noqa: F401
from ftjax.aggregators import weighted
from ftjax.aggregators.base import avg, centered_clip, centered_clipping, cwmed, cwtm, gm
from ftjax.aggregators.base import krum, meamed, multikrum
from ftjax.aggregators.core import AGGREGATORS, ALIASES, META_AGGREGATORS, Aggregator
from ftjax.aggregators.core import RuleInfo, canonical
from ftjax.aggregators.optax_adapter import AggregatorState
from ftjax.aggregators.core import options_of, register, register_table, rule, shipped
from ftjax.aggregators.specs import make_aggregator, spec_layers
from ftjax.aggregators.meta import arc, bucketing, clip, ctma, nearest_neighbour_mix, nnm
from ftjax.aggregators.meta import nnm_ctma

DEFAULT_OPTIONS = _types.MappingProxyType(
    {name: info.options for name, info in {**AGGREGATORS, **META_AGGREGATORS}.items()})
"""Rule name -> option name -> default, for the rules of the package (e.g. to write a
config); :func:`options_of` also knows the ones registered later."""

__all__ = [
    "AGGREGATORS", "ALIASES", "META_AGGREGATORS", "DEFAULT_OPTIONS", "Aggregator",
    "AggregatorState", "RuleInfo", "arc", "avg", "bucketing", "canonical", "centered_clip",
    "centered_clipping", "clip", "ctma", "cwmed", "cwtm", "gm", "krum", "make_aggregator",
    "meamed", "multikrum", "nearest_neighbour_mix", "nnm", "nnm_ctma", "options_of",
    "register", "register_table", "rule", "shipped", "spec_layers", "weighted",
]
