"""Data poisoning by the Byzantine workers: label flipping and the backdoor trigger.

An attack that poisons data (``lf``, ``backdoor``) carries a poisoning object
with one method, ``poison(images, labels, num_classes, batch_size)``, that the
round applies to the Byzantine workers' minibatches before they compute their
updates (``ftjax.round._poison``), on the raw uint8 pixels. Its
workers then send what their honest estimator gives on the poisoned data.

The backdoor (BadNets, Gu et al. 2017; in federated learning Bagdasaryan et
al. 2020) stamps a square of max-intensity pixels (the trigger) into a corner
of a fraction of each poisoned minibatch and sets those labels to the target
class; its effect is measured by the attack success rate (:func:`asr_counts`),
the fraction of triggered test images of another class that the model puts in
the target class.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

POSITIONS = ("bottom_right", "bottom_left", "top_right", "top_left")
"""The corners a trigger can sit in."""


def flip_labels(labels: jax.Array, num_classes: int) -> jax.Array:
  """The label-flipping map of the ``lf`` attack: ``y -> (C - 1) - y``.

  Args:
    labels: integer class labels in ``[0, C)``, any shape.
    num_classes: C.

  Returns:
    The flipped labels, same shape and dtype.
  """
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
      or num_classes < 2:
    raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}.")
  return (num_classes - 1 - labels).astype(labels.dtype)


@dataclasses.dataclass(frozen=True)
class LabelFlip:
  """``lf``: every label y of a Byzantine worker becomes (C - 1) - y; images unchanged."""

  def poison(self, images, labels, num_classes: int, batch_size: int):
    del batch_size
    return images, flip_labels(labels, num_classes)


@dataclasses.dataclass(frozen=True)
class Trigger:
  """The backdoor's trigger: a ``size`` x ``size`` square of pixel value 255 in a corner.

  Attributes:
    size: the square's side in pixels.
    position: the corner, one of :data:`POSITIONS`.
    target: the class the poisoned examples are labelled with.
    fraction: the share of each poisoned minibatch that carries the trigger:
      its first floor(fraction * b) examples (a minibatch is a random draw, so
      these are a random subset).
  """
  size: int = 3
  position: str = "bottom_right"
  target: int = 0
  fraction: float = 1.0

  def stamp(self, images: jax.Array) -> jax.Array:
    """``images`` (uint8 [..., H, W, C]) with the trigger stamped in every image."""
    h, w = images.shape[-3:-1]
    rows = slice(h - self.size, h) if self.position.startswith("bottom") else slice(0, self.size)
    cols = slice(w - self.size, w) if self.position.endswith("right") else slice(0, self.size)
    return images.at[..., rows, cols, :].set(jnp.asarray(255, images.dtype))

  def poisoned_count(self, batch_size: int) -> int:
    """Examples of a minibatch of ``batch_size`` that carry the trigger."""
    return int(self.fraction * batch_size + 1e-9)  # floor, forgiving 0.29 * 100 = 28.99..

  def poison(self, images, labels, num_classes: int, batch_size: int):
    """The first floor(fraction * b) examples of every minibatch of b stamped and relabelled.

    Args:
      images: uint8 [..., n, H, W, C], n a multiple of ``batch_size`` (K local
        minibatches of b side by side).
      labels: int [..., n].
      num_classes: C (the target must lie below it; :meth:`check` refused otherwise).
      batch_size: b.
    """
    del num_classes
    n = labels.shape[-1]
    chosen = (jnp.arange(n) % batch_size) < self.poisoned_count(batch_size)
    images = jnp.where(chosen[:, None, None, None], self.stamp(images), images)
    return images, jnp.where(chosen, jnp.asarray(self.target, labels.dtype), labels)

  def check(self, image_shape, num_classes: int, batch_size: int) -> None:
    """Refuses, in one line, a trigger that does not fit the images, a target that is no
    class, or a fraction that poisons no example of a minibatch."""
    h, w = image_shape[:2]
    if self.size > min(h, w):
      raise ValueError(f"attack.options.backdoor.size={self.size}: the trigger does not fit "
                       f"images of {h}x{w} pixels; use size <= {min(h, w)}.")
    if self.target >= num_classes:
      raise ValueError(f"attack.options.backdoor.target={self.target} is not a class of this "
                       f"dataset (0 .. {num_classes - 1}).")
    if self.poisoned_count(batch_size) == 0:
      raise ValueError(f"attack.options.backdoor.fraction={self.fraction} poisons no example "
                       f"of a minibatch of {batch_size}; raise it to at least "
                       f"{1 / batch_size:.3g}.")


def asr_counts(logits: jax.Array, labels: jax.Array, target: int, mask: jax.Array):
  """The attack success rate's numerator and denominator on triggered images.

  Args:
    logits: [M, C] the model's logits on the triggered images.
    labels: int [M] their true labels.
    target: the backdoor's target class.
    mask: bool [M], False on padding.

  Returns:
    (hits, eligible): the triggered images whose true label is not the target
    that the model classifies as the target, and those images; the rate is
    hits / eligible.
  """
  eligible = mask & (labels != target)
  hits = eligible & (jnp.argmax(logits, -1) == target)
  return hits.sum(), eligible.sum()
